"""Evaluation: verification of drafted blocks, acceptance/calibration metrics, report plots.

Names are imported on first use, so the torch-free parts (``deepspec.eval.settings``,
``deepspec.eval.report``'s argument checks) start without loading ``torch``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AcceptanceStats": "deepspec.eval.metrics",
    "CalibrationStats": "deepspec.eval.metrics",
    "ThresholdSweep": "deepspec.eval.metrics",
    "acceptance_stats": "deepspec.eval.metrics",
    "calibration_stats": "deepspec.eval.metrics",
    "macro_average": "deepspec.eval.metrics",
    "threshold_sweep": "deepspec.eval.metrics",
    "VerifyResult": "deepspec.eval.verify",
    "probs_from_logits": "deepspec.eval.verify",
    "residual_probs": "deepspec.eval.verify",
    "verify_greedy": "deepspec.eval.verify",
    "verify_sampling": "deepspec.eval.verify",
    "BatchRun": "deepspec.eval.batch_decode",
    "plain_generate_batch": "deepspec.eval.batch_decode",
    "speculative_generate_batch": "deepspec.eval.batch_decode",
    "RaggedTarget": "deepspec.eval.ragged_target",
    "VerifyPolicy": "deepspec.eval.policies",
    "SPSTable": "deepspec.eval.scheduler",
    "schedule_prefixes": "deepspec.eval.scheduler",
    "simulate": "deepspec.eval.simulator",
    "fit_sts": "deepspec.eval.calibration",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
