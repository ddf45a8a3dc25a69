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
import os

from deepspec.cli import run_main
from deepspec.config.schema import DEFAULT_EVAL_TASKS
from deepspec.errors import ConfigError


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
    parser.add_argument(
        "--baseline-from",
        default=None,
        metavar="DIR",
        help="reuse the plain-decoding runs of an earlier --output-dir made with the same target, "
        "tasks, prompts and decoding settings (when comparing several drafts, decode the baseline once)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="worker processes (default: one per visible GPU, else 1); prompts are split across them",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="target and draft precision; auto = fp32 at temperature 0 (bf16 matmuls of "
        "different shapes can flip near-tied greedy choices), bf16 otherwise",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature} is invalid, must be >= 0")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} is invalid, must be >= 1")
    if args.max_samples is not None and args.max_samples < 1:
        raise ConfigError(f"--max-samples {args.max_samples} is invalid, must be >= 1")
    if not 0 <= args.confidence_threshold <= 1:
        raise ConfigError(f"--confidence-threshold {args.confidence_threshold} is invalid, must be in [0, 1]")
    import torch

    from deepspec.data import load_eval_prompts
    from deepspec.drafts import load_draft
    from deepspec.eval.runner import EvalSettings, check_draft_matches_target, evaluate, format_table
    from deepspec.targets import load_family_spec, resolve_target

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for task in tasks:  # fail on a bad task before loading any model
        load_eval_prompts(task, args.eval_datasets_dir, max_samples=1, seed=args.seed)
    target_dir = resolve_target(args.target_name_or_path)
    torch.manual_seed(args.seed)
    draft = load_draft(args.draft_name_or_path)  # fail here, once, on a bad checkpoint
    settings = EvalSettings(
        tasks=tasks,
        max_samples=args.max_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        confidence_threshold=args.confidence_threshold,
        seed=args.seed,
        eval_datasets_dir=args.eval_datasets_dir,
        output_dir=args.output_dir,
        baseline=not args.no_baseline,
        dtype=args.dtype,
        baseline_from=args.baseline_from,
    )
    check_draft_matches_target(draft, load_family_spec(target_dir), args.target_name_or_path)
    results = evaluate(
        target_dir,
        args.draft_name_or_path,
        settings,
        target_name=args.target_name_or_path,
        num_workers=args.num_workers,
    )
    name = os.path.basename(os.path.realpath(os.path.expanduser(args.draft_name_or_path)).rstrip("/"))
    print(format_table(results, f"{draft.algorithm}:{name}"))
    if args.output_dir:
        print(f"results: {os.path.join(args.output_dir, 'results.json')}")
    return 0


if __name__ == "__main__":
    run_main(main)
