"""Greedy generation with vLLM and (optionally) an exported draft; run it with the vLLM
virtualenv's python (``bash scripts/setup.sh --serving`` makes ``<cache root>/vllm-venv``).

    <cache root>/vllm-venv/bin/python scripts/serve/vllm_generate.py --target <HF target dir> \\
        --prompts prompts.json [--draft <export dir> --method eagle3 --k 7] \\
        [--max-new-tokens 64] [--batch 1,4] [--dtype bfloat16|float32]

``prompts.json`` holds a list of token-id lists. Prints one JSON object: the generated
tokens (first batch size), tokens/s per batch size (``B`` prompts per ``generate`` call),
the engine's start time, and with a draft vLLM's spec-decode counters and the mean
acceptance length ``1 + accepted / drafts`` (bonus token included).

Settings for a small CPU machine: in-process engine, one OpenMP thread, eager mode, a
256 MiB KV cache (vLLM otherwise reserves most of the RAM). bf16 matmuls of different
shapes can flip near-tied greedy choices; compare outputs token for token in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def spec_counters(llm) -> dict:
    out = {}
    for metric in llm.get_metrics():
        if "spec_decode" in metric.name:
            out[metric.name.split(":")[-1]] = (
                list(metric.values) if hasattr(metric, "values") else metric.value
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--draft")
    parser.add_argument("--method", default="eagle3")
    parser.add_argument("--k", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", default="1")
    parser.add_argument("--dtype", default="bfloat16", help="float32 for bit-exact greedy comparisons")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    prompts = json.load(open(args.prompts))
    kwargs = dict(
        model=args.target,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=2048,
        max_num_seqs=8,
        max_num_batched_tokens=2048,
        seed=0,
        distributed_executor_backend="uni",
        kv_cache_memory_bytes=256 * 2**20,
        disable_log_stats=False,
    )
    if args.draft:
        kwargs["speculative_config"] = {
            "method": args.method,
            "model": args.draft,
            "num_speculative_tokens": args.k,
        }
    start = time.perf_counter()
    llm = LLM(**kwargs)
    result: dict = {"start_s": round(time.perf_counter() - start, 1), "runs": {}}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, ignore_eos=True)
    llm.generate(
        [{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False
    )
    before = spec_counters(llm)
    for i, batch in enumerate(int(b) for b in args.batch.split(",")):
        tokens, t0 = [], time.perf_counter()
        for lo in range(0, len(prompts), batch):
            chunk = [{"prompt_token_ids": p} for p in prompts[lo : lo + batch]]
            tokens += [list(o.outputs[0].token_ids) for o in llm.generate(chunk, params, use_tqdm=False)]
        seconds = time.perf_counter() - t0
        n = sum(map(len, tokens))
        result["runs"][str(batch)] = {
            "tokens": n,
            "seconds": round(seconds, 2),
            "tok_s": round(n / seconds, 1),
        }
        if i == 0:
            result["tokens"] = tokens
            if args.draft:
                after = spec_counters(llm)
                diff = {
                    k: [a - b for a, b in zip(v, before.get(k, [0] * len(v)))]
                    if isinstance(v, list)
                    else v - before.get(k, 0)
                    for k, v in after.items()
                }
                drafts = diff.get("spec_decode_num_drafts", 0)
                result["spec"] = diff
                result["tau"] = (
                    round(1 + diff.get("spec_decode_num_accepted_tokens", 0) / drafts, 3) if drafts else None
                )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
