"""Target cache: round trip against the target itself, fp8, SIGKILL + resume, corruption, NaN."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from deepspec.config import load_config
from deepspec.data import ChatTokenizer
from deepspec.data.cache_builder import CacheBuildOptions, build_target_cache
from deepspec.data.cache_format import INDEX, MANIFEST, SampleLayout
from deepspec.data.cache_reader import CacheDataset, validate_cache_for_config
from deepspec.data.fingerprint import target_fingerprint
from deepspec.errors import DataError
from tests.conftest import ROOT

MINI = os.path.join(ROOT, "data", "train_prompts", "mini.jsonl")
PREPARE = os.path.join(ROOT, "scripts", "data", "prepare_target_cache.py")
LAYERS = [-1, 0, 2]
MAX_LENGTH = 192
MIN_LOSS = 4


def head(n, out, start=0):
    with open(MINI, encoding="utf-8") as fh:
        lines = fh.readlines()[start : start + n]
    out.write_text("".join(lines), encoding="utf-8")
    return str(out)


def options(out, target, data, **kw):
    base = dict(
        output_dir=str(out),
        train_data_paths=[str(data)],
        target=str(target),
        layer_ids=LAYERS,
        max_length=MAX_LENGTH,
        min_loss_tokens=MIN_LOSS,
        target_dtype="fp32",
        rows_per_shard=4,
        local_batch_size=4,
        progress=False,
    )
    base.update(kw)
    return CacheBuildOptions(**base)


def config_for(target, **data_opts):
    opts = [
        f"model.target_model_name_or_path={target}",
        f"model.target_layer_ids=[{','.join(map(str, LAYERS))}]",
        f"data.max_length={MAX_LENGTH}",
        f"data.min_loss_tokens={MIN_LOSS}",
    ] + [f"data.{k}={v}" for k, v in data_opts.items()]
    return load_config(None, opts)


def one_line(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def tiny(tiny_target):
    return tiny_target("llama")


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory, tiny):
    """A bf16 cache of 16 mini rows, built in-process once; tests work on copies."""
    root = tmp_path_factory.mktemp("cache")
    data = head(16, root / "data.jsonl")
    build_target_cache(options(root / "cache", tiny, data))
    return root / "cache", data


@pytest.fixture
def cache_copy(built_cache, tmp_path):
    src, _ = built_cache
    dst = tmp_path / "cache"
    shutil.copytree(src, dst)
    return dst


def recompute(model, samples):
    """HF hidden states for samples padded into one batch: (cat of LAYERS, final normed)."""
    longest = max(len(ids) for ids in samples)
    ids = torch.full((len(samples), longest), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, s in enumerate(samples):
        ids[j, : len(s)], mask[j, : len(s)] = s, 1
    with torch.no_grad():
        hs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    hidden = torch.cat([hs[i + 1] for i in LAYERS], dim=-1)
    return hidden, hs[-1]


# ---- round trip ----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_gloo_ranks_round_trip_equals_the_targets_hidden_states(tmp_path, tiny, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    data = head(16, tmp_path / "data.jsonl")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model:\n  target_model_name_or_path: {tiny}\n  target_layer_ids: {LAYERS}\n"
        f"data:\n  max_length: {MAX_LENGTH}\n  min_loss_tokens: {MIN_LOSS}\n"
    )
    out = tmp_path / "cache"
    proc = subprocess.run(
        [
            sys.executable, PREPARE, "--config", str(cfg), "--train-data-path", data, "--output-dir", str(out),
            "--nproc", "2", "--target-dtype", "fp32", "--rows-per-shard", "4", "--local-batch-size", "4",
            "--no-progress",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "expected cache size:" in proc.stdout and "target cache ready" in proc.stdout

    cache = CacheDataset(out)
    manifest = cache.manifest
    assert manifest["layer_ids"] == LAYERS and manifest["target"]["fingerprint"] == target_fingerprint(tiny)
    chat = ChatTokenizer(smollm2_tokenizer, max_length=MAX_LENGTH, min_loss_tokens=MIN_LOSS)
    rows = [json.loads(line) for line in open(data, encoding="utf-8")]
    expected = {i: chat(r["conversations"]) for i, r in enumerate(rows)}
    kept = {i for i, s in expected.items() if s is not None}
    assert list(cache.rows) == sorted(kept) and len(kept) < 16  # rows without answers were dropped
    assert manifest["counts"]["dropped"] == dict(chat.stats.dropped)  # the tokenizer's reasons, counted
    assert sum(chat.stats.dropped.values()) == 16 - len(kept)
    assert manifest["counts"]["tokens"] == sum(len(expected[i].input_ids) for i in kept)

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    torch.set_num_threads(1)  # the two workers ran one thread each
    by_row = {int(r): i for i, r in enumerate(cache.rows)}
    d = cache.hidden_size
    for shard in range(4):  # each shard was one batch: its kept rows, longest first
        batch_rows = sorted(
            (r for r in kept if r // 4 == shard), key=lambda r: (-len(expected[r].input_ids), r)
        )
        hidden, last = recompute(model, [torch.tensor(expected[r].input_ids) for r in batch_rows])
        for j, row in enumerate(batch_rows):
            sample = cache[by_row[row]]
            n = len(expected[row].input_ids)
            assert sample["input_ids"].tolist() == expected[row].input_ids
            assert sample["loss_mask"].tolist() == expected[row].loss_mask
            assert sample["attention_mask"].tolist() == [1] * n
            assert sample["hidden_states"].shape == (n, len(LAYERS) * d)
            # same batch composition: bit for bit (after the bf16 storage rounding)
            assert torch.equal(sample["hidden_states"], hidden[j, :n].bfloat16())
            assert torch.equal(sample["last_hidden_states"], last[j, :n].bfloat16())
            # the sequence alone: within bf16 rounding
            h_alone, l_alone = recompute(model, [torch.tensor(expected[row].input_ids)])
            for got, ref in (
                (sample["hidden_states"], h_alone[0]),
                (sample["last_hidden_states"], l_alone[0]),
            ):
                assert ((got.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-5).all()
    torch.set_num_threads(os.cpu_count() or 1)


def test_fp8_cache_is_within_its_quantisation_error(built_cache, tmp_path, tiny):
    bf16_dir, data = built_cache
    build_target_cache(options(tmp_path / "fp8", tiny, data, hidden_dtype="fp8"))
    fp8 = CacheDataset(tmp_path / "fp8", dtype=torch.float32)
    ref = CacheDataset(bf16_dir, dtype=torch.float32)
    d, L = fp8.hidden_size, len(LAYERS)
    assert fp8.manifest["storage"]["bytes_per_token"] == 5 + (d + 4) * (L + 1)
    assert ref.manifest["storage"]["bytes_per_token"] == 5 + 2 * d * (L + 1)
    assert len(fp8) == len(ref) and (fp8.rows == ref.rows).all()
    for i in range(len(fp8)):
        a, b = fp8[i], ref[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        for key, width in (("hidden_states", L), ("last_hidden_states", 1)):
            x = b[key].reshape(-1, width, d)  # reference (bf16-rounded; fp8 was quantised from fp32)
            scale = x.abs().amax(-1, keepdim=True) / 448
            err = (a[key].reshape(-1, width, d) - x).abs()
            assert (err <= x.abs() * (2**-4 + 2**-8) + scale * 2**-9 + 1e-6).all()
            assert err.max() > 0  # it really is quantised


def test_reader_api_lengths_pickling_and_dataloader(built_cache):
    path, _ = built_cache
    cache = CacheDataset(path)
    assert len(cache) == cache.manifest["counts"]["samples"] > 0
    assert list(cache.lengths) == [len(cache[i]["input_ids"]) for i in range(len(cache))]
    assert cache[-1]["row"] == cache[len(cache) - 1]["row"]
    with pytest.raises(IndexError):
        cache[len(cache)]
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone[1]["hidden_states"], cache[1]["hidden_states"])
    loader = torch.utils.data.DataLoader(cache, batch_size=None, num_workers=2)
    for i, sample in enumerate(loader):
        assert torch.equal(sample["hidden_states"], cache[i]["hidden_states"])
    assert i == len(cache) - 1


def test_layout_sizes_match_the_formula():
    layout = SampleLayout(num_layers=5, hidden_size=576, storage="bf16")
    assert (
        layout.bytes_per_token == 6 + 2 * 576 * 6 - 1
    )  # docs/DESIGN.md §5 minus the unstored attention mask
    sizes = layout.block_bytes_array(np.array([1, 7, 300]))
    for n, size in zip([1, 7, 300], sizes):
        assert (
            size % 64 == 0 and n * layout.bytes_per_token <= size < n * layout.bytes_per_token + 64 + 3 * 16
        )


# ---- crash safety --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory, tiny):
    """40 rows, one row per shard, and their cache built without interruption."""
    root = tmp_path_factory.mktemp("kill")
    data = head(40, root / "data.jsonl")
    cfg = root / "cfg.yaml"
    cfg.write_text(
        f"model:\n  target_model_name_or_path: {tiny}\n  target_layer_ids: {LAYERS}\n"
        f"data:\n  max_length: {MAX_LENGTH}\n  min_loss_tokens: {MIN_LOSS}\n"
    )
    whole = root / "whole"
    build_target_cache(options(whole, tiny, data, rows_per_shard=1, local_batch_size=1))
    return data, cfg, whole


def assert_same_cache(a_dir, b_dir):
    """Two caches hold the same samples, byte for byte (the manifest up to its date)."""
    a, b = CacheDataset(a_dir), CacheDataset(b_dir)
    ma = {k: v for k, v in a.manifest.items() if k not in ("created_at", "manifest_checksum")}
    mb = {k: v for k, v in b.manifest.items() if k not in ("created_at", "manifest_checksum")}
    assert ma == mb
    assert (a_dir / INDEX).read_bytes() == (b_dir / INDEX).read_bytes()
    for shard in a.shards:
        assert (a_dir / shard["file"]).read_bytes() == (b_dir / shard["file"]).read_bytes()
    for i in range(len(a)):  # and every sample reads back verified
        assert torch.equal(a[i]["hidden_states"], b[i]["hidden_states"])


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_mid_run_leaves_no_manifest_and_resume_equals_uninterrupted(
    tmp_path, tiny, kill_setup, nproc
):
    data, cfg, whole = kill_setup
    out = tmp_path / "killed"
    args = [
        sys.executable, PREPARE, "--config", str(cfg), "--train-data-path", data, "--output-dir", str(out),
        "--rows-per-shard", "1", "--local-batch-size", "1", "--target-dtype", "fp32", "--no-progress",
        "--nproc", str(nproc),
    ]  # fmt: skip
    # own session: SIGKILL reaches the launcher and its spawned workers at once
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 240
    while len(list(out.glob("shards/shard-*.json"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # let the killed workers go
    done = sorted(p.name for p in (out / "shards").glob("shard-*.json"))
    assert 2 <= len(done) < 40, "the kill must land mid-run"
    assert not (out / MANIFEST).exists()
    with pytest.raises(DataError, match="incomplete: no manifest.json") as exc:
        CacheDataset(out)
    one_line(exc)
    reader = subprocess.run(
        [sys.executable, "-m", "deepspec.data.cache_reader", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert reader.returncode == 2 and reader.stderr.count("error:") == 1 and "incomplete" in reader.stderr
    with pytest.raises(DataError, match="pass --resume"):
        build_target_cache(options(out, tiny, data, rows_per_shard=1, local_batch_size=1))
    done = sorted(p.name for p in (out / "shards").glob("shard-*.json"))  # the workers are gone now
    resumed = subprocess.run([*args, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({len(done)}/40 shards done)" in resumed.stdout  # finished shards were not redone
    assert not list((out / "shards").glob(".*.tmp"))
    assert_same_cache(out, whole)


# ---- corruption: each rejected with one line, also under python -O ------------------------


def flip_byte(path, offset):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x40]))


def test_missing_manifest_is_refused(cache_copy):
    os.unlink(cache_copy / MANIFEST)
    with pytest.raises(DataError, match="incomplete: no manifest.json") as exc:
        CacheDataset(cache_copy)
    one_line(exc)


def test_truncated_and_padded_shards_are_refused(cache_copy):
    shard = cache_copy / "shards" / "shard-00001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(DataError, match=r"shard-00001.bin is truncated: \d+ bytes, expected \d+") as exc:
        CacheDataset(cache_copy)
    one_line(exc)
    shard.write_bytes(data + b"\0")
    with pytest.raises(DataError, match="has extra bytes"):
        CacheDataset(cache_copy)
    os.unlink(shard)
    with pytest.raises(DataError, match="shard-00001.bin is missing"):
        CacheDataset(cache_copy)


def test_flipped_shard_byte_fails_the_sample_and_shard_checksums(cache_copy):
    cache = CacheDataset(cache_copy)
    victim = 2
    rec = cache.index[victim]
    shard_file = cache_copy / cache.shards[int(rec["shard"])]["file"]
    flip_byte(shard_file, int(rec["offset"]) + 4 * int(rec["seq_len"]) + 1000)  # inside its hidden states
    cache = CacheDataset(cache_copy)  # opening does not read the data
    with pytest.raises(DataError, match=rf"sample {victim} \(row \d+\) .* failed its checksum") as exc:
        cache[victim]
    one_line(exc)
    others = [i for i in range(len(cache)) if cache.index[i]["shard"] == rec["shard"] and i != victim]
    assert others and all(cache[i]["input_ids"].numel() for i in others)  # neighbours still read
    with pytest.raises(DataError, match="failed its checksum"):
        cache.verify_shards()


def test_index_corruption_is_refused(cache_copy):
    index = cache_copy / INDEX
    raw = index.read_bytes()
    flip_byte(index, 9)
    with pytest.raises(DataError, match="index samples.idx failed its checksum") as exc:
        CacheDataset(cache_copy)
    one_line(exc)
    index.write_bytes(raw[:-5])
    with pytest.raises(DataError, match="expected"):
        CacheDataset(cache_copy)


def test_edited_manifest_is_refused(cache_copy):
    path = cache_copy / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["layer_ids"] = [0, 1, 2]
    path.write_text(json.dumps(manifest, indent=2))
    with pytest.raises(DataError, match="modified after it was written") as exc:
        CacheDataset(cache_copy)
    one_line(exc)
    path.write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        CacheDataset(cache_copy)


def test_cache_from_another_target_or_other_settings_is_refused(built_cache, tiny, tmp_path, smollm2_dir):
    from deepspec.targets.tiny import build_tiny_target

    path, _ = built_cache
    assert len(validate_cache_for_config(path, config_for(tiny), tiny)) > 0
    other = build_tiny_target("llama", tmp_path / "other", tokenizer_dir=smollm2_dir, seed=1)
    with pytest.raises(DataError, match=r"built from target .* but .* is xxh3-128:") as exc:
        validate_cache_for_config(path, config_for(other), other)
    one_line(exc)
    cfg = load_config(None, [f"model.target_model_name_or_path={tiny}", "model.target_layer_ids=[0,1]",
                             f"data.max_length={MAX_LENGTH}", f"data.min_loss_tokens={MIN_LOSS}"])  # fmt: skip
    with pytest.raises(
        DataError, match=r"layer ids \[-1, 0, 2\] in the cache, model.target_layer_ids=\[0, 1\]"
    ):
        validate_cache_for_config(path, cfg, tiny)
    with pytest.raises(DataError, match="data.max_length=1024 but the cache was built with 192"):
        validate_cache_for_config(path, load_config(None, [*_opts(tiny), "data.max_length=1024"]), tiny)
    with pytest.raises(DataError, match="chat template"):
        validate_cache_for_config(path, config_for(tiny, system_prompt="Be brief."), tiny)


def test_a_config_may_read_a_subset_of_the_cached_layers(built_cache, tiny):
    """A 3-layer cache serves a draft that reads two of its layers: the same per-layer
    features, in the cache's order; layers it does not hold are refused."""
    path, _ = built_cache
    full = CacheDataset(path)
    cfg = load_config(None, [f"model.target_model_name_or_path={tiny}", f"model.target_layer_ids=[{LAYERS[0]},{LAYERS[2]}]",
                             f"data.max_length={MAX_LENGTH}", f"data.min_loss_tokens={MIN_LOSS}"])  # fmt: skip
    sub = validate_cache_for_config(path, cfg, tiny)
    d = full.hidden_size
    for i in (0, len(full) - 1):
        want = full[i]["hidden_states"].view(-1, 3, d)[:, [0, 2]].flatten(1)
        assert torch.equal(sub[i]["hidden_states"], want)
        assert torch.equal(sub[i]["last_hidden_states"], full[i]["last_hidden_states"])
    with pytest.raises(DataError, match="not an increasing subset"):
        full.use_layers([LAYERS[2], LAYERS[0]])


def _opts(target):
    return [
        f"model.target_model_name_or_path={target}",
        f"model.target_layer_ids=[{','.join(map(str, LAYERS))}]",
        f"data.min_loss_tokens={MIN_LOSS}",
    ]


def test_validation_survives_python_O(cache_copy):
    flip_byte(cache_copy / INDEX, 3)
    proc = subprocess.run(
        [sys.executable, "-O", "-m", "deepspec.data.cache_reader", str(cache_copy)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: target cache") and "failed its checksum" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


# ---- per-sample verification: token ids, caches without a recorded vocabulary -------------


def reseal(path):
    """Recompute every checksum of a cache from its current bytes (a cache written wrong, not
    damaged afterwards: only the content checks can catch it)."""
    import xxhash

    from deepspec.data.cache_format import INDEX_DTYPE, manifest_checksum

    manifest = json.loads((path / MANIFEST).read_text())
    index = np.fromfile(path / INDEX, dtype=INDEX_DTYPE)
    layout = SampleLayout(len(manifest["layer_ids"]), manifest["target"]["hidden_size"],
                          manifest["storage"]["hidden_dtype"])  # fmt: skip
    for k in range(len(index)):
        data = (path / manifest["shards"][int(index[k]["shard"])]["file"]).read_bytes()
        start = int(index[k]["offset"])
        index[k]["checksum"] = xxhash.xxh3_64_intdigest(
            data[start : start + layout.block_bytes(int(index[k]["seq_len"]))]
        )
    (path / INDEX).write_bytes(index.tobytes())
    manifest["index"]["checksum"] = "xxh3-128:" + xxhash.xxh3_128_hexdigest(index.tobytes())
    for shard in manifest["shards"]:
        shard["checksum"] = "xxh3-128:" + xxhash.xxh3_128_hexdigest((path / shard["file"]).read_bytes())
    manifest["manifest_checksum"] = manifest_checksum(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def set_token(path, sample, position, token):
    cache = CacheDataset(path)
    rec = cache.index[sample]
    with open(path / cache.shards[int(rec["shard"])]["file"], "r+b") as fh:
        fh.seek(int(rec["offset"]) + 4 * position)
        fh.write(np.array([token], dtype="<i4").tobytes())


def test_token_ids_outside_the_vocabulary_are_refused_on_read(cache_copy):
    cache = CacheDataset(cache_copy)
    assert cache.vocab_size == cache.manifest["target"]["vocab_size"] == 49152
    for token in (49152, -1):
        set_token(cache_copy, 3, 5, token)
        reseal(cache_copy)
        cache = CacheDataset(cache_copy)
        cache.verify_shards()  # every checksum agrees: only the id check sees it
        with pytest.raises(
            DataError,
            match=rf"sample 3 \(row \d+\) in shards/shard-\d+.bin holds token id {token} outside the target's "
            r"vocabulary \[0, 49152\); .*rebuild it",
        ) as exc:
            cache[3]
        one_line(exc)
        assert all(cache[i]["input_ids"].numel() for i in range(len(cache)) if i != 3)


def test_cache_without_a_recorded_vocab_size_is_read_and_checked_against_the_target(cache_copy, tiny):
    set_token(cache_copy, 2, 0, 60000)
    manifest = json.loads((cache_copy / MANIFEST).read_text())
    del manifest["target"]["vocab_size"]  # as written by deepspec before it was recorded
    (cache_copy / MANIFEST).write_text(json.dumps(manifest))
    reseal(cache_copy)
    old = CacheDataset(cache_copy)
    assert old.vocab_size is None and old[2]["input_ids"][0] == 60000  # nothing to check against
    checked = validate_cache_for_config(cache_copy, config_for(tiny), tiny)
    assert checked.vocab_size == 49152
    with pytest.raises(DataError, match="holds token id 60000 outside the target's vocabulary"):
        checked[2]
    assert CacheDataset(cache_copy, vocab_size=49152).vocab_size == 49152


def test_per_sample_verification_is_on_by_default_and_covers_every_byte(cache_copy):
    cache = CacheDataset(cache_copy)
    assert cache.verify_samples
    rec = cache.index[1]
    end = int(rec["offset"]) + cache.layout.block_bytes(int(rec["seq_len"])) - 1  # last padding byte
    flip_byte(cache_copy / cache.shards[int(rec["shard"])]["file"], end)
    with pytest.raises(DataError, match=r"sample 1 \(row \d+\) in shards/shard-\d+.bin failed its checksum"):
        CacheDataset(cache_copy)[1]


# ---- --resume verifies a finished cache and repairs what is damaged ------------------------


def test_resume_rebuilds_corrupt_and_deleted_shards_of_a_complete_cache(built_cache, tmp_path, tiny, capsys):
    src, data = built_cache
    out = tmp_path / "cache"
    shutil.copytree(src, out)
    flip_byte(out / "shards" / "shard-00001.bin", 3000)
    os.unlink(out / "shards" / "shard-00002.bin")
    capsys.readouterr()
    result = build_target_cache(options(out, tiny, data, resume=True))
    printed = capsys.readouterr().out
    assert "is damaged" in printed and "rebuilding" in printed and "already a complete" not in printed
    original = CacheDataset(src)
    assert result.samples_written == sum(original.shards[k]["samples"] for k in (1, 2))
    assert_same_cache(out, src)
    again = build_target_cache(options(out, tiny, data, resume=True))  # now sound: nothing to do
    assert again.samples_written == 0 and "already a complete target cache" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["manifest", "index"])
def test_resume_repairs_a_damaged_manifest_or_index(built_cache, tmp_path, tiny, damage):
    src, data = built_cache
    out = tmp_path / "cache"
    shutil.copytree(src, out)
    if damage == "manifest":
        (out / MANIFEST).write_text("{truncated")
    else:
        flip_byte(out / INDEX, 20)
    with pytest.raises(DataError):
        CacheDataset(out)
    result = build_target_cache(options(out, tiny, data, resume=True))
    assert result.samples_written == 0  # the shards were sound: only index and manifest rewritten
    assert_same_cache(out, src)


def test_resume_leaves_a_cache_of_another_format_version_alone(built_cache, tmp_path, tiny):
    from deepspec.data.cache_format import manifest_checksum

    src, data = built_cache
    out = tmp_path / "cache"
    shutil.copytree(src, out)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["version"] = 2
    manifest["manifest_checksum"] = manifest_checksum(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match=r"holds a version 2 target cache; .* pass --overwrite") as exc:
        build_target_cache(options(out, tiny, data, resume=True))
    one_line(exc)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_of_an_unfinished_cache_rehashes_its_finished_shards(built_cache, tmp_path, tiny, capsys):
    src, data = built_cache
    out = tmp_path / "cache"
    shutil.copytree(src, out)
    os.unlink(out / MANIFEST)  # as if killed before finalising
    flip_byte(out / "shards" / "shard-00000.bin", 100)
    litter = [out / "shards" / ".shard-00002.bin.tmp", out / "shards" / ".shard-00003.json.k1ll3d.tmp",
              out / ".manifest.json.x7.tmp"]  # fmt: skip
    for path in litter:  # what a writer killed mid-write leaves
        path.write_bytes(b"partial")
    capsys.readouterr()
    result = build_target_cache(options(out, tiny, data, resume=True))
    assert "rebuilding damaged shard(s)" in capsys.readouterr().out
    assert result.samples_written == CacheDataset(src).shards[0]["samples"]
    assert_same_cache(out, src)
    assert not any(path.exists() for path in litter)


# ---- empty results, truncation and too-long prompts ----------------------------------------


def test_empty_or_fully_dropped_input_is_refused_and_leaves_no_cache(tmp_path, tiny):
    from deepspec.data.cache_writer import ShardWriter, finalize_cache

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.jsonl holds no conversations \(2 blank line\(s\)") as exc:
        build_target_cache(options(tmp_path / "a", tiny, empty))
    one_line(exc)
    assert not (tmp_path / "a").exists()  # refused before the output directory is touched
    no_answers = tmp_path / "questions.jsonl"
    no_answers.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                                  for i in range(5)))  # fmt: skip
    with pytest.raises(
        DataError,
        match=r"all 5 conversation\(s\) of .*questions.jsonl were dropped \(5 with no assistant answer\)",
    ) as exc:
        build_target_cache(options(tmp_path / "b", tiny, no_answers))
    one_line(exc)
    assert not (tmp_path / "b").exists()  # no manifest, no plan, no directory: not even an unfinished cache
    build_target_cache(options(tmp_path / "b", tiny, head(4, tmp_path / "ok.jsonl")))  # a fresh start works
    assert len(CacheDataset(tmp_path / "b")) > 0
    # every sample lost later (non-finite hidden states): finalising refuses, no manifest
    out = tmp_path / "c"
    writer = ShardWriter(str(out), 0, SampleLayout(3, 64, "bf16"))
    writer.commit({"rows": [0, 4], "dropped": {}, "nonfinite_rows": [0, 1, 2, 3]})
    with pytest.raises(DataError, match=r"no sample was written \(4 had non-finite hidden states"):
        finalize_cache(str(out), {}, 1, {})
    assert not (out / MANIFEST).exists()


def test_truncated_samples_and_too_long_prompts_are_counted(tmp_path, tiny, capsys):
    def row(question, answer):
        return json.dumps({"conversations": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n"  # fmt: skip

    data = tmp_path / "data.jsonl"
    data.write_text(
        row("What is two plus two?", "Two plus two equals four, since adding two and two gives four.")
        + row("why " * 400, "Because of Rayleigh scattering.")  # the prompt alone exceeds max_length
        + row("Tell me a long story.", "Once upon a time " * 100)  # kept, cut at max_length
    )
    build_target_cache(options(tmp_path / "cache", tiny, data))
    counts = CacheDataset(tmp_path / "cache").manifest["counts"]
    assert counts["dropped"] == {"prompt longer than max_length": 1}
    assert counts["truncated"] == 1 and counts["samples"] == 2
    assert list(CacheDataset(tmp_path / "cache").lengths).count(MAX_LENGTH) == 1
    printed = capsys.readouterr().out
    assert f"truncated at max_length={MAX_LENGTH}: 1;" in printed
    assert "'prompt longer than max_length': 1" in printed


# ---- NaN hidden states, directory guards, disk space --------------------------------------


def test_nonfinite_hidden_states_are_skipped_and_counted_or_abort(tmp_path, tiny, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    data = head(16, tmp_path / "data.jsonl")
    chat = ChatTokenizer(smollm2_tokenizer, max_length=MAX_LENGTH, min_loss_tokens=MIN_LOSS)
    samples = {i: chat(json.loads(line)["conversations"]) for i, line in enumerate(open(data))}
    kept = {i: s for i, s in samples.items() if s is not None}
    counts = {}
    for s in kept.values():
        for t in set(s.input_ids):
            counts[t] = counts.get(t, 0) + 1
    poison = next(t for t, c in sorted(counts.items()) if 1 <= c <= 3)
    bad_rows = sorted(i for i, s in kept.items() if poison in s.input_ids)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight[poison] = float("nan")
    model.save_pretrained(tmp_path / "nan_target")
    shutil.copy(os.path.join(tiny, "tokenizer.json"), tmp_path / "nan_target")
    shutil.copy(os.path.join(tiny, "tokenizer_config.json"), tmp_path / "nan_target")
    if os.path.exists(os.path.join(tiny, "chat_template.jinja")):
        shutil.copy(os.path.join(tiny, "chat_template.jinja"), tmp_path / "nan_target")

    build_target_cache(options(tmp_path / "skip", tmp_path / "nan_target", data))
    cache = CacheDataset(tmp_path / "skip")
    assert cache.manifest["counts"]["dropped_nonfinite"] == len(bad_rows)
    assert cache.manifest["counts"]["nonfinite_rows"] == bad_rows
    assert sorted(cache.rows) == sorted(set(kept) - set(bad_rows))
    assert all(torch.isfinite(cache[i]["hidden_states"]).all() for i in range(len(cache)))
    with pytest.raises(DataError, match="non-finite hidden states for source row") as exc:
        build_target_cache(options(tmp_path / "abort", tmp_path / "nan_target", data, on_nonfinite="abort"))
    one_line(exc)
    assert not (tmp_path / "abort" / MANIFEST).exists()


def test_directory_guards_and_resume_settings(built_cache, tmp_path, tiny):
    path, data = built_cache
    with pytest.raises(DataError, match="already holds a complete target cache"):
        build_target_cache(options(path, tiny, data))
    result = build_target_cache(options(path, tiny, data, resume=True))  # complete: nothing to do
    assert result.samples_written == 0 and result.manifest["counts"]["samples"] == len(CacheDataset(path))
    with pytest.raises(
        DataError, match=r"cannot resume .* different settings \(tokenization.max_length 192 -> 128"
    ):
        build_target_cache(options(path, tiny, data, resume=True, max_length=128))
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a target cache; refusing to delete it"):
        build_target_cache(options(stranger, tiny, data, overwrite=True))
    assert (stranger / "notes.txt").exists()


def test_size_estimate_and_disk_space_refusal(tmp_path, tiny, capsys, monkeypatch):
    import shutil as real_shutil

    from deepspec.data import cache_plan

    data = head(8, tmp_path / "data.jsonl")
    build_target_cache(options(tmp_path / "ok", tiny, data))
    printed = capsys.readouterr().out
    manifest = CacheDataset(tmp_path / "ok").manifest
    bpt = manifest["storage"]["bytes_per_token"]
    assert f"expected cache size: {manifest['counts']['tokens']:,} tokens x {bpt:,} B/token" in printed

    # A full disk cannot be produced on demand: report a tiny free space instead.
    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(cache_plan.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(DataError, match="not enough disk space .* 1000 B free") as exc:
        build_target_cache(options(tmp_path / "full", tiny, data))
    one_line(exc)
    assert not list((tmp_path / "full").glob("shards/*.bin"))
    build_target_cache(options(tmp_path / "full", tiny, data, resume=True, ignore_disk_space=True))
    assert len(CacheDataset(tmp_path / "full")) == len(CacheDataset(tmp_path / "ok"))
