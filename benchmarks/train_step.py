"""Training-step time of each algorithm's SmolLM2 config on this machine (forward + backward),
and the share spent in the frozen LM head — the floor no implementation goes below.

    python benchmarks/train_step.py                       # bf16, 1024-token sequence
    python benchmarks/train_step.py --seq-len 2048 --precision fp32 --repeats 5
    python benchmarks/train_step.py --batch 4 --seq-len 280 --compile --draft-vocab-sizes 0,8192

Inputs are random target features for a sequence whose tokens are all supervised; the
draft is built from the real embedded target (embedding + LM head). The LM-head share is
measured by timing the same LM-head matmuls alone, in the loss's chunks (draft and target
logits, and the gradient back into the hidden states): the floor of any implementation.
With a pruned draft vocabulary (``--draft-vocab-sizes``, random ids: speed does not depend on
which) the floor is those matmuls over the draft vocabulary plus one full-vocabulary matmul
per distinct target position (the target's normaliser).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from deepspec.config import load_config
from deepspec.drafts import build_draft, get_algorithm
from deepspec.drafts.fused_head import use_compiled_vocab_rows
from deepspec.targets import load_family_spec, resolve_target


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(
    algo: str,
    seq_len: int,
    precision: str,
    repeats: int,
    target_dir: str,
    batch: int = 1,
    vocab: int | None = None,
) -> dict:
    """One algorithm's step; ``vocab`` overrides the config's ``model.draft_vocab_size``."""
    opts = [] if vocab is None else [f"model.draft_vocab_size={vocab}"]
    cfg = load_config(f"config/{algo}/{algo}_smollm2_135m.py", opts)
    vocab = cfg.model.draft_vocab_size
    spec = load_family_spec(target_dir)
    torch.manual_seed(0)
    draft_ids = torch.randperm(spec.vocab_size)[:vocab].sort().values if vocab else None
    model = build_draft(cfg, target_dir, draft_ids=draft_ids)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = model.to(dtype)
    alg = get_algorithm(algo)
    L = len(cfg.model.target_layer_ids)
    ids = torch.randint(0, spec.vocab_size, (batch, seq_len))
    loss_mask = torch.ones(batch, seq_len, dtype=torch.long)
    feats = torch.randn(batch, seq_len, L * spec.hidden_size, dtype=dtype)
    last = torch.randn(batch, seq_len, spec.hidden_size, dtype=dtype)
    g = torch.Generator().manual_seed(0)

    def step():
        out = model(ids, loss_mask, feats, last, num_anchors=cfg.model.num_anchors, generator=g)
        res = alg.loss(model, out, **alg.loss_kwargs(cfg))
        res.loss.backward()
        model.zero_grad(set_to_none=True)
        return out

    out = step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    step_rss = peak_rss_mb()  # before the LM-head probe below, which has its own peak
    # rows that go through the LM head per step
    rows = int(out.hidden.shape[:-1].numel())
    h = torch.randn(rows, spec.hidden_size, dtype=dtype)
    W = model.lm_head.weight
    chunk = max(1, (16 * 2**20) // W.shape[0])  # the loss's own chunking
    full, positions = model.embed_tokens.weight, 0  # SmolLM2 ties its head to the embedding
    if vocab:  # one full-vocabulary matmul per distinct target position the rows read
        pos = (
            out.target_pos
            if algo == "eagle3"
            else out.anchors[..., None] + torch.arange(cfg.model.block_size)
        )
        positions = int(sum(torch.unique(pos[b].clamp(max=seq_len - 1)).numel() for b in range(batch)))
    hp = torch.randn(positions, spec.hidden_size, dtype=dtype)
    head_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for r0 in range(0, rows, chunk):
            x = h[r0 : r0 + chunk]
            _ = x @ W.T  # target logits
            g = x @ W.T  # draft logits
            _ = g @ W  # gradient back into the hidden states (the head is frozen)
        pchunk = max(1, (16 * 2**20) // full.shape[0])
        for r0 in range(0, positions, pchunk):
            _ = hp[r0 : r0 + pchunk] @ full.T
        head_times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    head_s = sorted(head_times)[len(head_times) // 2]
    return {
        "algorithm": algo,
        "draft_vocab_size": vocab or spec.vocab_size,
        "batch": batch,
        "seq_len": seq_len,
        "precision": precision,
        "lm_head_rows": rows,
        "step_seconds": round(step_s, 4),
        "lm_head_seconds": round(head_s, 4),
        "lm_head_share": round(head_s / step_s, 3),
        "peak_rss_mb": round(step_rss, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--algorithms", default="dspark,dflash,eagle3")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument(
        "--draft-vocab-sizes",
        help="comma-separated model.draft_vocab_size values (0 = full; default: each config's own)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the vocabulary kernel, as train.torch_compile does",
    )
    args = parser.parse_args()
    use_compiled_vocab_rows(args.compile)
    target_dir = resolve_target("embedded:smollm2-135m-instruct")
    for algo in args.algorithms.split(","):
        sizes = [None] if args.draft_vocab_sizes is None else args.draft_vocab_sizes.split(",")
        for vocab in (None if v is None else int(v) for v in sizes):
            row = bench(algo, args.seq_len, args.precision, args.repeats, target_dir, args.batch, vocab)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
