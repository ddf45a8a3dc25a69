"""Score a draft on samples with its own training loss and anchors, once with the target's
context features and once with them zeroed: does the draft read the target?

Used by the trainer for the periodic held-out metrics (``data.heldout_samples``,
``logging.heldout_steps``) and by ``benchmarks/feature_use.py`` / ``benchmarks/overfit.py``.
Anchors come from the trainer's per-sample generators for epoch 0, so both passes score the
same positions. Only ``hidden_states`` is zeroed: the target's final state, which defines
the TV term's target distribution, stays real.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from deepspec.config import Config
from deepspec.train.batch import prepare_micro_batch

REPORTED = ("ce", "accuracy@1", "accept_rate@1", "tau_probabilistic")


@torch.no_grad()
def score(
    module: nn.Module,
    cfg: Config,
    dataset: Any,
    indices: Sequence[int],
    *,
    batch: int,
    pad_id: int = 0,
    features: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, float]]:
    """``{"real": metrics, "zero": metrics}`` of ``module`` (a
    :class:`~deepspec.train.batch.TrainModule`) over ``dataset[indices]``, each metric
    averaged over supervised positions; ``positions`` counts them."""
    device = torch.device(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    was_training = module.training
    module.eval()
    sums = {"real": {}, "zero": {}}
    totals = {"real": 0.0, "zero": 0.0}
    try:
        for start in range(0, len(indices), batch):
            chunk = list(indices[start : start + batch])
            data, extra, weight = prepare_micro_batch(
                cfg, dataset, chunk, epoch=0, pad_id=pad_id, features=features, device=device
            )
            for name in ("real", "zero"):
                run = dict(data)
                if name == "zero":
                    run["hidden_states"] = torch.zeros_like(data["hidden_states"])
                with autocast:
                    res = module(run, extra, weight)
                n = res.metrics.get("supervised_positions", 1.0)
                totals[name] += n
                for key in REPORTED:
                    if key in res.metrics:
                        sums[name][key] = sums[name].get(key, 0.0) + res.metrics[key] * n
    finally:
        module.train(was_training)
    out = {}
    for name in ("real", "zero"):
        out[name] = {k: v / max(totals[name], 1.0) for k, v in sums[name].items()}
        out[name]["positions"] = totals[name]
    return out


PREFIX = "heldout/"


def flat_metrics(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """Scores as log scalars: ``heldout/ce``, ``heldout/ce_zeroed``, ``heldout/ce_gap`` ...
    and ``heldout/positions``."""
    out = {f"{PREFIX}positions": scores["real"]["positions"]}
    for key in REPORTED:
        if key in scores["real"]:
            out[f"{PREFIX}{key}"] = scores["real"][key]
            out[f"{PREFIX}{key}_zeroed"] = scores["zero"][key]
            out[f"{PREFIX}{key}_gap"] = scores["zero"][key] - scores["real"][key]
    return out


def scores_from_metrics(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """The ``{"real", "zero"}`` scores back from logged :func:`flat_metrics`."""
    positions = metrics[f"{PREFIX}positions"]
    keys = [k for k in REPORTED if f"{PREFIX}{k}" in metrics]
    return {
        "real": {**{k: metrics[f"{PREFIX}{k}"] for k in keys}, "positions": positions},
        "zero": {**{k: metrics[f"{PREFIX}{k}_zeroed"] for k in keys}, "positions": positions},
    }
