"""Sequential Temperature Scaling (STS) of DSpark's confidence head (DESIGN §4).

The confidence head gives, per drafted position ``k``, a logit ``l_k`` whose sigmoid
estimates the survival of token ``k`` given that tokens ``< k`` survived. A scheduler uses
the cumulative survival ``a_k = prod_{i<=k} sigmoid(l_i / T_i)``. STS fits one temperature
per position, in order: ``T_k`` minimises the expected calibration error of ``a_k``
against the observed cumulative survival on held-out rounds, with ``T_1..T_{k-1}`` already
fixed. A positive temperature keeps the order of the logits at each position.

Inputs are per round (one verification of a drafted block): ``logits`` ``[R, G]``,
``drafted`` ``[R, G]`` (position ``k`` was proposed in that round) and ``survived``
``[R, G]`` (tokens ``1..k`` were all accepted).
"""

from __future__ import annotations

import numpy as np

from deepspec.eval.metrics import expected_calibration_error

DEFAULT_GRID = np.geomspace(0.05, 20.0, 241)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for large |x|


def cumulative_survival(logits: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """``a`` ``[R, G]``: ``a[:, k] = prod_{i<=k} sigmoid(logits[:, i] / temperatures[i])``."""
    logits = np.asarray(logits, dtype=np.float64)
    temperatures = np.asarray(temperatures, dtype=np.float64)
    if logits.ndim != 2 or temperatures.shape != (logits.shape[1],):
        raise ValueError(
            f"logits [R, G] and temperatures [G] expected, got {logits.shape} and {temperatures.shape}"
        )
    if not np.all(temperatures > 0):
        raise ValueError("temperatures must be > 0")
    return np.cumprod(_sigmoid(logits / temperatures), axis=1)


def _check(logits, drafted, survived) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    drafted = np.asarray(drafted, dtype=bool)
    survived = np.asarray(survived, dtype=bool)
    if not (logits.shape == drafted.shape == survived.shape) or logits.ndim != 2:
        raise ValueError(
            f"logits, drafted and survived must share one [R, G] shape, got "
            f"{logits.shape}, {drafted.shape}, {survived.shape}"
        )
    if np.any(survived & ~drafted):
        raise ValueError("a position survived without being drafted")
    if not np.all(np.isfinite(logits[drafted])):
        raise ValueError("confidence logits of drafted positions must be finite")
    return logits, drafted, survived


def position_ece(
    logits: np.ndarray,
    drafted: np.ndarray,
    survived: np.ndarray,
    temperatures: np.ndarray,
    num_bins: int = 10,
) -> list[float]:
    """ECE of the cumulative survival at each position (NaN where nothing was drafted)."""
    logits, drafted, survived = _check(logits, drafted, survived)
    a = cumulative_survival(np.where(drafted, logits, 0.0), temperatures)
    return [
        expected_calibration_error(a[drafted[:, k], k], survived[drafted[:, k], k], num_bins)
        for k in range(logits.shape[1])
    ]


def fit_sts(
    logits: np.ndarray,
    drafted: np.ndarray,
    survived: np.ndarray,
    grid: np.ndarray = DEFAULT_GRID,
    num_bins: int = 10,
) -> np.ndarray:
    """Temperatures ``[G]``, fitted position by position in order (grid search on ECE;
    ties go to the temperature closest to 1; positions never drafted keep 1)."""
    logits, drafted, survived = _check(logits, drafted, survived)
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or not np.all(grid > 0):
        raise ValueError("grid must be a non-empty 1-D array of positive temperatures")
    order = np.argsort(np.abs(np.log(grid)), kind="stable")  # closest to 1 first: wins ties
    G = logits.shape[1]
    temps = np.ones(G)
    prefix = np.ones(logits.shape[0])  # prod_{i<k} c_i with the fitted temperatures
    for k in range(G):
        rows = drafted[:, k]
        if rows.any():
            best, best_ece = 1.0, np.inf
            for t in grid[order]:
                ece = expected_calibration_error(
                    prefix[rows] * _sigmoid(logits[rows, k] / t), survived[rows, k], num_bins
                )
                if ece < best_ece - 1e-12:
                    best, best_ece = float(t), ece
            temps[k] = best
        prefix = prefix * _sigmoid(np.where(drafted[:, k], logits[:, k], 0.0) / temps[k])
    return temps
