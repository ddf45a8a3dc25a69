"""PNG figures for evaluation reports (matplotlib, Agg backend); every writer is atomic.

Each function takes metric dicts (``to_dict()`` of the dataclasses in
:mod:`deepspec.eval.metrics`, or the dataclasses themselves) and an output path, and returns
the path it wrote.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from deepspec.utils.io import atomic_open  # noqa: E402

__all__ = ["plot_conditional_acceptance", "plot_reliability", "plot_threshold_sweep"]


def _as_dict(obj: Any) -> dict[str, Any]:
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def _floats(values: Sequence[Any]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def _save(fig: Any, path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    try:
        with atomic_open(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_conditional_acceptance(
    per_dataset: Mapping[str, Any], path: str | os.PathLike[str], title: str | None = None
) -> str:
    """Grouped bars: conditional acceptance at position k (given < k accepted) per dataset.

    ``per_dataset``: dataset name → acceptance stats (dict or dataclass with
    ``conditional_accept_rate_at_k``) or directly the list of rates.
    """
    series = {}
    for name, stats in per_dataset.items():
        rates = stats if isinstance(stats, list | tuple) else _as_dict(stats)["conditional_accept_rate_at_k"]
        series[name] = _floats(rates)
    num_k = max((len(v) for v in series.values()), default=0)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * num_k + 3), 4))
    width = 0.8 / max(len(series), 1)
    positions = np.arange(1, num_k + 1)
    for i, (name, rates) in enumerate(series.items()):
        padded = np.full(num_k, math.nan)
        padded[: rates.size] = rates
        ax.bar(positions - 0.4 + width * (i + 0.5), np.nan_to_num(padded), width, label=name)
    ax.set_xticks(positions)
    ax.set_xlabel("draft position k")
    ax.set_ylabel("P(accept k | accepted < k)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title or "Conditional acceptance per position")
    if series:
        ax.legend(fontsize="small", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_reliability(
    calibration: Sequence[Any], path: str | os.PathLike[str], title: str | None = None
) -> str:
    """Reliability diagrams, one panel per position (and the pooled one, ``position == 0``).

    ``calibration``: the list returned by :func:`deepspec.eval.metrics.calibration_stats`
    (dataclasses or their dicts).
    """
    panels = [_as_dict(c) for c in calibration]
    cols = min(4, max(len(panels), 1))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        bins = panel["reliability"]
        lower, upper = _floats(bins["lower"]), _floats(bins["upper"])
        acc = np.nan_to_num(_floats(bins["accuracy"]))
        ax.bar(lower, acc, upper - lower, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="ideal")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        name = "pooled" if panel["position"] == 0 else f"position {panel['position']}"
        ece = panel.get("ece")
        ece_text = "n/a" if ece is None or math.isnan(ece) else f"{ece:.3f}"
        ax.set_title(f"{name}: ECE {ece_text}, n={panel['count']}", fontsize="small")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accepted fraction")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_threshold_sweep(
    sweeps: Mapping[str, Any], path: str | os.PathLike[str], title: str | None = None
) -> str:
    """Acceptance rate and tokens per step against the confidence threshold, one line per label.

    ``sweeps``: label (dataset or draft) → :class:`deepspec.eval.metrics.ThresholdSweep` or its dict.
    """
    fig, (ax_rate, ax_tokens) = plt.subplots(1, 2, figsize=(10, 4))
    for label, sweep in sweeps.items():
        data = _as_dict(sweep)
        t = _floats(data["thresholds"])
        ax_rate.plot(t, _floats(data["acceptance_rate"]), marker="o", markersize=3, label=label)
        ax_tokens.plot(t, _floats(data["tokens_per_step"]), marker="o", markersize=3, label=label)
    ax_rate.set_ylabel("acceptance rate")
    ax_tokens.set_ylabel("tokens per step")
    for ax in (ax_rate, ax_tokens):
        ax.set_xlabel("confidence threshold")
        ax.grid(alpha=0.3)
        if sweeps:
            ax.legend(fontsize="small")
    fig.suptitle(title or "Confidence-threshold sweep")
    fig.tight_layout()
    return _save(fig, path)
