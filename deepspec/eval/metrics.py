"""Acceptance, calibration and threshold-sweep metrics computed from per-round records.

A *round* is one draft proposal verified by the target: ``proposed[r]`` draft tokens were
proposed and the first ``accepted[r]`` of them were accepted (``0 <= accepted <= proposed``).
Positions are 1-based in names (``accept_rate_at_k[0]`` is position 1). Undefined values
(nothing to average over) are NaN in the dataclasses and ``None`` in their ``to_dict()``.

Confidences (DSpark's head) are *conditional*: ``confidences[r, k-1]`` estimates the
probability that draft token ``k`` survives given that tokens ``< k`` did; position ``k``
of round ``r`` is a sample only if it was *reached* (proposed, and all earlier accepted).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "AcceptanceStats",
    "BinnedReliability",
    "CalibrationStats",
    "ThresholdSweep",
    "acceptance_stats",
    "auroc",
    "brier_score",
    "calibration_stats",
    "expected_calibration_error",
    "macro_average",
    "reliability_bins",
    "threshold_sweep",
]

ArrayLike = Sequence[float] | np.ndarray


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {key: _nan_to_none(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(value) for value in obj]
    return obj


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


def _rounds(proposed: ArrayLike, accepted: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    prop = np.asarray(proposed, dtype=np.int64).reshape(-1)
    acc = np.asarray(accepted, dtype=np.int64).reshape(-1)
    if prop.shape != acc.shape:
        raise ValueError(f"proposed and accepted need one entry per round, got {prop.size} and {acc.size}")
    if (acc < 0).any() or (acc > prop).any():
        raise ValueError("each round needs 0 <= accepted <= proposed")
    return prop, acc


@dataclass
class AcceptanceStats:
    num_rounds: int
    acceptance_length: float  # tau: mean over rounds of accepted + 1 (bonus/correction included)
    draft_tokens_per_proposal: float  # mean proposed
    verify_rate: float  # accepted / proposed tokens over all rounds
    accept_rate_at_k: list[float]  # [K] P(>= k accepted | >= k proposed)
    conditional_accept_rate_at_k: list[float]  # [K] P(k accepted | k proposed, < k all accepted)

    def to_dict(self) -> dict[str, Any]:
        return _nan_to_none(asdict(self))


def acceptance_stats(
    proposed: ArrayLike, accepted: ArrayLike, max_position: int | None = None
) -> AcceptanceStats:
    """Acceptance metrics (docs/DESIGN.md §3) from per-round ``proposed`` and ``accepted`` counts ``[R]``.

    ``max_position`` sets ``K`` for the per-position lists (default: the largest proposal).
    """
    prop, acc = _rounds(proposed, accepted)
    num_k = int(prop.max(initial=0)) if max_position is None else max_position
    at_k, conditional = [], []
    for k in range(1, num_k + 1):
        has_k = prop >= k  # rounds that proposed position k
        at_k.append(_ratio(np.sum(has_k & (acc >= k)), np.sum(has_k)))
        reached = has_k & (acc >= k - 1)  # ... and accepted every position before it
        conditional.append(_ratio(np.sum(reached & (acc >= k)), np.sum(reached)))
    return AcceptanceStats(
        num_rounds=int(prop.size),
        acceptance_length=float(np.mean(acc + 1)) if prop.size else math.nan,
        draft_tokens_per_proposal=float(np.mean(prop)) if prop.size else math.nan,
        verify_rate=_ratio(acc.sum(), prop.sum()),
        accept_rate_at_k=at_k,
        conditional_accept_rate_at_k=conditional,
    )


# ----------------------------------------------------------------------------- calibration


def _pairs(confidence: ArrayLike, outcome: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    out = np.asarray(outcome, dtype=np.float64).reshape(-1)
    if conf.shape != out.shape:
        raise ValueError(f"confidence and outcome differ in length: {conf.size} vs {out.size}")
    if not np.all((conf >= 0) & (conf <= 1)):
        raise ValueError("confidences must be finite and in [0, 1]")
    if not np.all((out == 0) | (out == 1)):
        raise ValueError("outcomes must be 0/1 (or booleans)")
    return conf, out


@dataclass
class BinnedReliability:
    """Equal-width bins on [0, 1]; empty bins have NaN means and count 0."""

    lower: list[float]  # [num_bins] bin lower edges
    upper: list[float]  # [num_bins] bin upper edges (the last bin includes 1.0)
    mean_confidence: list[float]  # [num_bins]
    accuracy: list[float]  # [num_bins] fraction of positive outcomes
    count: list[int]  # [num_bins]


def reliability_bins(confidence: ArrayLike, outcome: ArrayLike, num_bins: int = 10) -> BinnedReliability:
    """Reliability-diagram bins of ``confidence`` ``[N]`` against 0/1 ``outcome`` ``[N]``."""
    conf, out = _pairs(confidence, outcome)
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    index = np.minimum((conf * num_bins).astype(np.int64), num_bins - 1)
    count = np.bincount(index, minlength=num_bins)
    conf_sum = np.bincount(index, weights=conf, minlength=num_bins)
    out_sum = np.bincount(index, weights=out, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf, acc = conf_sum / count, out_sum / count
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    return BinnedReliability(
        edges[:-1].tolist(), edges[1:].tolist(), mean_conf.tolist(), acc.tolist(), count.tolist()
    )


def expected_calibration_error(confidence: ArrayLike, outcome: ArrayLike, num_bins: int = 10) -> float:
    """ECE = sum over bins of (n_bin / N) * |accuracy_bin - mean_confidence_bin|; NaN if N = 0."""
    bins = reliability_bins(confidence, outcome, num_bins)
    count = np.asarray(bins.count, dtype=np.float64)
    if count.sum() == 0:
        return math.nan
    gap = np.abs(np.nan_to_num(np.asarray(bins.accuracy) - np.asarray(bins.mean_confidence)))
    return float(np.sum(count * gap) / count.sum())


def brier_score(confidence: ArrayLike, outcome: ArrayLike) -> float:
    """Mean of (confidence - outcome)^2; NaN if N = 0."""
    conf, out = _pairs(confidence, outcome)
    return float(np.mean((conf - out) ** 2)) if conf.size else math.nan


def auroc(confidence: ArrayLike, outcome: ArrayLike) -> float:
    """Area under the ROC curve = P(conf of a positive > conf of a negative) + 0.5 P(tie).

    Rank-based (Mann-Whitney U with average ranks for ties); NaN when only one class is present.
    """
    conf, out = _pairs(confidence, outcome)
    num_pos = int(out.sum())
    num_neg = conf.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return math.nan
    order = np.argsort(conf, kind="mergesort")
    sorted_conf = conf[order]
    # average 1-based rank of each run of equal confidences
    starts = np.flatnonzero(np.r_[True, sorted_conf[1:] != sorted_conf[:-1]])
    ends = np.r_[starts[1:], conf.size]
    ranks = np.empty(conf.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    u_pos = ranks[out == 1].sum() - num_pos * (num_pos + 1) / 2.0
    return float(u_pos / (num_pos * num_neg))


def _confidence_matrix(confidences: Sequence[Sequence[float]] | np.ndarray, rounds: int) -> np.ndarray:
    """Ragged per-round confidences → ``[R, K]`` float64, NaN-padded."""
    if isinstance(confidences, np.ndarray) and confidences.ndim == 2:
        matrix = confidences.astype(np.float64)
    else:
        rows = [np.asarray(row, dtype=np.float64).reshape(-1) for row in confidences]
        width = max((row.size for row in rows), default=0)
        matrix = np.full((len(rows), width), np.nan)
        for i, row in enumerate(rows):
            matrix[i, : row.size] = row
    if matrix.shape[0] != rounds:
        raise ValueError(f"need one confidence row per round: {matrix.shape[0]} rows for {rounds} rounds")
    return matrix


@dataclass
class CalibrationStats:
    position: int  # 1-based draft position; 0 for all positions pooled
    count: int  # samples (reached positions)
    ece: float
    auroc: float
    brier: float
    reliability: BinnedReliability

    def to_dict(self) -> dict[str, Any]:
        return _nan_to_none(asdict(self))


def calibration_stats(
    confidences: Sequence[Sequence[float]] | np.ndarray,
    proposed: ArrayLike,
    accepted: ArrayLike,
    num_bins: int = 10,
    cumulative: bool = False,
) -> list[CalibrationStats]:
    """ECE / AUROC / Brier / reliability bins per position 1..K, then pooled (``position=0``).

    ``confidences``: ``[R, >= proposed[r]]`` conditional survival confidences (ragged lists or a
    NaN-padded array). By default position ``k`` of round ``r`` counts when reached
    (``accepted >= k - 1`` and ``proposed >= k``), with outcome ``accepted >= k``. With
    ``cumulative=True`` the score is ``prod_{i<=k} c_i`` against survival ``accepted >= k`` over
    every proposed position (the quantity docs/DESIGN.md §4's calibration targets).
    """
    prop, acc = _rounds(proposed, accepted)
    conf = _confidence_matrix(confidences, prop.size)
    num_k = int(prop.max(initial=0))
    if conf.shape[1] < num_k:
        raise ValueError(f"confidences have {conf.shape[1]} positions but a round proposed {num_k}")
    conf = conf[:, :num_k]
    if cumulative:
        conf = np.cumprod(np.nan_to_num(conf, nan=0.0), axis=1)
    positions = np.arange(1, num_k + 1)
    proposed_k = positions[None, :] <= prop[:, None]  # [R, K]
    reached = proposed_k if cumulative else proposed_k & (positions[None, :] <= acc[:, None] + 1)
    survived = positions[None, :] <= acc[:, None]  # [R, K]

    def stats(position: int, mask: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> CalibrationStats:
        c, y = scores[mask], labels[mask]
        return CalibrationStats(
            position=position,
            count=int(c.size),
            ece=expected_calibration_error(c, y, num_bins),
            auroc=auroc(c, y),
            brier=brier_score(c, y),
            reliability=reliability_bins(c, y, num_bins),
        )

    per_position = [stats(k, reached[:, k - 1], conf[:, k - 1], survived[:, k - 1]) for k in positions]
    return per_position + [stats(0, reached, conf, survived)]


# ----------------------------------------------------------------------------- threshold sweep


@dataclass
class ThresholdSweep:
    thresholds: list[float]  # [T]
    acceptance_rate: list[float]  # [T] accepted / proposed tokens after truncation
    tokens_per_step: list[float]  # [T] mean of (accepted within the truncated proposal + 1)
    draft_tokens_per_proposal: list[float]  # [T] mean truncated proposal length

    def to_dict(self) -> dict[str, Any]:
        return _nan_to_none(asdict(self))


def threshold_sweep(
    confidences: Sequence[Sequence[float]] | np.ndarray,
    proposed: ArrayLike,
    accepted: ArrayLike,
    thresholds: Iterable[float] | None = None,
    rule: str = "threshold",
) -> ThresholdSweep:
    """Confidence-threshold truncation replayed offline on rounds run without truncation.

    For threshold ``t`` a round keeps its first ``L`` tokens, cutting at the first position
    where, by ``rule`` (the verification policies of :mod:`deepspec.eval.policies`), the slot's
    own confidence ``c_k`` (``threshold``, the reference's ``--confidence-threshold``) or the
    survival estimate ``prod_{i<=k} c_i`` (``cumulative``) drops below ``t``. Acceptance of a
    prefix does not depend on what follows it, so ``min(accepted, L)`` is exactly what that
    round would accept. Default grid: 0, 0.05, ..., 1.
    """
    if rule not in ("threshold", "cumulative"):
        raise ValueError(f"rule must be threshold or cumulative, got {rule!r}")
    prop, acc = _rounds(proposed, accepted)
    conf = _confidence_matrix(confidences, prop.size)
    grid = np.linspace(0.0, 1.0, 21) if thresholds is None else np.asarray(list(thresholds), np.float64)
    num_k = conf.shape[1]
    if num_k < int(prop.max(initial=0)):
        raise ValueError(f"confidences have {num_k} positions but a round proposed {int(prop.max())}")
    within = np.arange(1, num_k + 1)[None, :] <= prop[:, None]  # [R, K]
    if not np.all((conf[within] >= 0) & (conf[within] <= 1)):
        raise ValueError("confidences of proposed positions must be finite and in [0, 1]")
    score = np.nan_to_num(conf, nan=0.0)  # [R, K] c_k
    if rule == "cumulative":
        score = np.cumprod(score, axis=1)  # prod_{i<=k} c_i
    rate, tokens, lengths = [], [], []
    for t in grid:
        keep = np.cumprod((score >= t) & within, axis=1)  # [R, K] prefix above the threshold
        length = keep.sum(axis=1)
        kept_accepted = np.minimum(acc, length)
        rate.append(_ratio(kept_accepted.sum(), length.sum()))
        tokens.append(float(np.mean(kept_accepted + 1)) if prop.size else math.nan)
        lengths.append(float(np.mean(length)) if prop.size else math.nan)
    return ThresholdSweep(grid.tolist(), rate, tokens, lengths)


# ----------------------------------------------------------------------------- averaging


def macro_average(per_dataset: Sequence[Mapping[str, Any]], keys: Iterable[str]) -> dict[str, Any]:
    """Unweighted mean over datasets of each key; NaN/None/missing values are skipped.

    Scalars average to a float; lists (per-position metrics) average position by position over
    the datasets that have that position. A key with no values at all maps to ``None``.
    """
    result: dict[str, Any] = {}
    for key in keys:
        values = [d[key] for d in per_dataset if d.get(key) is not None]
        if values and all(isinstance(v, list | tuple) for v in values):
            width = max(len(v) for v in values)
            result[key] = [_mean([v[i] for v in values if i < len(v)]) for i in range(width)]
        else:
            result[key] = _mean(values)
    return result


def _mean(values: Sequence[Any]) -> float | None:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else None
