"""Evaluate a draft model by running lossless speculative decoding against its target.

CPU:
    python eval.py --target_name_or_path embedded:smollm2-135m-instruct \
        --draft_name_or_path ~/checkpoints/deepspec/dspark_smollm2_135m/step_latest \
        --tasks gsm8k,mt-bench --max-samples 3 --max-new-tokens 64
GPUs (one worker per visible GPU, prompts split across them):
    CUDA_VISIBLE_DEVICES=0,1 python eval.py --target_name_or_path Qwen/Qwen3-4B \
        --draft_name_or_path <draft dir>
"""

from __future__ import annotations

import argparse

from deepspec.cli import run_main
from deepspec.config.schema import DEFAULT_EVAL_TASKS
from deepspec.errors import ConfigError, NotBuiltYetError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target_name_or_path", "--target-name-or-path", required=True)
    parser.add_argument("--draft_name_or_path", "--draft-name-or-path", required=True)
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_EVAL_TASKS),
        help="comma-separated benchmark names (files in --eval-datasets-dir)",
    )
    parser.add_argument("--max-samples", type=int, default=None, help="cap per task (default: task caps)")
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--confidence-threshold", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=980406)
    parser.add_argument("--eval-datasets-dir", default="eval_datasets")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--no-baseline", action="store_true", help="skip plain target decoding")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature} is invalid, must be >= 0")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} is invalid, must be >= 1")
    if args.max_samples is not None and args.max_samples < 1:
        raise ConfigError(f"--max-samples {args.max_samples} is invalid, must be >= 1")
    from deepspec.data import load_eval_prompts
    from deepspec.targets import resolve_target

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for task in tasks:
        cap = args.max_samples or DEFAULT_EVAL_TASKS.get(task)
        load_eval_prompts(task, args.eval_datasets_dir, max_samples=cap, seed=args.seed)
    resolve_target(args.target_name_or_path)
    raise NotBuiltYetError("speculative-decoding evaluation is not available in this version of deepspec yet")


if __name__ == "__main__":
    run_main(main)
