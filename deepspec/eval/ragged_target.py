"""A target that serves several requests at once with ragged token counts (batched
speculative decoding; docs/DESIGN.md §4).

Every forward is *packed*: the new tokens of all requests form one sequence ``[1, N]``, so
the target's linear layers (most of its cost) run over exactly ``N = sum_r n_r`` tokens,
the quantity the prefix scheduler's ``SPS(B)`` table is indexed by. Only attention needs
the requests apart: it runs through a registered attention function that scatters the
packed queries of short feeds (drafts under verification, decode tokens) into ``[R, width]``
rows attending together, and lets each long feed (a prompt) attend on its own, each to its
request's own cache.

The cache holds, per layer, keys and values ``[R, KVH, capacity, hd]``; row ``r``'s
position ``p`` lives at column ``p``. ``lengths[r]`` counts the positions that count, so
cropping a request after a rejection only lowers its length: the next forward overwrites
the stale columns. The query of request ``r`` at position ``lengths[r] + t`` sees columns
``<= lengths[r] + t`` (and, on sliding-window layers, those within the window).

Features are read the same way as :class:`~deepspec.eval.target.HFTarget` reads them
(outputs of ``layer_ids``), unpacked per request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deepspec.data.target_features import capture_layers, find_decoder
from deepspec.errors import TargetError
from deepspec.eval.target import cache_argument

ATTENTION_NAME = "deepspec_ragged"


LONG = 16  # a row feeding more tokens than this (a prompt) attends on its own


@dataclass
class _Step:
    """Where the packed tokens of one forward go: token ``i`` belongs to row ``rows[i]``,
    is that row's ``slots[i]``-th new token and sits at position ``positions[i]``.

    Rows feeding at most ``LONG`` tokens (drafts under verification, decode tokens) attend
    together, their queries padded to ``width``; each longer row (a prompt being prefilled)
    attends on its own, so one prompt does not pad every other row to its length."""

    rows: Tensor  # [N] long
    slots: Tensor  # [N] long
    positions: Tensor  # [N] long
    starts: Tensor  # [R] long: each row's length before this forward
    short: Tensor  # [N] bool: the token's row feeds at most LONG tokens
    flat: Tensor  # [N_short] long: where each short token's query goes in [R * width]
    long_rows: list[tuple[int, int, int, int]]  # (row, first packed index, tokens, start) per long row
    width: int  # the most new tokens of one short row (at least 2)
    upto: int  # columns any query can see: max over rows of start + new tokens
    masks: dict[tuple, Tensor]

    def mask(self, window: int) -> Tensor:
        """``[R, 1, width, upto]`` bool for the short rows."""
        return self._mask(("short", window), self.starts, self.width, self.upto, window)[:, None]

    def long_mask(self, row: int, count: int, start: int, window: int) -> Tensor:
        """``[1, 1, count, start + count]`` bool for long row ``row``."""
        return self._mask((row, window), self.starts[row : row + 1], count, start + count, window)[:, None]

    def _mask(self, key: tuple, starts: Tensor, width: int, upto: int, window: int) -> Tensor:
        if key not in self.masks:
            q = starts[:, None, None] + torch.arange(width, device=starts.device)[None, :, None]
            j = torch.arange(upto, device=starts.device)[None, None]
            visible = j <= q
            if window > 0:
                visible = visible & (q - j < window)
            self.masks[key] = visible
        return self.masks[key]


class _RaggedCache:
    """Key/value storage for :class:`RaggedTarget`; the model calls :meth:`update` once per
    layer and forward (any transformers 5.x signature)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.step: _Step | None = None

    def _grow(self, layer: int, like: Tensor, capacity: int) -> None:
        old = self.keys.get(layer)
        have = 0 if old is None else old.shape[2]
        if capacity <= have:
            return
        size = max(capacity, 2 * have, 64)
        heads, dim = like.shape[1], like.shape[3]
        for store in (self.keys, self.values):
            grown = like.new_zeros(self.rows, heads, size, dim)
            if old is not None:
                grown[:, :, :have] = store[layer]
            store[layer] = grown

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        step = self.step
        self._grow(layer_idx, key_states, step.upto)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[step.rows, :, step.positions] = key_states[0].transpose(0, 1).to(k.dtype)
        v[step.rows, :, step.positions] = value_states[0].transpose(0, 1).to(v.dtype)
        return k[:, :, : step.upto], v[:, :, : step.upto]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.step.upto if self.step is not None else 0


def _ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over packed queries ``[1, H, N, hd]`` and per-row caches ``[R, KVH, S, hd]``."""
    step: _Step = kwargs["deepspec_step"]
    if kwargs.get("softcap") or getattr(module.config, "attn_logit_softcapping", None):
        raise TargetError("batched decoding does not support attention logit soft-capping (Gemma 2)")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None) or 0
    R, heads, dim = step.starts.shape[0], query.shape[1], query.shape[3]
    gqa = key.shape[1] != heads
    packed = query[0].transpose(0, 1)  # [N, H, hd]
    out = torch.empty_like(packed)
    if step.flat.numel():
        q = query.new_zeros(R * step.width, heads, dim)
        q[step.flat] = packed[step.short]
        q = q.view(R, step.width, heads, dim).transpose(1, 2)  # [R, H, width, hd]
        o = torch.nn.functional.scaled_dot_product_attention(
            q, key, value, attn_mask=step.mask(int(window)), scale=scaling, enable_gqa=gqa
        )  # [R, H, width, hd]
        out[step.short] = o.transpose(1, 2).reshape(R * step.width, heads, dim)[step.flat]
    for row, first, count, start in step.long_rows:
        o = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, first : first + count],
            key[row : row + 1, :, : start + count],
            value[row : row + 1, :, : start + count],
            attn_mask=step.long_mask(row, count, start, int(window)),
            scale=scaling,
            enable_gqa=gqa,
        )  # [1, H, count, hd]
        out[first : first + count] = o[0].transpose(0, 1)
    return out[None], None


def _register() -> None:
    from transformers import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, _ragged_attention)


@contextlib.contextmanager
def _attention(model: torch.nn.Module) -> Iterator[None]:
    """Route every attention module of ``model`` through :func:`_ragged_attention` while open."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    configs = [c for c in configs.values() if hasattr(c, "_attn_implementation")]
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = ATTENTION_NAME
        yield
    finally:
        for c, name in zip(configs, saved, strict=True):
            c._attn_implementation = name


class RaggedTarget:
    """An HF CausalLM serving ``rows`` requests; :meth:`forward` feeds any subset of them a
    ragged number of tokens in one packed forward."""

    def __init__(self, model: torch.nn.Module, layer_ids: Sequence[int], rows: int) -> None:
        _register()
        self.model = model.eval()
        self.base = find_decoder(model)
        self.layer_ids = list(layer_ids)
        self.rows = rows
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.device = next(model.parameters()).device
        self.lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.cache = _RaggedCache(rows)
        self._cache_arg = cache_argument(model)

    def reset(self, row: int | None = None) -> None:
        """Forget the cached positions of ``row`` (every row when ``None``)."""
        if row is None:
            self.lengths.zero_()
        else:
            self.lengths[row] = 0

    def crop(self, row: int, length: int) -> None:
        """Keep only the first ``length`` cached positions of ``row``."""
        self.lengths[row] = min(int(self.lengths[row]), length)

    @torch.inference_mode()
    def forward(
        self, feeds: Mapping[int, Tensor], features: bool = True
    ) -> dict[int, tuple[Tensor, Tensor | None]]:
        """Feed ``feeds[row]`` (``[n]`` token ids) after each row's cached positions in one
        packed forward; returns per row its ``logits`` ``[n, V]`` (fp32) and ``features``
        ``[n, L*d]`` (``None`` with ``features=False``). The positions join the cache."""
        rows = [r for r, t in feeds.items() if t.numel()]
        if not rows:
            return {}
        counts = torch.zeros(self.rows, dtype=torch.long, device=self.device)
        for r in rows:
            counts[r] = feeds[r].numel()
        tokens = torch.cat([feeds[r].to(self.device).view(-1) for r in rows])
        row_ids = torch.cat([torch.full((int(counts[r]),), r, device=self.device) for r in rows])
        slots = torch.cat([torch.arange(int(counts[r]), device=self.device) for r in rows])
        positions = self.lengths[row_ids] + slots
        long_rows, first = [], 0
        for r in rows:
            n = int(counts[r])
            if n > LONG:
                long_rows.append((r, first, n, int(self.lengths[r])))
            first += n
        width = max([2, *(int(counts[r]) for r in rows if int(counts[r]) <= LONG)])  # CPU SDPA:
        short = counts[row_ids] <= LONG  # ~3x slower for one query per row than for two
        step = _Step(
            rows=row_ids,
            slots=slots,
            positions=positions,
            starts=self.lengths.clone(),
            short=short,
            flat=(row_ids * width + slots)[short],
            long_rows=long_rows,
            width=width,
            upto=int((self.lengths + counts).max()),
            masks={},
        )
        self.cache.step = step
        capture = capture_layers(self.base, self.layer_ids) if features else contextlib.nullcontext({})
        try:
            with _attention(self.model), capture as captured:
                out = self.model(
                    input_ids=tokens[None],
                    position_ids=positions[None],
                    attention_mask=step.mask(0),  # 4-D: used as given; the real masks come per layer
                    use_cache=True,
                    deepspec_step=step,
                    **{self._cache_arg: self.cache},
                )
        finally:
            self.cache.step = None
        self.lengths += counts
        logits = out.logits[0].float()
        feats = torch.cat([captured[i] for i in self.layer_ids], dim=-1)[0] if features else None
        result, start = {}, 0
        for r in rows:
            n = int(counts[r])
            result[r] = (logits[start : start + n], None if feats is None else feats[start : start + n])
            start += n
        return result
