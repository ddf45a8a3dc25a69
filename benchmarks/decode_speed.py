"""Decoding speed side by side, in one run, on the same prompts and the same machine:
plain target decoding (ours), transformers' prompt-lookup decoding, speculative decoding
with each deepspec draft given, and llama.cpp's plain decoding of the same model (the
installed ``llama_cpp`` package, at 1 and 2 threads).

    python benchmarks/decode_speed.py --draft <draft dir> [<draft dir> ...] [--task gsm8k]
        [--prompts 5] [--max-new-tokens 128] [--dtype bf16|fp32] [--llamacpp-threads 1,2]

Greedy (temperature 0). Our methods must produce the same tokens as plain decoding in fp32
(in bf16 matmuls of different shapes may flip near-ties; mismatches are counted). For each
draft: tau and the shares of time in the target, in the draft and in the loop itself
(sampling, verification, cache bookkeeping). llama.cpp runs the embedded target's GGUF, the
very weights the transformers target is built from, with its own kernels (its outputs are
not compared). One untimed warm-up per method; methods interleaved per prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch

from deepspec.data.chat import ChatTokenizer
from deepspec.data.eval_prompts import load_eval_prompts
from deepspec.drafts import load_draft
from deepspec.eval.decode import DecodeResult, plain_generate, speculative_generate
from deepspec.eval.target import HFTarget
from deepspec.targets import resolve_target


def llamacpp_method(gguf: str, threads: int, n: int) -> Callable[[list[int]], DecodeResult]:
    """Plain greedy decoding of ``gguf`` by llama.cpp with ``threads`` threads."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=gguf, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False
    )

    def run(ids: list[int]) -> DecodeResult:
        start = time.perf_counter()
        tokens: list[int] = []
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):  # greedy
            tokens.append(int(token))
            if token == llm.token_eos() or len(tokens) >= n:
                break
        return DecodeResult(output_ids=tokens, seconds=time.perf_counter() - start)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--draft", nargs="+", default=[], help="draft checkpoint directories")
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompt-lookup-tokens", type=int, default=7)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument(
        "--llamacpp-threads",
        default="1,2",
        help="llama.cpp plain decoding at these thread counts ('' = skip)",
    )
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_dir = resolve_target(args.target)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    drafts = {}
    for path in args.draft:  # named <run>/<step>: two runs' step_160 stay apart
        parts = os.path.normpath(path).split(os.sep)
        drafts["/".join(parts[-2:])] = load_draft(path).to(dtype=dtype).eval()
    target = HFTarget(model, [])  # plain decoding reads no features; each draft sets its own
    chat = ChatTokenizer(tokenizer)
    prompts = [
        chat.prompt_ids([{"role": "user", "content": p.text}])
        for p in load_eval_prompts(args.task, max_samples=args.prompts)
    ]
    eos = {tokenizer.eos_token_id}
    n = args.max_new_tokens

    def lookup(ids: list[int]) -> DecodeResult:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=n,
                do_sample=False,
                prompt_lookup_num_tokens=args.prompt_lookup_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
            )
        return DecodeResult(output_ids=out[0, len(ids) :].tolist(), seconds=time.perf_counter() - start)

    def speculative(draft) -> Callable[[list[int]], DecodeResult]:
        def run(ids: list[int]) -> DecodeResult:
            # the target's features are the draft's own layers, in its order
            target.layer_ids = list(draft.config.target_layer_ids)
            return speculative_generate(target, draft, ids, max_new_tokens=n, temperature=0, eos_ids=eos)

        return run

    methods: dict[str, Callable[[list[int]], DecodeResult]] = {
        "plain": lambda ids: plain_generate(target, ids, max_new_tokens=n, temperature=0, eos_ids=eos),
        "prompt_lookup": lookup,
    }
    for name, draft in drafts.items():
        methods[f"speculative:{name}"] = speculative(draft)
    ours = set(methods)  # what must reproduce plain decoding's tokens (llama.cpp: other kernels)
    gguf = None
    if args.llamacpp_threads:
        from deepspec.targets import embedded_gguf_path

        gguf = embedded_gguf_path(args.target.removeprefix("embedded:"))
        for threads in (int(t) for t in args.llamacpp_threads.split(",")):
            methods[f"llamacpp_plain:{threads}t"] = llamacpp_method(gguf, threads, n)

    for run in methods.values():  # warm-up
        run(prompts[0][:32])
    totals = {name: [0, 0.0] for name in methods}
    stats = {name: {"rounds": 0, "accepted": 0, "target": 0.0, "draft": 0.0} for name in methods}
    mismatches = {name: 0 for name in methods}
    for ids in prompts:  # interleaved per prompt
        results = {name: run(ids) for name, run in methods.items()}
        reference = results["plain"].output_ids
        for name, res in results.items():
            totals[name][0] += len(res.output_ids)
            totals[name][1] += res.seconds
            mismatches[name] += int(name in ours and res.output_ids != reference)
            st = stats[name]
            st["rounds"] += len(res.accepted)
            st["accepted"] += sum(res.accepted)
            st["target"] += res.target_seconds
            st["draft"] += res.draft_seconds
    base = totals["plain"][0] / totals["plain"][1]
    report: dict[str, dict] = {}
    for name, (tok, sec) in totals.items():
        row = {"tokens_per_second": round(tok / sec, 2), "ratio_to_plain": round(tok / sec / base, 3)}
        if name.startswith("speculative:"):
            st = stats[name]
            row.update(
                tau=round((st["accepted"] + st["rounds"]) / max(st["rounds"], 1), 3),
                target_share=round(st["target"] / sec, 3),
                draft_share=round(st["draft"] / sec, 3),
                loop_overhead_share=round(1 - (st["target"] + st["draft"]) / sec, 3),
            )
        if name in ours:
            row["output_mismatches"] = mismatches[name]
        report[name] = row
    report["setup"] = {
        "drafts": args.draft,
        "task": args.task,
        "prompts": len(prompts),
        "max_new_tokens": n,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "llamacpp_gguf": gguf,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
