"""How many drafted tokens of each request to verify in a round (docs/DESIGN.md §4).

A DSpark draft gives each drafted slot ``k`` (0-based) a confidence ``c_k = sigmoid(l_k)``
(``sigmoid(l_k / T_k)`` once STS temperatures are stored with the draft): the estimated
probability that token ``k`` survives verification given that the tokens before it did.
Each policy returns ``n``, the number of leading drafted tokens to verify (``0 <= n <=``
the number drafted); the anchor's own target token is produced by verification whatever
``n`` is, so ``n = 0`` is a legal round that emits one token. The decode loops then cap
``n`` by the tokens still allowed (``max_new_tokens``).

* ``fixed``: ``n = min(L, drafted)`` (``L = 0``: every drafted token);
* ``threshold`` (``--confidence-threshold t``, the DeepSpec reference's rule): ``n`` is the
  index of the first slot whose own confidence is below the threshold,
  ``n = min{k : c_k < t}``, or every drafted token when no slot is below ``t``. Slot 0
  below ``t`` gives ``n = 0``; ``t = 0`` verifies every drafted token;
* ``cumulative`` (``--survival-threshold t``): ``n`` is the index of the first slot whose
  cumulative survival ``a_k = c_0 * c_1 * ... * c_k`` is below ``t``, or every drafted
  token when none is. Since ``a_k <= c_k``, it never verifies more than ``threshold`` with
  the same ``t``;
* ``scheduled``: the hardware-aware prefix scheduler (Algorithm 1) over the cumulative
  survivals of all requests of the round with a profiled ``SPS(B)`` table
  (:mod:`deepspec.eval.scheduler`).

The same policy object drives the decode loops and the serving simulator, so the simulator
replays exactly the choices the loops make.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from operator import mul

from deepspec.errors import ConfigError
from deepspec.eval.scheduler import SPSTable, schedule_prefixes

POLICIES = ("fixed", "threshold", "cumulative", "scheduled")
THRESHOLD_POLICIES = ("threshold", "cumulative")  # value = a threshold t in [0, 1]


def survival(confidence: Sequence[float]) -> list[float]:
    """The cumulative survival ``a_k = c_0 * ... * c_k`` of per-slot confidences ``c``
    (double-precision products, left to right)."""
    return list(accumulate((float(c) for c in confidence), mul))


def first_below(values: Sequence[float], t: float) -> int:
    """The index of the first value ``< t``, or ``len(values)`` when there is none."""
    return next((k for k, v in enumerate(values) if v < t), len(values))


@dataclass(frozen=True)
class VerifyPolicy:
    name: str = "fixed"
    value: float = 0.0  # fixed: the length L (0 = all); threshold, cumulative: t in [0, 1]
    sps: SPSTable | None = None  # scheduled: the profiled table

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ConfigError(f"unknown verification policy {self.name!r}; choose {', '.join(POLICIES)}")
        if self.name == "fixed" and (self.value < 0 or self.value != int(self.value)):
            raise ConfigError(f"the fixed policy's length must be an integer >= 0, got {self.value}")
        if self.name in THRESHOLD_POLICIES and not 0 <= self.value <= 1:
            raise ConfigError(f"the {self.name} policy's threshold must lie in [0, 1], got {self.value}")
        if self.name == "scheduled" and self.sps is None:
            raise ConfigError(
                "the scheduled policy needs an SPS table: pass --sps-table "
                "(write one with python benchmarks/sps_profile.py)"
            )

    def lengths(self, drafted: Sequence[int], confidence: Sequence[Sequence[float]] | None) -> list[int]:
        """Tokens to verify per request, given how many each drafted and (for every policy
        but ``fixed``) the per-slot confidences ``c_k`` of its drafted tokens (not their
        cumulative survival: the policies that need it take the products themselves)."""
        if self.name == "fixed":
            return [min(int(self.value), k) if self.value else k for k in drafted]
        if confidence is None:
            raise ConfigError(
                f"the {self.name} policy needs a draft with a confidence head (DSpark); use --policy fixed"
            )
        drafts = [list(c[:k]) for c, k in zip(confidence, drafted, strict=True)]
        if self.name == "threshold":
            return [first_below(c, self.value) for c in drafts]
        if self.name == "cumulative":
            return [first_below(survival(c), self.value) for c in drafts]
        return schedule_prefixes([survival(c) for c in drafts], self.sps).lengths

    def describe(self) -> str:
        if self.name == "fixed":
            return f"fixed length {int(self.value)}" if self.value else "fixed (all drafted)"
        if self.name == "threshold":
            return f"threshold {self.value:g} (per slot)"
        if self.name == "cumulative":
            return f"cumulative {self.value:g} (survival)"
        return "scheduled (Algorithm 1)"
