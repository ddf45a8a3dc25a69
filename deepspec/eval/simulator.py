"""Replay recorded speculative rounds at any batch size under a verification policy, with a
profiled ``SPS(B)`` table: expected tokens per second without running the target.

A recorded round is what one request's draft did once: the (calibrated) confidence ``c_j``
of each drafted slot, whose running products are the cumulative survivals ``a_j``, and how
many drafted tokens the target accepted (``accepted``, the length of the accepted prefix
when all were verified). When a policy verifies only ``n`` of them, the request gains
``min(accepted, n) + 1`` tokens (the target's own token after the last accepted one),
because acceptance stops at the first rejection. A batch step takes
``1 / SPS(R + sum n_r)``: give the table the time per step outside the target's forward as
its ``overhead_seconds`` (``sps_profile.py --draft``).
:func:`recorded_rounds` reads the rounds of an ``eval.py`` run (``samples.jsonl``).

Policies are those of the decode loop (:mod:`deepspec.eval.policies`): ``fixed``,
``threshold`` (per-slot confidence), ``cumulative`` (cumulative survival) and ``scheduled``
(Algorithm 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deepspec.eval.calibration import rounds_from_records, slot_confidence
from deepspec.eval.policies import VerifyPolicy, survival
from deepspec.eval.scheduler import SPSTable


@dataclass(frozen=True)
class RecordedRound:
    confidence: tuple[float, ...]  # c_j per drafted slot, each in [0, 1]
    accepted: int  # accepted drafted tokens when every drafted token is verified

    def __post_init__(self) -> None:
        if not 0 <= self.accepted <= len(self.confidence):
            raise ValueError(f"accepted {self.accepted} is outside 0..{len(self.confidence)} drafted tokens")
        bad = [c for c in self.confidence if not 0 <= c <= 1]
        if bad:
            raise ValueError(f"a slot's confidence must lie in [0, 1], got {bad[0]}")

    @property
    def survival(self) -> tuple[float, ...]:
        """The cumulative survival ``a_j = c_0 * ... * c_j`` per drafted slot."""
        return tuple(survival(self.confidence))


def recorded_rounds(
    records: list[dict],
    decoded_with: Sequence[float] | None = None,
    temperatures: Sequence[float] | None = None,
) -> list[RecordedRound]:
    """The rounds of ``eval.py`` sample records, decoded with confidence temperatures
    ``decoded_with`` (``None``: none), rescored with ``temperatures`` (``None``: raw head).
    A round's drafted positions are those it verified; replay policies that verify fewer
    from a run that verified whole blocks."""
    logits, drafted, survived = rounds_from_records(records, decoded_with)
    G = logits.shape[1]
    c = slot_confidence(logits, np.ones(G) if temperatures is None else np.asarray(temperatures[:G]))
    return [
        RecordedRound(tuple(c[i, : int(drafted[i].sum())].tolist()), int(survived[i].sum()))
        for i in range(len(c))
    ]


@dataclass(frozen=True)
class SimulatedRun:
    policy: str
    batch: int
    tokens_per_second: float
    tokens_per_round: float  # mean tokens a request gains per round (tau)
    verified_per_round: float  # mean drafted tokens verified per request and round


def simulate(
    rounds: Sequence[RecordedRound],
    sps: SPSTable,
    *,
    batch: int,
    policy: str,
    value: float = 0.0,
    steps: int = 2000,
    seed: int = 0,
) -> SimulatedRun:
    """``steps`` batch steps of ``batch`` requests, each request's round drawn from
    ``rounds`` (seeded); ``value`` is the fixed length or the threshold ``t`` (``threshold``:
    per-slot confidence, ``cumulative``: cumulative survival)."""
    if not rounds:
        raise ValueError("no recorded rounds to replay")
    if batch < 1 or steps < 1:
        raise ValueError("batch and steps must be >= 1")
    chooser = VerifyPolicy(policy, value, sps)
    rng = np.random.default_rng(seed)
    tokens = verified = 0
    seconds = 0.0
    for _ in range(steps):
        picked = [rounds[i] for i in rng.integers(0, len(rounds), size=batch)]
        lengths = chooser.lengths([len(r.confidence) for r in picked], [r.confidence for r in picked])
        tokens += sum(min(r.accepted, n) + 1 for r, n in zip(picked, lengths))
        verified += sum(lengths)
        seconds += 1.0 / sps(batch + sum(lengths))
    n = steps * batch
    return SimulatedRun(policy, batch, tokens / seconds, tokens / n, verified / n)
