"""Write target-cache shards atomically and finalise a cache (index + manifest, last).

A shard is written under a temporary name (``shards/.shard-00003.bin.tmp``), fsynced and
renamed; then its commit record ``shards/shard-00003.json`` (sizes, checksums, index
records) is written atomically. A shard counts as done only when both exist and the
sizes agree, so a killed writer leaves either a finished shard or one that
``--resume`` rewrites from scratch. :func:`finalize_cache` writes ``samples.idx`` and
then ``manifest.json`` — the last file, whose presence makes the cache readable.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections import Counter
from typing import Any

import numpy as np
import torch
import xxhash

from deepspec.data.cache_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX,
    INDEX_DTYPE,
    MANIFEST,
    SAMPLE_ALIGN,
    SHARD_DIR,
    SampleLayout,
    encode_sample,
    manifest_checksum,
    shard_name,
)
from deepspec.errors import DataError
from deepspec.utils.io import atomic_open, atomic_write_json, fsync_dir


class ShardWriter:
    """Append samples to one shard; :meth:`commit` makes it visible, :meth:`abort` drops it."""

    def __init__(self, cache_dir: str, shard: int, layout: SampleLayout) -> None:
        self.cache_dir = cache_dir
        self.shard = shard
        self.layout = layout
        directory = os.path.join(cache_dir, SHARD_DIR)
        os.makedirs(directory, exist_ok=True)
        self.final_path = os.path.join(directory, shard_name(shard) + ".bin")
        self.tmp_path = os.path.join(directory, "." + shard_name(shard) + ".bin.tmp")
        self._fh = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in commit/abort
        self._hasher = xxhash.xxh3_128()
        self.records: list[list[int]] = []  # [row, offset, checksum, seq_len]
        self.bytes = 0
        self.tokens = 0
        self.loss_tokens = 0

    def add(
        self,
        row: int,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        hidden_states: torch.Tensor,
        last_hidden_states: torch.Tensor,
    ) -> None:
        """Append one sample (shapes as in :func:`~deepspec.data.cache_format.encode_sample`)."""
        block = encode_sample(self.layout, input_ids, loss_mask, hidden_states, last_hidden_states)
        if self.bytes % SAMPLE_ALIGN:  # internal invariant: blocks are padded
            raise AssertionError("unaligned shard offset")
        seq_len = int(input_ids.shape[0])
        self.records.append([int(row), self.bytes, xxhash.xxh3_64_intdigest(block), seq_len])
        self._fh.write(block)
        self._hasher.update(block)
        self.bytes += len(block)
        self.tokens += seq_len
        self.loss_tokens += int(loss_mask.sum())

    def commit(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Fsync + rename the shard, then write its commit record; returns the record."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp_path, self.final_path)
        fsync_dir(os.path.dirname(self.final_path))
        record = {
            "shard": self.shard,
            "file": f"{SHARD_DIR}/{os.path.basename(self.final_path)}",
            "bytes": self.bytes,
            "checksum": "xxh3-128:" + self._hasher.hexdigest(),
            "samples": len(self.records),
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            **extra,
            "records": self.records,
        }
        atomic_write_json(commit_record_path(self.cache_dir, self.shard), record)
        return record

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)


def commit_record_path(cache_dir: str, shard: int) -> str:
    return os.path.join(cache_dir, SHARD_DIR, shard_name(shard) + ".json")


def load_commit_record(cache_dir: str, shard: int) -> dict[str, Any] | None:
    """The commit record of a finished shard, or None when the shard must be (re)written."""
    path = commit_record_path(cache_dir, shard)
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
        size = os.path.getsize(os.path.join(cache_dir, record["file"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if size != record.get("bytes"):
        return None
    return record


def finalize_cache(cache_dir: str, plan: dict[str, Any], num_shards: int, stats: dict[str, Any]) -> dict:
    """Write ``samples.idx`` and then ``manifest.json`` from the shards' commit records.

    ``plan`` is the build settings (stored in the manifest as they are), ``stats`` extra
    counters (rows read, rows dropped by tokenization …). Returns the manifest.
    """
    records: list[dict[str, Any]] = []
    for shard in range(num_shards):
        record = load_commit_record(cache_dir, shard)
        if record is None:
            raise DataError(
                f"cannot finalise {cache_dir}: shard {shard} is missing or incomplete; rerun with --resume"
            )
        records.append(record)
    parts = []
    for rec in records:
        table = np.array(rec["records"], dtype=np.uint64).reshape(-1, 4)
        part = np.zeros(len(table), dtype=INDEX_DTYPE)
        part["row"], part["offset"], part["checksum"] = table[:, 0], table[:, 1], table[:, 2]
        part["seq_len"] = table[:, 3]
        part["shard"] = rec["shard"]
        parts.append(part)
    index = np.concatenate(parts) if parts else np.zeros(0, dtype=INDEX_DTYPE)
    if len(index) == 0:
        nonfinite = sum(len(r.get("nonfinite_rows", [])) for r in records)
        raise DataError(
            f"cannot finalise {cache_dir}: no sample was written"
            + (f" ({nonfinite} had non-finite hidden states; try --target-dtype fp32)" if nonfinite else "")
            + "; a cache needs at least one sample"
        )
    index = index[np.argsort(index["row"], kind="stable")]
    if len(index) > 1 and (np.diff(index["row"].astype(np.int64)) == 0).any():
        raise DataError(f"cannot finalise {cache_dir}: a source row was written twice")
    raw = index.tobytes()
    with atomic_open(os.path.join(cache_dir, INDEX), "wb") as fh:
        fh.write(raw)
    dropped: Counter = Counter()
    for rec in records:
        dropped.update(rec.get("dropped", {}))
    counts = {
        "samples": int(len(index)),
        "tokens": int(sum(r["tokens"] for r in records)),
        "loss_tokens": int(sum(r["loss_tokens"] for r in records)),
        "dropped": dict(sorted(dropped.items())),
        "truncated": int(sum(r.get("truncated", 0) for r in records)),  # kept, cut at max_length
        "dropped_nonfinite": int(sum(len(r.get("nonfinite_rows", [])) for r in records)),
        "nonfinite_rows": [row for r in records for row in r.get("nonfinite_rows", [])],
        **stats,
    }
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **plan,
        "counts": counts,
        "index": {
            "file": INDEX,
            "records": int(len(index)),
            "record_bytes": INDEX_DTYPE.itemsize,
            "checksum": "xxh3-128:" + xxhash.xxh3_128_hexdigest(raw),
        },
        "shards": [
            {k: rec[k] for k in ("file", "bytes", "checksum", "samples", "tokens")} for rec in records
        ],
    }
    manifest["manifest_checksum"] = manifest_checksum(manifest)
    atomic_write_json(os.path.join(cache_dir, MANIFEST), manifest)
    return manifest
