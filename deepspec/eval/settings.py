"""Evaluation settings, output-directory checks and reuse of an earlier run's baseline.

Kept free of ``torch`` so that ``eval.py`` and ``python -m deepspec.eval.report`` refuse a bad
output directory or a torn ``--baseline-from`` before loading any model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from deepspec.algorithms import ALGORITHMS
from deepspec.data.conversations import describe_json_error
from deepspec.data.eval_prompts import DEFAULT_DATASETS_DIR, DEFAULT_EVAL_SEED
from deepspec.errors import ConfigError, DataError
from deepspec.utils.io import check_writable_dir


@dataclass
class EvalSettings:
    tasks: list[str]
    max_samples: int | None = None
    max_new_tokens: int = 2048
    temperature: float = 1.0
    confidence_threshold: float = 0.0  # threshold policy: cut at the first slot with c_k < t
    seed: int = DEFAULT_EVAL_SEED
    eval_datasets_dir: str = DEFAULT_DATASETS_DIR
    output_dir: str | None = None
    baseline: bool = True
    dtype: str = "auto"  # auto: fp32 at temperature 0 (bit-exact greedy), else bf16
    progress: bool = True
    baseline_from: str | None = None  # reuse the plain-decoding records of this output dir
    split: str = "report"  # or "calibration": prompts disjoint from the reported ones
    batch_size: int = 1  # requests in flight (continuous batching when > 1)
    policy: str = "auto"  # fixed, threshold, cumulative, scheduled; auto: see resolve_policy
    sps_table: str | None = None  # the scheduled policy's SPS(B) table (benchmarks/sps_profile.py)
    survival_threshold: float = 0.0  # cumulative policy: cut at the first slot with prod c_i < t

    def verify_policy(self):
        """The :class:`~deepspec.eval.policies.VerifyPolicy` these settings describe."""
        from deepspec.eval.policies import VerifyPolicy  # numpy: not at import, this module starts fast
        from deepspec.eval.scheduler import SPSTable  # numpy, as above

        policy = resolve_policy(self.policy, self.confidence_threshold, self.survival_threshold)
        sps = SPSTable.load(self.sps_table) if policy == "scheduled" else None
        thresholds = {"threshold": self.confidence_threshold, "cumulative": self.survival_threshold}
        return VerifyPolicy(policy, thresholds.get(policy, 0.0), sps)


# the flag that sets each threshold policy's t
THRESHOLD_FLAGS = {"threshold": "--confidence-threshold", "cumulative": "--survival-threshold"}


def resolve_policy(policy: str, confidence_threshold: float, survival_threshold: float = 0.0) -> str:
    """``auto`` means ``threshold`` when ``--confidence-threshold`` is set, ``cumulative`` when
    ``--survival-threshold`` is set (both: a one-line :class:`ConfigError`), else ``fixed``."""
    if policy != "auto":
        return policy
    if confidence_threshold > 0 and survival_threshold > 0:
        raise ConfigError(
            "pass only one of --confidence-threshold (cut at the first slot whose confidence is below it) "
            "and --survival-threshold (cut where the cumulative survival falls below it)"
        )
    if confidence_threshold > 0:
        return "threshold"
    return "cumulative" if survival_threshold > 0 else "fixed"


CONFIDENCE_POLICIES = ("threshold", "cumulative", "scheduled")  # they read the draft's confidence head


def check_draft_supports_policy(
    policy: str,
    draft_path: str,
    config: Any,
    confidence_threshold: float = 0.0,
    survival_threshold: float = 0.0,
) -> None:
    """Refuse a verification policy that reads confidences (``threshold``, ``cumulative``,
    ``scheduled``) for a draft without a confidence head, from the draft's config (its
    ``DraftConfig``, read from ``config.json``) alone: before the target or the draft loads.
    ``policy`` may be ``auto`` (resolved here)."""
    resolved = resolve_policy(policy, confidence_threshold, survival_threshold)
    if resolved not in CONFIDENCE_POLICIES:
        return
    if config.confidence_head:
        return
    if policy == resolved:
        asked = f"--policy {resolved}"
    else:
        value = confidence_threshold if resolved == "threshold" else survival_threshold
        asked = f"{THRESHOLD_FLAGS[resolved]} {value:g}"
    what = (
        f"a {config.algorithm} draft trained without a confidence head (model.confidence_head_alpha=0)"
        if ALGORITHMS[config.algorithm].markov
        else f"a {config.algorithm} draft, which has no confidence head"
    )
    raise ConfigError(
        f"{asked} needs the draft's confidence head, but --draft_name_or_path {draft_path} is {what}; "
        "use --policy fixed without --confidence-threshold or --survival-threshold, or a DSpark draft "
        "trained with model.confidence_head_alpha > 0"
    )


BASELINE_KEYS = (
    "target",
    "temperature",
    "max_new_tokens",
    "seed",
    "dtype",
    "eval_datasets_dir",
    "split",
    "batch_size",
)
RESULTS_NAME = "results.json"
SAMPLES_NAME = "samples.jsonl"


def resolve_settings(settings: EvalSettings) -> EvalSettings:
    """Fill in ``dtype="auto"`` (fp32 at temperature 0, bit-exact greedy, else bf16) and
    ``policy="auto"`` (:func:`resolve_policy`: threshold, cumulative or fixed)."""
    if settings.dtype == "auto":
        settings.dtype = "fp32" if settings.temperature == 0 else "bf16"
    settings.policy = resolve_policy(
        settings.policy, settings.confidence_threshold, settings.survival_threshold
    )
    return settings


def check_output_dir(directory: str, flag: str = "--output-dir") -> None:
    """Refuse, before any decoding, an output directory that is a file or not writable, and
    one whose ``results.json`` / ``samples.jsonl`` eval.py did not write (they would be
    replaced): an earlier eval run is the only thing deepspec overwrites there."""
    check_writable_dir(directory, flag)
    path = os.path.expanduser(directory)
    clash = [n for n in (RESULTS_NAME, SAMPLES_NAME) if os.path.lexists(os.path.join(path, n))]
    if clash and not _is_eval_run(path):
        raise DataError(
            f"{flag} {directory} holds {' and '.join(clash)} that eval.py did not write (they would be "
            "replaced); choose another directory, or move them away"
        )


def _is_eval_run(directory: str) -> bool:
    """``directory/results.json`` is one eval.py wrote (its config and per-dataset results)."""
    try:
        with open(os.path.join(directory, RESULTS_NAME), encoding="utf-8") as fh:
            results = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(results, dict) and isinstance(results.get("config"), dict) and "datasets" in results


class _BadLine(ValueError):
    """A file that is not JSON (JSONL: a line); the message names the file, line and column."""


def _jsonl_rows(raw: bytes, path: str) -> list:
    """The rows of a JSONL file's bytes; a bad line raises :class:`_BadLine`."""
    rows = []
    for lineno, line in enumerate(raw.decode("utf-8").split("\n"), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise _BadLine(f"{path}:{lineno}: {describe_json_error(exc)}") from None
    return rows


def read_eval_run(directory: str, what: str, redo: str) -> tuple[dict, list[dict]]:
    """``(results, sample rows)`` of an earlier ``eval.py --output-dir`` run. One-line
    :class:`DataError` s (``what`` names the run, ``redo`` is the fix) for a missing run, a
    torn ``results.json`` or ``samples.jsonl`` (real line and column), and samples that do
    not match the SHA-256 their ``results.json`` recorded (an interrupted or mixed write)."""
    directory = os.path.expanduser(directory)
    path = os.path.join(directory, RESULTS_NAME)
    samples = os.path.join(directory, SAMPLES_NAME)
    if not os.path.isdir(directory):
        raise DataError(f"{what} {directory} is not a directory; pass an earlier eval.py --output-dir")
    if not (os.path.isfile(path) and os.path.isfile(samples)):
        raise DataError(
            f"{what} {directory}: no {RESULTS_NAME} + {SAMPLES_NAME} there; pass an earlier eval.py --output-dir"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            try:
                results = json.load(fh)
            except json.JSONDecodeError as exc:  # the whole file parsed: its line and column are real
                raise _BadLine(
                    f"{path}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
                ) from None
        if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
            raise TypeError("no config object")
        with open(samples, "rb") as fh:
            raw = fh.read()
        rows = _jsonl_rows(raw, samples)
    except (ValueError, TypeError) as exc:
        detail = str(exc) if isinstance(exc, _BadLine) else f"{type(exc).__name__}: {exc}"
        raise DataError(f"{what} {directory}: unreadable results ({detail}); {redo}") from None
    expected = results.get("samples_sha256")
    if expected and expected != hashlib.sha256(raw).hexdigest():
        raise DataError(
            f"{what} {directory}: {SAMPLES_NAME} does not belong to {RESULTS_NAME} (an interrupted, "
            f"mixed or edited write); {redo}"
        )
    return results, rows


def load_baseline(directory: str, settings: EvalSettings, target_name: str) -> dict[tuple[str, int], dict]:
    """Plain-decoding records of an earlier ``eval.py --output-dir`` run, keyed by
    (dataset, prompt index); refuses a run made with other decoding settings, and a
    ``samples.jsonl`` that is torn or does not belong to its ``results.json``."""
    redo = f"run eval.py --output-dir {directory} again or drop --baseline-from"
    results, rows = read_eval_run(directory, "--baseline-from", redo)
    config = results["config"]
    need = ("baseline_output_token_ids", "baseline_seconds", "prompt_token_ids")
    try:
        out = {(r["dataset"], r["index"]): {k: r[k] for k in need} for r in rows}
    except (KeyError, TypeError) as exc:
        raise DataError(
            f"--baseline-from {directory}: unreadable results ({type(exc).__name__}: {exc}); {redo}"
        ) from None
    mine = {**asdict(settings), "target": target_name}
    defaults = {"split": "report", "batch_size": 1}  # runs written before these settings existed
    diff = [
        f"{k} {config.get(k, defaults.get(k))!r} there, {mine[k]!r} here"
        for k in BASELINE_KEYS
        if config.get(k, defaults.get(k)) != mine[k]
    ]
    if not config.get("baseline"):
        diff.append("it ran without the baseline")
    if diff:
        raise DataError(f"--baseline-from {directory} was decoded differently: " + "; ".join(diff))
    return out
