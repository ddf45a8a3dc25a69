"""DSpark's prefix scheduler (Algorithm 1) against a direct reference on random rounds."""

from __future__ import annotations

import numpy as np
import pytest

from deepspec.eval.scheduler import SPSTable, schedule_prefixes


def reference(survival, sps):
    """Algorithm 1 written out: all (request, depth) pairs in descending survival, the
    throughput after each admission, stop before the first that does not raise it."""
    R = len(survival)
    order = sorted(((-a, j, r) for r, row in enumerate(survival) for j, a in enumerate(row)))
    thetas = [R * sps(R)]
    for k in range(1, len(order) + 1):
        thetas.append((R + sum(-x[0] for x in order[:k])) * sps(R + k))
    k = 0
    while k < len(order) and thetas[k + 1] > thetas[k]:
        k += 1
    lengths = [0] * R
    for _, _, r in order[:k]:
        lengths[r] += 1
    return lengths, thetas[: k + 1]


def random_round(rng):
    R = int(rng.integers(1, 9))
    gamma = int(rng.integers(1, 8))
    cond = rng.beta(2.0, 1.0, size=(R, gamma))  # conditional survival of each position
    return np.cumprod(cond, axis=1).tolist()


def random_table(rng):
    tokens = np.unique(rng.integers(1, 80, size=6))
    # steps/s falls with the token count (verification gets dearer), with noise
    sps = 100.0 / (1.0 + tokens / rng.uniform(5, 60)) * rng.uniform(0.9, 1.1, size=tokens.size)
    return SPSTable.from_mapping(dict(zip(tokens.tolist(), sps.tolist())))


@pytest.mark.parametrize("seed", range(200))
def test_scheduler_equals_the_reference_on_random_rounds(seed):
    rng = np.random.default_rng(seed)
    survival, sps = random_round(rng), random_table(rng)
    got = schedule_prefixes(survival, sps)
    lengths, thetas = reference(survival, sps)
    assert got.lengths == lengths
    assert got.batch_tokens == len(survival) + sum(lengths)
    assert got.throughput == pytest.approx(thetas[-1])
    assert all(b > a for a, b in zip(thetas, thetas[1:]))  # every admission raised Theta
    # admitted tokens are prefixes, and the best rejected one never beats an admitted one
    admitted = [a for row, n in zip(survival, lengths) for a in row[:n]]
    rejected = [a for row, n in zip(survival, lengths) for a in row[n:]]
    if admitted and rejected:
        assert max(rejected) <= min(admitted)


def test_scheduler_stops_where_throughput_stops_rising():
    flat = SPSTable.from_mapping({1: 10.0, 64: 10.0})  # verification cost independent of B
    s = schedule_prefixes([[0.9, 0.5, 0.0], [0.8]], flat)
    assert s.lengths == [2, 1]  # every token with survival > 0, and nothing more
    assert s.expected_tokens == pytest.approx(2 + 0.9 + 0.5 + 0.8)
    steep = SPSTable.from_mapping({2: 10.0, 3: 5.0})  # a third token halves the steps/s
    assert schedule_prefixes([[0.9, 0.8], [0.7]], steep).lengths == [0, 0]


def test_bad_survival_and_tables_are_refused():
    table = SPSTable.from_mapping({1: 1.0})
    with pytest.raises(ValueError, match="must not increase"):
        schedule_prefixes([[0.5, 0.7]], table)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        schedule_prefixes([[1.5]], table)
    with pytest.raises(ValueError, match="at least one"):
        SPSTable.from_mapping({})
    with pytest.raises(ValueError, match="steps/s > 0"):
        SPSTable.from_mapping({4: 0.0})


def test_sps_table_reads_the_profile_benchmark_file(tmp_path):
    import json

    from deepspec.errors import DataError

    path = tmp_path / "sps.json"
    path.write_text(json.dumps({"device": "cpu", "steps_per_second": {"1": 18.0, "8": 16.0, "64": 6.0}}))
    table = SPSTable.load(str(path))
    assert table(1) == 18.0 and table(8) == 16.0 and table(36) == pytest.approx(11.0)
    assert table(200) == 6.0  # held constant beyond the last point
    path.write_text("{}")
    with pytest.raises(DataError, match="sps_profile.py"):
        SPSTable.load(str(path))
    with pytest.raises(DataError, match="unreadable"):
        SPSTable.load(str(tmp_path / "missing.json"))


def test_time_outside_the_target_makes_tokens_cheaper_and_is_read_from_the_profile(tmp_path):
    """With per-step overhead (drafting, bookkeeping) a token's share of the step is smaller,
    so the scheduler admits what the target-only table refuses."""
    import json

    target_only = SPSTable.from_mapping({1: 20.0, 2: 10.0})  # a second token halves the target's rate
    assert schedule_prefixes([[0.6]], target_only).lengths == [0]  # 1.6 * 10 < 1 * 20
    whole = SPSTable.from_mapping({1: 20.0, 2: 10.0}, 0.2)  # steps of 0.25 s and 0.30 s
    assert whole(1) == pytest.approx(4.0) and whole(2) == pytest.approx(1 / 0.3)
    assert schedule_prefixes([[0.6]], whole).lengths == [1]  # 1.6 / 0.30 > 1 / 0.25
    path = tmp_path / "sps.json"
    path.write_text(json.dumps({"steps_per_second": {"1": 20.0, "2": 10.0}, "overhead_seconds": 0.2}))
    assert SPSTable.load(str(path)) == whole
    path.write_text(json.dumps({"steps_per_second": {"1": 20.0}, "overhead_seconds": None}))
    assert SPSTable.load(str(path)).overhead_seconds == 0.0
    with pytest.raises(ValueError, match="overhead_seconds must be"):
        SPSTable.from_mapping({1: 20.0}, overhead_seconds=-1.0)
