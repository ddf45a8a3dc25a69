"""Load prompt datasets from files, saved datasets or the hub; normalise; split train/held-out.

Accepted sources: a ``.jsonl`` / ``.json`` / ``.parquet`` file, a directory written by
``datasets.Dataset.save_to_disk``, or a hub dataset name (needs the hub; offline it fails
at once with one line, never a hang).

Accepted row shapes (normalised to :class:`~deepspec.data.conversations.Conversation`):

* ``conversations`` / ``messages`` lists (``role``/``content`` or ShareGPT ``from``/``value``);
* a prompt field — ``prompt``, ``instruction`` (+ ``input``, Alpaca style), ``question``,
  ``query`` or ``problem`` — with an optional answer field (``response``, ``output``,
  ``answer``, ``completion``, ``solution``);
* ``turns`` (a list of user turns, as in ``eval_datasets/``): the first one is the prompt.

Rows without an ``id`` get ``<name>-<row index>``. A JSONL line that is not JSON stops the
run with ``file:line`` unless ``skip_bad`` (``--skip-bad-rows``), which skips and counts it.
"""

from __future__ import annotations

import json
import os
import random
import socket
import urllib.parse
from collections.abc import Iterator
from typing import Any

from deepspec.data.conversations import Conversation, describe_json_error, parse_conversation
from deepspec.errors import DataError

PROMPT_KEYS = ("prompt", "instruction", "question", "query", "problem")
ANSWER_KEYS = ("response", "output", "answer", "completion", "solution")


def _hub_reachable(timeout: float = 5.0) -> tuple[bool, str]:
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False, "HF_HUB_OFFLINE is set"
    try:
        parsed = urllib.parse.urlparse(endpoint)
        host = parsed.hostname or "huggingface.co"
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError as exc:  # "http://[::1", a port that is not a number
        return (
            False,
            f"HF_ENDPOINT {endpoint!r} is not a valid URL ({' '.join(str(exc).split())}): fix or unset it",
        )
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as exc:
        return False, f"{host}:{port} unreachable ({exc.__class__.__name__})"


def load_rows(
    source: str,
    *,
    split: str = "train",
    subset: str | None = None,
    skip_bad: bool = False,
    skipped: dict[str, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the raw rows (dicts) of ``source`` (see the module docstring).

    ``skip_bad``: JSONL lines that are not JSON are skipped and counted in ``skipped``
    (reason → count) instead of stopping."""
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        yield from _file_rows(path, skip_bad=skip_bad, skipped=skipped if skipped is not None else {})
        return
    if os.path.isdir(path):
        yield from _saved_dataset_rows(path, split)
        return
    if source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".json", ".parquet")):
        raise DataError(f"data source {source} not found (check --input)")
    ok, why = _hub_reachable()
    if not ok:
        raise DataError(
            f"{source!r} is not a local file or directory and the dataset hub cannot be reached ({why}); "
            f"download it where the hub is reachable (datasets save_to_disk or JSONL) and pass the local path"
        )
    import datasets

    try:
        data = datasets.load_dataset(source, subset, split=split)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot load hub dataset {source!r} (split {split}): {first}") from None
    yield from data


def _file_rows(path: str, *, skip_bad: bool = False, skipped: dict[str, int]) -> Iterator[dict[str, Any]]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
        yield from table.to_pylist()
        return
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (UnicodeDecodeError, ValueError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
        yield from data
        return
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                if skip_bad:
                    skipped["not a JSON line"] = skipped.get("not a JSON line", 0) + 1
                    continue
                if isinstance(exc, json.JSONDecodeError):
                    reason = describe_json_error(exc)
                elif isinstance(exc, UnicodeDecodeError):
                    reason = f"invalid UTF-8 at byte {exc.start}"
                else:
                    reason = exc.__class__.__name__
                raise DataError(
                    f"{path}:{lineno}: not a JSON row: {reason} "
                    "(fix the row, or skip malformed rows with --skip-bad-rows)"
                ) from None
            yield row


def _saved_dataset_rows(path: str, split: str) -> Iterator[dict[str, Any]]:
    import datasets

    try:
        data = datasets.load_from_disk(path)
    except Exception as exc:
        raise DataError(f"{path}: not a directory written by datasets save_to_disk ({exc})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{path}: no split {split!r} (available: {', '.join(data)})")
        data = data[split]
    yield from data


def normalize_row(row: Any, default_id: str) -> Conversation:
    """One raw row → a conversation; ``ValueError`` says why a row cannot be used."""
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, expected an object")
    if "conversations" in row or "messages" in row:
        return parse_conversation(row, default_id)
    raw_id = row.get("id", default_id)
    extra = {k: v for k, v in row.items() if k in ("source", "category")}
    if isinstance(row.get("turns"), list) and row["turns"] and isinstance(row["turns"][0], str):
        messages = [{"role": "user", "content": row["turns"][0]}]
        return parse_conversation({"id": raw_id, "conversations": messages, **extra}, default_id)
    prompt_key = next((k for k in PROMPT_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
    if prompt_key is None:
        raise ValueError(
            f"no conversation or prompt field (looked for conversations, messages, {', '.join(PROMPT_KEYS)})"
        )
    prompt = row[prompt_key]
    if prompt_key == "instruction" and isinstance(row.get("input"), str) and row["input"].strip():
        prompt = f"{prompt}\n\n{row['input']}"
    messages = [{"role": "user", "content": prompt}]
    answer_key = next((k for k in ANSWER_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
    if answer_key is not None:
        messages.append({"role": "assistant", "content": row[answer_key]})
    return parse_conversation({"id": raw_id, "conversations": messages, **extra}, default_id)


def normalize_rows(
    rows: Iterator[dict[str, Any]], name: str, *, max_rows: int | None = None
) -> tuple[list[Conversation], dict[str, int]]:
    """Normalise rows; unusable rows are skipped and counted by reason (never silently)."""
    out: list[Conversation] = []
    skipped: dict[str, int] = {}
    seen: set[str] = set()
    for index, row in enumerate(rows):
        if max_rows is not None and len(out) >= max_rows:
            break
        try:
            conv = normalize_row(row, f"{name}-{index}")
        except ValueError as exc:
            reason = str(exc).split(" (")[0]
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        if conv.id in seen:
            skipped["duplicate id"] = skipped.get("duplicate id", 0) + 1
            continue
        seen.add(conv.id)
        out.append(conv)
    return out, skipped


def split_conversations(
    conversations: list[Conversation], *, test_size: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Seeded split; ``test_size`` < 1 is a fraction, >= 1 a count. Both keep input order."""
    n = len(conversations)
    if test_size < 0:
        raise DataError(f"--test-size must be >= 0, got {test_size}")
    k = round(n * test_size) if test_size < 1 else int(test_size)
    if k > n:
        raise DataError(f"--test-size {test_size} asks for {k} held-out rows but there are only {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    train = [c for i, c in enumerate(conversations) if i not in held]
    heldout = [c for i, c in enumerate(conversations) if i in held]
    return train, heldout


def first_user_turn(conv: Conversation) -> str:
    for message in conv.messages:
        if message["role"] == "user":
            return message["content"]
    raise DataError(f"conversation {conv.id!r} has no user turn")
