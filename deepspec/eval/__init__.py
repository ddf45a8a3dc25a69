"""Evaluation: verification of drafted blocks, acceptance/calibration metrics, report plots."""

from deepspec.eval.metrics import (
    AcceptanceStats,
    CalibrationStats,
    ThresholdSweep,
    acceptance_stats,
    calibration_stats,
    macro_average,
    threshold_sweep,
)
from deepspec.eval.verify import (
    VerifyResult,
    probs_from_logits,
    residual_probs,
    verify_greedy,
    verify_sampling,
)

__all__ = [
    "AcceptanceStats",
    "CalibrationStats",
    "ThresholdSweep",
    "VerifyResult",
    "acceptance_stats",
    "calibration_stats",
    "macro_average",
    "probs_from_logits",
    "residual_probs",
    "threshold_sweep",
    "verify_greedy",
    "verify_sampling",
]
