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


def test_threshold_and_scheduled_policies():
    rounds = [RecordedRound((0.9, 0.6, 0.3), accepted=1)]
    run = simulate(rounds, FLAT, batch=1, policy="threshold", value=0.5, steps=3)
    assert run.verified_per_round == 2 and run.tokens_per_round == 2
    # flat SPS: the scheduler verifies every token with survival > 0
    assert simulate(rounds, FLAT, batch=3, policy="scheduled", steps=3).verified_per_round == 3
    # a steep table (a second token halves the steps/s) makes it verify nothing
    steep = SPSTable.from_mapping({1: 10.0, 2: 5.0})
    run = simulate(rounds, steep, batch=1, policy="scheduled", steps=3)
    assert run.verified_per_round == 0 and run.tokens_per_second == pytest.approx(10.0)


def test_draft_time_and_sps_enter_the_step_time():
    table = SPSTable.from_mapping({1: 20.0, 9: 4.0})  # B = 1 + 8 verified tokens: 0.25 s
    rounds = [RecordedRound((1.0,) * 8, accepted=8)]
    run = simulate(rounds, table, batch=1, policy="fixed", value=8, steps=4, draft_seconds=0.05)
    assert run.tokens_per_second == pytest.approx(9 / 0.30)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="outside 0..2"):
        RecordedRound((0.5, 0.2), accepted=3)
    with pytest.raises(ValueError, match="no recorded rounds"):
        simulate([], FLAT, batch=1, policy="fixed")
    with pytest.raises(ValueError, match="unknown verification policy"):
        simulate([RecordedRound((0.5,), 0)], FLAT, batch=1, policy="greedy")
