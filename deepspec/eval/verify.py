"""Verification of a drafted block against the target (docs/DESIGN.md §3), batched over requests.

Notation: ``p_t`` is the target's distribution, ``p_d`` the draft's. A row proposes
``x_0 .. x_{L-1}`` (``L = draft_lengths[b] <= k``); the target scored the prefix plus each
drafted token, so it gives ``k + 1`` distributions per row (the last one, at position ``L``,
is where the bonus token comes from when every drafted token survives).

* Greedy (temperature 0): accept while ``x_j == argmax p_t[j]``; the next token is the
  target's argmax at the first mismatch, or at position ``L`` (the bonus).
* Sampling: accept ``x_j`` with probability ``min(1, p_t[j](x_j) / p_d[j](x_j))``, stop at
  the first rejection and resample it from ``norm(max(0, p_t[j] - p_d[j]))``; if all ``L``
  are accepted, draw the bonus from ``p_t[L]``. The emitted tokens follow ``p_t`` exactly.

Randomness: :func:`verify_sampling` uses exactly ``k + 1`` uniforms per row, ``uniforms[b]``
(``k`` acceptance tests, then one inverse-CDF draw for the next token). Row ``b``'s result
depends only on row ``b``'s inputs and ``uniforms[b]``, so a batched call equals per-row calls
given the same rows of ``uniforms``; with a ``generator`` the uniforms are drawn as one
``torch.rand((B, k + 1), dtype=float64)`` call, so a fixed seed reproduces the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from deepspec.errors import NumericalError

__all__ = [
    "VerifyResult",
    "check_logits",
    "probs_from_logits",
    "residual_probs",
    "sample_from_probs",
    "verify_greedy",
    "verify_sampling",
]

_SUM_TOLERANCE = 1e-3  # how far a probability row may sum from 1 (fp32 softmax over 150k tokens)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of verifying one block per row."""

    num_accepted: Tensor  # [B] long: leading draft tokens accepted, in 0..draft_lengths[b]
    next_token: Tensor  # [B] long: correction at the first rejection, else the bonus token
    draft_tokens: Tensor  # [B, k] long: the verified proposal

    @property
    def num_emitted(self) -> Tensor:
        """``[B]`` long: tokens this round adds to each row (accepted + 1)."""
        return self.num_accepted + 1

    def emitted_tokens(self, pad_id: int = -1) -> Tensor:
        """``[B, k + 1]`` long: row ``b`` holds ``num_emitted[b]`` tokens, then ``pad_id``."""
        batch, k = self.draft_tokens.shape
        positions = torch.arange(k + 1, device=self.draft_tokens.device)
        out = torch.full((batch, k + 1), pad_id, dtype=torch.long, device=self.draft_tokens.device)
        keep = positions[:k] < self.num_accepted[:, None]  # [B, k] the accepted prefix
        out[:, :k] = torch.where(keep, self.draft_tokens.long(), out[:, :k])
        out.scatter_(1, self.num_accepted[:, None], self.next_token[:, None])
        return out

    def emitted_lists(self) -> list[list[int]]:
        """Per row: the accepted draft tokens followed by ``next_token``."""
        return [
            row[: int(n) + 1].tolist()
            for row, n in zip(self.emitted_tokens(), self.num_accepted, strict=True)
        ]


def probs_from_logits(logits: Tensor, temperature: float) -> Tensor:
    """``softmax(logits / temperature)`` over the last dim; temperature 0 → one-hot argmax.

    ``logits``: ``[..., V]``. Returns ``[..., V]`` in float32 (float64 if given float64).
    Raises :class:`NumericalError` for NaN, ``+inf`` or all ``-inf`` rows (``-inf`` entries
    are fine: they mark impossible tokens).
    """
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    check_logits(logits)
    x = logits if logits.dtype == torch.float64 else logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).to(x.dtype)
    probs = torch.softmax(x / temperature, dim=-1)
    if not torch.isfinite(probs).all():
        raise NumericalError(f"softmax(logits / {temperature}) overflowed; use a larger temperature")
    return probs


def check_logits(logits: Tensor, name: str = "logits") -> None:
    """Raise :class:`NumericalError` if ``logits`` ``[..., V]`` has NaN, +inf or an all -inf row."""
    if torch.isnan(logits).any():
        raise NumericalError(f"{name} contain NaN; the model produced invalid scores")
    if torch.isposinf(logits).any():
        raise NumericalError(f"{name} contain +inf; the model produced invalid scores")
    if logits.numel() and torch.isneginf(logits).all(-1).any():
        raise NumericalError(f"a row of {name} is all -inf, so no token is possible")


def residual_probs(target_probs: Tensor, draft_probs: Tensor) -> Tensor:
    """``norm(max(0, p_t - p_d))`` over the last dim (``[..., V]``), where rejections resample.

    Where the residual has no mass (``p_t <= p_d`` everywhere, i.e. ``p_t == p_d``, so a
    rejection has probability 0) it falls back to ``p_t``, so every row is a distribution.
    """
    residual = (target_probs - draft_probs).clamp_min(0)  # max(0, p_t - p_d)
    mass = residual.sum(-1, keepdim=True)
    tiny = torch.finfo(residual.dtype).tiny
    fallback = target_probs / target_probs.sum(-1, keepdim=True).clamp_min(tiny)
    return torch.where(mass > 0, residual / mass.clamp_min(tiny), fallback)


def sample_from_probs(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw: ``probs`` ``[B, V]`` (non-negative, positive mass), ``uniforms`` ``[B]`` in [0, 1).

    Returns ``[B]`` long ids in ``[0, V)``; a token with zero probability is never drawn.
    """
    cdf = probs.double().cumsum(-1)  # [B, V]
    level = (uniforms.double() * cdf[:, -1]).unsqueeze(-1)  # [B, 1]
    ids = torch.searchsorted(cdf, level, right=True).squeeze(-1)  # first i with cdf[i] > level
    # Rounding can put the level at the top of the CDF: take the last token with mass.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.where(ids < probs.shape[-1], ids, last)


def verify_greedy(
    draft_tokens: Tensor, target_logits: Tensor, draft_lengths: Tensor | None = None
) -> VerifyResult:
    """Greedy verification (temperature 0).

    ``draft_tokens`` ``[B, k]``; ``target_logits`` ``[B, k + 1, V]`` (position ``j`` scores the
    token after prefix + ``x_0 .. x_{j-1}``); ``draft_lengths`` ``[B]`` in ``0..k`` (default ``k``).
    """
    batch, k = _check_tokens(draft_tokens, target_logits)
    lengths = _lengths(draft_lengths, batch, k, draft_tokens.device)
    check_logits(target_logits, "target_logits")
    best = target_logits.argmax(-1)  # [B, k + 1] target's greedy token at each position
    in_block = torch.arange(k, device=draft_tokens.device) < lengths[:, None]  # [B, k]
    match = (draft_tokens == best[:, :k]) & in_block  # x_j == argmax p_t[j]
    num_accepted = match.long().cumprod(-1).sum(-1)  # [B] length of the matching prefix
    next_token = best.gather(1, num_accepted[:, None]).squeeze(1)  # argmax p_t at the stop
    return VerifyResult(num_accepted, next_token, draft_tokens)


def verify_sampling(
    draft_tokens: Tensor,
    draft_probs: Tensor,
    target_probs: Tensor,
    draft_lengths: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    uniforms: Tensor | None = None,
) -> VerifyResult:
    """Speculative-sampling verification; the emitted tokens are distributed as under ``p_t``.

    ``draft_tokens`` ``[B, k]`` (each ``x_j`` drawn from ``p_d[j]``); ``draft_probs`` ``[B, k, V]``;
    ``target_probs`` ``[B, k + 1, V]``; ``draft_lengths`` ``[B]`` in ``0..k`` (default ``k``):
    positions ``>= draft_lengths[b]`` are ignored. ``uniforms`` ``[B, k + 1]`` in [0, 1) replaces
    drawing them from ``generator`` (see the module docstring for the guarantee).
    """
    batch, k = _check_tokens(draft_tokens, target_probs)
    vocab = target_probs.shape[-1]
    if draft_probs.shape != (batch, k, vocab):
        raise ValueError(
            f"draft_probs must be [B, k, V] = {[batch, k, vocab]}, got {list(draft_probs.shape)}"
        )
    device = draft_tokens.device
    lengths = _lengths(draft_lengths, batch, k, device)
    _check_probs(target_probs, "target_probs", torch.ones(batch, k + 1, dtype=torch.bool, device=device))
    in_block = torch.arange(k, device=device) < lengths[:, None]  # [B, k]
    _check_probs(draft_probs, "draft_probs", in_block)
    if uniforms is None:
        uniforms = torch.rand(batch, k + 1, generator=generator, dtype=torch.float64, device=device)
    elif uniforms.shape != (batch, k + 1):
        raise ValueError(f"uniforms must be [B, k + 1] = {[batch, k + 1]}, got {list(uniforms.shape)}")

    x = draft_tokens.long().unsqueeze(-1)  # [B, k, 1]
    p_t = target_probs[:, :k].gather(-1, x).squeeze(-1)  # [B, k] target's probability of x_j
    p_d = draft_probs.gather(-1, x).squeeze(-1)  # [B, k] draft's probability of x_j
    # accept x_j iff u_j < p_t(x_j) / p_d(x_j): probability min(1, p_t / p_d)
    accept = (uniforms[:, :k] * p_d < p_t) & in_block
    num_accepted = accept.long().cumprod(-1).sum(-1)  # [B] stop at the first rejection

    rows = torch.arange(batch, device=device)
    stop_t = target_probs[rows, num_accepted]  # [B, V] p_t at the stop position
    stop_d = draft_probs[rows, num_accepted.clamp(max=k - 1)] if k else torch.zeros_like(stop_t)
    # rejected: resample from norm(max(0, p_t - p_d)); all accepted: bonus token from p_t
    all_accepted = (num_accepted == lengths)[:, None]
    next_dist = torch.where(all_accepted, stop_t, residual_probs(stop_t, stop_d))
    next_token = sample_from_probs(next_dist, uniforms[:, k])
    return VerifyResult(num_accepted, next_token, draft_tokens)


def _check_tokens(draft_tokens: Tensor, target: Tensor) -> tuple[int, int]:
    if draft_tokens.dim() != 2 or draft_tokens.dtype.is_floating_point:
        raise ValueError(
            f"draft_tokens must be an integer [B, k] tensor, got {draft_tokens.dtype} {list(draft_tokens.shape)}"
        )
    batch, k = draft_tokens.shape
    if target.dim() != 3 or target.shape[:2] != (batch, k + 1):
        raise ValueError(
            f"target scores must be [B, k + 1, V] with B={batch}, k={k}; got {list(target.shape)}"
        )
    if draft_tokens.numel() and (draft_tokens.min() < 0 or draft_tokens.max() >= target.shape[-1]):
        raise ValueError(f"draft_tokens must lie in [0, {target.shape[-1]})")
    return batch, k


def _lengths(draft_lengths: Tensor | None, batch: int, k: int, device: torch.device) -> Tensor:
    if draft_lengths is None:
        return torch.full((batch,), k, dtype=torch.long, device=device)
    lengths = torch.as_tensor(draft_lengths, device=device).long()
    if lengths.shape != (batch,):
        raise ValueError(f"draft_lengths must be [B] = [{batch}], got {list(lengths.shape)}")
    if batch and (lengths.min() < 0 or lengths.max() > k):
        raise ValueError(f"draft_lengths must lie in 0..{k}, got {lengths.tolist()}")
    return lengths


def _check_probs(probs: Tensor, name: str, used: Tensor) -> None:
    """NaN/inf/negative anywhere, or a used row ``[B, n]`` not summing to 1 → NumericalError."""
    if not torch.isfinite(probs).all():
        raise NumericalError(f"{name} contain NaN or inf; the model produced invalid scores")
    if (probs < 0).any():
        raise NumericalError(f"{name} contain negative values; pass probabilities, not logits")
    bad = ((probs.sum(-1) - 1).abs() > _SUM_TOLERANCE) & used
    if bad.any():
        raise NumericalError(f"{name} rows must sum to 1; pass probabilities, not logits")
