"""STS calibration of the confidence head (deepspec/eval/calibration.py)."""

from __future__ import annotations

import numpy as np
import pytest

from deepspec.eval.calibration import cumulative_survival, fit_sts, position_ece


def simulate(rounds: int, gamma: int, overconfidence: float, seed: int = 0, ragged: bool = False):
    """Rounds whose true conditional survival is ``sigmoid(z)``; the head reports
    ``overconfidence * z`` (miscalibrated, well ordered)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.5, 1.5, size=(rounds, gamma))
    p = 1.0 / (1.0 + np.exp(-z))
    drafted = np.ones((rounds, gamma), dtype=bool)
    if ragged:  # each round drafts a prefix of 1..gamma positions
        n = rng.integers(1, gamma + 1, size=rounds)
        drafted = np.arange(gamma)[None] < n[:, None]
    survived = np.cumprod(rng.random((rounds, gamma)) < p, axis=1).astype(bool) & drafted
    return overconfidence * z, drafted, survived


@pytest.mark.parametrize("overconfidence", [3.0, 0.4])
def test_sts_lowers_ece_at_every_position_and_recovers_the_temperature(overconfidence):
    logits, drafted, survived = simulate(6000, 4, overconfidence)
    temps = fit_sts(logits, drafted, survived)
    before = position_ece(logits, drafted, survived, np.ones(4))
    after = position_ece(logits, drafted, survived, temps)
    for k in range(4):
        assert after[k] < before[k] and after[k] < 0.03, (k, before, after)
    assert np.all(np.abs(np.log(temps / overconfidence)) < np.log(1.35)), temps
    # held-out rounds from the same head: the fitted temperatures still calibrate
    held = simulate(6000, 4, overconfidence, seed=1)
    assert max(position_ece(*held, temps)) < 0.03


def test_sts_preserves_the_order_at_each_position():
    logits, drafted, survived = simulate(3000, 3, 2.5)
    temps = fit_sts(logits, drafted, survived)
    calibrated = 1.0 / (1.0 + np.exp(-logits / temps))
    for k in range(3):
        assert np.array_equal(
            np.argsort(calibrated[:, k], kind="stable"), np.argsort(logits[:, k], kind="stable")
        )


def test_sts_fits_in_order_with_earlier_positions_fixed():
    logits, drafted, survived = simulate(4000, 5, 2.0, ragged=True)
    full = fit_sts(logits, drafted, survived)
    for j in range(1, 5):
        assert np.array_equal(fit_sts(logits[:, :j], drafted[:, :j], survived[:, :j]), full[:j])
    # a position no round drafted keeps temperature 1
    drafted[:, -1] = survived[:, -1] = False
    assert fit_sts(logits, drafted, survived)[-1] == 1.0
    # so does one with too few survivals to fit (here 5), whatever its miscalibration
    drafted[:, :-1] = True
    survived[:, -2] = False
    survived[:5, :-1] = True
    assert fit_sts(logits, drafted, survived)[-2] == 1.0
    assert fit_sts(logits, drafted, survived, min_survivals=5)[-2] != 1.0


def test_cumulative_survival_is_the_product_of_scaled_sigmoids():
    logits = np.array([[0.0, 2.0, -1.0]])
    temps = np.array([1.0, 2.0, 0.5])
    s = 1.0 / (1.0 + np.exp(-logits / temps))
    np.testing.assert_allclose(cumulative_survival(logits, temps), np.cumprod(s, axis=1))


def test_bad_inputs_are_refused():
    logits, drafted, survived = simulate(50, 3, 1.0)
    with pytest.raises(ValueError, match="share one"):
        fit_sts(logits[:, :2], drafted, survived)
    bad = survived.copy()
    bad[0] = True
    drafted2 = drafted.copy()
    drafted2[0, 2] = False
    with pytest.raises(ValueError, match="survived without being drafted"):
        fit_sts(logits, drafted2, bad)
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        cumulative_survival(logits, np.array([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="grid"):
        fit_sts(logits, drafted, survived, grid=np.array([]))


def test_recorded_rounds_give_back_raw_logits_and_the_draft_applies_its_temperatures(tiny_target):
    """Confidences recorded by a calibrated draft are ``sigmoid(l / T)``: the reader returns
    ``l`` given ``T``, so a new fit starts from the raw head; a DSpark draft with stored
    temperatures proposes ``sigmoid(l_k / T_k)``."""
    import torch

    from deepspec.eval.calibration import rounds_from_records
    from tests.conftest import tiny_dspark

    raw = np.array([[2.0, -1.0, 0.5], [0.3, 1.5, -2.0]])
    temps = np.array([2.0, 0.5, 1.0])
    recorded = 1 / (1 + np.exp(-raw / temps))
    records = [
        {
            "confidence_per_round": recorded.tolist(),
            "proposed_per_round": [3, 2],
            "accepted_per_round": [1, 2],
        }
    ]
    logits, drafted, survived = rounds_from_records(records, temps)
    np.testing.assert_allclose(logits, raw, rtol=1e-6)
    assert drafted.tolist() == [[True, True, True], [True, True, False]]
    assert survived.tolist() == [[True, False, False], [True, True, False]]
    with pytest.raises(ValueError, match="no rounds with confidences"):
        rounds_from_records(
            [{"confidence_per_round": [], "proposed_per_round": [], "accepted_per_round": []}]
        )

    draft = tiny_dspark(tiny_target("llama")).eval()
    state = draft.new_state(2)
    draft.extend(
        state,
        torch.randn(2, 4, 2 * draft.spec.hidden_size),
        torch.tensor([4, 2]),
        tokens=torch.ones(2, 4).long(),
    )
    anchors = torch.tensor([3, 5])
    plain = draft.propose(state, anchors).confidence
    draft.confidence_temperatures = torch.tensor([2.0, 0.5, 4.0])
    scaled = draft.propose(state, anchors).confidence
    torch.testing.assert_close(
        torch.logit(scaled.double()),
        torch.logit(plain.double()) / draft.confidence_temperatures.double(),
        rtol=1e-4,
        atol=1e-5,
    )
