"""How many drafted tokens of each request to verify in a round (DESIGN §4).

* ``fixed``: ``n = min(L, drafted)`` (``L = 0``: every drafted token);
* ``threshold``: the prefix whose cumulative survival ``a_j = prod_{i<=j} c_i`` stays
  ``>= t`` (DSpark's confidence head; the reference code's rule);
* ``scheduled``: the hardware-aware prefix scheduler (Algorithm 1) over all requests of the
  round with a profiled ``SPS(B)`` table (:mod:`deepspec.eval.scheduler`).

The same policy object drives the batched decode loop and the serving simulator, so the
simulator replays exactly the choices the loop makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from deepspec.errors import ConfigError
from deepspec.eval.scheduler import SPSTable, schedule_prefixes

POLICIES = ("fixed", "threshold", "scheduled")


@dataclass(frozen=True)
class VerifyPolicy:
    name: str = "fixed"
    value: float = 0.0  # fixed: the length L (0 = all); threshold: t in [0, 1]
    sps: SPSTable | None = None  # scheduled: the profiled table

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ConfigError(f"unknown verification policy {self.name!r}; choose {', '.join(POLICIES)}")
        if self.name == "fixed" and (self.value < 0 or self.value != int(self.value)):
            raise ConfigError(f"the fixed policy's length must be an integer >= 0, got {self.value}")
        if self.name == "threshold" and not 0 <= self.value <= 1:
            raise ConfigError(f"the threshold policy's value must lie in [0, 1], got {self.value}")
        if self.name == "scheduled" and self.sps is None:
            raise ConfigError(
                "the scheduled policy needs an SPS table: pass --sps-table "
                "(write one with python benchmarks/sps_profile.py)"
            )

    def lengths(self, drafted: Sequence[int], survival: Sequence[Sequence[float]] | None) -> list[int]:
        """Tokens to verify per request, given how many each drafted and (for ``threshold``
        and ``scheduled``) the cumulative survival of each drafted position."""
        if self.name == "fixed":
            return [min(int(self.value), k) if self.value else k for k in drafted]
        if survival is None:
            raise ConfigError(
                f"the {self.name} policy needs a draft with a confidence head (DSpark); use --policy fixed"
            )
        if self.name == "threshold":
            return [sum(1 for a in s[:k] if a >= self.value) for s, k in zip(survival, drafted, strict=True)]
        return schedule_prefixes(
            [list(s[:k]) for s, k in zip(survival, drafted, strict=True)], self.sps
        ).lengths

    def describe(self) -> str:
        if self.name == "fixed":
            return f"fixed length {int(self.value)}" if self.value else "fixed (all drafted)"
        return f"threshold {self.value:g}" if self.name == "threshold" else "scheduled (Algorithm 1)"
