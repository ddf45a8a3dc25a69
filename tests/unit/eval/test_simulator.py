"""The serving simulator: replayed rounds, policies and an SPS table give exact throughput
on hand-made cases."""

from __future__ import annotations

import pytest

from deepspec.eval.scheduler import SPSTable
from deepspec.eval.simulator import RecordedRound, simulate

FLAT = SPSTable.from_mapping({1: 10.0, 256: 10.0})  # every step 0.1 s, whatever B


def test_fixed_length_counts_accepted_tokens_within_the_verified_prefix():
    rounds = [RecordedRound((0.9, 0.8, 0.5, 0.2), accepted=3)]
    for n, gained in ((1, 2), (2, 3), (3, 4), (4, 4), (9, 4), (0, 4)):  # 0: every drafted token
        run = simulate(rounds, FLAT, batch=2, policy="fixed", value=n, steps=5)
        assert run.tokens_per_round == gained
        assert run.tokens_per_second == pytest.approx(2 * gained / 0.1)
        assert run.verified_per_round == (min(n, 4) if n else 4)


def test_threshold_cumulative_and_scheduled_policies():
    short = [RecordedRound((0.9, 0.6, 0.3), accepted=1)]  # per-slot confidences c_j
    run = simulate(short, FLAT, batch=1, policy="threshold", value=0.5, steps=3)
    assert run.verified_per_round == 2 and run.tokens_per_round == 2
    # confidences .9 .6 .9 .2: the first below .5 is slot 3 (threshold verifies 3); the
    # survival .9 .54 .486 .0972 is first below .5 at slot 2 (cumulative verifies 2)
    mixed = [RecordedRound((0.9, 0.6, 0.9, 0.2), accepted=3)]
    run = simulate(mixed, FLAT, batch=1, policy="threshold", value=0.5, steps=3)
    assert run.verified_per_round == 3 and run.tokens_per_round == 4
    run = simulate(mixed, FLAT, batch=1, policy="cumulative", value=0.5, steps=3)
    assert run.verified_per_round == 2 and run.tokens_per_round == 3
    # flat SPS: the scheduler verifies every token with survival > 0
    assert simulate(short, FLAT, batch=3, policy="scheduled", steps=3).verified_per_round == 3
    # a steep table (a second token halves the steps/s) makes it verify nothing
    steep = SPSTable.from_mapping({1: 10.0, 2: 5.0})
    run = simulate(short, steep, batch=1, policy="scheduled", steps=3)
    assert run.verified_per_round == 0 and run.tokens_per_second == pytest.approx(10.0)


def test_draft_time_and_sps_enter_the_step_time():
    table = SPSTable.from_mapping({1: 20.0, 9: 4.0}, overhead_seconds=0.05)  # 9 tokens: 0.25 + 0.05 s
    rounds = [RecordedRound((1.0,) * 8, accepted=8)]
    run = simulate(rounds, table, batch=1, policy="fixed", value=8, steps=4)
    assert run.tokens_per_second == pytest.approx(9 / 0.30)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="outside 0..2"):
        RecordedRound((0.5, 0.2), accepted=3)
    with pytest.raises(ValueError, match=r"confidence must lie in \[0, 1\], got 1.5"):
        RecordedRound((0.5, 1.5), accepted=1)
    with pytest.raises(ValueError, match="no recorded rounds"):
        simulate([], FLAT, batch=1, policy="fixed")
    with pytest.raises(ValueError, match="unknown verification policy"):
        simulate([RecordedRound((0.5,), 0)], FLAT, batch=1, policy="greedy")


def test_recorded_rounds_rescore_eval_records_with_any_temperatures():
    """Records decoded with temperatures T replay with the raw head, or with T again (the
    confidences as recorded); a round's drafted positions are those it verified."""
    import numpy as np

    from deepspec.eval.simulator import recorded_rounds

    raw = np.array([[2.0, -1.0, 0.5], [0.3, 1.5, -2.0]])
    temps = [2.0, 0.5, 1.0]
    recorded = 1 / (1 + np.exp(-raw / temps))
    records = [
        {
            "confidence_per_round": recorded.tolist(),
            "proposed_per_round": [3, 2],
            "accepted_per_round": [1, 2],
        }
    ]
    as_recorded = recorded_rounds(records, temps, temps)
    assert [r.accepted for r in as_recorded] == [1, 2]
    assert [len(r.confidence) for r in as_recorded] == [3, 2]
    np.testing.assert_allclose(as_recorded[0].confidence, recorded[0], rtol=1e-5)
    np.testing.assert_allclose(as_recorded[0].survival, np.cumprod(recorded[0]), rtol=1e-5)
    raw_head = recorded_rounds(records, temps)
    np.testing.assert_allclose(raw_head[1].survival, np.cumprod(1 / (1 + np.exp(-raw[1])))[:2], rtol=1e-5)
