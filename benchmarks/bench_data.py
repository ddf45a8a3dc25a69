"""Data-pipeline benchmarks: target-cache write throughput and size, regeneration throughput.

CPU (the numbers in benchmarks/README.md)::

    python benchmarks/bench_data.py cache --rows 48            # embedded SmolLM2, bf16 and fp8
    python benchmarks/bench_data.py regen --prompts 8 --threads 1 2

GPU: the cache benchmark runs the target on ``cuda`` when one is visible (add
``--target`` for another model and ``--layer-ids`` to match it); for several GPUs time
``torchrun ... scripts/data/prepare_target_cache.py`` itself, which prints the same size
estimate and a tokens/s progress bar.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(ROOT, "data", "train_prompts", "mini.jsonl")


def bench_cache(args: argparse.Namespace) -> None:
    from deepspec.data.cache_builder import CacheBuildOptions, build_target_cache
    from deepspec.data.cache_reader import CacheDataset
    from deepspec.targets import load_family_spec, resolve_target

    d = load_family_spec(resolve_target(args.target)).hidden_size
    L = len(args.layer_ids)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.jsonl")
        with open(args.data, encoding="utf-8") as src, open(data, "w", encoding="utf-8") as dst:
            dst.writelines(line for _, line in zip(range(args.rows), src))
        print(f"target {args.target}: d={d}, L={L}, formula 6 + 2*d*(L+1) = {6 + 2 * d * (L + 1)} B/token")
        print(
            f"torch threads: {args.threads or 'default'}, target dtype {args.target_dtype}, batch {args.batch}"
        )
        print("| storage | samples | tokens | write tok/s | wall s | B/token stored | B/token on disk |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for storage in args.storage:
            out = os.path.join(tmp, storage)
            start = time.perf_counter()
            result = build_target_cache(
                CacheBuildOptions(
                    output_dir=out,
                    train_data_paths=[data],
                    target=args.target,
                    layer_ids=args.layer_ids,
                    max_length=args.max_length,
                    min_loss_tokens=14,
                    hidden_dtype=storage,
                    target_dtype=args.target_dtype,
                    local_batch_size=args.batch,
                    rows_per_shard=max(args.rows, 1),
                    cpu_threads=args.threads,
                    progress=False,
                )
            )
            wall = time.perf_counter() - start
            cache = CacheDataset(out)
            tokens = cache.manifest["counts"]["tokens"]
            on_disk = sum(s["bytes"] for s in cache.shards) + os.path.getsize(
                os.path.join(out, "samples.idx")
            )
            print(
                f"| {storage} | {len(cache)} | {tokens} | {result.tokens_written / result.seconds:,.0f} | "
                f"{wall:.1f} | {cache.manifest['storage']['bytes_per_token']:,} | {on_disk / tokens:,.0f} |",
                flush=True,
            )
            times = {}
            for verify in (False, True, False, True):  # alternated: page cache warm for both
                cache.verify_samples = verify
                start = time.perf_counter()
                for i in range(len(cache)):
                    cache[i]
                times[verify] = min(times.get(verify, float("inf")), time.perf_counter() - start)
            read, plain = times[True], times[False]
            print(
                f"  read back {len(cache)} samples (checksum + token-id check) in {read:.3f}s = "
                f"{tokens / read:,.0f} tok/s; the checks cost {(read - plain) / len(cache) * 1e3:.3f} ms "
                f"per sample ({(read - plain) / max(read, 1e-9):.0%} of a verified read)"
            )


def bench_regen(args: argparse.Namespace) -> None:
    from deepspec.data.generation_backends import OpenAIBackend, SamplingParams
    from deepspec.data.regenerate import RegenOptions, run_regeneration
    from deepspec.targets import embedded_gguf_path
    from deepspec.utils.distributed import find_free_port

    gguf = embedded_gguf_path("smollm2-135m-instruct")
    print("| llama.cpp threads | prompts | completion tokens | seconds | tok/s | requests/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        port = find_free_port()
        server = subprocess.Popen(
            [
                sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
                "--port", str(port), "--n_ctx", "4096", "--n_threads", str(threads),
                "--n_threads_batch", str(threads),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                    break
                except OSError:
                    time.sleep(0.2)
            with tempfile.TemporaryDirectory() as tmp:
                data = os.path.join(tmp, "in.jsonl")
                with open(args.data, encoding="utf-8") as src, open(data, "w", encoding="utf-8") as dst:
                    for _, line in zip(range(args.prompts), src):
                        row = json.loads(line)
                        dst.write(
                            json.dumps({"id": row["id"], "conversations": row["conversations"][:1]}) + "\n"
                        )
                summary = run_regeneration(
                    OpenAIBackend([f"127.0.0.1:{port}"], None, timeout=600),
                    RegenOptions(
                        data, os.path.join(tmp, "out.jsonl"), concurrency=args.concurrency, progress=False
                    ),
                    SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
                )
            print(
                f"| {threads} | {summary.ok} | {summary.completion_tokens} | {summary.seconds:.1f} | "
                f"{summary.completion_tokens / summary.seconds:.1f} | {summary.requests / summary.seconds:.2f} |",
                flush=True,
            )
        finally:
            server.terminate()
            server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    cache = sub.add_parser("cache", help="cache write throughput and bytes per token")
    cache.add_argument("--target", default="embedded:smollm2-135m-instruct")
    cache.add_argument("--layer-ids", type=int, nargs="+", default=[1, 7, 14, 21, 27])
    cache.add_argument("--data", default=MINI)
    cache.add_argument("--rows", type=int, default=48)
    cache.add_argument("--max-length", type=int, default=1024)
    cache.add_argument("--batch", type=int, default=4)
    cache.add_argument("--target-dtype", choices=("bf16", "fp32"), default="bf16")
    cache.add_argument("--storage", nargs="+", default=["bf16", "fp8"])
    cache.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    regen = sub.add_parser("regen", help="regeneration throughput through llama.cpp")
    regen.add_argument("--data", default=MINI)
    regen.add_argument("--prompts", type=int, default=8)
    regen.add_argument("--max-tokens", type=int, default=128)
    regen.add_argument("--concurrency", type=int, default=2)
    regen.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    bench_cache(args) if args.what == "cache" else bench_regen(args)


if __name__ == "__main__":
    main()
