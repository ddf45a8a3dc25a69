"""Regenerate the assistant turns of a conversation file with the target model.

Every assistant turn is replaced, in order, by the target's answer to the conversation
so far (earlier turns already regenerated); a conversation that ends with a user turn
gets one more, generated, assistant turn. Rows are written in completion order, one JSON
line each, appended and flushed as soon as a row is done; rows that still fail after
the retries go to the error file with the reason. Resume works by **id**: ``resume=True``
reads the ids already present in the output and error files and skips them, so a killed
run loses at most the rows in flight and never writes a row twice. A line cut short by
the kill is removed before appending.

Nothing is written or deleted before the run can start: the paths are checked (the output
must not be the input; its directory must be writable), the input is read, and every
server must answer with the expected model. With ``overwrite=True`` the rows go to
``<output>.partial`` and ``<error>.partial``, which replace the previous files only when
the run completes; a killed or stopped ``--overwrite`` run leaves the previous files as
they were, and ``overwrite=True, resume=True`` continues its partial files.

With ``num_samples > 1`` each input row yields that many rows, with ids ``<id>#<k>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from deepspec.data.conversations import (
    Conversation,
    ReadStats,
    describe_json_error,
    duplicate_id_error,
    read_conversations,
)
from deepspec.data.generation_backends import Completion, RequestError, SamplingParams
from deepspec.errors import DataError
from deepspec.utils.io import atomic_open, check_writable_dir, fsync_dir, same_file

PARTIAL_SUFFIX = ".partial"  # where an --overwrite run writes until it completes


@dataclass
class RegenOptions:
    input_path: str
    output_path: str
    error_path: str | None = None  # default: <output stem>_error.jsonl
    num_samples: int = 1
    concurrency: int = 64
    max_retries: int = 3
    retry_backoff: float = 1.0  # seconds before the first retry; doubles each time
    resume: bool = False
    overwrite: bool = False
    retry_errors: bool = False  # with resume: take the error file's rows again
    max_consecutive_failures: int = 100  # stop early when the servers look dead
    progress: bool = True
    skip_bad_rows: bool = False  # skip (and count) malformed input rows instead of stopping

    def resolved_error_path(self) -> str:
        if self.error_path:
            return self.error_path
        stem, _ = os.path.splitext(self.output_path)
        return f"{stem}_error.jsonl"

    def write_paths(self) -> tuple[str, str]:
        """The files rows are appended to: the output and error files, or with
        ``overwrite`` their ``.partial`` siblings (moved over them when the run completes)."""
        paths = (self.output_path, self.resolved_error_path())
        return tuple(p + PARTIAL_SUFFIX for p in paths) if self.overwrite else paths  # type: ignore[return-value]


@dataclass
class RegenSummary:
    total: int = 0  # output rows the input asks for
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # already in the output / error file (resume)
    bad_rows: int = 0  # malformed input rows skipped (skip_bad_rows)
    bad_reasons: dict[str, int] = field(default_factory=dict)
    committed: bool = True  # False: an --overwrite run stopped early; the old output is kept
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    seconds: float = 0.0
    aborted: str | None = None  # why the run stopped early
    first_error: str | None = None
    output_path: str = ""
    error_path: str = ""
    finish_reasons: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        rate = self.completion_tokens / self.seconds if self.seconds else 0.0
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.finish_reasons.items())) or "none"
        return (
            f"regeneration: {self.ok} ok, {self.failed} failed, {self.skipped} skipped (already done) "
            f"of {self.total}; {self.requests} requests, {self.prompt_tokens} prompt + "
            f"{self.completion_tokens} completion tokens in {self.seconds:.1f}s ({rate:.1f} tok/s); "
            f"finish reasons: {reasons}"
            + (
                f"; {self.bad_rows} malformed input rows skipped ({self.bad_reasons})"
                if self.bad_rows
                else ""
            )
        )


def read_done_ids(path: str) -> set[str]:
    """Ids of the complete rows of an output/error file (see :func:`_scan_rows`)."""
    return _scan_rows(path)[0]


def _scan_rows(path: str) -> tuple[set[str], int, int]:
    """``(ids of the complete rows, bytes of complete lines, file size)`` of an output/error
    file. A last line without its newline is a write cut by a kill (:func:`_cut_tail`);
    any other malformed line is an error, since the file is then not ours."""
    if not os.path.exists(path):
        return set(), 0, 0
    ids: set[str] = set()
    with open(path, "rb") as fh:
        data = fh.read()
    end = data.rfind(b"\n") + 1
    for lineno, raw in enumerate(data[:end].split(b"\n"), start=1):  # "\n" only: the editor's lines
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            ids.add(str(row["id"]))
        except (ValueError, KeyError, TypeError) as exc:
            why = (
                describe_json_error(exc)
                if isinstance(exc, json.JSONDecodeError)
                else "no JSON object with an id"
            )
            raise DataError(
                f"{path}:{lineno}: not a row written by the generator ({why}); "
                "choose another output path, or move this file away"
            ) from None
    return ids, end, len(data)


def _cut_tail(path: str, end: int, size: int) -> None:
    """Remove the incomplete last line (bytes ``end .. size``) that :func:`_scan_rows` found."""
    if end == size:
        return
    with open(path, "r+b") as fh:
        fh.truncate(end)
    print(f"note: removed an incomplete last line from {path} (a killed write)", flush=True)


def _rewrite_without(path: str, ids: set[str]) -> None:
    with open(path, "rb") as fh:
        lines = fh.read().splitlines(keepends=True)
    with atomic_open(path, "wb") as fh:
        for raw in lines:
            if raw.strip() and str(json.loads(raw)["id"]) not in ids:
                fh.write(raw)


def _tasks(conversations: list[Conversation], num_samples: int) -> Iterator[tuple[str, int, Conversation]]:
    for conv in conversations:
        for k in range(num_samples):
            yield (conv.id if num_samples == 1 else f"{conv.id}#{k}"), k, conv


def count_pending(options: RegenOptions) -> int:
    """Rows of the input a ``--resume`` run would still request (ids in neither the output
    nor the error file); lets a pipeline skip starting servers when nothing is left."""
    conversations, _ = load_input(options)
    tasks = _tasks(conversations, options.num_samples)
    out_path, err_path = options.write_paths()
    done = read_done_ids(out_path) | read_done_ids(err_path)
    return sum(1 for row_id, _, _ in tasks if row_id not in done)


def check_paths(options: RegenOptions) -> None:
    """Refuse, before anything is read from a server or written, paths that would lose data:
    a missing input, an output (or error file) that is the input or each other, an output
    that is a directory or cannot be written, or existing outputs without resume/overwrite."""
    src = options.input_path
    if os.path.isdir(src):
        raise DataError(f"--input-file-path {src} is a directory: pass a JSONL file")
    if not os.path.isfile(src):
        raise DataError(f"--input-file-path {src} not found: check the path")
    out, err = options.output_path, options.resolved_error_path()
    named = [("--output-file-path", out), ("the error file", err)]
    named += [(f"{what} ({PARTIAL_SUFFIX})", p + PARTIAL_SUFFIX) for what, p in named]
    for what, path in named:
        if same_file(path, src):
            flag = (
                "--error-file-path"
                if what.startswith("the error") and options.error_path
                else "--output-file-path"
            )
            raise DataError(
                f"{what} {path} is the input file {src}: writing it would destroy the prompts; choose another {flag}"
            )
        if os.path.isdir(path):
            raise DataError(f"{what} {path} is a directory: pass a file path")
    if same_file(out, err):
        raise DataError(f"--error-file-path {err} is the output file: choose another --error-file-path")
    if not (options.resume or options.overwrite):
        existing = [p for p in (out, err) if os.path.exists(p) and os.path.getsize(p)]
        if existing:
            raise DataError(
                f"{existing[0]} exists; pass --resume to continue it or --overwrite to start over"
            )
    for what, path in named[:2]:
        check_writable_dir(os.path.dirname(os.path.abspath(path)), what)


def load_input(options: RegenOptions) -> tuple[list[Conversation], ReadStats]:
    """The input conversations (ids checked unique) and the reader's counts."""
    stats = ReadStats()
    conversations = list(read_conversations(options.input_path, skip_bad=options.skip_bad_rows, stats=stats))
    seen: dict[str, int] = {}
    for conv in conversations:
        if conv.id in seen:
            raise duplicate_id_error(
                options.input_path,
                conv.id,
                seen[conv.id],
                conv.line,
                "ids must be unique because --resume matches rows by id",
            )
        seen[conv.id] = conv.line
    if not conversations:
        what = f"all {stats.skipped} rows are malformed" if stats.skipped else "it has no rows"
        raise DataError(f"--input-file-path {options.input_path}: nothing to regenerate ({what})")
    return conversations, stats


def _commit(options: RegenOptions) -> None:
    """Move an --overwrite run's partial files over the previous output and error file."""
    out_partial, err_partial = options.write_paths()
    out, err = options.output_path, options.resolved_error_path()
    for path in (out_partial, err_partial):  # on disk before they replace anything
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
    os.replace(out_partial, out)
    if os.path.getsize(err_partial):
        os.replace(err_partial, err)
    else:
        os.unlink(err_partial)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(err)  # it listed the previous run's failures
    for directory in {os.path.dirname(os.path.abspath(p)) for p in (out, err)}:
        fsync_dir(directory)


class _Writer:
    """Append JSON rows to a file, one flushed line per row."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._fh = open(path, "ab")  # noqa: SIM115 - closed in close()

    def write(self, row: dict[str, Any]) -> None:
        self._fh.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


async def regenerate(
    backend: Any,
    options: RegenOptions,
    params: SamplingParams,
    prepared: tuple[list[Conversation], ReadStats] | None = None,
) -> RegenSummary:
    """Run the regeneration described by ``options`` against ``backend`` (closed at the end).

    ``prepared``: what :func:`load_input` returned, when the caller already read the input."""
    try:
        return await _regenerate(backend, options, params, prepared)
    finally:
        await backend.close()


async def _regenerate(
    backend: Any,
    options: RegenOptions,
    params: SamplingParams,
    prepared: tuple[list[Conversation], ReadStats] | None,
) -> RegenSummary:
    from tqdm import tqdm

    error_path = options.resolved_error_path()
    summary = RegenSummary(output_path=options.output_path, error_path=error_path)
    check_paths(options)
    conversations, stats = prepared if prepared is not None else load_input(options)
    summary.bad_rows, summary.bad_reasons = stats.skipped, dict(stats.reasons)
    # every server answers with the expected model before any file is touched
    model = await backend.resolve_model()
    print(f"model: {model}", flush=True)
    out_path, err_path = options.write_paths()
    if options.overwrite and not options.resume:
        for path in (out_path, err_path):  # a stopped --overwrite run's leftovers
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    scans = {path: _scan_rows(path) for path in (out_path, err_path)}  # both checked before either is cut
    done, failed_before = scans[out_path][0], scans[err_path][0]
    for path, (_, end, size) in scans.items():
        _cut_tail(path, end, size)
    if options.retry_errors and failed_before:
        _rewrite_without(err_path, failed_before - done)
        failed_before = set()
    tasks = list(_tasks(conversations, options.num_samples))
    summary.total = len(tasks)
    pending = [t for t in tasks if t[0] not in done and t[0] not in failed_before]
    summary.skipped = summary.total - len(pending)

    out, err = _Writer(out_path), _Writer(err_path)
    bar = tqdm(
        total=len(pending), unit="row", disable=not options.progress, dynamic_ncols=True, desc="regenerate"
    )
    start = time.perf_counter()
    consecutive_failures = 0
    reasons: dict[str, int] = {}
    last_error = [""]
    queue = iter(pending)

    async def request(messages: list[dict[str, str]]) -> Completion:
        for attempt in range(options.max_retries + 1):
            summary.requests += 1
            try:
                return await backend.complete(messages, params)
            except RequestError as exc:
                if not exc.retryable or attempt == options.max_retries:
                    tries = f"{attempt + 1} attempt" + ("s" if attempt else "")
                    raise RequestError(f"{exc.reason} (after {tries})", retryable=False) from None
                await asyncio.sleep(options.retry_backoff * 2**attempt * (1 + 0.25 * random.random()))
        raise AssertionError("unreachable")

    async def run_row(row_id: str, k: int, conv: Conversation) -> None:
        nonlocal consecutive_failures
        messages: list[dict[str, str]] = []
        finish, tokens = [], 0
        try:
            turns = conv.messages if conv.messages[-1]["role"] == "assistant" else [*conv.messages, None]
            for turn in turns:
                if turn is not None and turn["role"] != "assistant":
                    messages.append(turn)
                    continue
                if not any(m["role"] == "user" for m in messages):
                    raise RequestError("an assistant turn comes before any user turn", retryable=False)
                completion = await request(messages)
                messages.append({"role": "assistant", "content": completion.text})
                finish.append(completion.finish_reason)
                tokens += completion.completion_tokens
                summary.prompt_tokens += completion.prompt_tokens
                summary.completion_tokens += completion.completion_tokens
        except RequestError as exc:
            summary.failed += 1
            summary.first_error = summary.first_error or exc.reason
            consecutive_failures += 1
            last_error[0] = exc.reason
            original = {k: v for k, v in conv.to_json().items() if k != "id"}
            err.write({"id": row_id, "error": exc.reason, **original})
        else:
            summary.ok += 1
            consecutive_failures = 0
            for reason in finish:
                reasons[str(reason)] = reasons.get(str(reason), 0) + 1
            row = {**conv.to_json(), "id": row_id, "conversations": messages}
            row["regenerated"] = {"model": model, "finish_reasons": finish, "completion_tokens": tokens}
            if options.num_samples > 1:
                row["regenerated"].update(source_id=conv.id, sample=k)
            out.write(row)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(
            req_s=f"{summary.requests / elapsed:.1f}",
            tok_s=f"{summary.completion_tokens / elapsed:.0f}",
            failed=summary.failed,
            refresh=False,
        )
        bar.update(1)

    async def worker() -> None:
        for row_id, k, conv in queue:
            if summary.aborted:
                return
            await run_row(row_id, k, conv)
            if consecutive_failures >= options.max_consecutive_failures and not summary.aborted:
                summary.aborted = (
                    f"stopped after {consecutive_failures} rows failed in a row (last: {last_error[0]})"
                )

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, options.concurrency))))
    finally:
        summary.seconds = time.perf_counter() - start
        bar.close()
        out.close()
        err.close()
    summary.finish_reasons = reasons
    if options.overwrite:
        summary.committed = not summary.aborted
        if summary.committed:
            _commit(options)
    return summary


def run_regeneration(
    backend: Any,
    options: RegenOptions,
    params: SamplingParams,
    prepared: tuple[list[Conversation], ReadStats] | None = None,
) -> RegenSummary:
    """Synchronous wrapper of :func:`regenerate`."""
    return asyncio.run(regenerate(backend, options, params, prepared))
