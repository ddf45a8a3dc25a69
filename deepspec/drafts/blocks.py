"""Anchors and block-sparse attention for block drafters (DFlash, DSpark).

A block for anchor ``a`` holds positions ``a .. a+gamma-1``; its position ``k`` predicts
token ``a+1+k``. A block position attends to context positions ``j < a`` (target features)
and to every position of its own block. A context window ``W > 0`` is a standard sliding
window over positions, as the serving engines (llama.cpp, vLLM) apply it: slot ``k`` (at
position ``a+k``) sees context ``j`` only if ``a + k - j < W``, i.e. the newest ``W-1-k``
positions. All blocks of a sequence go through the draft in one pass:

* ``flex``: ``torch.nn.attention.flex_attention`` with a block mask (CUDA);
* ``sdpa``: exact dense boolean masks through SDPA, processed in chunks of anchors so the
  score tensor stays ``[chunk*gamma, S + chunk*gamma]`` per head (4k-token sequences with
  512 anchors fit in a few hundred MB). With a window the context keys of each block are
  gathered instead (``W-1`` of them, then its ``gamma`` block keys): a
  ``[gamma, W-1 + gamma]`` score tile per block, exact, and far smaller than the dense mask.
"""

from __future__ import annotations

import torch

from deepspec.drafts.layers import attend


def sample_anchors(
    loss_mask: torch.Tensor,
    num_anchors: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample anchors uniformly among valid positions ``a`` (``loss_mask[a] = loss_mask[a+1] = 1``).

    ``loss_mask`` [B, S]. Returns ``anchors`` [B, N] (sorted ascending per row) and ``keep``
    [B, N] (False for dummy anchors padding rows with too few valid positions), with
    ``N = min(num_anchors, max valid count over the batch)`` (at least 1).
    ``generator`` may be one generator per row: then a row's anchors depend only on its own
    generator and loss mask, not on the batch it is padded into.
    """
    lm = loss_mask.bool()
    valid = torch.zeros_like(lm)
    valid[:, :-1] = lm[:, :-1] & lm[:, 1:]
    counts = valid.sum(1)
    n = max(1, min(num_anchors, int(counts.max()) if counts.numel() else 0))
    # random keys; invalid positions pushed to the end, then take the n smallest
    if isinstance(generator, list | tuple):
        keys = torch.ones(lm.shape)
        last = torch.where(lm.any(1), lm.shape[1] - lm.flip(1).long().argmax(1), torch.zeros_like(counts))
        for b, g in enumerate(generator):
            keys[b, : int(last[b])] = torch.rand(int(last[b]), generator=g)
        keys = keys.to(lm.device)
    else:
        keys = torch.rand(lm.shape, generator=generator, device="cpu").to(lm.device)
    keys = torch.where(valid, keys, torch.full_like(keys, 2.0))
    order = keys.argsort(dim=1, stable=True)[:, :n]
    keep = torch.gather(valid, 1, order)
    anchors = torch.where(keep, order, torch.zeros_like(order))
    # sort real anchors ascending, dummies (anchor 0) last
    sort_key = torch.where(keep, anchors, torch.full_like(anchors, lm.shape[1]))
    idx = sort_key.argsort(dim=1)
    return torch.gather(anchors, 1, idx), torch.gather(keep, 1, idx)


def block_targets(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor, keep: torch.Tensor, gamma: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forcing views of each block.

    Returns ``prev_tokens`` [B, N, gamma] (token before each position: the anchor, then the
    ground truth), ``targets`` [B, N, gamma] (token ``a+1+k``), ``target_pos`` [B, N, gamma]
    (position ``a+k`` whose target hidden state gives p_t) and ``eval_mask`` [B, N, gamma]
    (the contiguous prefix of supervised, in-range targets of kept blocks).
    """
    B, S = input_ids.shape
    k = torch.arange(gamma, device=input_ids.device)
    pos = anchors[..., None] + k  # a + k
    in_range = pos + 1 < S
    gather = lambda t, p: torch.gather(t, 1, p.clamp(max=S - 1).flatten(1)).view(p.shape)  # noqa: E731
    prev_tokens = gather(input_ids, pos)
    targets = gather(input_ids, pos + 1)
    supervised = gather(loss_mask.long(), pos + 1).bool() & in_range
    eval_mask = supervised.long().cumprod(-1).bool() & keep[..., None]
    return prev_tokens, targets, pos.clamp(max=S - 1), eval_mask


def context_visible(
    j: torch.Tensor, anchors: torch.Tensor, window: int, slot: torch.Tensor | int = 0
) -> torch.Tensor:
    """May slot ``slot`` of the block at ``anchors`` see context position ``j``?
    (broadcasting; ``window`` 0 = all; otherwise the sliding window ``a + slot - j < W``)."""
    visible = j < anchors
    if window > 0:
        visible = visible & (anchors + slot - j < window)
    return visible


def _dense_block_attention(q, kb, vb, kc, vc, anchors, scale, chunk):
    """No window: each block sees every context position before its anchor."""
    B, N, H, G, hd = q.shape
    S = kc.shape[-2]
    outs = []
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        c = n1 - n0
        ctx_end = max(1, min(S, int(anchors[:, n0:n1].max())))  # later keys: seen by no query
        Q = q[:, n0:n1].permute(0, 2, 1, 3, 4).reshape(B, H, c * G, hd)
        Kb = kb[:, n0:n1].permute(0, 2, 1, 3, 4).reshape(B, -1, c * G, hd)
        Vb = vb[:, n0:n1].permute(0, 2, 1, 3, 4).reshape(B, -1, c * G, hd)
        K = torch.cat([kc[..., :ctx_end, :], Kb], dim=-2)
        V = torch.cat([vc[..., :ctx_end, :], Vb], dim=-2)
        j = torch.arange(ctx_end, device=q.device)
        ctx_mask = j[None, None] < anchors[:, n0:n1, None]  # every position before the anchor
        ctx_mask = ctx_mask.repeat_interleave(G, dim=1)  # [B, cG, ctx]
        blk = torch.arange(c, device=q.device).repeat_interleave(G)
        blk_mask = (blk[:, None] == blk[None, :]).expand(B, -1, -1)  # [B, cG, cG]
        mask = torch.cat([ctx_mask, blk_mask], dim=-1)[:, None]
        o = attend(Q, K, V, mask, scale)  # [B, H, cG, hd]
        outs.append(o.reshape(B, H, c, G, hd).permute(0, 2, 1, 3, 4))
    return torch.cat(outs, dim=1)


def _windowed_block_attention(q, kb, vb, kc, vc, anchors, scale, window):
    B, N, H, G, hd = q.shape
    KVH = kc.shape[1]
    n = max(1, window - 1)  # slot 0 sees the newest W-1 context positions, later slots fewer
    pos = anchors[..., None] - n + torch.arange(n, device=q.device)  # [B, N, n], all < a
    slot = torch.arange(G, device=q.device)[:, None]
    visible = (pos[:, :, None] >= 0) & context_visible(
        pos[:, :, None], anchors[..., None, None], window, slot
    )
    idx = pos.clamp(min=0).reshape(B, 1, N * n, 1).expand(B, KVH, N * n, hd)

    def keys(ctx, blk):  # [B, KVH, S, hd], [B, N, KVH, G, hd] -> [B*N, KVH, n + G, hd]
        near = torch.gather(ctx, 2, idx).view(B, KVH, N, n, hd).permute(0, 2, 1, 3, 4)
        return torch.cat([near, blk], dim=3).reshape(B * N, KVH, n + G, hd)

    mask = torch.cat([visible, visible.new_ones(B, N, G, G)], -1)
    o = attend(q.reshape(B * N, H, G, hd), keys(kc, kb), keys(vc, vb), mask.view(B * N, 1, G, -1), scale)
    return o.view(B, N, H, G, hd)


def recent_context_attention(
    q: torch.Tensor,
    kb: torch.Tensor,
    kc: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
    window: int = 0,
    recent: int = 8,
    max_blocks: int = 16,
) -> tuple[float, float]:
    """Does block slot 0 look at the newest context? For up to ``max_blocks`` kept blocks of
    the first sequence: slot 0's attention mass on the last ``recent`` visible context
    positions (mean over heads and blocks), and the mass uniform attention would put there.

    Shapes as in :func:`block_attention`. A draft that reads the target concentrates far
    above the uniform share; one that ignores it stays at or below it.
    """
    H, G = q.shape[2], q.shape[3]
    groups = H // kc.shape[1]
    masses, uniforms = [], []
    for i in range(min(max_blocks, q.shape[1])):
        a = int(anchors[0, i])
        lo = max(0, a - window + 1) if window > 0 else 0  # slot 0's view
        n_ctx = a - lo
        if not bool(keep[0, i]) or n_ctx < 1:
            continue
        k = torch.cat([kc[0, :, lo:a], kb[0, i]], 1).repeat_interleave(groups, 0).float()  # [H, T, hd]
        p = torch.softmax(q[0, i, :, :1].float() @ k.transpose(-1, -2) * scale, -1)  # [H, 1, T]
        masses.append(float(p[..., max(0, n_ctx - recent) : n_ctx].sum(-1).mean()))
        uniforms.append(min(recent, n_ctx) / (n_ctx + G))
    if not masses:  # no kept block with context in this batch
        return 0.0, 0.0
    return sum(masses) / len(masses), sum(uniforms) / len(uniforms)


_COMPILED_FLEX = None


def _flex_fn(cuda: bool):
    """flex_attention, compiled on CUDA (eager elsewhere: slow, for checking only)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not cuda:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
    return _COMPILED_FLEX


def _flex_block_attention(q, kb, vb, kc, vc, anchors, scale, window):
    from torch.nn.attention.flex_attention import create_block_mask

    B, N, H, G, hd = q.shape
    S = kc.shape[-2]
    Q = q.permute(0, 2, 1, 3, 4).reshape(B, H, N * G, hd)
    K = torch.cat([kc, kb.permute(0, 2, 1, 3, 4).reshape(B, -1, N * G, hd)], dim=-2)
    V = torch.cat([vc, vb.permute(0, 2, 1, 3, 4).reshape(B, -1, N * G, hd)], dim=-2)

    def mask_mod(b, h, qi, ki):
        block = qi // G
        ctx_visible = (ki < S) & context_visible(ki, anchors[b, block], window, qi % G)
        same_block = (ki >= S) & ((ki - S) // G == block)
        return ctx_visible | same_block

    mask = create_block_mask(mask_mod, B, None, N * G, S + N * G, device=q.device)
    o = _flex_fn(q.is_cuda)(Q, K, V, block_mask=mask, scale=scale, enable_gqa=K.shape[1] != H)
    return o.reshape(B, H, N, G, hd).permute(0, 2, 1, 3, 4)


def block_attention(
    q: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    anchors: torch.Tensor,
    scale: float,
    backend: str = "auto",
    chunk: int = 64,
    window: int = 0,
) -> torch.Tensor:
    """Attention of every block over its visible context and its own block.

    ``q`` [B, N, H, G, hd] (block queries), ``kb/vb`` [B, N, KVH, G, hd] (block keys),
    ``kc/vc`` [B, KVH, S, hd] (context keys), ``anchors`` [B, N]; ``window`` > 0 is a sliding
    window over positions (slot ``k`` sees context ``j`` iff ``a + k - j < window``).
    Returns [B, N, H, G, hd].
    """
    if backend == "auto":
        backend = "flex" if q.is_cuda else "sdpa"
    if backend == "flex":
        return _flex_block_attention(q, kb, vb, kc, vc, anchors, scale, window)
    if window > 0:
        return _windowed_block_attention(q, kb, vb, kc, vc, anchors, scale, window)
    return _dense_block_attention(q, kb, vb, kc, vc, anchors, scale, chunk)
