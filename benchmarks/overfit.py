"""Can a draft memorize a handful of conversations, and what does a variant learn at a fixed
budget? Train on the cache's first ``--samples`` samples for ``--steps`` steps, then score
those samples (and, with ``--heldout M``, the cache's last M, which the run never saw) with
real and zeroed target features.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/overfit.py \
        --config config/dspark/dspark_smollm2_135m.py \
        --cache out/quickstart/fast/data/target_cache --samples 6 --steps 60 --batch 2

A draft that cannot memorize ~1,700 supervised tokens will not learn from 400
conversations either: this is the first check of any change to a draft or its training.
To compare variants on unseen data, train on 348 of the default profile's 388 conversations
and score the other 40 (``--samples 348 --heldout 40 --batch 4``).

The trainer runs in-process with the config's own settings (``--opts`` overrides any key);
the held-out scores are the trainer's own (``data.heldout_samples``, at the last step).
Checkpoints and logs go to a temporary directory unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.feature_use import measure, table  # noqa: E402


def overfit(
    config: str,
    cache: str,
    out: str,
    *,
    samples: int,
    steps: int,
    batch: int,
    opts: list[str],
    heldout: int = 0,
) -> dict[str, Any]:
    """Train on the first ``samples`` samples. Returns ``{"train": measure(the first 40 of
    them), "heldout": the trainer's scores of the last ``heldout`` samples (when asked),
    "seconds": training (and held-out scoring) time}``."""
    from deepspec.train.heldout import scores_from_metrics
    from deepspec.train.launch import run_worker

    run_opts = [
        f"data.target_cache_path={cache}",
        f"data.max_samples={samples}",
        f"data.heldout_samples={heldout}",
        f"train.max_train_steps={steps}",
        f"train.global_batch_size={batch}",
        f"train.local_batch_size={batch}",
        "train.num_cpu_workers=1",
        "train.resume=false",
        f"logging.checkpointing_steps={steps}",
        f"logging.checkpoint_dir={os.path.join(out, 'checkpoints')}",
        f"logging.tensorboard_dir={os.path.join(out, 'tensorboard')}",
        *opts,
    ]
    start = time.perf_counter()
    result = run_worker(config, run_opts)
    scores: dict[str, Any] = {"seconds": time.perf_counter() - start}
    # the training fit on at most 40 of the training samples (all of them in an overfit check)
    scores["train"] = measure(result.checkpoint, cache, samples=min(samples, 40), batch=batch)
    if heldout:
        scores["heldout"] = scores_from_metrics(result.metrics)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--cache", required=True, help="a target cache built for the config")
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heldout", type=int, default=0, help="also score the cache's last M samples")
    parser.add_argument("--out", help="keep checkpoints and logs here (default: a temporary dir)")
    parser.add_argument("--opts", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = overfit(
            args.config,
            args.cache,
            args.out or tmp,
            samples=args.samples,
            steps=args.steps,
            batch=args.batch,
            opts=args.opts,
            heldout=args.heldout,
        )
    print(
        f"{args.config} {' '.join(args.opts)}: {args.samples} samples, {args.steps} steps of batch "
        f"{args.batch}, trained in {result['seconds']:.0f}s"
    )
    for split in ("train", "heldout"):
        if split in result:
            print(f"{split} ({int(result[split]['real']['positions'])} supervised positions):")
            print(table(result[split]))
    print(f"({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    from deepspec.cli import run_main

    run_main(main)
