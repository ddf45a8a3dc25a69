"""Does a draft read the target? Its training loss terms on cached samples, once with the
target's features and once with them replaced by zeros.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/feature_use.py \
        --draft out/quickstart/fast/checkpoints/deepspec/dspark_smollm2_135m/step_40 \
        --cache out/quickstart/fast/data/target_cache --samples 32

The checkpoint's own training config (``trainer_state/config.yaml``) sets the loss and the
anchor sampling; anchors come from the trainer's per-sample generators, so both passes
score exactly the same positions. Only the context features (``hidden_states``) are zeroed:
the target's final state, which defines the TV term's target distribution, stays real.
A draft that reads the target shows a clear gap: higher CE and a lower first-slot accept
rate with zeroed features. With no gap, the draft is a language model of its own inputs.

The samples are the cache's first ``--samples`` after ``--skip`` (a run trained with
``data.max_samples=N`` is held out from samples N onwards: ``--skip N``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def measure(
    draft_dir: str, cache_dir: str, *, samples: int, batch: int, skip: int = 0
) -> dict[str, dict[str, float]]:
    """``{"real": metrics, "zero": metrics}``, each averaged over supervised positions."""
    from deepspec.config import load_config
    from deepspec.data.cache_reader import CacheDataset
    from deepspec.drafts import get_algorithm, load_draft
    from deepspec.train.batch import TrainModule
    from deepspec.train.heldout import score

    cfg = load_config(os.path.join(draft_dir, "trainer_state", "config.yaml"))
    draft = load_draft(draft_dir)
    alg = get_algorithm(cfg.algorithm)
    dataset = CacheDataset(cache_dir)
    indices = list(range(skip, min(skip + samples, len(dataset))))
    return score(TrainModule(draft, alg.loss, alg.loss_kwargs(cfg)), cfg, dataset, indices, batch=batch)


def table(result: dict[str, dict[str, Any]]) -> str:
    from deepspec.train.heldout import REPORTED

    keys = [k for k in REPORTED if k in result["real"]]
    lines = ["| features | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name in ("real", "zero"):
        lines.append(f"| {name} | " + " | ".join(f"{result[name][k]:.4f}" for k in keys) + " |")
    lines.append(
        "| gap (zero - real) | "
        + " | ".join(f"{result['zero'][k] - result['real'][k]:+.4f}" for k in keys)
        + " |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draft", required=True, help="a training checkpoint directory (step_N)")
    parser.add_argument("--cache", required=True, help="a target cache built for the draft's config")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--skip", type=int, default=0, help="score samples from this index on")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    start = time.perf_counter()
    result = measure(args.draft, args.cache, samples=args.samples, batch=args.batch, skip=args.skip)
    print(f"draft {args.draft}; {int(result['real']['positions'])} supervised positions per pass")
    print(table(result))
    print(f"({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    from deepspec.cli import run_main

    run_main(main)
