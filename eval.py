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

from deepspec.cli import ArgumentParser, run_main
from deepspec.data.eval_prompts import DEFAULT_EVAL_TASKS
from deepspec.errors import ConfigError, check_number
from deepspec.eval.settings import EvalSettings

MAX_SEED = 2**32 - 1
DEFAULTS = EvalSettings(tasks=list(DEFAULT_EVAL_TASKS))  # the one home of the defaults below


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target_name_or_path", "--target-name-or-path", required=True)
    parser.add_argument("--draft_name_or_path", "--draft-name-or-path", required=True)
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_EVAL_TASKS),
        help="comma-separated benchmark names (files in --eval-datasets-dir)",
    )
    parser.add_argument(
        "--max-samples", type=int, default=DEFAULTS.max_samples, help="cap per task (default: task caps)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=DEFAULTS.temperature)
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=DEFAULTS.confidence_threshold,
        help="threshold policy (the DeepSpec reference's rule): verify the drafted tokens before the "
        "first slot whose own confidence c_k = sigmoid(l_k) is below this (none when slot 0 is)",
    )
    parser.add_argument(
        "--survival-threshold",
        type=float,
        default=DEFAULTS.survival_threshold,
        help="cumulative policy: verify the drafted tokens before the first slot whose cumulative "
        "survival c_0 * ... * c_k is below this",
    )
    parser.add_argument(
        "--policy",
        choices=("auto", "fixed", "threshold", "cumulative", "scheduled"),
        default=DEFAULTS.policy,
        help="how many drafted tokens to verify: fixed (the whole block), threshold "
        "(--confidence-threshold), cumulative (--survival-threshold), scheduled (DSpark's prefix "
        "scheduler with --sps-table); auto = the policy of the threshold flag given, else fixed",
    )
    parser.add_argument(
        "--sps-table",
        default=DEFAULTS.sps_table,
        metavar="JSON",
        help="steps/s of the target per batch token count, for --policy scheduled "
        "(python benchmarks/sps_profile.py writes it)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULTS.batch_size,
        help="requests decoded at once (continuous batching); the baseline decodes as many",
    )
    parser.add_argument(
        "--split",
        choices=("report", "calibration"),
        default=DEFAULTS.split,
        help="calibration: prompts disjoint from the reported ones, for python -m deepspec.eval.calibration",
    )
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--eval-datasets-dir", default=DEFAULTS.eval_datasets_dir)
    parser.add_argument("--output-dir", default=DEFAULTS.output_dir)
    parser.add_argument("--no-baseline", action="store_true", help="skip plain target decoding")
    parser.add_argument(
        "--allow-other-target",
        action="store_true",
        help="evaluate the draft with a target other than the one it was trained for (refused by default)",
    )
    parser.add_argument(
        "--baseline-from",
        default=DEFAULTS.baseline_from,
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
        default=DEFAULTS.dtype,
        help="target and draft precision; auto = fp32 at temperature 0 (bf16 matmuls of "
        "different shapes can flip near-tied greedy choices), bf16 otherwise",
    )
    return parser.parse_args(argv)


def parse_tasks(raw: str, datasets_dir: str) -> list[str]:
    """The ``--tasks`` list; refuses an empty list, unknown names and repeats, naming the valid tasks."""
    from deepspec.data.eval_prompts import available_tasks

    if not os.path.isdir(datasets_dir):
        raise ConfigError(
            f"--eval-datasets-dir {datasets_dir} is not a directory; pass the folder with the "
            "<task>.jsonl prompt files (eval_datasets/ in the repository)"
        )
    valid = available_tasks(datasets_dir)
    choices = f"valid tasks in {datasets_dir}: {', '.join(valid) or 'none (no .jsonl files)'}"
    tasks = [t.strip() for t in raw.split(",") if t.strip()]
    if not tasks:
        raise ConfigError(f"--tasks {raw!r} names no task; {choices}")
    unknown = [t for t in tasks if t not in valid]
    if unknown:
        raise ConfigError(f"--tasks: unknown task(s) {', '.join(unknown)}; {choices}")
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        raise ConfigError(f"--tasks lists {', '.join(repeated)} more than once; name each task once")
    return tasks


def check_args(args: argparse.Namespace) -> list[str]:
    """Every numeric argument finite and in range, the tasks valid; returns the task list."""
    check_number("--temperature", args.temperature, low=0)
    check_number("--max-new-tokens", args.max_new_tokens, low=1)
    if args.max_samples is not None:
        check_number("--max-samples", args.max_samples, low=1)
    check_number("--confidence-threshold", args.confidence_threshold, low=0, high=1)
    check_number("--survival-threshold", args.survival_threshold, low=0, high=1)
    if not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(f"--seed must be an integer in 0..{MAX_SEED}, got {args.seed}")
    if args.num_workers is not None:
        check_number("--num-workers", args.num_workers, low=1)
    check_number("--batch-size", args.batch_size, low=1)
    policy = check_policy_args(args)
    if policy == "scheduled" and not args.sps_table:
        raise ConfigError(
            "--policy scheduled needs --sps-table (write one with python benchmarks/sps_profile.py)"
        )
    if args.sps_table and policy != "scheduled":
        raise ConfigError("--sps-table is read by --policy scheduled only")
    if args.no_baseline and args.baseline_from:
        raise ConfigError("--baseline-from reuses a baseline that --no-baseline skips; pass only one of them")
    for flag in ("target_name_or_path", "draft_name_or_path"):
        if not getattr(args, flag).strip():
            raise ConfigError(f"--{flag} is empty; pass a path or name")
    return parse_tasks(args.tasks, args.eval_datasets_dir)


def check_policy_args(args: argparse.Namespace) -> str:
    """The verification policy the flags ask for; refuses a threshold policy without its
    threshold, a threshold flag given to another policy, and both threshold flags under auto."""
    from deepspec.eval.settings import THRESHOLD_FLAGS, resolve_policy

    policy = resolve_policy(args.policy, args.confidence_threshold, args.survival_threshold)
    given = {"threshold": args.confidence_threshold, "cumulative": args.survival_threshold}
    for name, flag in THRESHOLD_FLAGS.items():
        if policy == name and given[name] <= 0:
            raise ConfigError(f"--policy {name} needs {flag} > 0")
        if policy != name and given[name] > 0:
            raise ConfigError(f"{flag} applies to --policy {name}, not {policy}")
    return policy


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tasks = check_args(args)
    from deepspec.drafts.checkpoint import check_draft_target
    from deepspec.eval.runner import plan_evaluation

    local = os.path.expanduser(args.draft_name_or_path)  # the label: the step, or the hub id's name
    draft_label = os.path.basename(
        os.path.realpath(local) if os.path.exists(local) else os.path.normpath(local)
    )
    settings = EvalSettings(
        tasks=tasks,
        max_samples=args.max_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        confidence_threshold=args.confidence_threshold,
        survival_threshold=args.survival_threshold,
        seed=args.seed,
        eval_datasets_dir=args.eval_datasets_dir,
        output_dir=args.output_dir,
        baseline=not args.no_baseline,
        dtype=args.dtype,
        baseline_from=args.baseline_from,
        split=args.split,
        batch_size=args.batch_size,
        policy=args.policy,
        sps_table=args.sps_table,
    )
    # prompts, SPS table, policy vs the draft's heads, output dir, baseline: read once, and
    # refused here before any model loads
    plan = plan_evaluation(args.draft_name_or_path, settings, args.target_name_or_path)
    args.draft_name_or_path = plan.draft_path  # a hub id resolved to its local directory
    from deepspec.targets import load_family_spec, resolve_target

    target_dir = resolve_target(args.target_name_or_path)
    spec = load_family_spec(target_dir)
    import torch

    from deepspec.drafts import load_draft
    from deepspec.eval.runner import check_draft_matches_target, format_table, run_plan

    torch.manual_seed(args.seed)
    check_draft_target(
        os.path.expanduser(args.draft_name_or_path),
        target_dir,
        allow_other=args.allow_other_target,
        flag="--allow-other-target",
    )
    draft = load_draft(args.draft_name_or_path)  # fail here, once, on a bad checkpoint
    check_draft_matches_target(draft, spec, args.target_name_or_path)
    results = run_plan(target_dir, plan, draft=draft, num_workers=args.num_workers)
    print(format_table(results, f"{draft.algorithm}:{draft_label}"))
    if args.output_dir:
        print(f"results: {os.path.join(args.output_dir, 'results.json')}")
    return 0


if __name__ == "__main__":
    run_main(main)
