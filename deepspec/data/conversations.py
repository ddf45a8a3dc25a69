"""Read conversation JSONL files strictly: a bad row stops with ``file:line: reason``.

Row format (one JSON object per line)::

    {"id": "gsm8k-17", "conversations": [{"role": "user", "content": "..."},
                                         {"role": "assistant", "content": "..."}]}

``messages`` is accepted instead of ``conversations``, and ShareGPT-style turns
(``{"from": "human" | "gpt" | "system", "value": ...}``) are normalised. Other top-level
keys are kept in :attr:`Conversation.extra`. With ``skip_bad=True`` (the
``--skip-bad-rows`` flag of the data scripts) malformed rows are skipped and counted in
:class:`ReadStats` instead — never dropped silently. Whitespace-only lines are ignored
(and counted).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from deepspec.errors import DataError

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class Conversation:
    id: str
    messages: list[dict[str, str]]  # [{"role": ..., "content": ...}, ...]
    extra: dict[str, Any] = field(default_factory=dict)
    line: int = field(default=0, compare=False)  # line of its file (0: not read from a file)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, **self.extra, "conversations": self.messages}


@dataclass
class ReadStats:
    rows: int = 0  # rows returned
    blank: int = 0  # whitespace-only lines (ignored)
    skipped: int = 0  # malformed rows skipped with skip_bad=True
    reasons: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        text = f"{self.rows} rows"
        if self.skipped:
            text += f", {self.skipped} malformed rows skipped ({dict(self.reasons)})"
        return text


def _normalise_turn(turn: Any, index: int) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise ValueError(f"turn {index} is {type(turn).__name__}, expected an object")
    if "role" in turn:
        role, content = turn.get("role"), turn.get("content")
    elif "from" in turn:
        role = _SHAREGPT_ROLES.get(str(turn.get("from")).lower(), turn.get("from"))
        content = turn.get("value")
    else:
        raise ValueError(f"turn {index} has no 'role'")
    if role not in ROLES:
        raise ValueError(f"turn {index} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if not isinstance(content, str):
        what = "null" if content is None else type(content).__name__
        raise ValueError(f"turn {index} ({role}) content is {what}, expected a string")
    return {"role": role, "content": content}


def parse_conversation(row: Any, default_id: str) -> Conversation:
    """Validate one decoded JSON row; raises ``ValueError`` with the reason."""
    if not isinstance(row, dict):
        raise ValueError(f"row is a JSON {type(row).__name__}, expected an object")
    turns = row.get("conversations", row.get("messages"))
    if turns is None:
        raise ValueError("row has no 'conversations' (or 'messages') list")
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list")
    messages = [_normalise_turn(t, i) for i, t in enumerate(turns)]
    raw_id = row.get("id", default_id)
    if not isinstance(raw_id, str | int) or isinstance(raw_id, bool):
        raise ValueError(f"'id' must be a string or integer, got {type(raw_id).__name__}")
    extra = {k: v for k, v in row.items() if k not in ("id", "conversations", "messages")}
    return Conversation(id=str(raw_id), messages=messages, extra=extra)


def describe_json_error(exc: json.JSONDecodeError) -> str:
    """``invalid JSON (<reason> at column N)`` for an error in one line of a JSONL file.

    ``exc`` comes from parsing that line (its newline included, so the parser's own line and
    column point past a row cut short: ``line 2 column 1``). The column reported here is the
    real one in the line, counted in characters from 1; an error at the end of the line's
    text says the row is cut short."""
    text = exc.doc.rstrip("\r\n")
    pos = min(exc.pos, len(text))
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1  # a JSONL row holds no newline of its own
    msg = exc.msg.removesuffix(" at")  # "Invalid control character at"
    if not text[pos:].strip():
        return f"invalid JSON ({msg} at column {column}, the end of the line: the row is cut short)"
    return f"invalid JSON ({msg} at column {column})"


def duplicate_id_error(path: str, conv_id: str, first_line: int, line: int, why: str) -> DataError:
    """The error for an id seen twice in one file: the file, the id, both lines and the fix."""
    return DataError(
        f"{path}: id {conv_id!r} appears twice (lines {first_line} and {line}); {why}: "
        "remove the repeated row or give it another id"
    )


def check_data_file(path: str | os.PathLike[str]) -> None:
    """Raise a one-line :class:`DataError` unless ``path`` is a readable regular file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"data file {path} is a directory; pass a JSONL file")
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path} (check the path)")
    if not os.access(path, os.R_OK):
        raise DataError(f"data file {path} is not readable (check its permissions)")


def read_conversations(
    path: str | os.PathLike[str],
    *,
    skip_bad: bool = False,
    stats: ReadStats | None = None,
    can_skip: bool = True,
) -> Iterator[Conversation]:
    """Yield the conversations of a JSONL file, validating every row.

    Raises :class:`DataError` (``file:line: reason``) on the first malformed row unless
    ``skip_bad``; then the row is counted in ``stats`` and skipped. ``can_skip=False`` (a
    caller without a ``--skip-bad-rows`` flag) leaves that flag out of the error's hint.
    """
    path = os.fspath(path)
    stats = stats if stats is not None else ReadStats()
    check_data_file(path)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                reason = f"invalid UTF-8 at byte {exc.start}"
            else:
                if not text.strip():
                    stats.blank += 1
                    continue
                try:
                    row = json.loads(text)
                    conv = parse_conversation(row, default_id=f"{os.path.basename(path)}:{lineno}")
                    conv.line = lineno
                except json.JSONDecodeError as exc:
                    reason = describe_json_error(exc)
                except ValueError as exc:
                    reason = str(exc)
                else:
                    stats.rows += 1
                    yield conv
                    continue
            if not skip_bad:
                hint = "fix the row, or skip bad rows with --skip-bad-rows" if can_skip else "fix the row"
                raise DataError(f"{path}:{lineno}: {reason} ({hint})")
            stats.skipped += 1
            stats.reasons[reason.split(" (")[0]] += 1
