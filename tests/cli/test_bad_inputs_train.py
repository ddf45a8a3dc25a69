"""Bad inputs and faults for ``train.py``: every case runs the real command and expects a
non-zero exit, exactly one ``error:`` line, no traceback, and earlier outputs (the cache,
existing checkpoints) unchanged.

One tiny target, two tiny caches and one finished 4-step run (checkpoints at steps 2 and 4)
are built once per module; each case works on a copy of that run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from deepspec.data.cache_builder import CacheBuildOptions, build_target_cache
from deepspec.train import checkpoint as ckpt
from tests.badinput import (
    assert_one_error,
    assert_unchanged,
    digest_tree,
    rewrite_draft_weights,
    run_cli,
    unwritable_dir,
)
from tests.conftest import ROOT
from tests.helpers import opts_for

CONFIG = "config/dspark/dspark_smollm2_135m.py"
MINI = os.path.join(ROOT, "data", "train_prompts", "mini.jsonl")
RUN = ("ck", "deepspec", "run")


def build_cache(target: str, rows: list[str], out) -> str:
    data = out.with_suffix(".jsonl")
    data.write_text("".join(rows), encoding="utf-8")
    build_target_cache(
        CacheBuildOptions(
            output_dir=str(out),
            train_data_paths=[str(data)],
            target=target,
            layer_ids=[0, 2],
            max_length=256,
            min_loss_tokens=4,
            rows_per_shard=8,
            local_batch_size=4,
            progress=False,
        )
    )
    return str(out)


def opts(base, out, **extra) -> list[str]:
    """The tiny run of ``tests/e2e/test_train.py`` (DSpark, 4 steps, checkpoints every 2), eager."""
    return opts_for(base, out, **{"train.torch_compile": "false", **extra})


def train_args(base, out, **extra) -> list[str]:
    return ["train.py", "--config", CONFIG, "--opts", *opts(base, out, **extra)]


def train(base, out, env=None, **extra) -> subprocess.CompletedProcess:
    return run_cli(train_args(base, out, **extra), env=env)


def run_dir(out):
    return out.joinpath(*RUN)


def losses(out) -> dict[int, float]:
    with open(run_dir(out) / "metrics.jsonl", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"metrics.jsonl repeats steps: {steps}"
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_target):
    """A tiny target, its cache (24 samples), a second cache (20 samples), and a finished
    4-step run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("bad_train")
    target = tiny_target("llama")
    with open(MINI, encoding="utf-8") as fh:
        rows = [line for line in fh if '"assistant"' in line][:24]
    info = {
        "target": target,
        "cache": build_cache(target, rows, root / "cache"),
        "cache2": build_cache(target, rows[:20], root / "cache2"),
        "run": root / "done",
    }
    proc = train(info, info["run"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses(info["run"])) == [1, 2, 3, 4]
    return info


@pytest.fixture
def done(base, tmp_path):
    """A copy of the finished run (resuming it continues from step 4) and the digests of
    everything that must not change: the cache and the checkpoint directories."""
    shutil.copytree(base["run"], tmp_path, symlinks=True, dirs_exist_ok=True)
    steps = [str(run_dir(tmp_path) / "step_2"), str(run_dir(tmp_path) / "step_4")]
    watched = [base["cache"], *steps]
    return tmp_path, watched, digest_tree(*watched)


# -- config values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, fragment",
    [("nan", "finite"), ("-1", "must be > 0"), ("inf", "finite"), ("1e39", "overflow float32")],
)
def test_bad_learning_rate(base, tmp_path, value, fragment):
    proc = train(base, tmp_path, **{"train.lr": value})
    assert_one_error(proc, "train.lr", fragment)
    assert not (tmp_path / "ck").exists()


# -- resuming: what may not change -------------------------------------------------------


def test_resume_refuses_a_different_draft_or_order(base, done):
    out, watched, before = done
    proc = train(
        base,
        out,
        **{"model.num_draft_layers": 2, "model.block_size": 5, "seed": 7, "train.max_train_steps": 6},
    )
    assert_one_error(
        proc,
        "cannot resume",
        "model.num_draft_layers 1 -> 2",
        "model.block_size 4 -> 5",
        "seed 42 -> 7",
        "train.resume=false",
        code=2,
    )
    assert_unchanged(before, *watched)


def test_resume_refuses_a_different_cache(base, done):
    out, watched, before = done
    proc = train(base, out, **{"data.target_cache_path": base["cache2"], "train.max_train_steps": 6})
    assert_one_error(proc, "cannot resume", "number of training samples 24 -> 20", "target cache content")
    assert_unchanged(before, *watched)


def test_resume_refuses_another_world_size_in_one_line(base, done):
    """Both gloo workers meet the problem; the launcher prints it once."""
    out, watched, before = done
    proc = train(base, out, **{"train.num_cpu_workers": 2, "train.max_train_steps": 6})
    assert_one_error(proc, "[rank 0]", "world size 1 -> 2", code=2)
    assert_unchanged(before, *watched)


# -- resuming: damaged or crafted checkpoints ----------------------------------------------


class _RunsCode:
    """Unpickling this calls os.makedirs(path): what a crafted checkpoint could do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_crafted_trainer_state_is_not_unpickled(base, done):
    out, watched, before = done
    marker = out / "code-ran"
    shared = run_dir(out) / "step_4" / ckpt.STATE_DIR / "shared.pt"
    torch.save({"optimizer": _RunsCode(str(marker)), "scheduler": {}}, shared)
    torch.load(shared, weights_only=False)  # the file is live: a full unpickle runs the code
    assert marker.is_dir()
    marker.rmdir()
    watched_now = [p for p in watched if "step_4" not in p]
    before = {k: v for k, v in before.items() if "step_4" not in k}
    proc = train(base, out, **{"train.max_train_steps": 6})
    assert_one_error(proc, "shared.pt", "not loaded", "train.resume=false")
    assert not marker.exists()
    assert_unchanged(before, *watched_now)


def test_truncated_rank_state_is_a_clear_error(base, done):
    out, watched, before = done
    state = run_dir(out) / "step_4" / ckpt.STATE_DIR / "rank0.pt"
    state.write_bytes(state.read_bytes()[:200])
    proc = train(base, out, **{"train.max_train_steps": 6})
    assert_one_error(proc, "rank0.pt", "unreadable", "delete that step directory")
    assert_unchanged(
        {k: v for k, v in before.items() if "step_4" not in k}, *[p for p in watched if "step_4" not in p]
    )


@pytest.mark.parametrize(
    "damage, fragments",
    [
        ("drop", ("does not match", "missing")),
        ("extra", ("does not match", "unexpected")),
        ("nan", ("not finite",)),
    ],
)
def test_checkpoint_weights_must_match_and_be_finite(base, done, damage, fragments):
    out, watched, before = done
    file = run_dir(out) / "step_4" / "model.safetensors"
    weights = load_file(str(file))
    name = next(k for k in sorted(weights) if "layers.0." in k)
    if damage == "drop":
        del weights[name]
    elif damage == "extra":
        weights["layers.9.extra.weight"] = torch.zeros(2)
    else:
        weights[name] = torch.full_like(weights[name], float("nan"))
    rewrite_draft_weights(file.parent, weights)
    proc = train(base, out, **{"train.max_train_steps": 6})
    assert_one_error(proc, "cannot resume", *fragments)
    assert_unchanged(
        {k: v for k, v in before.items() if "step_4" not in k}, *[p for p in watched if "step_4" not in p]
    )


def test_a_second_run_into_a_running_experiment_is_refused(base, done):
    """While a process holds the experiment directory's lock (a running train.py does, for
    its whole life), train.py into the same directory stops in one line naming the holder's
    pid, and neither resumes from nor writes into the live run."""
    from deepspec.utils.locks import LOCK_NAME, exclusive_lock

    out, watched, before = done
    metrics = digest_tree(str(run_dir(out) / "metrics.jsonl"))
    with exclusive_lock(str(run_dir(out) / LOCK_NAME)):
        proc = train(base, out, **{"train.max_train_steps": 6})
    assert_one_error(proc, f"checkpoint directory {run_dir(out)}", f"pid {os.getpid()}", "exp_name")
    assert_unchanged(before, *watched)
    assert_unchanged(metrics, str(run_dir(out) / "metrics.jsonl"))
    assert not (run_dir(out) / "step_6").exists()


# -- output directories ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["logging.checkpoint_root", "logging.tensorboard_root"])
def test_unwritable_output_root_fails_before_training(base, tmp_path, key):
    proc = train(base, tmp_path, **{key: os.path.join(unwritable_dir(tmp_path), "out")})
    assert_one_error(proc, "cannot write", key, code=2)
    assert "train:" not in proc.stderr  # no step started


def test_checkpoint_root_below_a_file(base, tmp_path):
    (tmp_path / "file").write_text("x")
    proc = train(base, tmp_path, **{"logging.checkpoint_root": str(tmp_path / "file" / "ck")})
    assert_one_error(proc, "logging.checkpoint_root", "which is a file, not a directory")
    assert (tmp_path / "file").read_text() == "x"


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(base, done):
    """A file-size limit makes every write past 1 MiB fail (EFBIG), like a full disk."""
    import resource

    out, watched, before = done

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = subprocess.run(
        [sys.executable, *train_args(base, out, **{"train.max_train_steps": 6})],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    line = assert_one_error(proc, "saving step 6 failed", "step_4 is intact", "File too large", "ulimit -f")
    assert f"{run_dir(out)}/.step_6.tmp-" in line  # the file whose write failed
    assert_unchanged(before, *watched)
    assert ckpt.latest_checkpoint(str(run_dir(out))) == str(run_dir(out) / "step_4")
    assert [d for d in os.listdir(run_dir(out)) if ".tmp" in d] == []


# -- divergence ----------------------------------------------------------------------------


def test_nan_loss_names_the_checkpoint_with_bad_weights(base, done):
    """With lr 1e30 the update of step 5 gives weights ~1e29 (finite, saved as step_5) and
    a NaN loss at step 6: step_5 is not good, step_4 is."""
    out, watched, before = done
    proc = train(
        base,
        out,
        **{
            "train.lr": 1e30,
            "train.max_grad_norm": 0,
            "train.max_train_steps": 8,
            "logging.checkpointing_steps": 1,
        },
    )
    root = run_dir(out)
    line = assert_one_error(proc, "non-finite loss", "at step 6", code=2)
    assert f"last good checkpoint: {root / 'step_4'};" in line
    assert f"{root / 'step_5'} holds the weights that gave it" in line
    assert_unchanged(before, *watched)


# -- torch.compile without a working compiler ------------------------------------------------


def test_compile_without_a_compiler_is_one_line(base, tmp_path):
    env = {"CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = train(base, tmp_path, env=env, **{"train.torch_compile": "true"})
    assert_one_error(proc, "torch.compile", "train.torch_compile=false", code=2)


def test_compile_failure_in_spawned_workers_is_one_line(base, tmp_path):
    """A compiler that builds programs but not inductor's shared libraries: the failure
    happens inside torch.compile in both gloo workers; one line is printed."""
    fake = tmp_path / "g++"
    fake.write_text(
        '#!/bin/sh\ncase " $* " in *" -shared "*) echo "fatal error: Python.h: No such file" >&2; exit 1;; esac\n'
        'exec g++ "$@"\n'
    )
    fake.chmod(0o755)
    if shutil.which("g++") is None:
        pytest.skip("no g++ to wrap")
    env = {"CXX": str(fake), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = train(
        base,
        tmp_path,
        env=env,
        **{"train.torch_compile": "true", "train.num_cpu_workers": 2, "train.max_train_steps": 1},
    )
    assert_one_error(proc, "torch.compile failed", "train.torch_compile=false", code=2)


# -- signals and kills -------------------------------------------------------------------------


def _wait_for_step(out, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    metrics = run_dir(out) / "metrics.jsonl"
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        assert proc.poll() is None, _finish(proc).stderr[-3000:]
        if metrics.exists():
            steps = [
                json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.endswith("}")
            ]
            if steps and max(steps) >= step:
                return
        time.sleep(0.1)
    raise TimeoutError(f"step {step} not reached")


def _popen(args, logs, **kwargs) -> subprocess.Popen:
    """Start train.py with stdout/stderr in files (a pipe could fill up and stall it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=open(logs / "out", "w"),
        stderr=open(logs / "err", "w"),
        **kwargs,
    )
    proc.logs = logs
    return proc


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    proc.wait(timeout=300)
    out, err = ((proc.logs / name).read_text() for name in ("out", "err"))
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_saves_and_exits_75(base, done):
    out, watched, before = done
    logs = out / "logs"
    logs.mkdir()
    proc = _popen(
        train_args(base, out, **{"train.max_train_steps": 200, "logging.checkpointing_steps": 1000}), logs
    )
    _wait_for_step(out, 5, proc)
    proc.send_signal(signal.SIGINT)
    result = _finish(proc)
    line = assert_one_error(result, "stopped by SIGINT", "rerun the same command to resume", code=75)
    latest = ckpt.latest_checkpoint(str(run_dir(out)))
    assert ckpt.load_meta(latest)["step"] >= 5 and latest in line
    assert_unchanged(before, *watched)


def test_a_second_ctrl_c_aborts_at_once(base, done):
    """The first Ctrl-C asks for a save after the step; a second one stops in the step:
    exit 130, nothing half-written, the earlier checkpoints as they were."""
    out, watched, before = done
    logs = out / "logs"
    logs.mkdir()
    proc = _popen(
        train_args(base, out, **{"train.max_train_steps": 200, "logging.checkpointing_steps": 1000}), logs
    )
    _wait_for_step(out, 5, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    result = _finish(proc)
    assert result.returncode == 130, result.stderr[-3000:]
    assert "interrupted" in result.stderr and "Traceback" not in result.stderr
    assert_unchanged(before, *watched)
    assert ckpt.latest_checkpoint(str(run_dir(out))) == str(run_dir(out) / "step_4")
    assert [d for d in os.listdir(run_dir(out)) if ".tmp" in d] == []


def test_ctrl_c_to_two_workers_saves_and_exits_75(base, tmp_path):
    """Ctrl-C reaches the launcher and both workers (one process group): they save once."""
    proc = _popen(
        train_args(
            base,
            tmp_path,
            **{"train.max_train_steps": 200, "train.num_cpu_workers": 2, "logging.checkpointing_steps": 1000},
        ),
        tmp_path,
        start_new_session=True,
    )
    _wait_for_step(tmp_path, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    result = _finish(proc)
    line = assert_one_error(result, "stopped by SIGINT", "rerun the same command to resume", code=75)
    latest = ckpt.latest_checkpoint(str(run_dir(tmp_path)))
    assert latest is not None and latest in line, (line, result.stdout[-2000:])
    assert os.path.isfile(os.path.join(latest, ckpt.STATE_DIR, "rank1.pt"))


KILL_IN_SAVE = r"""
import os, runpy, sys, time
from deepspec.train import checkpoint as ckpt

real = ckpt.atomic_write_json

def slow(path, obj):  # inside finish_save: model and shared state written, meta and COMPLETE not
    if path.endswith("meta.json") and obj.get("step") == int(os.environ["KILL_AT_STEP"]):
        open(os.environ["SAVE_MARKER"], "w").close()
        time.sleep(120)
    return real(path, obj)

ckpt.atomic_write_json = slow
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_sigkill_inside_a_save_then_resume_equals_a_clean_run(base, tmp_path):
    marker = tmp_path / "saving"
    args = train_args(base, tmp_path, **{"logging.checkpointing_steps": 1})
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_IN_SAVE, *args[1:]],
        cwd=ROOT,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "KILL_AT_STEP": "3", "SAVE_MARKER": str(marker)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    start = time.monotonic()
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - start < 240
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    root = run_dir(tmp_path)
    assert any(name.startswith(".step_3.tmp-") for name in os.listdir(root))  # killed mid-save
    assert ckpt.latest_checkpoint(str(root)) == str(root / "step_2")

    resumed = train(base, tmp_path, **{"logging.checkpointing_steps": 1})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {root / 'step_2'} at step 2" in resumed.stdout
    assert [d for d in os.listdir(root) if ".tmp" in d] == []
    clean, again = losses(base["run"]), losses(tmp_path)  # also: no step logged twice
    assert sorted(again) == [1, 2, 3, 4]
    for step in clean:
        assert again[step] == pytest.approx(clean[step], rel=1e-6, abs=1e-6), step
    wa = load_file(str(run_dir(base["run"]) / "step_4" / "model.safetensors"))
    wb = load_file(str(root / "step_4" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-6)
