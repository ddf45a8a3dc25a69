"""DSpark's hardware-aware prefix scheduler (paper Algorithm 1; docs/DESIGN.md §4).

Each round, request ``r`` has drafted tokens with calibrated cumulative survival
``a[r][j] = prod_{i<=j} c_{r,i}`` (non-increasing in ``j``). Verifying ``n_r`` tokens of
request ``r`` costs a target forward over ``B = R + sum_r n_r`` tokens (each request's
last accepted token plus its admitted drafts) and yields ``R + sum_r sum_{j<n_r} a[r][j]``
tokens in expectation. The scheduler admits ``(r, j)`` pairs in descending ``a`` and stops
at the first admission that does not raise the expected throughput
``Theta = tau * SPS(B)``, with ``SPS`` the target's verification steps per second at ``B``
tokens (a profiled table). Because ``a`` is non-increasing along a request, the admitted
tokens of each request form a prefix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from deepspec.errors import DataError

# How much steps/s may rise with the token count before a table is refused: profiles on a
# shared machine wobble (benchmarks/README.md: +2.9% from 24 to 32 tokens at R = 16).
RISE_TOLERANCE = 0.05


@dataclass(frozen=True)
class SPSTable:
    """Decode steps per second at ``B`` verified tokens: the target's verification forward
    (profiled points, linearly interpolated, constant beyond the last one) plus
    ``overhead_seconds`` per step spent outside it (drafting, verification, bookkeeping), so
    ``SPS(B) = 1 / (1 / SPS_target(B) + overhead)``. With the overhead the scheduler weighs
    a token's cost against the whole step, as the paper's steps-per-second table does."""

    tokens: tuple[int, ...]
    steps_per_second: tuple[float, ...]
    overhead_seconds: float = 0.0

    @classmethod
    def from_mapping(cls, points: Mapping[int, float], overhead_seconds: float = 0.0) -> SPSTable:
        if not points:
            raise ValueError("an SPS table needs at least one (tokens, steps/s) point")
        items = sorted((int(b), float(s)) for b, s in points.items())
        if items[0][0] < 1 or any(s <= 0 or not np.isfinite(s) for _, s in items):
            raise ValueError("SPS points need token counts >= 1 and finite steps/s > 0")
        if not (np.isfinite(overhead_seconds) and overhead_seconds >= 0):
            raise ValueError(f"overhead_seconds must be a finite number >= 0, got {overhead_seconds}")
        return cls(tuple(b for b, _ in items), tuple(s for _, s in items), float(overhead_seconds))

    def first_rise(self, tolerance: float = RISE_TOLERANCE) -> tuple[int, int, float] | None:
        """``(fewer, more, rise)`` for the first token count ``more`` whose steps/s exceed the
        lowest steps/s at a smaller count ``fewer`` by more than ``tolerance`` (a fraction),
        else None. Verifying more tokens never makes a step faster: such a rise is noise or a
        broken profile."""
        low_at, low = self.tokens[0], self.steps_per_second[0]
        for b, sps in zip(self.tokens[1:], self.steps_per_second[1:], strict=True):
            if sps > low * (1.0 + tolerance):
                return low_at, b, sps / low - 1.0
            if sps < low:
                low_at, low = b, sps
        return None

    @classmethod
    def load(cls, path: str) -> SPSTable:
        """A table written by ``benchmarks/sps_profile.py`` (``steps_per_second``: {B: steps/s},
        optional ``overhead_seconds``). Steps/s must not rise with the token count by more
        than :data:`RISE_TOLERANCE` (measurement noise)."""
        import json
        import os

        redo = "python benchmarks/sps_profile.py --out <file>"
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as fh:
                data = json.load(fh)
            points = data["steps_per_second"]
            overhead = float(data.get("overhead_seconds") or 0.0)
            table = cls.from_mapping({int(b): float(v) for b, v in points.items()}, overhead)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(
                f"SPS table {path} is unreadable ({type(exc).__name__}: {exc}); write it with {redo}"
            ) from None
        rise = table.first_rise()
        if rise is not None:
            fewer, more, by = rise
            at = dict(zip(table.tokens, table.steps_per_second, strict=True))
            raise DataError(
                f"SPS table {path}: steps/s rise from {at[fewer]:g} at {fewer} tokens to {at[more]:g} at "
                f"{more} tokens (+{100 * by:.1f}%, more than the {100 * RISE_TOLERANCE:g}% allowed for noise), "
                f"but verifying more tokens never makes a step faster; profile again on an idle machine "
                f"(more --repeats) with {redo}"
            )
        return table

    def __call__(self, batch_tokens: int) -> float:
        target = float(np.interp(batch_tokens, self.tokens, self.steps_per_second))
        return target if not self.overhead_seconds else 1.0 / (1.0 / target + self.overhead_seconds)


@dataclass(frozen=True)
class Schedule:
    lengths: list[int]  # tokens admitted per request (a prefix of its drafts)
    expected_tokens: float  # tau: R + sum of the admitted survivals
    batch_tokens: int  # B = R + admitted
    throughput: float  # tau * SPS(B)


def schedule_prefixes(survival: Sequence[Sequence[float]], sps: SPSTable) -> Schedule:
    """Algorithm 1 on one round: ``survival[r]`` is request ``r``'s cumulative survival per
    drafted position (non-increasing, in [0, 1]); returns the prefix length per request."""
    R = len(survival)
    pairs = []
    for r, a in enumerate(survival):
        a = np.asarray(a, dtype=np.float64)
        if a.ndim != 1 or np.any(~np.isfinite(a)) or np.any((a < 0) | (a > 1)):
            raise ValueError(f"request {r}: survival must be a 1-D sequence in [0, 1]")
        if np.any(np.diff(a) > 1e-12):
            raise ValueError(f"request {r}: cumulative survival must not increase along the draft")
        pairs += [(-float(v), j, r) for j, v in enumerate(a)]
    pairs.sort()  # descending survival; ties: earlier position, then lower request
    lengths = [0] * R
    tau, batch = float(R), R
    best = tau * sps(batch) if R else 0.0
    for neg, _j, r in pairs:
        theta = (tau - neg) * sps(batch + 1)
        if theta <= best:
            break  # the first admission that does not raise Theta ends the round
        tau, batch, best = tau - neg, batch + 1, theta
        lengths[r] += 1
    return Schedule(lengths, tau, batch, best)
