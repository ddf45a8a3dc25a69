"""Train a draft model (DSpark, DFlash or Eagle3) for a target LLM.

CPU (gloo workers, count from train.num_cpu_workers):
    python train.py --config config/dspark/dspark_smollm2_135m.py \
        --opts data.target_cache_path=<cache dir>
One node, one worker per visible GPU:
    CUDA_VISIBLE_DEVICES=0,1,2,3 python train.py --config config/dspark/dspark_qwen3_4b.py \
        --opts data.target_cache_path=<cache dir>
Several nodes (run on each; torchrun-style env names the node):
    MASTER_ADDR=<node0> MASTER_PORT=29500 RANK=<node rank> WORLD_SIZE=<nodes> python train.py ...

Any config key can be overridden: --opts train.lr=3e-4 --opts model.block_size=8
"""

from __future__ import annotations

import argparse
import os

from deepspec.cli import ArgumentParser, run_main
from deepspec.config import load_config, validate_against_target


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file (.py or .yaml) under config/")
    parser.add_argument(
        "--opts",
        action="append",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --opts train.lr=3e-4 (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = [o for group in args.opts for o in group]
    cfg = load_config(args.config, opts)  # fails on a bad key before any worker starts
    from deepspec.train.launch import launch, local_worker_count

    if local_worker_count(cfg) > 1 and "LOCAL_RANK" not in os.environ:
        preflight(cfg)  # one clear error line instead of one per worker
    launch(args.config, opts, cfg)
    return 0


def preflight(cfg) -> None:
    """Check target, config and cache once, before workers start."""
    from deepspec.targets import load_family_spec, resolve_target
    from deepspec.train.trainer import check_output_dirs

    target_dir = resolve_target(cfg.model.target_model_name_or_path)
    validate_against_target(cfg, load_family_spec(target_dir))
    check_output_dirs(cfg)
    if cfg.data.mode == "offline":
        from deepspec.data.cache_reader import validate_cache_for_config
        from deepspec.errors import DataError

        if not cfg.data.target_cache_path:
            raise DataError("data.mode=offline needs data.target_cache_path")
        validate_cache_for_config(os.path.expanduser(cfg.data.target_cache_path), cfg, target_dir)


if __name__ == "__main__":
    run_main(main)
