"""Losses and training metrics (DESIGN §2). Pure functions: they return terms and metrics;
the trainer reduces across ranks and logs.

Vocabulary-sized tensors are never materialised for a whole batch: rows go through the
LM head in chunks under activation checkpointing, so at most one chunk's
``[rows, V]`` logits exist at a time (recomputed in backward).

Block drafters (DFlash, DSpark), position weights ``w_k = exp(-k / loss_decay_gamma)``
over the contiguous valid prefix of each block:
``L = (α_ce Σ w·CE + α_tv Σ w·‖p_d − p_t‖₁ + α_conf Σ w·BCE(c_k, c*_k)) / Σ w``,
``c*_k = 1 − ½‖p_d − p_t‖₁`` (detached). Eagle3: soft cross-entropy to ``p_t`` per TTT
step, mean over valid positions, weighted by ``step_loss_decay^s``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backpropagate
    normalizer: torch.Tensor  # the weight sum(s) the loss was divided by (local unless given)
    metrics: dict[str, float] = field(default_factory=dict)


def chunked_rows(fn: Callable, inputs: list[torch.Tensor | None], chunk: int) -> list[torch.Tensor]:
    """Apply ``fn(*row_chunk)`` over the leading dim of ``inputs`` and concatenate its
    (small) outputs; checkpointed when gradients are on, so big intermediates are freed."""
    rows = inputs[0].shape[0]
    results: list[list[torch.Tensor]] = []
    for r0 in range(0, rows, chunk):
        part = [None if t is None else t[r0 : r0 + chunk] for t in inputs]
        if torch.is_grad_enabled():
            out = checkpoint(fn, *part, use_reentrant=False)
        else:
            out = fn(*part)
        results.append(list(out))
    return [torch.cat(cols) for cols in zip(*results)]


def position_weights(gamma: int, decay: float, device: torch.device | None = None) -> torch.Tensor:
    """``w_k = exp(-k / decay)`` for ``k = 0 .. gamma-1``."""
    return torch.exp(-torch.arange(gamma, dtype=torch.float64, device=device) / decay)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a / b.clamp(min=1e-12)


def block_loss(
    model,
    out,
    *,
    ce_alpha: float,
    l1_alpha: float,
    conf_alpha: float,
    decay_gamma: float,
    normalizer: torch.Tensor | None = None,
    chunk: int = 32,
) -> LossOutput:
    """Loss of a DFlash/DSpark :class:`BlockTrainOutput` ``out``.

    ``normalizer`` (the global Σw over ranks) defaults to the local Σw.
    """
    G = out.hidden.shape[-2]
    keep = out.keep.reshape(-1)
    hidden = out.hidden.reshape(-1, G, out.hidden.shape[-1])[keep]
    target_hidden = out.target_hidden.reshape(-1, G, out.target_hidden.shape[-1])[keep]
    targets = out.targets.reshape(-1, G)[keep]
    mask = out.eval_mask.reshape(-1, G)[keep]
    markov = None if out.markov is None else out.markov.reshape(-1, G, out.markov.shape[-1])[keep]
    w = position_weights(G, decay_gamma, hidden.device).to(_upcast(hidden).dtype) * mask  # [R, G]
    W = w.sum() if normalizer is None else normalizer

    def per_position(h, th, tgt, mk):
        logp_d = F.log_softmax(_upcast(model.block_logits(h, mk)), dim=-1)
        with torch.no_grad():
            p_t = torch.softmax(_upcast(model.lm_logits(th)), dim=-1)
        ce = -logp_d.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        l1 = (logp_d.exp() - p_t).abs().sum(-1)
        return ce, l1

    if hidden.shape[0] == 0:
        zero = out.hidden.sum() * 0.0
        return LossOutput(zero, W, {})
    ce, l1 = chunked_rows(per_position, [hidden, target_hidden, targets, markov], chunk)
    loss_sum = ce_alpha * (w * ce).sum() + l1_alpha * (w * l1).sum()
    accept = (1 - 0.5 * l1.detach()).clamp(0, 1)  # exact per-step acceptance probability
    metrics: dict[str, float] = {}
    conf_logits = out.confidence_logits
    if conf_logits is not None:
        conf_logits = _upcast(conf_logits.reshape(-1, G)[keep])
        bce = F.binary_cross_entropy_with_logits(conf_logits, accept, reduction="none")
        loss_sum = loss_sum + conf_alpha * (w * bce).sum()
        c = torch.sigmoid(conf_logits.detach())
        n = mask.sum().clamp(min=1)
        metrics["conf_loss"] = float(_safe_div((w * bce.detach()).sum(), w.sum()))
        metrics["conf_abs_err"] = float(((c - accept).abs() * mask).sum() / n)
        metrics["conf_bias"] = float(((c - accept) * mask).sum() / n)
        cum_bias = (torch.cumprod(c, -1) - torch.cumprod(accept, -1)) * mask
        metrics["conf_cumprod_bias"] = float(cum_bias.sum() / n)
    loss = loss_sum / W
    with torch.no_grad():
        metrics["ce"] = float(_safe_div((w * ce.detach()).sum(), w.sum()))
        metrics["l1"] = float(_safe_div((w * l1.detach()).sum(), w.sum()))
        per_pos = _safe_div((accept * mask).sum(0), mask.sum(0).float())  # [G]
        for k in range(G):
            metrics[f"accept_rate@{k + 1}"] = float(per_pos[k])
        metrics["tau_probabilistic"] = float(1 + torch.cumprod(per_pos, 0).sum())
        metrics["supervised_positions"] = float(mask.sum())
    return LossOutput(loss, W, metrics)


def eagle3_loss(
    model,
    out,
    *,
    step_loss_decay: float,
    normalizer: torch.Tensor | None = None,
    chunk: int = 1024,
) -> LossOutput:
    """Loss of an :class:`Eagle3TrainOutput`. ``normalizer`` [K]: global valid counts per step."""
    B, K, T, d = out.hidden.shape
    mask = out.mask.permute(1, 0, 2).reshape(K, -1)  # [K, B*T]
    counts = mask.sum(1).to(_upcast(out.hidden).dtype) if normalizer is None else normalizer

    def per_position(h, th, tgt):
        logp_d = F.log_softmax(_upcast(model.lm_logits(h)), dim=-1)
        with torch.no_grad():
            p_t = torch.softmax(_upcast(model.lm_logits(th)), dim=-1)
        soft_ce = -(p_t * logp_d).sum(-1)
        accept = torch.minimum(logp_d.detach().exp(), p_t).sum(-1)
        hit = (logp_d.detach().argmax(-1) == tgt).to(soft_ce.dtype)
        return soft_ce, accept, hit

    flat = lambda t: t.permute(1, 0, 2, *range(3, t.dim())).reshape(K * B * T, *t.shape[3:])  # noqa: E731
    soft_ce, accept, hit = chunked_rows(
        per_position, [flat(out.hidden), flat(out.target_hidden), flat(out.targets)], chunk
    )
    soft_ce, accept, hit = (x.view(K, B * T) for x in (soft_ce, accept, hit))
    m = mask.to(soft_ce.dtype)
    decay = torch.tensor([step_loss_decay**s for s in range(K)], device=m.device, dtype=m.dtype)
    per_step = (soft_ce * m).sum(1) / counts.clamp(min=1)
    loss = (decay * per_step).sum()
    metrics: dict[str, float] = {}
    with torch.no_grad():
        n = m.sum(1).clamp(min=1)
        for s in range(K):
            metrics[f"loss@{s + 1}"] = float((soft_ce[s] * m[s]).sum() / n[s])
            metrics[f"accuracy@{s + 1}"] = float((hit[s] * m[s]).sum() / n[s])
            metrics[f"accept_rate@{s + 1}"] = float((accept[s] * m[s]).sum() / n[s])
        rates = torch.tensor([metrics[f"accept_rate@{s + 1}"] for s in range(K)])
        metrics["tau_probabilistic"] = float(1 + torch.cumprod(rates, 0).sum())
        metrics["supervised_positions"] = float(m[0].sum())
    return LossOutput(loss, counts, metrics)
