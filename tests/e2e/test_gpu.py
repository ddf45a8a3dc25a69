"""CUDA-only paths, marked ``gpu`` and skipped on machines without a CUDA device (the CPU
suite checks the same maths on CPU). Run them alone with ``pytest -m gpu tests``.

- compiled flex attention on CUDA equals the dense block attention the CPU trains with;
- a DSpark training step under CUDA autocast (bf16) matches fp32 closely and is finite;
- NCCL initialises, all-reduces and shuts down in a single-GPU process group.
"""

from __future__ import annotations

import pytest
import torch

from deepspec.drafts.blocks import block_attention
from tests.helpers import block_attention_inputs

pytestmark = pytest.mark.gpu


def test_compiled_flex_attention_on_cuda_equals_dense_block_attention():
    B, N, H, G, hd, S = 2, 8, 4, 7, 64, 256
    q, kb, vb, kc, vc, anchors = block_attention_inputs(0, B=B, N=N, H=H, G=G, hd=hd, S=S)
    dense = block_attention(q, kb, vb, kc, vc, anchors, hd**-0.5, backend="sdpa")
    cuda = [t.cuda() for t in (q, kb, vb, kc, vc, anchors)]
    for window in (0, 32):
        ref = block_attention(q, kb, vb, kc, vc, anchors, hd**-0.5, backend="sdpa", window=window)
        flex = block_attention(*cuda, hd**-0.5, backend="flex", window=window)
        torch.testing.assert_close(flex.cpu(), ref, atol=2e-5, rtol=2e-5)
    assert dense.shape == (B, N, H, G, hd)


def test_dspark_step_under_cuda_autocast_is_close_to_fp32():
    from deepspec.config import load_config
    from deepspec.drafts import build_draft, get_algorithm
    from deepspec.targets.family import family_spec_from_config
    from deepspec.targets.tiny import tiny_config

    V, D = 96, 64
    cfg = load_config(
        opts=[
            "algorithm=dspark",
            "model.target_layer_ids=[0, 1]",
            "model.block_size=5",
            "model.num_draft_layers=2",
            "model.markov_rank=16",
        ]
    )
    torch.manual_seed(0)
    spec = family_spec_from_config(tiny_config("qwen3", vocab_size=V, hidden_size=D, num_hidden_layers=4))
    model = build_draft(cfg, spec=spec).cuda()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 48), generator=g).cuda()
    loss_mask = torch.ones(2, 48, dtype=torch.long, device="cuda")
    feats = torch.randn(2, 48, 2 * D, generator=g).cuda()
    last = torch.randn(2, 48, D, generator=g).cuda()
    anchors = torch.tensor([[3, 10, 20, 30], [5, 12, 25, 40]], device="cuda")
    alg = get_algorithm("dspark")

    def loss(autocast: bool) -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, loss_mask, feats, last, anchors=anchors)
            value = alg.loss(model, out, **alg.loss_kwargs(cfg)).loss
        value.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(bool(torch.isfinite(gr).all()) for gr in grads)
        model.zero_grad()
        return float(value.detach())

    full, mixed = loss(False), loss(True)
    assert mixed == pytest.approx(full, rel=2e-2)


def test_nccl_single_gpu_process_group(monkeypatch):
    from deepspec.utils import distributed as du

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(du.find_free_port()))
    info = du.init_distributed()
    try:
        assert info.backend == "nccl" and info.device.startswith("cuda")
        assert du.all_reduce_sum([2.0, 3.0]) == [2.0, 3.0]
    finally:
        du.cleanup()
