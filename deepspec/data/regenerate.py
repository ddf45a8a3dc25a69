"""Regenerate the assistant turns of a conversation file with the target model.

Every assistant turn is replaced, in order, by the target's answer to the conversation
so far (earlier turns already regenerated); a conversation that ends with a user turn
gets one more, generated, assistant turn. Rows are written in completion order, one JSON
line each, appended and flushed as soon as a row is done; rows that still fail after
the retries go to the error file with the reason. Resume works by **id**: ``resume=True``
reads the ids already present in the output and error files and skips them, so a killed
run loses at most the rows in flight and never writes a row twice. A line cut short by
the kill is removed before appending.

With ``num_samples > 1`` each input row yields that many rows, with ids ``<id>#<k>``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from deepspec.data.conversations import Conversation, read_conversations
from deepspec.data.generation_backends import Completion, RequestError, SamplingParams
from deepspec.errors import DataError


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

    def resolved_error_path(self) -> str:
        if self.error_path:
            return self.error_path
        stem, _ = os.path.splitext(self.output_path)
        return f"{stem}_error.jsonl"


@dataclass
class RegenSummary:
    total: int = 0  # output rows the input asks for
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # already in the output / error file (resume)
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
        )


def read_done_ids(path: str, *, repair: bool) -> set[str]:
    """Ids of the complete rows of an output/error file.

    A last line without its newline (a write cut by a kill) is removed when ``repair``;
    any other malformed line is an error, since the file is then not ours.
    """
    if not os.path.exists(path):
        return set()
    ids: set[str] = set()
    with open(path, "rb") as fh:
        data = fh.read()
    end = len(data)
    if data and not data.endswith(b"\n"):
        end = data.rfind(b"\n") + 1
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(end)
            print(f"note: removed an incomplete last line from {path} (a killed write)", flush=True)
    for lineno, raw in enumerate(data[:end].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            ids.add(str(row["id"]))
        except (ValueError, KeyError, TypeError):
            raise DataError(
                f"{path}:{lineno}: not a row written by the generator (no JSON object with an id)"
            ) from None
    return ids


def _rewrite_without(path: str, ids: set[str]) -> None:
    from deepspec.utils.io import atomic_open

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
    done = read_done_ids(options.output_path, repair=False)
    done |= read_done_ids(options.resolved_error_path(), repair=False)
    tasks = _tasks(list(read_conversations(options.input_path)), options.num_samples)
    return sum(1 for row_id, _, _ in tasks if row_id not in done)


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


async def regenerate(backend: Any, options: RegenOptions, params: SamplingParams) -> RegenSummary:
    """Run the regeneration described by ``options`` against ``backend``."""
    from tqdm import tqdm

    error_path = options.resolved_error_path()
    summary = RegenSummary(output_path=options.output_path, error_path=error_path)
    conversations = list(read_conversations(options.input_path))
    seen: dict[str, int] = {}
    for lineno, conv in enumerate(conversations, start=1):
        if conv.id in seen:
            raise DataError(
                f"{options.input_path}: id {conv.id!r} appears twice (rows {seen[conv.id]} and {lineno}); "
                f"ids must be unique because --resume matches rows by id"
            )
        seen[conv.id] = lineno
    existing = [p for p in (options.output_path, error_path) if os.path.exists(p) and os.path.getsize(p)]
    if existing and not (options.resume or options.overwrite):
        raise DataError(f"{existing[0]} exists; pass --resume to continue it or --overwrite to start over")
    if options.overwrite and not options.resume:
        for path in existing:
            os.unlink(path)
    done = read_done_ids(options.output_path, repair=True)
    failed_before = read_done_ids(error_path, repair=True)
    if options.retry_errors and failed_before:
        _rewrite_without(error_path, failed_before - done)
        failed_before = set()
    tasks = list(_tasks(conversations, options.num_samples))
    summary.total = len(tasks)
    pending = [t for t in tasks if t[0] not in done and t[0] not in failed_before]
    summary.skipped = summary.total - len(pending)
    model = await backend.resolve_model()

    out, err = _Writer(options.output_path), _Writer(error_path)
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
        await backend.close()
    summary.finish_reasons = reasons
    return summary


def run_regeneration(backend: Any, options: RegenOptions, params: SamplingParams) -> RegenSummary:
    """Synchronous wrapper of :func:`regenerate`."""
    return asyncio.run(regenerate(backend, options, params))
