"""Decoding speed of peers in one run, same prompts, same machine: plain target decoding,
transformers' prompt-lookup decoding, and speculative decoding with a deepspec draft.

    python benchmarks/decode_speed.py --draft <draft dir> [--task gsm8k] [--prompts 5]
        [--max-new-tokens 128] [--dtype bf16|fp32]

Greedy (temperature 0) so every method must produce the same tokens; the script checks it
and reports tokens/s, the ratio to plain decoding, and for speculative decoding tau and the
share of time in the target, in the draft and in the loop itself (sampling, verification,
cache bookkeeping). One untimed warm-up per method.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from deepspec.data.chat import ChatTokenizer
from deepspec.data.eval_prompts import load_eval_prompts
from deepspec.drafts import load_draft
from deepspec.eval.decode import plain_generate, speculative_generate
from deepspec.eval.target import HFTarget
from deepspec.targets import resolve_target


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--draft", required=True)
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompt-lookup-tokens", type=int, default=7)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_dir = resolve_target(args.target)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    draft = load_draft(args.draft).to(dtype=dtype).eval()
    target = HFTarget(model, draft.config.target_layer_ids)
    chat = ChatTokenizer(tokenizer)
    prompts = [
        chat.prompt_ids([{"role": "user", "content": p.text}])
        for p in load_eval_prompts(args.task, max_samples=args.prompts)
    ]
    eos = {tokenizer.eos_token_id}
    n = args.max_new_tokens

    def plain(ids):
        return plain_generate(target, ids, max_new_tokens=n, temperature=0, eos_ids=eos)

    def lookup(ids):
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
        tokens = out[0, len(ids) :].tolist()
        return tokens, time.perf_counter() - start

    def spec(ids):
        return speculative_generate(target, draft, ids, max_new_tokens=n, temperature=0, eos_ids=eos)

    plain(prompts[0][:32]), lookup(prompts[0][:32]), spec(prompts[0][:32])  # warm-up
    totals = {"plain": [0, 0.0], "prompt_lookup": [0, 0.0], "speculative": [0, 0.0]}
    rounds = accepted = 0
    t_target = t_draft = 0.0
    mismatches = 0
    for ids in prompts:  # interleaved per prompt
        p = plain(ids)
        lk, lk_s = lookup(ids)
        s = spec(ids)
        mismatches += int(s.output_ids != p.output_ids) + int(lk != p.output_ids)
        for name, toks, secs in (
            ("plain", p.output_ids, p.seconds),
            ("prompt_lookup", lk, lk_s),
            ("speculative", s.output_ids, s.seconds),
        ):
            totals[name][0] += len(toks)
            totals[name][1] += secs
        rounds += len(s.accepted)
        accepted += sum(s.accepted)
        t_target += s.target_seconds
        t_draft += s.draft_seconds
    base = totals["plain"][0] / totals["plain"][1]
    report = {
        name: {"tokens_per_second": round(tok / sec, 2), "ratio_to_plain": round(tok / sec / base, 3)}
        for name, (tok, sec) in totals.items()
    }
    spec_s = totals["speculative"][1]
    report["speculative"].update(
        tau=round((accepted + rounds) / max(rounds, 1), 3),
        target_share=round(t_target / spec_s, 3),
        draft_share=round(t_draft / spec_s, 3),
        loop_overhead_share=round(1 - (t_target + t_draft) / spec_s, 3),
    )
    report["setup"] = {
        "draft": args.draft,
        "task": args.task,
        "prompts": len(prompts),
        "max_new_tokens": n,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "output_mismatches": mismatches,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
