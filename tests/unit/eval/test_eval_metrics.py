"""Evaluation metrics (deepspec.eval.metrics) against hand-computed values, and the PNG writers."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from scipy import stats

from deepspec.eval.metrics import (
    acceptance_stats,
    auroc,
    brier_score,
    calibration_stats,
    expected_calibration_error,
    macro_average,
    reliability_bins,
    threshold_sweep,
)
from deepspec.eval.plots import plot_conditional_acceptance, plot_reliability, plot_threshold_sweep

# Four rounds: proposed / accepted, and each round's conditional confidences.
PROPOSED = [3, 3, 2, 3]
ACCEPTED = [3, 1, 0, 2]
CONFIDENCES = [[0.9, 0.8, 0.7], [0.6, 0.9, 0.9], [0.3, 0.5], [0.95, 0.85, 0.2]]


def direct_ece(conf, out, bins=10):
    conf, out = np.asarray(conf, float), np.asarray(out, float)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        sel = (conf >= lo) & ((conf < hi) if b < bins - 1 else (conf <= hi))
        if sel.any():
            total += sel.sum() / conf.size * abs(out[sel].mean() - conf[sel].mean())
    return total


def direct_auroc(conf, out):
    pos = [c for c, y in zip(conf, out) if y]
    neg = [c for c, y in zip(conf, out) if not y]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


# ----------------------------------------------------------------------------- acceptance


def test_acceptance_stats_hand_example():
    s = acceptance_stats(PROPOSED, ACCEPTED)
    assert s.num_rounds == 4
    assert s.acceptance_length == pytest.approx((4 + 2 + 1 + 3) / 4)
    assert s.draft_tokens_per_proposal == pytest.approx(11 / 4)
    assert s.verify_rate == pytest.approx(6 / 11)
    # P(>= k accepted | >= k proposed)
    assert s.accept_rate_at_k == pytest.approx([3 / 4, 2 / 4, 1 / 3])
    # P(k accepted | k proposed and 1..k-1 accepted)
    assert s.conditional_accept_rate_at_k == pytest.approx([3 / 4, 2 / 3, 1 / 2])


def test_acceptance_stats_edges():
    empty = acceptance_stats([], [])
    assert empty.num_rounds == 0 and math.isnan(empty.acceptance_length)
    assert empty.to_dict()["verify_rate"] is None
    wide = acceptance_stats([1, 1], [0, 1], max_position=3)
    assert wide.accept_rate_at_k[0] == 0.5 and math.isnan(wide.accept_rate_at_k[2])
    assert wide.to_dict()["conditional_accept_rate_at_k"] == [0.5, None, None]
    with pytest.raises(ValueError, match="accepted <= proposed"):
        acceptance_stats([2], [3])
    with pytest.raises(ValueError, match="one entry per round"):
        acceptance_stats([2, 2], [1])


def test_conditional_rates_multiply_to_accept_rate_with_full_proposals():
    rng = np.random.default_rng(0)
    accepted = rng.integers(0, 8, 500)
    s = acceptance_stats(np.full(500, 7), accepted)
    assert np.cumprod(s.conditional_accept_rate_at_k) == pytest.approx(s.accept_rate_at_k)
    assert s.acceptance_length == pytest.approx(1 + sum(s.accept_rate_at_k))


# ----------------------------------------------------------------------------- calibration


def test_calibration_hand_example():
    per_position = calibration_stats(CONFIDENCES, PROPOSED, ACCEPTED)
    assert [c.position for c in per_position] == [1, 2, 3, 0]
    assert [c.count for c in per_position] == [4, 3, 2, 9]
    first = per_position[0]  # confidences .9 .6 .3 .95, outcomes 1 1 0 1
    assert first.ece == pytest.approx(2 / 4 * 0.075 + 1 / 4 * 0.4 + 1 / 4 * 0.3)
    assert first.brier == pytest.approx((0.01 + 0.16 + 0.09 + 0.0025) / 4)
    assert first.auroc == 1.0
    assert per_position[1].auroc == 0.0  # the one rejection had the highest confidence
    pooled = per_position[3]  # negatives .3 .9 .2 vs six positives, one tie at .9
    assert pooled.auroc == pytest.approx(13.5 / 18)
    bins = first.reliability
    assert bins.count == [0, 0, 0, 1, 0, 0, 1, 0, 0, 2]
    assert bins.mean_confidence[9] == pytest.approx(0.925) and bins.accuracy[9] == 1.0
    assert math.isnan(bins.accuracy[0])
    assert first.to_dict()["reliability"]["accuracy"][0] is None


def test_calibration_cumulative_mode():
    per_position = calibration_stats(CONFIDENCES, PROPOSED, ACCEPTED, cumulative=True)
    assert [c.count for c in per_position] == [4, 4, 3, 11]  # every proposed position counts
    second = per_position[1]  # scores .72 .54 .15 .8075 against survival 1 0 0 1
    assert second.brier == pytest.approx(((0.72 - 1) ** 2 + 0.54**2 + 0.15**2 + (0.8075 - 1) ** 2) / 4)
    assert second.auroc == 1.0


def test_scores_match_direct_formulas():
    rng = np.random.default_rng(1)
    conf = np.round(rng.random(400), 2)  # rounding creates ties
    out = rng.random(400) < conf
    assert expected_calibration_error(conf, out) == pytest.approx(direct_ece(conf, out))
    assert expected_calibration_error(conf, out, 7) == pytest.approx(direct_ece(conf, out, 7))
    assert brier_score(conf, out) == pytest.approx(np.mean((conf - out) ** 2))
    assert auroc(conf, out) == pytest.approx(direct_auroc(conf, out))
    u = stats.mannwhitneyu(conf[out], conf[~out]).statistic
    assert auroc(conf, out) == pytest.approx(u / (out.sum() * (~out).sum()))
    bins = reliability_bins(conf, out, 5)
    assert sum(bins.count) == 400 and bins.upper[-1] == 1.0


def test_score_edges():
    assert math.isnan(auroc([0.2, 0.9], [1, 1]))  # one class only
    assert auroc([0.5, 0.5], [0, 1]) == 0.5
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0  # 1.0 falls in the last bin
    assert math.isnan(expected_calibration_error([], []))
    assert math.isnan(brier_score([], []))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier_score([1.2], [1])
    with pytest.raises(ValueError, match="0/1"):
        auroc([0.5], [2])
    with pytest.raises(ValueError, match="positions"):
        calibration_stats([[0.5]], [2], [1])


# ----------------------------------------------------------------------------- threshold sweep


def test_threshold_sweep_hand_example_per_slot():
    # round 0 .9 .8 .5 (2 of 3 accepted); round 1 .6 .9 (0 of 2): cut at the first c_k < t
    sweep = threshold_sweep([[0.9, 0.8, 0.5], [0.6, 0.9]], [3, 2], [2, 0], [0.0, 0.55, 0.7, 0.85, 1.0])
    assert sweep.draft_tokens_per_proposal == pytest.approx([2.5, 2.0, 1.0, 0.5, 0.0])
    assert sweep.tokens_per_step == pytest.approx([2.0, 2.0, 2.0, 1.5, 1.0])
    with pytest.raises(ValueError, match="rule"):
        threshold_sweep([[0.5]], [1], [1], rule="product")


def test_threshold_sweep_hand_example_cumulative():
    # survival: round 0 .9 .72 .36 (2 of 3 accepted); round 1 .6 .54 (0 of 2 accepted)
    sweep = threshold_sweep(
        [[0.9, 0.8, 0.5], [0.6, 0.9]], [3, 2], [2, 0], [0.0, 0.5, 0.7, 0.8, 1.0], rule="cumulative"
    )
    assert sweep.draft_tokens_per_proposal == pytest.approx([2.5, 2.0, 1.0, 0.5, 0.0])
    assert sweep.tokens_per_step == pytest.approx([2.0, 2.0, 2.0, 1.5, 1.0])
    assert sweep.acceptance_rate[:4] == pytest.approx([2 / 5, 2 / 4, 1.0, 1.0])
    assert math.isnan(sweep.acceptance_rate[4])  # nothing proposed
    assert sweep.to_dict()["acceptance_rate"][4] is None


def test_threshold_sweep_monotone_and_matches_untruncated_at_zero():
    rng = np.random.default_rng(2)
    rounds = 300
    conf = rng.uniform(0.3, 1.0, (rounds, 7))
    accepted = np.array([np.argmin(np.r_[rng.random(7) < c, False]) for c in conf])  # survive w.p. c_k
    proposed = np.full(rounds, 7)
    sweep = threshold_sweep(conf, proposed, accepted)
    assert sweep.thresholds[0] == 0.0 and sweep.thresholds[-1] == 1.0 and len(sweep.thresholds) == 21
    base = acceptance_stats(proposed, accepted)
    assert sweep.tokens_per_step[0] == pytest.approx(base.acceptance_length)
    assert sweep.acceptance_rate[0] == pytest.approx(base.verify_rate)
    assert np.all(np.diff(sweep.tokens_per_step) <= 1e-12)
    assert np.all(np.diff(sweep.draft_tokens_per_proposal) <= 1e-12)
    assert sweep.tokens_per_step[-1] >= 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        threshold_sweep([[1.5]], [1], [1])


# ----------------------------------------------------------------------------- macro average


def test_macro_average():
    datasets = [
        {"tau": 2.0, "rates": [0.5, 1.0], "speedup": math.nan},
        {"tau": 4.0, "rates": [0.7], "speedup": None},
        {"rates": None},
    ]
    avg = macro_average(datasets, ["tau", "rates", "speedup", "missing"])
    assert avg["tau"] == 3.0
    assert avg["rates"] == pytest.approx([0.6, 1.0])
    assert avg["speedup"] is None and avg["missing"] is None
    assert macro_average([acceptance_stats(PROPOSED, ACCEPTED).to_dict()] * 2, ["acceptance_length"]) == {
        "acceptance_length": 2.5
    }


# ----------------------------------------------------------------------------- plots


def _assert_png(path, directory):
    with open(path, "rb") as fh:
        data = fh.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert not [f for f in os.listdir(directory) if f.endswith(".tmp")]


def test_plots_write_png(tmp_path):
    acc = acceptance_stats(PROPOSED, ACCEPTED)
    out = plot_conditional_acceptance(
        {"gsm8k": acc, "mt-bench": acc.to_dict(), "raw": [0.9, None, 0.4, 0.2]}, tmp_path / "cond.png"
    )
    assert out == str(tmp_path / "cond.png")
    _assert_png(out, tmp_path)
    calib = calibration_stats(CONFIDENCES, PROPOSED, ACCEPTED)
    _assert_png(plot_reliability(calib, tmp_path / "sub" / "rel.png", title="draft"), tmp_path / "sub")
    _assert_png(plot_reliability([c.to_dict() for c in calib[:1]], tmp_path / "rel1.png"), tmp_path)
    sweep = threshold_sweep(CONFIDENCES, PROPOSED, ACCEPTED)
    _assert_png(
        plot_threshold_sweep({"gsm8k": sweep, "alpaca": sweep.to_dict()}, tmp_path / "sweep.png"), tmp_path
    )
