"""Settle what a target-cache build will do before any target runs.

The options of a build (:class:`CacheBuildOptions`), the output directory's state
(fresh / resume / complete, and ``--overwrite``), the build plan recorded in ``plan.json``
and compared on ``--resume``, and the size estimate checked against free disk space.
The functions that read or write the directory run on rank 0 only (the builder calls them
through :func:`~deepspec.utils.distributed.run_on_main`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

from deepspec.config import Config
from deepspec.data.cache_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    FP8_MAX,
    INDEX,
    INDEX_DTYPE,
    MANIFEST,
    PLAN,
    SAMPLE_ALIGN,
    SECTION_ALIGN,
    SHARD_DIR,
    STORAGE_DTYPES,
    SampleLayout,
)
from deepspec.data.cache_reader import REPAIR_HINT, CacheDataset
from deepspec.data.cache_writer import load_commit_record
from deepspec.data.chat import NO_ANSWER, PROMPT_TOO_LONG, load_chat_template
from deepspec.data.conversations import check_data_file
from deepspec.data.fingerprint import chat_fingerprint, file_xxh3_128, target_fingerprint
from deepspec.data.target_features import LAYER_ID_CONVENTION
from deepspec.errors import DataError
from deepspec.targets.family import load_family_spec
from deepspec.utils import distributed as dist_utils
from deepspec.utils.io import atomic_write_json
from deepspec.utils.locks import LOCK_NAME

TARGET_DTYPE_NAMES = ("bf16", "fp32")


@dataclass
class CacheBuildOptions:
    """Everything that decides what a cache holds and how it is built."""

    output_dir: str
    train_data_paths: list[str]
    target: str  # name or path, as in model.target_model_name_or_path
    layer_ids: list[int]
    max_length: int = 4096
    min_loss_tokens: int = 14
    chat_template: str = "auto"
    system_prompt: str | None = None
    enable_thinking: bool = False
    hidden_dtype: str = "bf16"  # storage: bf16 | fp8
    target_dtype: str = "bf16"  # the target's compute dtype: bf16 | fp32
    local_batch_size: int = 4
    rows_per_shard: int = 512
    num_workers: int = 0  # tokenization processes (0 = in the worker itself)
    cpu_threads: int = 0  # torch threads per CPU worker (0 = cores / local workers)
    on_nonfinite: str = "skip"  # skip | abort
    resume: bool = False
    overwrite: bool = False
    ignore_disk_space: bool = False
    skip_bad_rows: bool = False
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: Config, **overrides: Any) -> CacheBuildOptions:
        """Options from a loaded config (model/data keys), then ``overrides``."""
        values: dict[str, Any] = dict(
            output_dir=cfg.data.target_cache_path,
            train_data_paths=list(cfg.data.train_data_paths),
            target=cfg.model.target_model_name_or_path,
            layer_ids=list(cfg.model.target_layer_ids),
            max_length=cfg.data.max_length,
            min_loss_tokens=cfg.data.min_loss_tokens,
            chat_template=cfg.data.chat_template,
            system_prompt=cfg.data.system_prompt,
            enable_thinking=cfg.data.enable_thinking,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def human_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def log_main(message: str) -> None:
    if dist_utils.get_info().rank == 0:
        print(message, flush=True)


# -- directory, plan, estimate (rank 0) -----------------------------------------------------


def prepare_output_dir(out: str, opts: CacheBuildOptions) -> str:
    """'fresh' | 'resume' | 'complete'; clears the directory for --overwrite."""
    has_manifest = os.path.isfile(os.path.join(out, MANIFEST))
    has_plan = os.path.isfile(os.path.join(out, PLAN))
    non_empty = os.path.isdir(out) and bool(set(os.listdir(out)) - {LOCK_NAME})  # the build's own lock
    if not non_empty:
        os.makedirs(out, exist_ok=True)
        return "fresh"
    if opts.overwrite:
        if not (has_manifest or has_plan):
            raise DataError(f"{out} is not empty and is not a target cache; refusing to delete it")
        for name in (MANIFEST, INDEX, PLAN):  # manifest first: a half-deleted cache is invalid
            if os.path.exists(os.path.join(out, name)):
                os.unlink(os.path.join(out, name))
        shutil.rmtree(os.path.join(out, SHARD_DIR), ignore_errors=True)
        return "fresh"
    if has_manifest:
        if opts.resume:
            return "complete"
        raise DataError(f"{out} already holds a complete target cache; pass --overwrite to rebuild it")
    if not opts.resume:
        raise DataError(
            f"{out} holds an unfinished target cache; pass --resume to continue it or --overwrite to start over"
        )
    if not has_plan:
        raise DataError(
            f"{out} is not empty and has no {PLAN}; it was not started by prepare_target_cache.py"
        )
    return "resume"


def _source_info(path: str) -> dict[str, Any]:
    check_data_file(path)
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "checksum": file_xxh3_128(path)}


def make_plan(opts: CacheBuildOptions, target_dir: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    spec = load_family_spec(target_dir)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    layout = SampleLayout(len(opts.layer_ids), spec.hidden_size, opts.hidden_dtype)
    return {
        "target": {
            "name": opts.target,
            "fingerprint": target_fingerprint(target_dir),
            "family": spec.family,
            "hidden_size": spec.hidden_size,
            "num_hidden_layers": spec.num_hidden_layers,
            "vocab_size": spec.vocab_size,  # every stored token id is checked against it on read
            "compute_dtype": opts.target_dtype,
        },
        "layer_ids": list(opts.layer_ids),
        "layer_id_convention": LAYER_ID_CONVENTION,
        "tokenization": {
            "chat_fingerprint": chat_fingerprint(
                tokenizer,
                chat_template=load_chat_template(opts.chat_template),
                system_prompt=opts.system_prompt,
                enable_thinking=opts.enable_thinking,
            ),
            "chat_template": opts.chat_template,
            "system_prompt": opts.system_prompt,
            "enable_thinking": opts.enable_thinking,
            "max_length": opts.max_length,
            "min_loss_tokens": opts.min_loss_tokens,
        },
        "storage": {
            "hidden_dtype": opts.hidden_dtype,
            "bytes_per_token": layout.bytes_per_token,
            "fp8_scaling": f"per row: s = amax/{FP8_MAX:g}, x = q*s" if opts.hidden_dtype == "fp8" else None,
            "sample_align": SAMPLE_ALIGN,
            "section_align": SECTION_ALIGN,
            "attention_mask": "not stored (all ones)",
        },
        "sources": [_source_info(p) for p in opts.train_data_paths],
        "rows_per_shard": opts.rows_per_shard,
        "local_batch_size": opts.local_batch_size,
    }


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} {old!r} -> {new!r}"]


def settle_plan(out: str, state: str, plan: dict[str, Any]) -> None:
    """Write the plan of a fresh build; on --resume refuse one started with other settings."""
    path = os.path.join(out, PLAN)
    if state == "fresh":
        atomic_write_json(path, plan)
        return
    try:
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise DataError(
            f"cannot resume {out}: it has no {PLAN}, so its settings are unknown; pass --overwrite to rebuild it"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(
            f"cannot resume {out}: its {PLAN} is unreadable ({' '.join(str(exc).split())}); "
            f"pass --overwrite to rebuild it"
        ) from None
    if isinstance(old.get("target"), dict) and "vocab_size" not in old["target"]:
        old["target"]["vocab_size"] = plan["target"]["vocab_size"]  # begun before it was recorded
    changes = _diff(old, plan)
    if changes:
        raise DataError(
            f"cannot resume {out}: it was started with different settings ({'; '.join(changes[:4])}); "
            f"pass --overwrite to start over"
        )


def estimate_and_check_disk(
    out: str, opts: CacheBuildOptions, layout: SampleLayout, num_shards: int, pending: list[float]
) -> None:
    """Print the expected size and refuse when the disk cannot hold what is left to write.

    ``pending`` = [tokens, bytes, samples] still to write, summed over all ranks.
    """
    done = [load_commit_record(out, k) for k in range(num_shards)]
    done_tokens = sum(r["tokens"] for r in done if r)
    done_bytes = sum(r["bytes"] for r in done if r)
    tokens, nbytes, samples = pending[0] + done_tokens, pending[1] + done_bytes, pending[2]
    need = pending[1] + (samples + sum(r["samples"] for r in done if r)) * INDEX_DTYPE.itemsize
    free = shutil.disk_usage(out).free
    log_main(
        f"expected cache size: {int(tokens):,} tokens x {layout.bytes_per_token:,} B/token "
        f"({opts.hidden_dtype}, L={layout.num_layers}, d={layout.hidden_size}) = "
        f"{human_bytes(tokens * layout.bytes_per_token)} ({human_bytes(nbytes)} with alignment); "
        f"to write now: {human_bytes(pending[1])} in {int(samples):,} samples "
        f"({sum(1 for r in done if r)}/{num_shards} shards done); free: {human_bytes(free)}"
    )
    if need > free and not opts.ignore_disk_space:
        raise DataError(
            f"not enough disk space in {out}: {human_bytes(need)} needed, {human_bytes(free)} free "
            f"(free space, use --hidden-dtype fp8, or pass --ignore-disk-space)"
        )


def forget_fresh_start(out: str) -> None:
    """Undo what a fresh build wrote before its first shard (``plan.json``, an empty shard
    directory), so a failed start leaves no unfinished cache behind."""
    import contextlib

    with contextlib.suppress(OSError):
        os.unlink(os.path.join(out, PLAN))
    with contextlib.suppress(OSError):
        os.rmdir(os.path.join(out, SHARD_DIR))  # only when empty


def check_not_empty(
    out: str,
    opts: CacheBuildOptions,
    num_shards: int,
    pending_samples: int,
    read: dict[str, int],
    dropped: dict[str, int],
) -> None:
    """Refuse a build that would write a cache without samples, naming why rows were dropped.

    ``read`` counts the source lines (``rows`` read, malformed rows ``skipped``, ``blank``
    lines), ``dropped`` the rows dropped by tokenization on all ranks in this run. Runs
    before any shard is written."""
    from collections import Counter

    done = [load_commit_record(out, k) for k in range(num_shards)]
    if pending_samples + sum(r["samples"] for r in done if r) > 0:
        return
    drops: Counter = Counter(dropped)
    for record in done:
        if record:
            drops.update(record.get("dropped", {}))
    files = ", ".join(opts.train_data_paths)
    other = [
        f"{n} {what}"
        for what, n in (
            ("blank line(s)", read.get("blank", 0)),
            ("malformed row(s) skipped", read.get("skipped", 0)),
        )
        if n
    ]
    if not read.get("rows"):
        fix = "fix the malformed rows" if read.get("skipped") else "pass a file with conversations"
        raise DataError(
            f"no samples for a target cache: {files} holds no conversations "
            f"({', '.join(other) or 'it is empty'}; {fix})"
        )
    fixes = []
    for reason in drops:
        if reason == PROMPT_TOO_LONG:
            fixes.append("raise data.max_length")
        elif reason == NO_ANSWER:
            fixes.append(
                "the rows need assistant answers: regenerate them with scripts/data/generate_train_data.py"
            )
        elif reason.startswith("with <"):
            fixes.append("their answers are too short: lower data.min_loss_tokens")
        elif reason == "untokenizable":
            fixes.append("fix the rows the chat template rejects")
    counts = ", ".join(f"{n} {reason}" for reason, n in sorted(drops.items()))
    raise DataError(
        f"no samples for a target cache: all {read['rows']} conversation(s) of {files} were dropped "
        f"({'; '.join([counts or 'no reason recorded', *other])}); " + "; ".join(fixes or ["check the data"])
    )


def check_options(opts: CacheBuildOptions) -> None:
    """Raise one :class:`DataError` naming every invalid option (before anything is written)."""
    problems = []
    for name, value, low in (
        ("max_length (data.max_length)", opts.max_length, 2),
        ("min_loss_tokens (data.min_loss_tokens)", opts.min_loss_tokens, 0),
        ("local batch size", opts.local_batch_size, 1),
        ("rows per shard", opts.rows_per_shard, 1),
        ("number of tokenization workers", opts.num_workers, 0),
        ("CPU threads", opts.cpu_threads, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"{name} must be an integer >= {low}, got {value!r}")
    if opts.hidden_dtype not in STORAGE_DTYPES:
        problems.append(f"hidden dtype {opts.hidden_dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
    if opts.target_dtype not in TARGET_DTYPE_NAMES:
        problems.append(f"target dtype {opts.target_dtype!r} is not one of {', '.join(TARGET_DTYPE_NAMES)}")
    if opts.on_nonfinite not in ("skip", "abort"):
        problems.append(f"on_nonfinite {opts.on_nonfinite!r} is not skip or abort")
    if not opts.layer_ids:
        problems.append("no target layer ids given (model.target_layer_ids)")
    if not opts.train_data_paths:
        problems.append("no training data files given")
    if not opts.output_dir:
        problems.append("no output directory given")
    if problems:
        raise DataError("invalid cache options: " + "; ".join(problems))
    for path in opts.train_data_paths:
        check_data_file(path)
    out = os.path.abspath(os.path.expanduser(opts.output_dir))
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"output directory {out} is a file; choose a directory")


# -- repair of a damaged cache on --resume (rank 0) -------------------------------------------


def drop_damaged_shards(out: str) -> list[str]:
    """Re-hash every committed shard; forget those whose bytes no longer match their record.

    A damaged shard loses its commit record first (so it counts as unwritten even if this
    is interrupted) and then its data; the build writes it again from the source rows.
    Temporary files of a killed writer are removed too. Returns the shard files dropped."""
    import glob

    for pattern in (os.path.join(out, SHARD_DIR, ".shard-*.tmp"), os.path.join(out, ".*.tmp")):
        for litter in glob.glob(pattern):  # no writer runs now: rank 0 calls this before any
            os.unlink(litter)
    dropped = []
    for record_path in sorted(glob.glob(os.path.join(out, SHARD_DIR, "shard-*.json"))):
        data = record_path[: -len(".json")] + ".bin"  # never a path read from the record
        try:
            with open(record_path, encoding="utf-8") as fh:
                record = json.load(fh)
            good = (
                record["file"] == f"{SHARD_DIR}/{os.path.basename(data)}"
                and os.path.isfile(data)
                and os.path.getsize(data) == record["bytes"]
                and "xxh3-128:" + file_xxh3_128(data) == record["checksum"]
            )
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            good = False
        if not good:
            os.unlink(record_path)
            if os.path.isfile(data):
                os.unlink(data)
            dropped.append(os.path.relpath(data, out))
    return dropped


def check_complete_cache(out: str) -> str:
    """Verify a cache whose manifest exists: 'complete', or 'resume' after removing what is bad.

    Checks what the reader checks on open plus a hash of every whole shard. A damaged
    cache loses its manifest and index first (it is then an unfinished cache), then the
    damaged shards; the build rewrites those and finalises again."""
    try:
        with open(os.path.join(out, MANIFEST), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError):
        manifest = None  # unreadable: damaged, rebuilt below
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME:
        version = manifest.get("version")
        if version != FORMAT_VERSION:  # another deepspec's cache: not ours to repair
            raise DataError(
                f"{out} holds a version {version!r} target cache; this deepspec writes version "
                f"{FORMAT_VERSION}: pass --overwrite to rebuild it"
            )
    try:
        CacheDataset(out).verify_shards()
        return "complete"
    except DataError as exc:
        problem = str(exc).replace(f"; {REPAIR_HINT}", "").replace(f"target cache {out}: ", "")
    for name in (MANIFEST, INDEX):  # manifest first: without it the directory is not a cache
        path = os.path.join(out, name)
        if os.path.lexists(path):
            os.unlink(path)
    dropped = drop_damaged_shards(out)
    log_main(
        f"{out} is damaged ({problem}); rebuilding "
        + (f"{len(dropped)} shard(s): {', '.join(dropped[:8])}" if dropped else "its index and manifest")
    )
    return "resume"
