"""deepspec deletes or replaces only what it wrote itself, and checks what it reads against
what produced it: export ``--out`` paths, locks on experiment directories, drafts tied to
their weights and target, calibration rounds tied to their draft, and write errors that
name their file. Every case runs the real entry point in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.badinput import assert_one_error, assert_unchanged, digest_tree, run_cli
from tests.conftest import ROOT

EXPORT = ["-m", "deepspec.export"]


@pytest.fixture(scope="module")
def drafts(tmp_path_factory, tiny_target):
    """A tiny target, a second target of the same family with other weights, and a DSpark
    draft of the first saved by deepspec's own writer."""
    from safetensors.torch import load_file, save_file

    from deepspec.drafts import save_draft
    from tests.conftest import tiny_dspark

    root = tmp_path_factory.mktemp("outputs")
    target = tiny_target("llama")
    other = str(root / "other_target")
    shutil.copytree(target, other)
    weights = next(os.path.join(other, f) for f in os.listdir(other) if f.endswith(".safetensors"))
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    draft = str(root / "draft")
    save_draft(tiny_dspark(target, opts=("model.qk_norm=true",)), draft)  # as the engines need
    return {"root": root, "target": target, "other": other, "draft": draft}


def _sentinel(directory) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "keep_me.txt")
    with open(path, "w") as fh:
        fh.write("the user's file\n")
    return path


# -- export --out ------------------------------------------------------------------------


def test_export_out_is_the_draft(drafts):
    before = digest_tree(drafts["draft"])
    proc = run_cli([*EXPORT, drafts["draft"], "--to", "vllm", "--out", drafts["draft"]])
    assert_one_error(proc, "--out", "contains", "which this command reads")
    assert_unchanged(before, drafts["draft"])


def test_export_out_is_the_drafts_parent(drafts, tmp_path):
    parent = tmp_path / "runs"
    draft = shutil.copytree(drafts["draft"], parent / "step_4")
    keep = _sentinel(parent)
    before = digest_tree(str(parent))
    proc = run_cli([*EXPORT, str(draft), "--to", "vllm", "--out", str(parent)])
    assert_one_error(proc, "--out", "contains", "which this command reads")
    assert_unchanged(before, str(parent))
    assert os.path.isfile(keep)


def test_export_out_is_a_directory_of_the_users(drafts, tmp_path):
    mine = tmp_path / "my_files"
    keep = _sentinel(mine)
    before = digest_tree(str(mine))
    proc = run_cli([*EXPORT, drafts["draft"], "--to", "vllm", "--out", str(mine)])
    assert_one_error(proc, str(mine), "already exists and is not an earlier deepspec export")
    assert_unchanged(before, str(mine))
    assert os.path.isfile(keep)


@pytest.mark.parametrize("out", [".", "", "..", "sub/.."])
def test_export_out_holding_the_working_directory(drafts, tmp_path, out):
    cwd = tmp_path / "work"
    keep = _sentinel(cwd)
    os.makedirs(cwd / "sub", exist_ok=True)
    before = digest_tree(str(tmp_path))
    proc = run_cli([*EXPORT, drafts["draft"], "--to", "vllm", "--out", out], cwd=str(cwd))
    assert_one_error(proc, "--out", "empty" if out == "" else "contains the working directory")
    assert_unchanged(before, str(tmp_path))
    assert os.path.isfile(keep)


def test_export_replaces_only_an_earlier_export_or_an_empty_directory(drafts, tmp_path):
    """The allowed cases work: an empty directory, then the export itself again; killed
    exports' leftovers are removed, a live export's temporary directory is not."""
    from deepspec.utils.locks import hold_directory

    out = tmp_path / "export"
    out.mkdir()
    dead = tmp_path / ".export.deepspec-tmp-killed"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"\0" * 4096)
    live = tmp_path / ".export.deepspec-tmp-live"
    live.mkdir()
    fd = hold_directory(str(live))
    try:
        for _ in range(2):
            proc = run_cli([*EXPORT, drafts["draft"], "--to", "vllm", "--out", str(out)])
            assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        os.close(fd)
    manifest = json.loads((out / "deepspec_export.json").read_text())
    assert manifest["format"] == "vllm" and manifest["source_checksum"].startswith("xxh3-128:")
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.deepspec-tmp-live", "export"]
    modes = {f: os.stat(out / f).st_mode & 0o777 for f in os.listdir(out)}
    assert len(set(modes.values())) == 1, modes  # weights as readable as the config


def test_export_write_error_names_the_file_and_leaves_nothing(drafts, tmp_path):
    """A file-size limit (``ulimit -f``) stops the weights' write: one line naming the file
    being written and the fix; no temporary directory is left."""
    import resource

    out = tmp_path / "export"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    proc = subprocess.run(
        [sys.executable, *EXPORT, drafts["draft"], "--to", "vllm", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=limit,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        timeout=300,
    )
    line = assert_one_error(proc, "File too large", "model.safetensors", "ulimit -f")
    assert str(tmp_path) in line
    assert os.listdir(tmp_path) == []


# -- what an export and an evaluation read -------------------------------------------------


def _flipped(drafts, tmp_path) -> str:
    copy = str(shutil.copytree(drafts["draft"], tmp_path / "flipped"))
    weights = os.path.join(copy, "model.safetensors")
    with open(weights, "r+b") as fh:
        fh.seek(os.path.getsize(weights) - 7)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x10]))
    return copy


def test_flipped_weight_bytes_are_refused_by_export_and_eval(drafts, tmp_path):
    copy = _flipped(drafts, tmp_path)
    before = digest_tree(copy)
    out = tmp_path / "out"
    proc = run_cli([*EXPORT, copy, "--to", "vllm", "--out", str(out)])
    assert_one_error(proc, copy, "does not match the weights_checksum", "copy the checkpoint again")
    assert not out.exists()
    proc = run_cli(
        ["eval.py", "--target_name_or_path", drafts["target"], "--draft_name_or_path", copy]
        + ["--tasks", "gsm8k", "--max-samples", "1", "--max-new-tokens", "2", "--no-baseline"]
    )
    assert_one_error(proc, "does not match the weights_checksum")
    assert_unchanged(before, copy)


def test_export_refuses_another_target_unless_asked(drafts, tmp_path):
    out = tmp_path / "spec"
    cli = [*EXPORT, drafts["draft"], "--to", "speculators", "--out", str(out), "--target", drafts["other"]]
    assert_one_error(run_cli(cli), "trained for another target", "--allow-other-target")
    assert not out.exists()
    proc = run_cli([*cli, "--allow-other-target"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == drafts["other"]


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (
            ["--to", "speculators", "--target", "./no/such/target"],
            ["--target ./no/such/target", "does not exist"],
        ),
        (["--to", "vllm", "--outtype", "bf16"], ["--outtype applies to --to llamacpp only"]),
        (["--to", "sglang", "--target", "x"], ["--target is read by --to llamacpp and speculators only"]),
    ],
)
def test_export_refuses_options_it_would_ignore_or_cannot_check(drafts, tmp_path, extra, fragments):
    out = tmp_path / "out"
    assert_one_error(run_cli([*EXPORT, drafts["draft"], *extra, "--out", str(out)]), *fragments)
    assert not out.exists()


def test_eval_refuses_another_target_of_the_same_family(drafts):
    cli = ["eval.py", "--target_name_or_path", drafts["other"], "--draft_name_or_path", drafts["draft"]]
    cli += ["--tasks", "gsm8k", "--max-samples", "1", "--max-new-tokens", "2", "--no-baseline"]
    assert_one_error(run_cli(cli), "trained for another target", "--allow-other-target")
    proc = run_cli([*cli, "--allow-other-target"])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_eval_output_dir_holding_files_eval_did_not_write(drafts, tmp_path):
    mine = tmp_path / "project"
    keep = _sentinel(mine)
    (mine / "results.json").write_text('{"my": "numbers"}\n')
    before = digest_tree(str(mine))
    cli = ["eval.py", "--target_name_or_path", drafts["target"], "--draft_name_or_path", drafts["draft"]]
    cli += ["--tasks", "gsm8k", "--max-samples", "1", "--max-new-tokens", "2", "--output-dir", str(mine)]
    assert_one_error(run_cli(cli), str(mine), "holds results.json that eval.py did not write")
    assert_unchanged(before, str(mine))
    assert os.path.isfile(keep)


# -- calibration rounds ------------------------------------------------------------------------


def _fake_run(directory, drafts, **config) -> str:
    """An eval output directory with one recorded round per sample, as eval.py writes it."""
    import hashlib

    from deepspec.data.fingerprint import target_fingerprint
    from deepspec.drafts.checkpoint import draft_fingerprint

    os.makedirs(directory, exist_ok=True)
    rows = [
        {
            "dataset": "gsm8k",
            "index": i,
            "confidence_per_round": [[0.9, 0.5, 0.2]] * 30,
            "proposed_per_round": [3] * 30,
            "accepted_per_round": [i % 4] * 30,
        }
        for i in range(4)
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(directory, "samples.jsonl"), "w") as fh:
        fh.write(text)
    base = {
        "draft": drafts["draft"],
        "draft_checksum": draft_fingerprint(drafts["draft"]),
        "target": drafts["target"],
        "target_fingerprint": target_fingerprint(drafts["target"]),
        "temperature": 0.0,
        "policy": "fixed",
        "split": "calibration",
        "confidence_temperatures": None,
    }
    results = {"config": {**base, **config}, "samples_sha256": hashlib.sha256(text.encode()).hexdigest()}
    with open(os.path.join(directory, "results.json"), "w") as fh:
        json.dump(results, fh)
    return str(directory)


@pytest.mark.parametrize(
    ("config", "fragments"),
    [
        ({"draft_checksum": "xxh3-128:0"}, ["decoded by another draft"]),
        ({"draft_checksum": None}, ["records no draft fingerprint"]),
        ({"target_fingerprint": "xxh3-128:0"}, ["verified by another target", "the draft's own target"]),
        ({"temperature": 1.0}, ["decoded at temperature 1.0", "--temperature 0"]),
        ({"split": "report"}, ["decoded the report split", "--split calibration"]),
        ({"policy": "threshold"}, ["--policy threshold", "--policy fixed"]),
        ({"policy": "cumulative"}, ["--policy cumulative", "--policy fixed"]),
    ],
)
def test_calibration_refuses_rounds_it_cannot_vouch_for(drafts, tmp_path, config, fragments):
    run = _fake_run(tmp_path / "run", drafts, **config)
    before = digest_tree(drafts["draft"], run)
    proc = run_cli(["-m", "deepspec.eval.calibration", "--rounds", run, "--draft", drafts["draft"]])
    assert_one_error(proc, *fragments)
    assert_unchanged(before, drafts["draft"], run)


def test_calibration_refuses_samples_that_do_not_match_their_results(drafts, tmp_path):
    run = _fake_run(tmp_path / "run", drafts)
    with open(os.path.join(run, "samples.jsonl"), "a") as fh:
        fh.write(json.dumps({"dataset": "gsm8k", "index": 9}) + "\n")
    proc = run_cli(["-m", "deepspec.eval.calibration", "--rounds", run, "--draft", drafts["draft"]])
    assert_one_error(proc, "the calibration run", "samples.jsonl does not belong to results.json")


def test_calibration_checks_the_held_out_run_and_fits_from_good_rounds(drafts, tmp_path):
    run = _fake_run(tmp_path / "run", drafts)
    held = _fake_run(tmp_path / "held", drafts)  # the calibration split: not held out
    draft = str(shutil.copytree(drafts["draft"], tmp_path / "draft"))
    cli = ["-m", "deepspec.eval.calibration", "--rounds", run, "--draft", draft]
    assert_one_error(run_cli([*cli, "--heldout", held]), "held-out run", "decoded the calibration split")
    assert not os.path.exists(os.path.join(draft, "confidence_calibration.json"))
    proc = run_cli(cli)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(os.path.join(draft, "confidence_calibration.json"))


def test_calibration_into_a_read_only_draft_says_what_to_do(tmp_path):
    """Checked before any fit: the one line names the draft, the file and the ways out
    (there is no output option to advise)."""
    from deepspec.errors import EnvironmentProblem
    from deepspec.eval.calibration import check_draft_writable
    from tests.badinput import unwritable_dir

    locked = unwritable_dir(tmp_path)
    with pytest.raises(EnvironmentProblem) as info:
        check_draft_writable(locked)
    message = str(info.value)
    assert locked in message and "cannot write in" in message and "confidence_calibration.json" in message
    assert "--dry-run" in message and "copy the draft" in message and "\n" not in message


# -- swaps and replaceable directories, in-process -------------------------------------------


def test_a_swap_killed_half_way_is_undone_by_the_next_run(tmp_path):
    """A replace killed between moving the old output aside and renaming the new one in
    leaves the old one in an abandoned temporary directory: it is put back, not deleted."""
    from deepspec.utils.locks import remove_abandoned

    old = tmp_path / ".out.deepspec-tmp-killed" / "old"
    old.mkdir(parents=True)
    (old / "deepspec_export.json").write_text("{}\n")
    half = tmp_path / ".out.deepspec-tmp-half"  # the new one, never renamed in
    half.mkdir()
    removed = remove_abandoned(str(tmp_path), ".out.deepspec-tmp-", restore_to=str(tmp_path / "out"))
    assert len(removed) == 2
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert (tmp_path / "out" / "deepspec_export.json").read_text() == "{}\n"


def test_save_pretrained_never_replaces_a_training_step(drafts, tmp_path):
    """A step directory holds the resumable trainer state next to the draft: it is not a
    plain draft checkpoint, so save_pretrained refuses it (and replaces a plain one)."""
    from deepspec.drafts import load_draft
    from deepspec.errors import ConfigError

    step = shutil.copytree(drafts["draft"], tmp_path / "step_4")
    (step / "COMPLETE").write_text("4\n")
    (step / "trainer_state").mkdir()
    before = digest_tree(str(step))
    model = load_draft(str(step))
    with pytest.raises(ConfigError, match="already exists and is not a draft checkpoint"):
        model.save_pretrained(str(step))
    assert_unchanged(before, str(step))
    plain = shutil.copytree(drafts["draft"], tmp_path / "plain")
    model.save_pretrained(str(plain))
    saved = json.loads((plain / "config.json").read_text())
    assert saved["target_fingerprint"] == json.loads((step / "config.json").read_text())["target_fingerprint"]


def test_a_file_system_without_flock_warns_and_goes_on(tmp_path, monkeypatch):
    """Lustre mounted noflock or NFS without a lock daemon answer flock with ENOLCK/ENOSYS:
    the run goes on without a lock (and says so) instead of refusing to work there."""
    import errno
    import fcntl

    from deepspec.utils.locks import directory_lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    ran = []
    with pytest.warns(UserWarning, match="does not support locks"):
        with directory_lock(str(tmp_path / "run"), "checkpoint directory", "fix"):
            ran.append(True)
    assert ran == [True] and not (tmp_path / "run").exists()
