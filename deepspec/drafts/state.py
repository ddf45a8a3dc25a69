"""What a draft keeps while it drafts: the ragged KV cache, the drafted block
(:class:`Proposal`) and sampling from draft logits.

Nothing here knows the draft's weights or config; the drafters (:mod:`deepspec.drafts.dflash`,
:mod:`~deepspec.drafts.dspark`, :mod:`~deepspec.drafts.eagle3`) build on it and the
decoders (:mod:`deepspec.eval.decode`, :mod:`~deepspec.eval.batch_decode`) read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    """Per-layer key/value buffers ``[B, capacity, KVH, hd]`` with a length per row.

    Rows may hold different numbers of positions (batched decoding accepts different
    numbers of tokens per row); position ``j`` of row ``b`` is valid iff
    ``min_position <= j < lengths[b]`` and, with a sliding ``window`` ``W > 0``, the query
    at position ``lengths[b] + k`` sees it only if ``lengths[b] + k - j < W``.

    With a window the cache keeps only what some row can still see: :meth:`trim` drops
    positions below ``min(lengths) - W`` and buffer index ``i`` then holds position
    ``offset + i``. :meth:`view` and :meth:`mask` cover positions ``offset .. upto-1``.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        min_position: int = 0,
        window: int = 0,
    ) -> None:
        self.k = [
            torch.zeros(batch, 0, num_kv_heads, head_dim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        self.v = [t.clone() for t in self.k]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.min_position = min_position
        self.window = window
        self.offset = 0

    def _ensure(self, capacity: int) -> None:
        capacity -= self.offset
        have = self.k[0].shape[1]
        if capacity <= have:
            return
        new = max(capacity, 2 * have, 64)
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                grown = t.new_zeros(t.shape[0], new, *t.shape[2:])
                grown[:, :have] = t
                store[i] = grown

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, counts: torch.Tensor
    ) -> None:
        """Write ``k/v`` ``[B, T, KVH, hd]`` at positions ``start[b] + i`` for ``i < counts[b]``."""
        T = k.shape[1]
        pos = start[:, None] + torch.arange(T, device=k.device)  # [B, T]
        valid = torch.arange(T, device=k.device)[None] < counts[:, None]
        self._ensure(int(pos[valid].max()) + 1 if valid.any() else 0)
        rows = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(pos)
        at = pos[valid] - self.offset
        if valid.any() and int(at.min()) < 0:
            raise ValueError(f"position {int(pos[valid].min())} was trimmed from the cache (window)")
        self.k[layer][rows[valid], at] = k[valid].to(self.k[layer].dtype)
        self.v[layer][rows[valid], at] = v[valid].to(self.v[layer].dtype)

    def trim(self) -> None:
        """Drop the positions no row can see any more (only with a window); amortised: the
        buffers move once at least ``max(W, 64)`` positions can go."""
        if self.window <= 0 or self.lengths.numel() == 0:
            return
        drop = int(self.lengths.min()) - self.window - self.offset
        if drop < max(self.window, 64):
            return
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                store[i] = t[:, drop:].clone()
        self.offset += drop

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Empty the rows ``rows`` (a ``[B]`` bool mask) for new sequences; trimmed positions
        come back first, since a new sequence starts at position 0."""
        self.lengths[rows] = 0
        if self.offset and bool(rows.any()):
            for store in (self.k, self.v):
                for i, t in enumerate(store):
                    store[i] = torch.cat([t.new_zeros(t.shape[0], self.offset, *t.shape[2:]), t], 1)
            self.offset = 0

    def view(self, layer: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``k, v`` as ``[B, KVH, upto - offset, hd]`` (positions ``offset .. upto-1``)."""
        self._ensure(upto)
        n = upto - self.offset
        return (self.k[layer][:, :n].transpose(1, 2), self.v[layer][:, :n].transpose(1, 2))

    def mask(self, upto: int, queries: int = 1) -> torch.Tensor:
        """``[B, queries, upto - offset]`` bool: which cached positions ``offset .. upto-1``
        the queries at positions ``lengths[b] + k`` (``k < queries``) see."""
        lengths = self.lengths[:, None, None]
        j = torch.arange(self.offset, upto, device=lengths.device)[None, None]
        visible = (j >= self.min_position) & (j < lengths)
        if self.window > 0:
            k = torch.arange(queries, device=lengths.device)[None, :, None]
            visible = visible & (lengths + k - j < self.window)
        return visible.expand(-1, queries, -1)


def sample_tokens(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample from ``logits`` [..., V]; returns ``tokens`` [...] and the fp32 ``probs`` [..., V]
    they were drawn from (one-hot at temperature 0)."""
    logits = logits.float()
    if not torch.isfinite(logits).any(-1).all() or torch.isnan(logits).any():
        raise FloatingPointError("draft logits contain NaN or no finite value")
    if temperature == 0:
        tokens = logits.argmax(-1)
        probs = torch.zeros_like(logits).scatter_(-1, tokens.unsqueeze(-1), 1.0)
        return tokens, probs
    probs = torch.softmax(logits / temperature, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    return tokens, probs


@dataclass
class Proposal:
    """A drafted block. ``tokens`` [B, k] target ids; ``probs`` [B, k, V] the draft
    distribution each token was sampled from, over the *target* vocabulary (zero outside a
    pruned draft vocabulary); ``logits`` [B, k, V_draft] raw draft logits over the draft
    vocabulary; ``confidence`` [B, k] (DSpark: P(token k survives | tokens < k did)) or None."""

    tokens: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor
    confidence: torch.Tensor | None = None
