"""Helpers several test modules share (test modules never import each other)."""

from __future__ import annotations

import torch


def block_attention_inputs(seed: int, B=2, N=6, H=4, G=3, hd=16, KVH=2, S=24) -> tuple[torch.Tensor, ...]:
    """Random ``q`` [B, N, H, G, hd], block keys/values ``kb, vb`` [B, N, KVH, G, hd], context
    keys/values ``kc, vc`` [B, KVH, S, hd] and sorted ``anchors`` [B, N] for
    :func:`deepspec.drafts.blocks.block_attention`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, G, hd, generator=g)
    kb, vb = torch.randn(2, B, N, KVH, G, hd, generator=g)
    kc, vc = torch.randn(2, B, KVH, S, hd, generator=g)
    anchors = torch.sort(torch.randint(0, S, (B, N), generator=g), 1).values
    return q, kb, vb, kc, vc, anchors
