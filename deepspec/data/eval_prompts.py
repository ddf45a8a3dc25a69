"""Benchmark prompts: ``eval_datasets/<task>.jsonl`` rows ``{"turns": ["...", ...]}``.

Only the first user turn of each row is used (docs/DESIGN.md §3). When a file has more rows than
the cap, rows are shuffled with ``random.Random(seed)`` and the first ``max_samples`` kept,
so the same seed always picks the same prompts.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from deepspec.data.conversations import describe_json_error
from deepspec.errors import DataError

# The one home of the evaluation defaults (eval.py, EvalSettings and the loader read these):
# every benchmark in eval_datasets/ with its default cap (the reference's prompt counts).
DEFAULT_EVAL_TASKS = {
    "gsm8k": 500,
    "math500": 500,
    "aime25": 30,
    "humaneval": 164,
    "mbpp": 256,
    "livecodebench": 500,
    "mt-bench": 80,
    "alpaca": 500,
    "arena-hard-v2": 500,
}
DEFAULT_EVAL_SEED = 980406
DEFAULT_DATASETS_DIR = "eval_datasets"


@dataclass(frozen=True)
class EvalPrompt:
    task: str
    index: int  # 0-based row index in the file
    text: str  # the first user turn


def available_tasks(datasets_dir: str | os.PathLike[str]) -> list[str]:
    directory = os.fspath(datasets_dir)
    if not os.path.isdir(directory):
        return []
    return sorted(f[:-6] for f in os.listdir(directory) if f.endswith(".jsonl"))


SPLITS = ("report", "calibration")


def load_eval_prompts(
    task: str,
    datasets_dir: str | os.PathLike[str] = DEFAULT_DATASETS_DIR,
    *,
    max_samples: int | None = None,
    seed: int = DEFAULT_EVAL_SEED,
    split: str = "report",
) -> list[EvalPrompt]:
    """Read ``<datasets_dir>/<task>.jsonl``; malformed rows stop with ``file:line: reason``.

    With ``max_samples`` the prompts are a seeded sample: ``split="report"`` takes the first
    ``max_samples`` of a seeded shuffle, ``split="calibration"`` the last ones. These never
    overlap a reported sample of up to ``len(prompts) - max_samples`` prompts, so a confidence
    calibration fitted on them is judged on other prompts."""
    if split not in SPLITS:
        raise DataError(f"unknown prompt split {split!r}; choose {' or '.join(SPLITS)}")
    path = os.path.join(os.fspath(datasets_dir), f"{task}.jsonl")
    if not os.path.isfile(path):
        tasks = available_tasks(datasets_dir)
        hint = f"available: {', '.join(tasks)}" if tasks else f"no .jsonl files in {datasets_dir}"
        raise DataError(f"eval task {task!r} not found at {path} ({hint})")
    prompts: list[EvalPrompt] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    continue
                row = json.loads(text)
                turns = row.get("turns") if isinstance(row, dict) else None
                if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                    raise ValueError("expected an object with a non-empty 'turns' list of strings")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {exc.start}") from None
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: {describe_json_error(exc)}") from None
            except ValueError as exc:
                raise DataError(f"{path}:{lineno}: {exc}") from None
            prompts.append(EvalPrompt(task=task, index=lineno - 1, text=turns[0]))
    if not prompts:
        raise DataError(f"eval task {task!r}: {path} has no prompts")
    if split == "calibration" and (max_samples is None or 2 * max_samples > len(prompts)):
        raise DataError(
            f"eval task {task!r} has {len(prompts)} prompts: a calibration split of "
            f"{max_samples or len(prompts)} would overlap the reported ones; pass --max-samples "
            f"<= {len(prompts) // 2}"
        )
    if max_samples is not None and len(prompts) > max_samples:
        order = list(range(len(prompts)))
        random.Random(seed).shuffle(order)
        picked = order[:max_samples] if split == "report" else order[::-1][:max_samples]
        prompts = [prompts[i] for i in picked]
    return prompts
