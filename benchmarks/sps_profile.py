"""Steps per second of the target's verification forward, SPS(B), for B new tokens over a
cached context: the table DSpark's prefix scheduler reads (``deepspec.eval.scheduler``).

    python benchmarks/sps_profile.py [--target embedded:smollm2-135m-instruct] [--dtype bf16]
        [--context 256] [--tokens 1,2,4,8,16,32,64] [--repeats 20] [--out out/sps_cpu.json]

One sequence: the context is prefilled once; each measurement runs a forward of B tokens
that reads the target's features (as verification does) and crops the cache back. Median
of ``--repeats`` after two warm-ups. On a GPU the same script profiles that device.
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
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--tokens", default="1,2,4,8,16,32,64")
    parser.add_argument("--layers", default="1,7,14,21,27", help="target layers whose features are read")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="out/sps_cpu.json")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from deepspec.eval.target import HFTarget
    from deepspec.targets import resolve_target

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(resolve_target(args.target), dtype=dtype).to(device).eval()
    target = HFTarget(model, [int(i) for i in args.layers.split(",")])
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    target.reset()
    target.forward(torch.randint(0, vocab, (args.context,), generator=g))
    points = {}
    for b in (int(x) for x in args.tokens.split(",")):
        times = []
        for i in range(args.repeats + 2):
            tokens = torch.randint(0, vocab, (b,), generator=g)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            target.forward(tokens)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
            target.crop(args.context)
        points[b] = round(1.0 / statistics.median(times), 2)
        print(f"B={b:4d}  {points[b]:8.2f} steps/s  ({1000 / points[b]:.1f} ms)", flush=True)
    result = {
        "target": args.target,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "context": args.context,
        "steps_per_second": points,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
