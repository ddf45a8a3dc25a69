"""Bad inputs to the target-cache tools: every case runs the real command and expects a
non-zero exit, exactly one ``error:`` line, no traceback, and inputs and earlier outputs
unchanged (SHA-256 of every file before and after).

Commands: ``scripts/data/prepare_target_cache.py`` (data files, numeric arguments, output
directories, existing caches, ``--nproc 2``), ``python -m deepspec.data.cache_reader`` on
damaged caches, and ``train.py`` reading a damaged cache. One tiny target, one 8-row data
file and its cache are built once per module; damaging cases work on copies.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from deepspec.data.cache_builder import CacheBuildOptions, build_target_cache
from deepspec.data.cache_format import INDEX, MANIFEST
from deepspec.data.cache_reader import CacheDataset
from tests.badinput import assert_one_error, assert_unchanged, digest_tree, run_cli, unwritable_dir
from tests.conftest import ROOT

PREPARE = "scripts/data/prepare_target_cache.py"
READER = ["-m", "deepspec.data.cache_reader"]
MINI = os.path.join(ROOT, "data", "train_prompts", "mini.jsonl")
GOOD_ROW = json.dumps({"conversations": [{"role": "user", "content": "What is 2+2?"},
                                         {"role": "assistant", "content": "2+2 is 4."}]})  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_target):
    root = tmp_path_factory.mktemp("bad_cache")
    target = tiny_target("llama")
    with open(MINI, encoding="utf-8") as fh:
        rows = [line for line in fh if '"assistant"' in line][:8]
    data = root / "data.jsonl"
    data.write_text("".join(rows), encoding="utf-8")
    cfg = root / "cfg.yaml"
    cfg.write_text(
        f"model:\n  target_model_name_or_path: {target}\n  target_layer_ids: [0, 2]\n"
        "data:\n  max_length: 256\n  min_loss_tokens: 4\n"
    )
    cache = root / "cache"
    build_target_cache(
        CacheBuildOptions(
            output_dir=str(cache), train_data_paths=[str(data)], target=target, layer_ids=[0, 2],
            max_length=256, min_loss_tokens=4, rows_per_shard=4, local_batch_size=4, progress=False,
        )
    )  # fmt: skip
    return {"root": root, "target": target, "data": data, "cfg": cfg, "cache": cache}


def prepare(env, *extra, data=None, out=None):
    return [
        PREPARE, "--config", str(env["cfg"]), "--train-data-path", str(data or env["data"]),
        "--output-dir", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def refused(args, *fragments, watch=(), untouched=None):
    """Run ``args``; one error line with ``fragments``; ``watch`` unchanged; ``untouched``
    (a fresh output directory) not created."""
    before = digest_tree(*map(str, watch))
    proc = run_cli(args)
    line = assert_one_error(proc, *fragments)
    assert_unchanged(before, *map(str, watch))
    if untouched is not None:
        assert not os.path.exists(untouched) or not os.listdir(untouched), os.listdir(untouched)
    return line


@pytest.fixture
def cache_copy(env, tmp_path):
    dst = tmp_path / "cache"
    shutil.copytree(env["cache"], dst)
    return dst


def flip_byte(path, offset):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x40]))


# ---- data files ------------------------------------------------------------------------------


def test_missing_data_file(env, tmp_path):
    refused(prepare(env, data=tmp_path / "nope.jsonl", out=tmp_path / "out"),
            "data file not found", "nope.jsonl", watch=[env["cfg"]], untouched=tmp_path / "out")  # fmt: skip


def test_directory_as_data_file(env, tmp_path):
    refused(prepare(env, data=tmp_path, out=tmp_path / "out"), "is a directory", "pass a JSONL file",
            watch=[env["cfg"]], untouched=tmp_path / "out")  # fmt: skip


MALFORMED = [
    ("truncated line", b'{"conversations": [{"role": "user", "con', "invalid JSON"),
    ("bad utf-8", b"\xff\xfe not utf-8", "invalid UTF-8"),
    ("non-object row", b'["user", "hi"]', "JSON list, expected an object"),
    ("unknown role", b'{"conversations": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
    ("content null", b'{"conversations": [{"role": "user", "content": null}]}', "content is null"),
]


@pytest.mark.parametrize("raw, reason", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_jsonl_names_file_and_line(env, tmp_path, raw, reason):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(GOOD_ROW.encode() + b"\n" + raw + b"\n" + GOOD_ROW.encode() + b"\n")
    refused(prepare(env, data=data, out=tmp_path / "out"), f"{data}:2:", reason, "--skip-bad-rows",
            watch=[data, env["cfg"]], untouched=tmp_path / "out")  # fmt: skip


def test_empty_data_file(env, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    refused(prepare(env, data=data, out=tmp_path / "out"), "holds no conversations", "1 blank line",
            watch=[data], untouched=tmp_path / "out")  # fmt: skip


def test_every_row_dropped(env, tmp_path):
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                            for i in range(3)))  # fmt: skip
    refused(prepare(env, data=data, out=tmp_path / "out"), "all 3 conversation(s)", "were dropped",
            "3 with no assistant answer", "regenerate them", watch=[data], untouched=tmp_path / "out")  # fmt: skip


def _row(conv_id, answer="2+2 is 4."):
    turns = [{"role": "user", "content": "What is 2+2?"}]
    if answer is not None:
        turns.append({"role": "assistant", "content": answer})
    return json.dumps({"id": conv_id, "conversations": turns}) + "\n"


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_duplicate_ids_name_the_file_the_id_and_both_lines(env, tmp_path, nproc):
    """As regeneration does: an id twice in one file is refused, with its two line numbers
    (the blank line 2 counts: lines, not rows)."""
    data = tmp_path / "dup.jsonl"
    data.write_text(_row("a") + "\n" + _row("b") + _row("a"))
    line = refused(prepare(env, "--nproc", nproc, data=data, out=tmp_path / "out"), str(data), "id 'a'",
                   "appears twice (lines 1 and 4)", "remove the repeated row", watch=[data],
                   untouched=tmp_path / "out")  # fmt: skip
    assert line.count("error:") == 1


def test_rows_without_an_answer_are_counted_as_such(env, tmp_path):
    """An empty or absent assistant turn is 'no assistant answer' (regenerate), not too few
    loss tokens; a short answer keeps its own reason (data.min_loss_tokens)."""
    data = tmp_path / "unanswered.jsonl"
    data.write_text(_row("empty", "") + _row("blank", "   ") + _row("absent", None) + _row("short", "4."))
    refused(prepare(env, data=data, out=tmp_path / "out"), "all 4 conversation(s)",
            "3 with no assistant answer", "1 with < 4 loss tokens", "regenerate them",
            "lower data.min_loss_tokens", watch=[data], untouched=tmp_path / "out")  # fmt: skip


def test_cut_row_reports_the_real_column(env, tmp_path):
    """The parser sees the newline after a cut row as line 2 column 1; the column reported is
    the one in the file's line."""
    data = tmp_path / "cut.jsonl"
    cut = GOOD_ROW[: GOOD_ROW.index("{", 20)].rstrip()  # '{"conversations": [{"role": ...},'
    data.write_text(GOOD_ROW + "\n" + GOOD_ROW + "\n" + cut + "\n")
    line = refused(prepare(env, data=data, out=tmp_path / "out"), f"{data}:3: invalid JSON",
                   f"at column {len(cut) + 1}, the end of the line: the row is cut short",
                   watch=[data], untouched=tmp_path / "out")  # fmt: skip
    assert "column 1)" not in line


def test_malformed_row_with_two_workers_is_reported_once(env, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(GOOD_ROW.encode() + b"\n" + b'{"conversations": [{"role": "user"}]}\n')
    line = refused(prepare(env, "--nproc", "2", data=data, out=tmp_path / "out"), f"{data}:2:",
                   "content is null", watch=[data], untouched=tmp_path / "out")  # fmt: skip
    assert line.startswith("error: [rank 0]")


# ---- numeric arguments -----------------------------------------------------------------------

NUMBERS = [
    ("--local-batch-size", "0", "--local-batch-size must be a finite number >= 1"),
    ("--rows-per-shard", "-3", "--rows-per-shard must be a finite number >= 1"),
    ("--num-workers", "-1", "--num-workers must be a finite number >= 0"),
    ("--nproc", "0", "--nproc must be a finite number >= 1"),
    ("--cpu-threads", "-2", "--cpu-threads must be a finite number >= 0"),
    ("--dist-timeout-minutes", "nan", "--dist-timeout-minutes must be a finite number > 0"),
    ("--dist-timeout-minutes", "inf", "--dist-timeout-minutes must be a finite number > 0"),
    ("--local-batch-size", "two", "invalid int value: 'two'"),
]


@pytest.mark.parametrize("flag, value, fragment", NUMBERS, ids=[f"{f}={v}" for f, v, _ in NUMBERS])
def test_numeric_arguments_are_checked(env, tmp_path, flag, value, fragment):
    refused(prepare(env, flag, value, out=tmp_path / "out"), fragment, watch=[env["data"], env["cfg"]],
            untouched=tmp_path / "out")  # fmt: skip


# ---- output directories and existing caches ------------------------------------------------


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_unwritable_output_dir(env, tmp_path, nproc):
    named = unwritable_dir(tmp_path)
    out = os.path.join(named, "cache")
    line = refused(prepare(env, "--nproc", nproc, out=out), named, "choose another", watch=[env["data"]])
    assert not os.path.exists(out)
    if nproc == "2":  # the spawned rank 0 met it, and it alone reported it
        assert line.startswith("error: [rank 0]")


def test_output_dir_is_a_file(env, tmp_path):
    out = tmp_path / "cache"
    out.write_text("not a directory")
    refused(prepare(env, out=out), "is a file", watch=[out, env["data"]])


def test_output_dir_below_a_file(env, tmp_path):
    (tmp_path / "file").write_text("x")
    refused(prepare(env, out=tmp_path / "file" / "cache"), "Not a directory", watch=[tmp_path])


def test_complete_cache_is_not_rebuilt_without_a_flag(env, cache_copy):
    refused(prepare(env, "--rows-per-shard", "4", "--local-batch-size", "4", out=cache_copy),
            "already holds a complete target cache", "--overwrite", watch=[cache_copy])  # fmt: skip


def test_resume_with_other_settings_is_refused(env, cache_copy):
    refused(prepare(env, "--resume", "--rows-per-shard", "2", out=cache_copy), "cannot resume",
            "rows_per_shard 4 -> 2", watch=[cache_copy, env["data"]])  # fmt: skip


def test_a_cache_being_built_is_not_built_twice(env, cache_copy):
    """While a process holds the cache directory's lock (a running build does), a second
    build into it (here an --overwrite that would delete its shards) stops in one line
    naming the holder's pid."""
    from deepspec.utils.locks import LOCK_NAME, exclusive_lock

    with exclusive_lock(str(cache_copy / LOCK_NAME)):
        refused(prepare(env, "--overwrite", out=cache_copy), f"target cache {cache_copy}",
                f"is in use by pid {os.getpid()}", watch=[cache_copy])  # fmt: skip


def test_overwrite_refuses_a_directory_that_is_not_a_cache(env, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    refused(prepare(env, "--overwrite", out=mine), "is not a target cache", "refusing to delete it",
            watch=[mine])  # fmt: skip
    assert sorted(os.listdir(mine)) == ["notes.txt"]  # not even a lock file left behind


def test_resume_refuses_a_directory_without_a_plan(env, tmp_path):
    other = tmp_path / "other"
    (other / "shards").mkdir(parents=True)
    (other / "shards" / "shard-00000.bin").write_bytes(b"\0" * 64)
    refused(prepare(env, "--resume", out=other), "has no plan.json", watch=[other])


# ---- the cache reader on damaged caches ----------------------------------------------------


@pytest.mark.parametrize("full", [False, True], ids=["default", "full"])
def test_reader_reports_a_flipped_shard_byte(cache_copy, full):
    cache = CacheDataset(cache_copy)
    rec = cache.index[len(cache) - 1]
    flip_byte(
        cache_copy / cache.shards[int(rec["shard"])]["file"],
        int(rec["offset"]) + 4 * int(rec["seq_len"]) + 99,
    )
    refused([*READER, str(cache_copy), *(["--full"] if full else [])], "failed its checksum",
            "shards/shard-", "--resume", watch=[cache_copy])  # fmt: skip


def test_reader_reports_a_deleted_shard(cache_copy):
    os.unlink(cache_copy / "shards" / "shard-00001.bin")
    refused([*READER, str(cache_copy)], "shards/shard-00001.bin is missing", "--resume", watch=[cache_copy])


def test_reader_reports_a_truncated_index(cache_copy):
    index = cache_copy / INDEX
    index.write_bytes(index.read_bytes()[:-7])
    refused([*READER, str(cache_copy), "--full"], "samples.idx has", "truncated", watch=[cache_copy])


def test_reader_reports_an_unfinished_cache(cache_copy):
    os.unlink(cache_copy / MANIFEST)
    refused([*READER, str(cache_copy)], "incomplete: no manifest.json", "--resume", watch=[cache_copy])


def test_reader_reports_a_token_id_outside_the_vocabulary(cache_copy):
    """Checksums that agree with wrong content (a cache written wrong): the id check sees it."""
    import xxhash

    from deepspec.data.cache_format import manifest_checksum

    cache = CacheDataset(cache_copy)
    rec = cache.index[0]
    shard = cache_copy / cache.shards[int(rec["shard"])]["file"]
    with open(shard, "r+b") as fh:
        fh.seek(int(rec["offset"]))
        fh.write(np.array([cache.vocab_size + 7], dtype="<i4").tobytes())
    index = cache.index.copy()
    index[0]["checksum"] = xxhash.xxh3_64_intdigest(cache.raw_block(0))
    (cache_copy / INDEX).write_bytes(index.tobytes())
    manifest = cache.manifest
    manifest["index"]["checksum"] = "xxh3-128:" + xxhash.xxh3_128_hexdigest(index.tobytes())
    for entry in manifest["shards"]:
        entry["checksum"] = "xxh3-128:" + xxhash.xxh3_128_hexdigest((cache_copy / entry["file"]).read_bytes())
    manifest["manifest_checksum"] = manifest_checksum(manifest)
    (cache_copy / MANIFEST).write_text(json.dumps(manifest))
    refused([*READER, str(cache_copy)], f"holds token id {cache.vocab_size + 7} outside the target's vocabulary",
            "sample 0", "--overwrite", watch=[cache_copy])  # fmt: skip


def test_reader_without_a_cache_directory(tmp_path):
    refused([*READER, str(tmp_path / "nowhere")], "not found", watch=[tmp_path])
    refused([*READER], "the following arguments are required: path")


# ---- training on a damaged cache -------------------------------------------------------------


def train_args(env, cache, tmp_path, **extra):
    opts = {
        "model.target_model_name_or_path": env["target"], "model.target_layer_ids": "[0,2]",
        "model.block_size": 4, "model.num_draft_layers": 1, "model.markov_rank": 8, "model.num_anchors": 16,
        "data.target_cache_path": str(cache), "data.max_length": 256, "data.min_loss_tokens": 4,
        "train.precision": "fp32", "train.torch_compile": "false",
        "train.global_batch_size": 2, "train.local_batch_size": 2, "train.max_train_steps": 2,
        "logging.checkpoint_root": str(tmp_path / "ck"), "logging.tensorboard_root": str(tmp_path / "tb"),
        "exp_name": "run", **extra,
    }  # fmt: skip
    return ["train.py", "--config", "config/dspark/dspark_smollm2_135m.py", "--opts",
            *[f"{k}={v}" for k, v in opts.items()]]  # fmt: skip


def test_draft_vocabulary_scan_names_the_damaged_cache_and_shard(env, cache_copy, tmp_path):
    """A flipped byte in a supervised token id: the vocabulary scan (model.draft_vocab_size)
    reads ids without hashing samples; it must report a damaged cache (directory, shard,
    row, checksum), not a data set built for another target."""
    cache = CacheDataset(cache_copy)
    ids, mask = cache.tokens(0)
    pos = int(np.flatnonzero(mask)[0])
    rec = cache.index[0]
    flip_byte(cache_copy / cache.shards[int(rec["shard"])]["file"], int(rec["offset"]) + 4 * pos + 3)
    line = refused(train_args(env, cache_copy, tmp_path, **{"model.draft_vocab_size": 64}),
                   f"target cache {cache_copy}", f"(row {int(rec['row'])}) in shards/shard-",
                   "failed its checksum", "--resume", "python -m deepspec.data.cache_reader",
                   watch=[cache_copy])  # fmt: skip
    assert "rebuild the data with this target" not in line


@pytest.mark.parametrize("held", ["all", "all-but-one"])
def test_heldout_samples_that_leave_less_than_a_batch(env, tmp_path, held):
    """The message names the held-out count and suggests another value that works."""
    import re

    n = len(CacheDataset(env["cache"]))
    batch = 4
    heldout = n if held == "all" else n - 1
    line = refused(train_args(env, env["cache"], tmp_path, **{"data.heldout_samples": heldout,
                   "train.global_batch_size": batch, "train.local_batch_size": 2}),
                   f"data.heldout_samples={heldout} holds out {heldout} of the {n} samples",
                   f"fewer than one global batch (train.global_batch_size={batch})", f"at most {n - batch}",
                   watch=[env["cache"]])  # fmt: skip
    suggested = int(re.search(r"--opts data\.heldout_samples=(\d+)", line).group(1))
    assert suggested != heldout and 0 < suggested <= n - batch


def test_training_on_a_corrupted_cache_stops_with_one_line(env, cache_copy, tmp_path):
    cache = CacheDataset(cache_copy)
    for i in range(len(cache)):  # every sample: the first batch meets one, whatever the order
        rec = cache.index[i]
        flip_byte(
            cache_copy / cache.shards[int(rec["shard"])]["file"],
            int(rec["offset"]) + 5 * int(rec["seq_len"]) + 3,
        )
    args = train_args(env, cache_copy, tmp_path)
    refused(args, f"target cache {cache_copy}", "failed its checksum", "--resume", watch=[cache_copy])
