"""Trainer: world-size invariance, exact resume after SIGKILL, kills during saves, online =
offline, failures (NaN, disk full, SIGTERM, changed world size), the latest pointer."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deepspec.config import load_config
from deepspec.data.cache_builder import CacheBuildOptions, build_target_cache
from deepspec.errors import DeepSpecError
from deepspec.train import checkpoint as ckpt
from deepspec.train.data import DataCursor, EpochOrder
from tests.conftest import ROOT
from tests.helpers import opts_for

MINI = os.path.join(ROOT, "data", "train_prompts", "mini.jsonl")
LAYERS = [0, 2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_target):
    """A tiny target, 24 conversations with answers, and their bf16 target cache."""
    root = tmp_path_factory.mktemp("train")
    target = tiny_target("llama")
    with open(MINI, encoding="utf-8") as fh:
        rows = [line for line in fh if '"assistant"' in line][:24]
    data = root / "data.jsonl"
    data.write_text("".join(rows), encoding="utf-8")
    cache = root / "cache"
    build_target_cache(
        CacheBuildOptions(
            output_dir=str(cache),
            train_data_paths=[str(data)],
            target=target,
            layer_ids=LAYERS,
            max_length=256,
            min_loss_tokens=4,
            rows_per_shard=8,
            local_batch_size=4,
            progress=False,
        )
    )
    return {"target": target, "data": str(data), "cache": str(cache)}


def train_cmd(opts):
    return [sys.executable, "train.py", "--config", "config/dspark/dspark_smollm2_135m.py", "--opts", *opts]


def run_train(opts, timeout=600, check=True):
    proc = subprocess.run(train_cmd(opts), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(root) -> dict[int, float]:
    out = {}
    with open(root / "ck" / "deepspec" / "run" / "metrics.jsonl") as fh:
        for line in fh:
            row = json.loads(line)
            out[row["step"]] = row["loss"]
    return out


def weights(root, step="step_latest"):
    return load_file(str(root / "ck" / "deepspec" / "run" / step / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "algo, sharding", [("dspark", "no_shard"), ("eagle3", "no_shard"), ("dflash", "full_shard")]
)
def test_two_gloo_ranks_equal_one_rank(setup, tmp_path, algo, sharding):
    """DDP and FSDP on 2 gloo ranks give the losses and weights of a single process."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(opts_for(setup, one, algo, **{"train.max_train_steps": 3}))
    run_train(
        opts_for(
            setup,
            two,
            algo,
            **{"train.max_train_steps": 3, "train.num_cpu_workers": 2, "train.sharding_strategy": sharding},
        )
    )
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5, rel=1e-5)
    wa, wb = weights(one), weights(two)
    assert wa.keys() == wb.keys()
    for k in wa:
        if not wa[k].is_floating_point():  # the draft vocabulary maps (d2t, t2d): identical
            assert torch.equal(wa[k], wb[k]), k
            continue
        # gradients are summed in another order across ranks; Adam's m/sqrt(v) can turn a
        # 1e-7 difference of a near-zero gradient into a fraction of one lr-sized update,
        # and a large weight (the final norm starts above 16 here) differs by its float ulp
        torch.testing.assert_close(wa[k], wb[k], atol=3e-4, rtol=1e-3)
        assert (wa[k] - wb[k]).abs().mean() < 1e-6 * max(1.0, float(wa[k].abs().mean())), k


def wait_for(path, timeout=300):
    start = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - start > timeout:
            raise TimeoutError(path)
        time.sleep(0.05)


@pytest.mark.slow
def test_resume_after_sigkill_equals_straight_run(setup, tmp_path):
    """8 steps straight = 4 steps, SIGKILL, resume to 8 (mid-epoch cut; crosses an epoch)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_train(opts_for(setup, straight, **{"train.max_train_steps": 8}))
    proc = subprocess.Popen(
        train_cmd(opts_for(setup, killed, **{"train.max_train_steps": 8})),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(killed / "ck" / "deepspec" / "run" / "step_4" / ckpt.COMPLETE)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_train(opts_for(setup, killed, **{"train.max_train_steps": 8}))
    assert re.search(r"resumed from .*step_(4|6) at step (4|6)", resumed.stdout)
    a, b = losses(straight), losses(killed)
    for step in range(1, 9):
        assert a[step] == pytest.approx(b[step], abs=1e-6, rel=1e-6), step
    wa, wb = weights(straight), weights(killed)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-6)
    optim_a = ckpt.load_shared(str(straight / "ck" / "deepspec" / "run" / "step_8"))["optimizer"]
    optim_b = ckpt.load_shared(str(killed / "ck" / "deepspec" / "run" / "step_8"))["optimizer"]
    for sa, sb in zip(optim_a["state"].values(), optim_b["state"].values()):
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_sigkill_at_random_points_never_leaves_a_partial_checkpoint(setup, tmp_path):
    opts = opts_for(
        setup,
        tmp_path,
        **{"train.max_train_steps": 40, "logging.checkpointing_steps": 1, "logging.keep_last_checkpoints": 2},
    )
    root = tmp_path / "ck" / "deepspec" / "run"
    rng = random.Random(0)
    partial_loads = killed_mid_run = 0
    for _ in range(4):
        before = ckpt.latest_checkpoint(str(root))
        proc = subprocess.Popen(
            train_cmd(opts), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # the run is training: it has saved a step of its own (one per step here)
        deadline = time.monotonic() + 300
        while ckpt.latest_checkpoint(str(root)) == before and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))  # anywhere in the next step or two, or a save
        killed_mid_run += proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = ckpt.latest_checkpoint(str(root))
        if latest is None:
            continue
        from deepspec.drafts import load_draft

        try:
            load_draft(latest)
            ckpt.load_shared(latest)
            ckpt.load_rank_state(latest, 0)
        except Exception:
            partial_loads += 1
    assert killed_mid_run >= 3  # the kills landed in running training, not after it ended
    assert partial_loads == 0
    done = run_train(opts)
    assert "resumed from" in done.stdout or os.path.isdir(root / "step_40")
    assert os.path.realpath(root / ckpt.LATEST) == str(root / "step_40")
    assert [d for d in os.listdir(root) if ".tmp" in d] == []


@pytest.mark.slow
def test_online_mode_first_step_loss_equals_offline(setup, tmp_path):
    offline, online = tmp_path / "off", tmp_path / "on"
    run_train(opts_for(setup, offline, **{"train.max_train_steps": 1}))
    run_train(
        opts_for(
            setup,
            online,
            **{
                "train.max_train_steps": 1,
                "data.mode": "online",
                "data.train_data_paths": f"[{setup['data']}]",
            },
        )
    )
    assert losses(offline)[1] == pytest.approx(losses(online)[1], rel=2e-3)


@pytest.mark.slow
def test_failures_have_clear_errors_and_keep_the_last_checkpoint(setup, tmp_path):
    # a run to build on
    run_train(opts_for(setup, tmp_path, **{"train.max_train_steps": 2}))
    root = tmp_path / "ck" / "deepspec" / "run"
    # changed batch size or world size: refused, one line
    proc = run_train(
        opts_for(setup, tmp_path, **{"train.max_train_steps": 4, "train.local_batch_size": 1}), check=False
    )
    assert (
        proc.returncode != 0
        and "cannot resume" in proc.stderr
        and "train.local_batch_size 2 -> 1" in proc.stderr
    )
    proc = run_train(
        opts_for(setup, tmp_path, **{"train.max_train_steps": 4, "train.num_cpu_workers": 2}), check=False
    )
    assert proc.returncode != 0 and "world size 1 -> 2" in proc.stderr
    # NaN: stop with the step number, the last good checkpoint intact
    proc = run_train(
        opts_for(setup, tmp_path, **{"train.max_train_steps": 6, "train.lr": 1e30, "train.max_grad_norm": 0}),
        check=False,
    )
    assert proc.returncode != 0 and re.search(r"non-finite loss .* at step \d+", proc.stderr), proc.stderr[
        -2000:
    ]
    assert ckpt.latest_checkpoint(str(root)) is not None
    # mismatched or missing cache: one line before any compute
    proc = run_train(opts_for(setup, tmp_path / "x", **{"model.target_layer_ids": "[0,1]"}), check=False)
    assert proc.returncode != 0 and "does not match the config" in proc.stderr.strip().splitlines()[-1]
    proc = run_train(
        opts_for(setup, tmp_path / "x", **{"data.target_cache_path": str(tmp_path / "none")}), check=False
    )
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(setup, tmp_path):
    opts = opts_for(setup, tmp_path, **{"train.max_train_steps": 200, "logging.checkpointing_steps": 1000})
    proc = subprocess.Popen(
        train_cmd(opts), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(tmp_path / "ck" / "deepspec" / "run" / "metrics.jsonl")
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    # preempted, not finished: EX_TEMPFAIL, one error line naming the checkpoint
    assert proc.returncode == 75, err[-2000:]
    assert "stopped by SIGTERM" in out
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rerun the same command to resume" in errors[0], err[-2000:]
    assert "Traceback" not in err
    latest = ckpt.latest_checkpoint(str(tmp_path / "ck" / "deepspec" / "run"))
    assert latest is not None and ckpt.load_meta(latest)["step"] < 200
    assert latest in errors[0]


def test_disk_full_during_save_keeps_previous_checkpoint(setup, tmp_path, monkeypatch):
    from deepspec.train.trainer import Trainer

    cfg = load_config(
        os.path.join(ROOT, "config/dspark/dspark_smollm2_135m.py"),
        opts_for(setup, tmp_path, **{"train.max_train_steps": 4}),
    )
    real = ckpt.finish_save
    calls = {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "finish_save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match=r"saving step 4 failed .*No space left.*step_2 is intact"):
        Trainer(cfg, progress=False).run()
    root = tmp_path / "ck" / "deepspec" / "run"
    assert ckpt.latest_checkpoint(str(root)) == str(root / "step_2")
    assert [d for d in os.listdir(root) if ".tmp" in d] == []


def test_latest_pointer_fallbacks(tmp_path):
    root = str(tmp_path)
    assert ckpt.latest_checkpoint(root) is None
    for step in (2, 4, 6):
        os.makedirs(tmp_path / f"step_{step}")
        if step != 6:  # step_6 never completed
            (tmp_path / f"step_{step}" / ckpt.COMPLETE).write_text(str(step))
    assert ckpt.latest_checkpoint(root) == str(tmp_path / "step_4")  # missing link
    os.symlink("step_2", tmp_path / ckpt.LATEST)
    assert ckpt.latest_checkpoint(root) == str(tmp_path / "step_4")  # a stale link loses no progress
    os.unlink(tmp_path / ckpt.LATEST)
    os.symlink("step_9", tmp_path / ckpt.LATEST)  # dangling
    assert ckpt.latest_checkpoint(root) == str(tmp_path / "step_4")
    os.unlink(tmp_path / ckpt.LATEST)
    os.symlink("step_6", tmp_path / ckpt.LATEST)  # names an incomplete step
    assert ckpt.latest_checkpoint(root) == str(tmp_path / "step_4")
    os.unlink(tmp_path / ckpt.LATEST)
    (tmp_path / ckpt.LATEST).write_text("not a link")
    assert ckpt.latest_checkpoint(root) == str(tmp_path / "step_4")


def test_data_cursor_resume_yields_the_same_batches():
    order = EpochOrder(23, global_batch=4, local_batch=2, rank=1, world=2, seed=7, shuffle=True)
    stream = order.micro_batches(DataCursor())
    straight = [next(stream) for _ in range(20)]
    cursor = straight[6][1]
    resumed = order.micro_batches(cursor)
    assert [next(resumed)[0] for _ in range(13)] == [b for b, _ in straight[7:]]
    seen = [i for b, _ in straight[: order.micro_per_epoch] for i in b]
    assert len(seen) == len(set(seen)) == 10  # 5 steps of 2 per rank; the 3 leftover samples wait


def test_too_small_dataset_is_refused():
    with pytest.raises(DeepSpecError, match="fewer than one global batch of 8"):
        EpochOrder(5, global_batch=8, local_batch=1, rank=0, world=1, seed=0, shuffle=False)


def test_train_sh_documented_commands_parse():
    with open(os.path.join(ROOT, "scripts", "train", "train.sh")) as fh:
        text = fh.read()
    configs = re.findall(r"config/\w+/\w+\.py", text)
    assert len(set(configs)) == 15
    for path in set(configs):
        assert os.path.isfile(os.path.join(ROOT, path)), path
    documented = re.findall(r"--opts ([a-z_]+(?:\.[a-z_]+)+=[^\s\"]+)", text)
    assert len(documented) >= 8
    for path in set(configs):
        load_config(os.path.join(ROOT, path), documented)


def _cfg(setup, tmp_path, **extra):
    return load_config(
        os.path.join(ROOT, "config/dspark/dspark_smollm2_135m.py"),
        opts_for(setup, tmp_path, **{"train.torch_compile": "false", **extra}),
    )


def test_nonfinite_weights_after_an_update_stop_training_and_are_not_saved(setup, tmp_path, monkeypatch):
    from deepspec.train.checkpointer import NonFiniteLoss
    from deepspec.train.trainer import Trainer

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def overflowing_step(self, *args, **kwargs):  # the update of step 3 overflows one weight
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    cfg = _cfg(setup, tmp_path, **{"train.max_train_steps": 4, "logging.checkpointing_steps": 1})
    root = tmp_path / "ck" / "deepspec" / "run"
    with pytest.raises(
        NonFiniteLoss,
        match=rf"non-finite weights after the update of step 3 .*finite weights: {re.escape(str(root / 'step_2'))} ",
    ):
        Trainer(cfg, progress=False).run()
    assert ckpt.latest_checkpoint(str(root)) == str(root / "step_2")
    assert not (root / "step_3").exists() and [d for d in os.listdir(root) if ".tmp" in d] == []


def test_nonfinite_gradient_norm_stops_before_the_update(setup, tmp_path, monkeypatch):
    from deepspec.train.checkpointer import NonFiniteLoss
    from deepspec.train.trainer import Trainer

    real_clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def overflowing_grads(params, *args, **kwargs):  # the gradient of step 3 overflows
        params = list(params)
        calls["n"] += 1
        if calls["n"] == 3:
            params[0].grad.view(-1)[0] = float("inf")
        return real_clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", overflowing_grads)
    cfg = _cfg(setup, tmp_path, **{"train.max_train_steps": 4, "logging.checkpointing_steps": 1})
    root = tmp_path / "ck" / "deepspec" / "run"
    with pytest.raises(NonFiniteLoss, match=r"non-finite gradient norm \(inf\) at step 3") as info:
        Trainer(cfg, progress=False).run()
    # the weights of step 2 gave the inf: step_1 is the last good checkpoint
    assert f"last good checkpoint: {root / 'step_1'};" in str(info.value)
    assert f"{root / 'step_2'} holds the weights that gave it" in str(info.value)
    assert not (root / "step_3").exists()
    for tensor in weights(tmp_path, "step_2").values():
        assert torch.isfinite(tensor).all()


def test_truncate_metrics_drops_later_steps_and_a_torn_tail(tmp_path):
    from deepspec.train.metrics_log import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\nnote kept\n{"step": 3}\n{"step": 4, "lo')
    truncate_metrics(str(path), 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\nnote kept\n'
    truncate_metrics(str(path), 2)  # nothing to drop: the file is left alone
    assert path.read_text() == '{"step": 1}\n{"step": 2}\nnote kept\n'
    truncate_metrics(str(tmp_path / "missing.jsonl"), 0)
    assert not (tmp_path / "missing.jsonl").exists()


def test_feature_use_benchmark_scores_the_same_positions_with_real_and_zeroed_features(setup, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from feature_use import measure, table
    finally:
        sys.path.pop(0)
    run_train(
        opts_for(setup, tmp_path, "dflash", **{"train.torch_compile": "false", "train.max_train_steps": 2})
    )
    step = tmp_path / "ck" / "deepspec" / "run" / "step_2"
    result = measure(str(step), setup["cache"], samples=6, batch=3)
    real, zero = result["real"], result["zero"]
    assert real["positions"] == zero["positions"] > 0  # the same anchors in both passes
    assert all(math.isfinite(v) for v in (*real.values(), *zero.values()))
    assert zero["ce"] != real["ce"]  # the features reach the draft's output
    assert "gap (zero - real)" in table(result)


def test_lr_schedules():
    from deepspec.train.schedule import lr_factor

    total, warmup = 10, 2
    f = {
        s: [lr_factor(i, total, warmup, s, decay_ratio=0.3) for i in range(total)]
        for s in ("cosine", "constant", "wsd")
    }
    for s in f:
        assert f[s][:2] == [0.5, 1.0]  # linear warmup
    assert f["constant"][2:] == [1.0] * 8
    cos = f["cosine"][2:]
    assert cos[0] == 1.0 and all(a > b for a, b in zip(cos, cos[1:])) and cos[-1] < 0.05
    assert f["wsd"][2:7] == [1.0] * 5  # stable
    assert f["wsd"][7:] == pytest.approx([1.0, 2 / 3, 1 / 3])  # linear decay over the last 30%
    with pytest.raises(ValueError, match="unknown LR schedule"):
        lr_factor(5, total, warmup, "linear")


def test_max_samples_and_feature_use_metrics_are_logged(setup, tmp_path):
    """``data.max_samples`` trains on the cache's first N samples; every logged step of a block
    drafter records block slot 0's attention on the newest context next to the uniform share."""
    opts = opts_for(
        setup, tmp_path, **{"data.max_samples": 4, "model.context_window": 6, "train.max_train_steps": 2}
    )
    proc = run_train(opts)
    assert "offline: 4 samples" in proc.stdout
    with open(tmp_path / "ck" / "deepspec" / "run" / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 < row["attn_recent8/layer0"] <= 1.0
        # a sliding window of 6: block slot 0 sees 5 context positions, + a block of 4:
        # uniform attention puts 5/9 there
        assert row["attn_recent8/uniform"] == pytest.approx(5 / 9)
        assert 0.0 <= row["accuracy@1"] <= 1.0
    with open(tmp_path / "ck" / "deepspec" / "run" / "step_2" / "config.json") as fh:
        assert json.load(fh)["context_window"] == 6


def test_tv_ramp_moves_weight_from_ce_to_tv():
    from deepspec.algorithms import get_algorithm
    from deepspec.config import load_config

    alg = get_algorithm("dspark")
    fixed = load_config("config/dspark/dspark_smollm2_135m.py", ["model.tv_ramp_ratio=0"])
    ramped = load_config("config/dspark/dspark_smollm2_135m.py", ["model.tv_ramp_ratio=0.5"])
    assert alg.loss_kwargs(fixed, 0.0) == alg.loss_kwargs(fixed, 1.0)
    start, middle, end = (alg.loss_kwargs(ramped, p) for p in (0.0, 0.25, 0.5))
    assert (start["ce_alpha"], start["l1_alpha"]) == pytest.approx((1.0, 0.0))
    assert (middle["ce_alpha"], middle["l1_alpha"]) == pytest.approx((0.55, 0.45))
    assert end == alg.loss_kwargs(fixed, 0.3) == alg.loss_kwargs(ramped, 0.9)


def test_heldout_scoring_is_logged_and_leaves_training_unchanged(setup, tmp_path):
    """``data.heldout_samples`` holds the cache's last samples out and scores them with real
    and zeroed features every ``logging.heldout_steps``; training is the same as a run on the
    same training samples without held-out scoring (it uses no global RNG)."""
    from deepspec.data.cache_reader import CacheDataset

    n = len(CacheDataset(setup["cache"]))
    common = {"train.max_train_steps": 4, "model.context_window": 5}
    held = tmp_path / "held"
    proc = run_train(
        opts_for(setup, held, **common, **{"data.heldout_samples": 4, "logging.heldout_steps": 2})
    )
    assert f"offline: {n - 4} samples, 4 held out" in proc.stdout
    plain = tmp_path / "plain"
    run_train(opts_for(setup, plain, **common, **{"data.max_samples": n - 4}))
    assert losses(held) == losses(plain)
    with open(held / "ck" / "deepspec" / "run" / "metrics.jsonl") as fh:
        rows = {r["step"]: r for r in map(json.loads, fh)}
    for step in (2, 4):
        row = rows[step]
        assert row["heldout/ce"] > 0 and row["heldout/ce_zeroed"] > 0
        assert row["heldout/ce_gap"] == pytest.approx(row["heldout/ce_zeroed"] - row["heldout/ce"])
        assert 1.0 <= row["heldout/tau_probabilistic"] <= 5.0
    assert "heldout/ce" not in rows[1] and "heldout/ce" not in rows[3]
    assert rows[2]["heldout/ce"] != rows[4]["heldout/ce"]  # the draft changed in between
    too_many = run_train(opts_for(setup, tmp_path / "bad", **{"data.heldout_samples": n}), check=False)
    assert too_many.returncode != 0 and "data.heldout_samples" in too_many.stderr


def test_pruned_draft_vocabulary_is_built_from_the_cache_saved_and_resumed(setup, tmp_path):
    """``model.draft_vocab_size``: the vocabulary is the most frequent supervised tokens of the
    training samples, it goes into every checkpoint, and a resumed run keeps it."""
    from deepspec.data.cache_reader import CacheDataset
    from deepspec.drafts.vocab import select_draft_vocab

    extra = {"model.draft_vocab_size": 300, "train.max_train_steps": 2}
    first = run_train(opts_for(setup, tmp_path, **extra))
    assert re.search(r"draft vocabulary: 300 of the target's tokens cover \d+\.\d+% of", first.stdout)
    cache = CacheDataset(setup["cache"])
    counts = np.zeros(cache.vocab_size, dtype=np.int64)
    for i in range(len(cache)):  # counted independently, through the decoded samples
        s = cache[i]
        counts += np.bincount(s["input_ids"][s["loss_mask"].bool()].numpy(), minlength=cache.vocab_size)
    expected = select_draft_vocab(counts, 300).draft_ids
    saved = weights(tmp_path)
    assert torch.equal(saved["d2t"] + torch.arange(300), expected)
    assert saved["lm_head.weight"].shape[0] == 300
    with open(tmp_path / "ck" / "deepspec" / "run" / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    assert all(0.0 <= r["draft_vocab_miss"] < 1.0 for r in rows)
    resumed = run_train(opts_for(setup, tmp_path, **{**extra, "train.max_train_steps": 4}))
    assert "resumed from" in resumed.stdout
    assert torch.equal(weights(tmp_path)["d2t"], saved["d2t"])


def test_a_run_starts_from_a_reference_format_draft(setup, tmp_path):
    """``model.init_from_draft`` takes a draft in the DeepSpec reference's format (here one
    exported from a deepspec run): a second run starts from its weights; a draft of another
    algorithm is refused in one line."""
    from deepspec.export import export_draft

    same = {
        "model.context_window": 0,
        "model.qk_norm": "true",
        "model.mask_token_id": 3,
        "model.draft_vocab_size": 0,
    }
    same["train.max_train_steps"] = 2
    run_train(opts_for(setup, tmp_path / "a", **same))
    first = tmp_path / "a" / "ck" / "deepspec" / "run" / "step_latest"
    export_draft(str(first), "deepspec-reference", str(tmp_path / "released"))
    run_train(
        opts_for(
            setup,
            tmp_path / "b",
            **same,
            **{"model.init_from_draft": tmp_path / "released", "train.lr": 1e-12},
        )
    )
    start, after = weights(tmp_path / "a"), weights(tmp_path / "b")
    moved = [k for k in start if not torch.allclose(start[k].float(), after[k].float(), atol=1e-6)]
    assert not moved and "markov_head.W2.weight" in start
    proc = run_train(
        opts_for(setup, tmp_path / "c", algo="eagle3", **{"model.init_from_draft": tmp_path / "released"}),
        check=False,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert errors[0].startswith("error: model.init_from_draft=")
    assert errors[0].endswith("is a dspark draft; this run trains eagle3")
