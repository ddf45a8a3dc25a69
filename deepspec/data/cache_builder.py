"""Build a target cache: tokenize conversations, run the frozen target, write shards.

Work split: source rows (all files, in order) are cut into shards of ``rows_per_shard``
consecutive rows; shard ``k`` belongs to rank ``k % world_size``. Inside a shard, samples
are sorted by length (longest first, ties by row) and run in batches of
``local_batch_size``. So the bytes of a cache depend on the data and these settings, not
on the number of workers or on interruptions: a resumed run equals an uninterrupted one.

Every rank runs :func:`build_target_cache`; rank 0 also prepares the directory, prints
the size estimate, checks free disk space (deepspec/data/cache_plan.py) and finally
writes the index and manifest.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jinja2 import TemplateError

from deepspec.data.cache_format import SampleLayout
from deepspec.data.cache_plan import (
    CacheBuildOptions,
    check_complete_cache,
    check_not_empty,
    check_options,
    drop_damaged_shards,
    estimate_and_check_disk,
    forget_fresh_start,
    human_bytes,
    log_main,
    make_plan,
    prepare_output_dir,
    settle_plan,
)
from deepspec.data.cache_reader import read_manifest
from deepspec.data.cache_writer import ShardWriter, finalize_cache, load_commit_record
from deepspec.data.chat import ChatTokenizer
from deepspec.data.conversations import ReadStats, duplicate_id_error, read_conversations
from deepspec.data.target_features import TargetFeatureExtractor
from deepspec.errors import DataError, DeepSpecError, as_user_error
from deepspec.targets.family import load_family_spec
from deepspec.targets.resolve import resolve_target
from deepspec.utils import distributed as dist_utils
from deepspec.utils.locks import directory_lock

TARGET_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class BuildResult:
    manifest: dict[str, Any] | None  # rank 0 only
    samples_written: int = 0  # by this rank, in this run
    tokens_written: int = 0
    seconds: float = 0.0  # model load excluded
    dropped: Counter = field(default_factory=Counter)


# -- tokenization --------------------------------------------------------------------------

_TOKENIZER: Any = None


def _init_tokenizer(target_dir: str, kwargs: dict[str, Any]) -> None:
    global _TOKENIZER
    from transformers import AutoTokenizer

    _TOKENIZER = ChatTokenizer(AutoTokenizer.from_pretrained(target_dir), **kwargs)


def _tokenize_one(item: tuple[int, list[dict[str, str]]]) -> tuple[int, Any]:
    """``(row, messages)`` → ``(row, (input_ids int32, loss_mask uint8, truncated))`` or
    ``(row, reason)`` for a dropped row."""
    row, messages = item
    before = Counter(_TOKENIZER.stats.dropped)
    try:
        sample = _TOKENIZER(messages)
    except (DataError, TemplateError, ValueError) as exc:  # a template may reject a conversation
        return row, f"untokenizable: {' '.join(str(exc).split()) or type(exc).__name__}"
    if sample is None:
        reason = next(iter((_TOKENIZER.stats.dropped - before).keys()), "dropped")
        return row, reason
    ids = np.asarray(sample.input_ids, dtype=np.int32)
    return row, (ids, np.asarray(sample.loss_mask, dtype=np.uint8), bool(sample.truncated))


def _tokenize(
    items: list[tuple[int, list]], target_dir: str, opts: CacheBuildOptions
) -> list[tuple[int, Any]]:
    kwargs = dict(
        chat_template=opts.chat_template,
        max_length=opts.max_length,
        min_loss_tokens=opts.min_loss_tokens,
        system_prompt=opts.system_prompt,
        enable_thinking=opts.enable_thinking,
    )
    if opts.num_workers <= 0 or len(items) < 64:
        _init_tokenizer(target_dir, kwargs)
        return [_tokenize_one(item) for item in items]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(
        opts.num_workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_tokenizer,
        initargs=(target_dir, kwargs),
    ) as pool:
        return list(pool.map(_tokenize_one, items, chunksize=64))


# -- the build -------------------------------------------------------------------------------


def build_target_cache(opts: CacheBuildOptions) -> BuildResult:
    """Build (or resume) the cache described by ``opts``; call on every rank.

    Returns a :class:`BuildResult`; its ``manifest`` is set on rank 0. Inputs are checked
    before the output directory is touched; a user error found by several ranks is
    reported once (by the lowest rank; the others raise :class:`PeerError`).
    """
    info = dist_utils.get_info()
    _on_main(check_options, opts)
    out = os.path.abspath(os.path.expanduser(opts.output_dir))

    # Every row is read (and checked) before the target loads and the output directory is
    # touched; this rank keeps the rows of its shards.
    read_stats = ReadStats()
    mine: list[tuple[int, list, str]] = []  # (row, messages, id: "file:line" for rows without one)
    num_rows = 0

    def read_rows() -> None:
        nonlocal num_rows
        for path in opts.train_data_paths:
            seen: dict[str, int] = {}  # id -> line: a file must not hold a conversation twice
            for conv in read_conversations(path, skip_bad=opts.skip_bad_rows, stats=read_stats):
                if conv.id in seen:
                    raise duplicate_id_error(
                        path,
                        conv.id,
                        seen[conv.id],
                        conv.line,
                        "ids must be unique within a file (a repeated id is usually a conversation "
                        "copied twice)",
                    )
                seen[conv.id] = conv.line
                if (num_rows // opts.rows_per_shard) % info.world_size == info.rank:
                    mine.append((num_rows, conv.messages, conv.id))
                num_rows += 1

    _everywhere(read_rows)
    read = {"rows": num_rows, "skipped": read_stats.skipped, "blank": read_stats.blank}
    if num_rows == 0:
        _on_main(check_not_empty, out, opts, 0, 0, read, {})
    num_shards = math.ceil(num_rows / opts.rows_per_shard)
    target_dir = _everywhere(resolve_target, opts.target)
    plan = _on_main(make_plan, opts, target_dir)

    with contextlib.ExitStack() as held:  # one build per cache directory at a time
        _on_main(lambda: held.enter_context(cache_lock(out)))
        return _build(out, opts, plan, target_dir, mine, num_shards, num_rows, read, read_stats)


def cache_lock(out: str) -> contextlib.AbstractContextManager[None]:
    """The exclusive lock a build holds on its cache directory (rank 0, for the whole build)."""
    return directory_lock(
        out,
        f"target cache {out}",
        "another prepare_target_cache.py is building it; wait for it to finish or stop it",
    )


def _build(
    out: str,
    opts: CacheBuildOptions,
    plan: dict[str, Any],
    target_dir: str,
    mine: list[tuple[int, list, str]],
    num_shards: int,
    num_rows: int,
    read: dict[str, int],
    read_stats: ReadStats,
) -> BuildResult:
    """Prepare the directory, write this rank's shards and finalize (under :func:`cache_lock`)."""
    info = dist_utils.get_info()
    state = _on_main(prepare_output_dir, out, opts)
    try:
        prepared = _prepare_work(out, opts, state, plan, target_dir, mine, num_shards, read)
    except DeepSpecError:
        if state == "fresh" and info.rank == 0:  # nothing was written: leave no unfinished cache
            forget_fresh_start(out)
        raise
    if prepared is None:
        return BuildResult(manifest=_on_main(_read_manifest, out))
    layout, by_shard, dropped, pending_tokens = prepared

    result = BuildResult(manifest=None)
    if by_shard:
        if info.device == "cpu" and (opts.cpu_threads or info.local_world_size > 1):
            torch.set_num_threads(opts.cpu_threads or max(1, (os.cpu_count() or 1) // info.local_world_size))
        extractor = TargetFeatureExtractor.from_pretrained(
            target_dir, opts.layer_ids, dtype=TARGET_DTYPES[opts.target_dtype], device=info.device
        )
        pad_id = _pad_id(target_dir)
        start = time.perf_counter()
        _write_shards(
            extractor, by_shard, dropped, out, opts, layout, pad_id, num_rows, pending_tokens, result
        )
        result.seconds = time.perf_counter() - start
    dist_utils.barrier()
    stats = {"rows": num_rows, "bad_rows_skipped": read_stats.skipped}
    result.manifest = _on_main(finalize_cache, out, plan, num_shards, stats)
    if result.manifest is not None:
        c = result.manifest["counts"]
        size = human_bytes(sum(s["bytes"] for s in result.manifest["shards"]))
        log_main(
            f"target cache ready: {out}: {c['samples']:,} samples, {c['tokens']:,} tokens, {size}; "
            f"truncated at max_length={opts.max_length}: {c['truncated']:,}; "
            f"dropped: {dict(c['dropped']) or 'none'}; non-finite skipped: {c['dropped_nonfinite']}"
        )
    dist_utils.barrier()
    return result


def _prepare_work(
    out: str,
    opts: CacheBuildOptions,
    state: str,
    plan: dict[str, Any],
    target_dir: str,
    mine: list[tuple[int, list, str]],
    num_shards: int,
    read: dict[str, int],
) -> tuple[SampleLayout, dict[int, list], dict[int, Counter], int] | None:
    """Settle the plan, verify what exists, tokenize this rank's unfinished shards and check
    size and disk space; None when the cache is already complete (and sound)."""
    _on_main(settle_plan, out, state, plan)
    if state == "complete":  # verified, not trusted: a damaged cache is repaired below
        state = _on_main(check_complete_cache, out)
        if state == "complete":
            log_main(f"{out} is already a complete target cache (every shard verified); nothing to do")
            return None
    elif state == "resume":
        dropped_shards = _on_main(drop_damaged_shards, out)
        if dropped_shards:
            log_main(f"rebuilding damaged shard(s) of {out}: {', '.join(dropped_shards[:8])}")
    layout = SampleLayout(len(opts.layer_ids), plan["target"]["hidden_size"], opts.hidden_dtype)

    committed: dict[int, bool] = {}
    items: list[tuple[int, list]] = []
    ids: dict[int, str] = {}
    for row, messages, conv_id in mine:
        shard = row // opts.rows_per_shard
        if shard not in committed:
            committed[shard] = load_commit_record(out, shard) is not None
        if not committed[shard]:
            items.append((row, messages))
            ids[row] = conv_id

    def tokenize() -> tuple[dict[int, list], dict[int, Counter]]:
        by_shard: dict[int, list[tuple[int, np.ndarray, np.ndarray, bool]]] = {}
        dropped: dict[int, Counter] = {}
        for row, result in _tokenize(items, target_dir, opts):
            shard = row // opts.rows_per_shard
            by_shard.setdefault(shard, [])
            dropped.setdefault(shard, Counter())
            if isinstance(result, str):
                if result.startswith("untokenizable") and not opts.skip_bad_rows:
                    raise DataError(
                        f"conversation {ids[row]!r} (source row {row}): {result} (fix or remove the row, "
                        f"or skip such rows with --skip-bad-rows)"
                    )
                dropped[shard][result.split(":")[0]] += 1
            else:
                by_shard[shard].append((row, *result))
        return by_shard, dropped

    by_shard, dropped = _everywhere(tokenize)
    pending_tokens = sum(len(s[1]) for samples in by_shard.values() for s in samples)
    pending_bytes = sum(
        int(layout.block_bytes_array(np.array([len(s[1]) for s in samples])).sum())
        for samples in by_shard.values()
        if samples
    )
    pending_samples = sum(len(samples) for samples in by_shard.values())
    pending = dist_utils.all_reduce_sum([pending_tokens, pending_bytes, pending_samples])
    all_dropped = sum((Counter(c) for r in _gather(dropped) for c in r.values()), Counter())
    _on_main(check_not_empty, out, opts, num_shards, int(pending[2]), read, dict(all_dropped))
    _on_main(estimate_and_check_disk, out, opts, layout, num_shards, pending)
    return layout, by_shard, dropped, pending_tokens


# -- errors found on several ranks: reported once --------------------------------------------


def _converted(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with environment exceptions (OSError …) turned into user errors."""
    try:
        return fn(*args)
    except DeepSpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs
        user = as_user_error(exc)
        if user is None:
            raise
        raise user from exc


def _on_main(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` on rank 0 and share its result or its user error (an OSError included)."""
    return dist_utils.run_on_main(_converted, fn, *args)


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    info = dist_utils.get_info()
    if not info.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _everywhere(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` on every rank; if any rank fails with a user error, the lowest such rank
    raises it and the others raise :class:`PeerError`, so it is reported once."""
    error: DeepSpecError | None = None
    result = None
    try:
        result = _converted(fn, *args)
    except DeepSpecError as exc:
        error = exc
    if not dist_utils.get_info().distributed:
        if error is not None:
            raise error
        return result
    messages = _gather(None if error is None else str(error))
    first = next((r for r, m in enumerate(messages) if m is not None), None)
    if first is None:
        return result
    if first == dist_utils.get_info().rank and error is not None:
        raise error
    raise dist_utils.PeerError(messages[first])


def _read_manifest(out: str) -> dict[str, Any]:
    return read_manifest(out)


def _pad_id(target_dir: str) -> int:
    spec = load_family_spec(target_dir)
    for candidate in (spec.pad_token_id, *spec.eos_token_ids, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _write_shards(
    extractor: TargetFeatureExtractor,
    by_shard: dict[int, list[tuple[int, np.ndarray, np.ndarray, bool]]],
    dropped: dict[int, Counter],
    out: str,
    opts: CacheBuildOptions,
    layout: SampleLayout,
    pad_id: int,
    num_rows: int,
    total_tokens: int,
    result: BuildResult,
) -> None:
    from tqdm import tqdm

    info = dist_utils.get_info()
    bar = tqdm(
        total=total_tokens,
        unit="tok",
        unit_scale=True,
        desc=f"cache rank {info.rank}/{info.world_size}",
        disable=not opts.progress or info.rank != 0,
        dynamic_ncols=True,
    )
    for shard in sorted(by_shard):
        samples = sorted(by_shard[shard], key=lambda s: (-len(s[1]), s[0]))
        writer = ShardWriter(out, shard, layout)
        nonfinite: list[int] = []
        truncated = 0
        try:
            for b in range(0, len(samples), opts.local_batch_size):
                batch = samples[b : b + opts.local_batch_size]
                longest = len(batch[0][1])
                ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), longest), dtype=torch.long)
                for j, (_, tokens, _, _) in enumerate(batch):
                    ids[j, : len(tokens)] = torch.from_numpy(tokens.astype(np.int64))
                    mask[j, : len(tokens)] = 1
                feats = extractor(ids, mask)
                for j, (row, tokens, loss, cut) in enumerate(batch):
                    S = len(tokens)
                    hidden = feats.hidden_states[j, :S]
                    last = feats.last_hidden_states[j, :S]
                    if not (torch.isfinite(hidden).all() and torch.isfinite(last).all()):
                        if opts.on_nonfinite == "abort":
                            raise DataError(
                                f"the target produced non-finite hidden states for source row {row}; "
                                f"check the target dtype or pass --on-nonfinite skip"
                            )
                        nonfinite.append(row)
                        continue
                    writer.add(row, torch.from_numpy(tokens), torch.from_numpy(loss), hidden, last)
                    truncated += int(cut)
                    result.samples_written += 1
                    result.tokens_written += S
                bar.update(sum(len(s[1]) for s in batch))
            lo = shard * opts.rows_per_shard
            writer.commit(
                {
                    "rows": [lo, min(lo + opts.rows_per_shard, num_rows)],
                    "dropped": dict(dropped.get(shard, {})),
                    "nonfinite_rows": nonfinite,
                    "truncated": truncated,
                }
            )
        except BaseException:
            writer.abort()
            raise
        result.dropped.update(dropped.get(shard, {}))
    bar.close()


def run_worker(opts: CacheBuildOptions, timeout_minutes: float = 180.0) -> BuildResult:
    """One rank of a cache build: join the process group (if any), build, leave."""
    import datetime

    dist_utils.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))
    try:
        return build_target_cache(opts)
    finally:
        dist_utils.cleanup()
