"""Training-step time of each algorithm's SmolLM2 config on this machine (forward + backward),
and the share spent in the frozen LM head — the floor no implementation goes below.

    python benchmarks/train_step.py                       # bf16, 1024-token sequence
    python benchmarks/train_step.py --seq-len 2048 --precision fp32 --repeats 5

Inputs are random target features for a sequence whose tokens are all supervised; the
draft is built from the real embedded target (embedding + LM head). The LM-head share is
measured by timing the same LM-head matmuls alone, in the loss's chunks (draft and target
logits, and the gradient back into the hidden states): the floor of any implementation.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from deepspec.config import load_config
from deepspec.drafts import build_draft, get_algorithm
from deepspec.targets import load_family_spec, resolve_target


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(algo: str, seq_len: int, precision: str, repeats: int, target_dir: str) -> dict:
    cfg = load_config(f"config/{algo}/{algo}_smollm2_135m.py")
    spec = load_family_spec(target_dir)
    torch.manual_seed(0)
    model = build_draft(cfg, target_dir)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = model.to(dtype)
    alg = get_algorithm(algo)
    L = len(cfg.model.target_layer_ids)
    ids = torch.randint(0, spec.vocab_size, (1, seq_len))
    loss_mask = torch.ones(1, seq_len, dtype=torch.long)
    feats = torch.randn(1, seq_len, L * spec.hidden_size, dtype=dtype)
    last = torch.randn(1, seq_len, spec.hidden_size, dtype=dtype)
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
    head_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for r0 in range(0, rows, chunk):
            x = h[r0 : r0 + chunk]
            _ = x @ W.T  # target logits
            g = x @ W.T  # draft logits
            _ = g @ W  # gradient back into the hidden states (the head is frozen)
        head_times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    head_s = sorted(head_times)[len(head_times) // 2]
    return {
        "algorithm": algo,
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
    args = parser.parse_args()
    target_dir = resolve_target("embedded:smollm2-135m-instruct")
    for algo in args.algorithms.split(","):
        print(json.dumps(bench(algo, args.seq_len, args.precision, args.repeats, target_dir)), flush=True)


if __name__ == "__main__":
    main()
