"""Sequential Temperature Scaling (STS) of DSpark's confidence head (docs/DESIGN.md §4).

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

import os

import numpy as np

from deepspec.cli import ArgumentParser, run_main
from deepspec.errors import DataError
from deepspec.eval.metrics import calibration_stats, expected_calibration_error
from deepspec.eval.settings import read_eval_run
from deepspec.utils.io import check_writable_dir

DEFAULT_GRID = np.geomspace(0.05, 20.0, 241)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for large |x|


def slot_confidence(logits: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """``c`` ``[R, G]``: each slot's own confidence, ``c[:, k] = sigmoid(logits[:, k] / temperatures[k])``
    (the per-slot values whose running products :func:`cumulative_survival` gives)."""
    logits = np.asarray(logits, dtype=np.float64)
    temperatures = np.asarray(temperatures, dtype=np.float64)
    if logits.ndim != 2 or temperatures.shape != (logits.shape[1],):
        raise ValueError(
            f"logits [R, G] and temperatures [G] expected, got {logits.shape} and {temperatures.shape}"
        )
    if not np.all(temperatures > 0):
        raise ValueError("temperatures must be > 0")
    return _sigmoid(logits / temperatures)


def cumulative_survival(logits: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """``a`` ``[R, G]``: ``a[:, k] = prod_{i<=k} sigmoid(logits[:, i] / temperatures[i])``."""
    return np.cumprod(slot_confidence(logits, temperatures), axis=1)


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
    min_survivals: int = 20,
) -> np.ndarray:
    """Temperatures ``[G]``, fitted position by position in order (grid search on ECE;
    ties go to the temperature closest to 1). A position with fewer than ``min_survivals``
    surviving or fewer than ``min_survivals`` failing drafts keeps 1: its ECE is flat in the
    temperature, and a grid search over noise would pick an extreme one."""
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
        hits = int(survived[rows, k].sum())
        if min(hits, int(rows.sum()) - hits) >= min_survivals:
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


# -- recorded rounds and the calibration file a draft carries -----------------------------

_CLIP = 1e-6  # recorded survival probabilities are clipped to [CLIP, 1 - CLIP] before the logit


def rounds_from_records(
    records: list[dict], temperatures: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(logits, drafted, survived)`` ``[R, G]`` from ``eval.py`` sample records.

    A round's ``confidence_per_round`` entry holds ``sigmoid(l_k / T_k)`` for the draft's
    temperatures at the time (``temperatures``, default 1); the logits returned are the raw
    ``l_k``, so fits compose with an earlier calibration. Position ``k`` counts as drafted
    when it was verified (``k < proposed``) and survived when ``k < accepted``."""
    rows = [
        (c, k, m)
        for r in records
        for c, k, m in zip(
            r["confidence_per_round"], r["proposed_per_round"], r["accepted_per_round"], strict=False
        )
    ]
    if not rows:
        raise ValueError(
            "the records hold no rounds with confidences (a DSpark draft with a confidence head)"
        )
    G = max(len(c) for c, _, _ in rows)
    temps = np.ones(G) if temperatures is None else np.asarray(temperatures, dtype=np.float64)[:G]
    logits = np.zeros((len(rows), G))
    drafted = np.zeros((len(rows), G), dtype=bool)
    survived = np.zeros((len(rows), G), dtype=bool)
    for i, (c, k, m) in enumerate(rows):
        p = np.clip(np.asarray(c, dtype=np.float64), _CLIP, 1 - _CLIP)
        logits[i, : len(p)] = np.log(p / (1 - p)) * temps[: len(p)]
        drafted[i, : min(k, len(p))] = True
        survived[i, :m] = True
    return logits, drafted, survived


def check_rounds_source(name: str, directory: str, config: dict, draft: str, fingerprint: str) -> None:
    """Refuse rounds this fit cannot vouch for: decoded by another draft (by the weights'
    fingerprint, not the path) or verified by another target than the draft was trained for,
    not greedy, not fully verified, or on the wrong prompt split (calibration rounds on the
    calibration split; held-out rounds on the report split)."""
    from deepspec.drafts.checkpoint import recorded_identity  # torch, transformers: not at import
    from deepspec.drafts.saving import TARGET_FINGERPRINT  # (eval.simulator imports this module)

    redo = f"decode them again: eval.py --draft_name_or_path {draft} --temperature 0 --policy fixed"
    split = "calibration" if name == "calibration" else "report"
    recorded = config.get("draft_checksum")
    if recorded is None:
        raise DataError(
            f"the {name} run {directory} records no draft fingerprint (an earlier deepspec wrote it); "
            f"{redo} --split {split} --output-dir {directory}"
        )
    if recorded != fingerprint:
        raise DataError(
            f"the {name} run {directory} was decoded by another draft ({config.get('draft')}, weights "
            f"{recorded}) than --draft {draft} ({fingerprint}); {redo} --split {split}"
        )
    trained_for = recorded_identity(draft).get(TARGET_FINGERPRINT)
    if trained_for and config.get("target_fingerprint") != trained_for:
        raise DataError(
            f"the {name} run {directory} was verified by another target ({config.get('target')}) than "
            f"{draft} was trained for; {redo} --split {split} and the draft's own target"
        )
    if config.get("temperature") != 0:
        raise DataError(
            f"the {name} run {directory} was decoded at temperature {config.get('temperature')}; STS fits "
            f"greedy rounds: {redo} --split {split}"
        )
    if config.get("policy", "fixed") != "fixed":
        raise DataError(
            f"the {name} run {directory} was verified with --policy {config.get('policy')}, which cuts "
            f"drafts by the confidences being calibrated; {redo} --split {split}"
        )
    if config.get("split", "report") != split:
        why = (
            "the temperatures must not be fitted on the prompts the report scores"
            if name == "calibration"
            else "the fit must be judged on prompts it was not fitted on"
        )
        raise DataError(
            f"the {name} run {directory} decoded the {config.get('split', 'report')} split; {why}: {redo} "
            f"--split {split}"
        )


def check_draft_writable(draft: str) -> None:
    """Refuse, before fitting, a draft directory the temperatures cannot be written into."""
    from deepspec.drafts.checkpoint import CALIBRATION_NAME  # torch, transformers: not at import

    check_writable_dir(
        draft,
        "--draft",
        fix=f"{CALIBRATION_NAME} goes there: make the directory writable, or copy the draft somewhere "
        "writable and pass the copy, or pass --dry-run to report only",
    )


def _ece_line(name: str, values: list[float]) -> str:
    cells = "  ".join("   -  " if np.isnan(v) else f"{100 * v:5.2f}%" for v in values)
    return f"{name:<22} {cells}"


def main(argv: list[str] | None = None) -> int:
    """Fit STS on the rounds of an eval run over the calibration split and store the
    temperatures with the draft; report ECE per position before and after."""
    import argparse

    from deepspec.drafts.checkpoint import (  # torch, transformers: not at import
        draft_fingerprint,
        read_calibration,
        read_weights,
        write_calibration,
    )

    parser = ArgumentParser(
        prog="python -m deepspec.eval.calibration",
        description="Sequential Temperature Scaling of a DSpark draft's confidence head. Record "
        "rounds with: eval.py --split calibration --max-samples N --output-dir RUN --draft_name_or_path "
        "DRAFT (greedy, full verification); then: python -m deepspec.eval.calibration --rounds RUN "
        "--draft DRAFT [--heldout REPORT_RUN] [--plots DIR]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", required=True, help="eval.py --output-dir of the calibration split")
    parser.add_argument("--draft", required=True, help="the draft checkpoint directory that decoded them")
    parser.add_argument("--heldout", default=None, help="an eval run on other prompts, to judge the fit")
    parser.add_argument("--plots", default=None, help="write reliability diagrams (before / after) here")
    parser.add_argument("--dry-run", action="store_true", help="report only; do not write the draft's file")
    args = parser.parse_args(argv)
    draft = os.path.expanduser(args.draft)
    if not os.path.isdir(draft):
        raise DataError(f"--draft {draft} is not a draft checkpoint directory")
    read_weights(draft)  # weights that are not what the draft recorded stop here
    fingerprint = draft_fingerprint(draft)
    current = read_calibration(draft)
    if not args.dry_run:
        check_draft_writable(draft)
    runs = {"calibration": args.rounds, **({"held-out": args.heldout} if args.heldout else {})}
    data = {}
    for name, directory in runs.items():
        redo = f"decode it again with eval.py --output-dir {directory} and this draft"
        results, records = read_eval_run(directory, f"the {name} run", redo)
        config = results["config"]
        check_rounds_source(name, directory, config, draft, fingerprint)
        used = config.get("confidence_temperatures")
        if (used is None) != (current is None) or (used is not None and not np.allclose(used, current)):
            raise DataError(
                f"the {name} run decoded with other confidence temperatures than {draft} holds now; "
                "decode it again with this draft"
            )
        try:
            data[name] = rounds_from_records(records, used)
        except ValueError as exc:
            raise DataError(f"{name} run: {exc}") from None
    logits, drafted, survived = data["calibration"]
    G = logits.shape[1]
    base = np.ones(G) if current is None else np.asarray(current[:G])
    fitted = fit_sts(logits, drafted, survived)
    report: dict = {"fitted_on": os.path.abspath(args.rounds), "rounds": int(logits.shape[0])}
    print(f"{'ECE of prod c_i':<22} " + "  ".join(f" pos {k + 1}" for k in range(G)))
    for name, (lg, dr, sv) in data.items():
        before = position_ece(lg, dr, sv, base)
        after = position_ece(lg, dr, sv, fitted)
        report[name] = {
            "rounds": int(lg.shape[0]),
            "ece_before": [None if np.isnan(v) else v for v in before],
            "ece_after": [None if np.isnan(v) else v for v in after],
        }
        print(_ece_line(f"{name} before", before))
        print(_ece_line(f"{name} after", after))
        if args.plots:
            from deepspec.eval.plots import plot_reliability  # matplotlib: only with --plots

            os.makedirs(args.plots, exist_ok=True)
            for when, temps in (("before", base), ("after", fitted)):
                stats = calibration_stats(_sigmoid(lg / temps), dr.sum(1), sv.sum(1), cumulative=True)
                path = os.path.join(args.plots, f"reliability_{name}_{when}.png")
                plot_reliability(stats, path, title=f"cumulative survival, {name} rounds, {when} STS")
    temperatures = [float(t) for t in fitted]
    print("temperatures: " + ", ".join(f"{t:.3g}" for t in temperatures))
    if not args.dry_run:
        print(f"wrote {write_calibration(draft, temperatures, report)}")
    return 0


if __name__ == "__main__":
    run_main(main)
