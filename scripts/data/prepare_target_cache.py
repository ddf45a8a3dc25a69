"""Run the frozen target over regenerated conversations and store its hidden states.

The cache holds, per conversation, the token ids, the loss mask, the outputs of
``model.target_layer_ids`` (``-1`` = embeddings) and the final normed hidden state; its
format is described in scripts/data/README.md and deepspec/data/cache_format.py.

CPU (gloo, 2 local processes; the embedded SmolLM2 target)::

    python scripts/data/prepare_target_cache.py --config config/dspark/dspark_smollm2_135m.py \\
        --train-data-path outputs/data/embedded/regenerated.jsonl \\
        --output-dir outputs/data/embedded/target_cache --nproc 2

One GPU / all GPUs of a node (NCCL, one process per GPU)::

    torchrun --nproc_per_node 8 scripts/data/prepare_target_cache.py \\
        --config config/dspark/dspark_qwen3_4b.py --train-data-path data/regen/qwen3_4b.jsonl \\
        --output-dir /data/caches/qwen3_4b --local-batch-size 8

Several nodes (same command on every node; the output directory on shared storage)::

    torchrun --nnodes 4 --node_rank $NODE_RANK --nproc_per_node 8 \\
        --master_addr $MASTER --master_port 29500 scripts/data/prepare_target_cache.py ...

An interrupted run continues with ``--resume`` (finished shards are re-hashed and kept).
Without a ``manifest.json`` the directory is not a usable cache; the reader refuses it.
``--resume`` on a finished cache re-hashes every shard and rebuilds what is damaged.
"""

from __future__ import annotations

import argparse

from deepspec.cli import ArgumentParser, run_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="training config (.py or .yaml); its model and data keys apply")
    parser.add_argument(
        "--opts",
        action="append",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --opts data.max_length=2048 (repeatable)",
    )
    parser.add_argument(
        "--train-data-path",
        action="append",
        default=None,
        help="regenerated conversation JSONL (repeatable; default: data.train_data_paths)",
    )
    parser.add_argument("--output-dir", help="cache directory (default: data.target_cache_path)")
    parser.add_argument("--local-batch-size", type=int, default=4, help="conversations per target forward")
    parser.add_argument(
        "--num-workers", type=int, default=0, help="tokenization processes per rank (0 = in the rank itself)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --output-dir; on a finished cache, re-hash every shard "
        "and rebuild the damaged ones",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete an existing cache in --output-dir first"
    )
    parser.add_argument(
        "--hidden-dtype", choices=("bf16", "fp8"), default="bf16", help="storage dtype of hidden states"
    )
    parser.add_argument(
        "--target-dtype", choices=("bf16", "fp32"), default="bf16", help="dtype the target runs in"
    )
    parser.add_argument(
        "--rows-per-shard", type=int, default=512, help="source rows per shard (the unit of --resume)"
    )
    parser.add_argument(
        "--on-nonfinite",
        choices=("skip", "abort"),
        default="skip",
        help="a sample with NaN/inf hidden states: skip and count it, or stop",
    )
    parser.add_argument(
        "--ignore-disk-space", action="store_true", help="start even if the disk looks too small"
    )
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) malformed rows")
    parser.add_argument(
        "--nproc", type=int, default=1, help="local processes on CPU (gloo); use torchrun on GPUs"
    )
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=0,
        help="torch threads per CPU process (default: cores / processes)",
    )
    parser.add_argument(
        "--dist-timeout-minutes", type=float, default=180.0, help="how long a rank waits for the others"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    _check_numbers(args)
    return args


def _check_numbers(args: argparse.Namespace) -> None:
    """Every numeric argument: finite and in range (one ``error:`` line otherwise)."""
    from deepspec.errors import check_number

    check_number("--local-batch-size", args.local_batch_size, low=1)
    check_number("--num-workers", args.num_workers, low=0, high=1024)
    check_number("--rows-per-shard", args.rows_per_shard, low=1)
    check_number("--nproc", args.nproc, low=1, high=1024)
    check_number("--cpu-threads", args.cpu_threads, low=0, high=4096)
    check_number("--dist-timeout-minutes", args.dist_timeout_minutes, low=0, low_open=True, high=7 * 24 * 60)


def main() -> int:
    from deepspec.config import load_config
    from deepspec.data.cache_builder import CacheBuildOptions, run_worker
    from deepspec.data.cache_plan import check_options
    from deepspec.errors import ConfigError
    from deepspec.utils.distributed import spawn

    args = parse_args()
    cfg = load_config(args.config, [o for group in args.opts for o in group])
    opts = CacheBuildOptions.from_config(
        cfg,
        train_data_paths=args.train_data_path,
        output_dir=args.output_dir,
        local_batch_size=args.local_batch_size,
        num_workers=args.num_workers,
        cpu_threads=args.cpu_threads,
        resume=args.resume,
        overwrite=args.overwrite,
        hidden_dtype=args.hidden_dtype,
        target_dtype=args.target_dtype,
        rows_per_shard=args.rows_per_shard,
        on_nonfinite=args.on_nonfinite,
        ignore_disk_space=args.ignore_disk_space,
        skip_bad_rows=args.skip_bad_rows,
        progress=not args.no_progress,
    )
    if not opts.output_dir:
        raise ConfigError("no cache directory: pass --output-dir or set data.target_cache_path")
    if not opts.train_data_paths:
        raise ConfigError("no training data: pass --train-data-path or set data.train_data_paths")
    check_options(opts)  # before any process starts: bad options and data files fail here
    if args.nproc == 1:
        run_worker(opts, args.dist_timeout_minutes)
        return 0
    spawn(run_worker, args.nproc, opts, args.dist_timeout_minutes)  # a worker's error: one line
    return 0


if __name__ == "__main__":
    run_main(main)
