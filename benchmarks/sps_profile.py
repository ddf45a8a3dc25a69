"""Steps per second of the target's verification forward, SPS(B), for B new tokens over a
cached context: the table DSpark's prefix scheduler reads (``deepspec.eval.scheduler``).

    python benchmarks/sps_profile.py [--target embedded:smollm2-135m-instruct] [--dtype bf16]
        [--rows 1] [--context 256] [--tokens 1,2,4,8,16,32,64] [--repeats 20]
        [--out out/sps_cpu.json]

``--rows R`` requests, each with ``--context`` cached positions, as the batched decode loop
holds them (:class:`~deepspec.eval.ragged_target.RaggedTarget`); a measurement feeds B
tokens spread over the R requests (B >= R) in one packed forward that reads the target's
features, as verification does, and crops the caches back. Median of ``--repeats`` after
two warm-ups. On a GPU the same script profiles that device.

``--draft D`` also runs the batched decode loop with that draft on ``R`` random prompts of
``--context`` tokens and writes the median time per step outside the target's forward
(drafting, verification, bookkeeping) as ``overhead_seconds``: the scheduler then weighs
each token against the whole step (:class:`~deepspec.eval.scheduler.SPSTable`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--rows", type=int, default=1, help="requests in flight")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--tokens", default="1,2,4,8,16,32,64")
    parser.add_argument("--layers", default="1,7,14,21,27", help="target layers whose features are read")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--draft", default=None, help="also time this draft's part of a step")
    parser.add_argument("--out", default="out/sps_cpu.json")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from deepspec.eval.ragged_target import RaggedTarget
    from deepspec.targets import resolve_target

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(resolve_target(args.target), dtype=dtype).to(device).eval()
    R = args.rows
    target = RaggedTarget(model, [int(i) for i in args.layers.split(",")], R)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    target.forward(
        {r: torch.randint(0, vocab, (args.context,), generator=g) for r in range(R)}, features=False
    )
    points = {}
    for b in (int(x) for x in args.tokens.split(",") if int(x) >= R):
        times = []
        for i in range(args.repeats + 2):
            feeds = {r: torch.randint(0, vocab, (b // R + (r < b % R),), generator=g) for r in range(R)}
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            target.forward(feeds)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
            for r in range(R):
                target.crop(r, args.context)
        points[b] = round(1.0 / statistics.median(times), 2)
        print(f"B={b:4d}  {points[b]:8.2f} steps/s  ({1000 / points[b]:.1f} ms)", flush=True)
    overhead = None
    if args.draft:
        overhead = _draft_seconds(model, args.draft, R, args.context, dtype, device)
        print(f"outside the target per step at {R} rows: {1000 * overhead:.1f} ms", flush=True)
    result = {
        "target": args.target,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "rows": R,
        "context": args.context,
        "steps_per_second": points,
        "overhead_seconds": overhead,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")


def _draft_seconds(model, path: str, rows: int, context: int, dtype, device: str) -> float:
    """Median seconds per decode step outside the target's forward (drafting, verification,
    bookkeeping) of the batched loop, run with this draft on ``rows`` random prompts."""
    from deepspec.drafts import load_draft
    from deepspec.eval.batch_decode import speculative_generate_batch
    from deepspec.eval.ragged_target import RaggedTarget

    draft = load_draft(path, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, draft.spec.vocab_size, (context,), generator=g).tolist() for _ in range(rows)]
    run = speculative_generate_batch(
        RaggedTarget(model, draft.config.target_layer_ids, rows),
        draft,
        prompts,
        max_new_tokens=40,
        temperature=0.0,
        eos_ids=set(),
    )
    steps = [s for s in run.steps if s.requests == rows and not s.prefill][2:]  # two warm-ups
    return statistics.median(s.seconds - s.target_seconds for s in steps)


if __name__ == "__main__":
    main()
