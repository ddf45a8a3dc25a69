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

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from deepspec.data.cache_format import SampleLayout
from deepspec.data.cache_plan import (
    CacheBuildOptions,
    check_options,
    estimate_and_check_disk,
    human_bytes,
    log_main,
    make_plan,
    prepare_output_dir,
    settle_plan,
)
from deepspec.data.cache_writer import ShardWriter, finalize_cache, load_commit_record
from deepspec.data.conversations import ReadStats, read_conversations
from deepspec.data.target_features import TargetFeatureExtractor
from deepspec.errors import DataError
from deepspec.utils import distributed as dist_utils

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

    from deepspec.data.chat import ChatTokenizer

    _TOKENIZER = ChatTokenizer(AutoTokenizer.from_pretrained(target_dir), **kwargs)


def _tokenize_one(item: tuple[int, list[dict[str, str]]]) -> tuple[int, Any]:
    """``(row, messages)`` → ``(row, (input_ids int32, loss_mask uint8))`` or ``(row, reason)``."""
    row, messages = item
    before = Counter(_TOKENIZER.stats.dropped)
    try:
        sample = _TOKENIZER(messages)
    except DataError as exc:
        return row, f"untokenizable: {exc}"
    if sample is None:
        reason = next(iter((_TOKENIZER.stats.dropped - before).keys()), "dropped")
        return row, reason
    return row, (np.asarray(sample.input_ids, dtype=np.int32), np.asarray(sample.loss_mask, dtype=np.uint8))


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

    Returns a :class:`BuildResult`; its ``manifest`` is set on rank 0.
    """
    from deepspec.targets.resolve import resolve_target

    check_options(opts)
    info = dist_utils.get_info()
    out = os.path.abspath(os.path.expanduser(opts.output_dir))
    state = dist_utils.run_on_main(prepare_output_dir, out, opts)
    target_dir = resolve_target(opts.target)
    plan = dist_utils.run_on_main(make_plan, opts, target_dir)
    dist_utils.run_on_main(settle_plan, out, state, plan)
    if state == "complete":
        log_main(f"{out} is already a complete target cache; nothing to do")
        return BuildResult(manifest=dist_utils.run_on_main(_read_manifest, out))
    layout = SampleLayout(len(opts.layer_ids), plan["target"]["hidden_size"], opts.hidden_dtype)

    # Rows of this rank's unfinished shards.
    read_stats = ReadStats()
    committed: dict[int, bool] = {}
    items: list[tuple[int, list]] = []
    num_rows = 0
    for path in opts.train_data_paths:
        for conv in read_conversations(path, skip_bad=opts.skip_bad_rows, stats=read_stats):
            shard = num_rows // opts.rows_per_shard
            if shard % info.world_size == info.rank:
                if shard not in committed:
                    committed[shard] = load_commit_record(out, shard) is not None
                if not committed[shard]:
                    items.append((num_rows, conv.messages))
            num_rows += 1
    if num_rows == 0:
        raise DataError(f"no conversations in {', '.join(opts.train_data_paths)}")
    num_shards = math.ceil(num_rows / opts.rows_per_shard)

    tokenized = _tokenize(items, target_dir, opts)
    by_shard: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    dropped: dict[int, Counter] = {}
    for row, result in tokenized:
        shard = row // opts.rows_per_shard
        by_shard.setdefault(shard, [])
        dropped.setdefault(shard, Counter())
        if isinstance(result, str):
            if result.startswith("untokenizable") and not opts.skip_bad_rows:
                raise DataError(f"row {row}: {result} (or pass --skip-bad-rows)")
            dropped[shard][result.split(":")[0]] += 1
        else:
            by_shard[shard].append((row, *result))
    pending_tokens = sum(len(s[1]) for samples in by_shard.values() for s in samples)
    pending_bytes = sum(
        int(layout.block_bytes_array(np.array([len(s[1]) for s in samples])).sum())
        for samples in by_shard.values()
        if samples
    )
    pending_samples = sum(len(samples) for samples in by_shard.values())
    pending = dist_utils.all_reduce_sum([pending_tokens, pending_bytes, pending_samples])
    dist_utils.run_on_main(estimate_and_check_disk, out, opts, layout, num_shards, pending)

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
    result.manifest = dist_utils.run_on_main(finalize_cache, out, plan, num_shards, stats)
    if result.manifest is not None:
        c = result.manifest["counts"]
        size = human_bytes(sum(s["bytes"] for s in result.manifest["shards"]))
        log_main(
            f"target cache ready: {out}: {c['samples']:,} samples, {c['tokens']:,} tokens, {size}; "
            f"dropped: {dict(c['dropped']) or 'none'}; non-finite skipped: {c['dropped_nonfinite']}"
        )
    dist_utils.barrier()
    return result


def _read_manifest(out: str) -> dict[str, Any]:
    from deepspec.data.cache_reader import read_manifest

    return read_manifest(out)


def _pad_id(target_dir: str) -> int:
    from deepspec.targets.family import load_family_spec

    spec = load_family_spec(target_dir)
    for candidate in (spec.pad_token_id, *spec.eos_token_ids, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _write_shards(
    extractor: TargetFeatureExtractor,
    by_shard: dict[int, list[tuple[int, np.ndarray, np.ndarray]]],
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
        try:
            for b in range(0, len(samples), opts.local_batch_size):
                batch = samples[b : b + opts.local_batch_size]
                longest = len(batch[0][1])
                ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), longest), dtype=torch.long)
                for j, (_, tokens, _) in enumerate(batch):
                    ids[j, : len(tokens)] = torch.from_numpy(tokens.astype(np.int64))
                    mask[j, : len(tokens)] = 1
                feats = extractor(ids, mask)
                for j, (row, tokens, loss) in enumerate(batch):
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
                    result.samples_written += 1
                    result.tokens_written += S
                bar.update(sum(len(s[1]) for s in batch))
            lo = shard * opts.rows_per_shard
            writer.commit(
                {
                    "rows": [lo, min(lo + opts.rows_per_shard, num_rows)],
                    "dropped": dict(dropped.get(shard, {})),
                    "nonfinite_rows": nonfinite,
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
