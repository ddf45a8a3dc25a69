"""Bad inputs to evaluation, target and config loading: every case runs the real entry point
(``eval.py``, ``python -m deepspec.targets``, ``python -m deepspec.eval.report``,
``train.py --config``) and must end with a non-zero exit, exactly one ``error:`` line, no
traceback, and its inputs and earlier outputs unchanged."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.badinput import (
    assert_one_error,
    assert_unchanged,
    digest_tree,
    rewrite_draft_weights,
    run_cli,
    unwritable_dir,
)
from tests.conftest import ROOT

DATASETS = os.path.join(ROOT, "eval_datasets")


def _truncate(path: str, keep: float = 0.5) -> None:
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_target):
    """A tiny target, a tiny DSpark draft saved by the project's own writer, and one real
    eval.py output directory (the 'earlier output' later cases must not touch)."""
    from deepspec.drafts import save_draft
    from tests.conftest import tiny_dspark

    root = tmp_path_factory.mktemp("bad_eval")
    target = tiny_target("llama")
    draft = str(root / "draft")
    save_draft(tiny_dspark(target), draft)
    earlier = str(root / "earlier")
    proc = run_cli(
        [
            "eval.py",
            "--target_name_or_path",
            target,
            "--draft_name_or_path",
            draft,
            "--tasks",
            "gsm8k",
            "--max-samples",
            "1",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
            "--eval-datasets-dir",
            DATASETS,
            "--output-dir",
            earlier,
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(os.path.join(earlier, "results.json"))
    return {"root": root, "target": target, "draft": draft, "earlier": earlier}


def _copy(world, name: str, what: str = "draft") -> str:
    dest = str(world["root"] / name)
    if not os.path.exists(dest):
        shutil.copytree(world[what], dest)
    return dest


def _eval(world, *extra: str, target: str | None = None, draft: str | None = None, output: bool = True):
    args = [
        "eval.py",
        "--target_name_or_path",
        target or world["target"],
        "--draft_name_or_path",
        draft or world["draft"],
        "--tasks",
        "gsm8k",
        "--max-samples",
        "1",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        "--eval-datasets-dir",
        DATASETS,
    ]
    if output:
        args += ["--output-dir", world["earlier"]]  # a failing run must leave it as it was
    return run_cli([*args, *extra])


# ---- eval.py: damaged drafts and targets ------------------------------------------------------


@pytest.mark.parametrize(
    "side, damaged, fragments",
    [
        ("draft", "model.safetensors", ["model.safetensors", "truncated", "copy the checkpoint again"]),
        ("draft", "config.json", ["config.json", "not valid JSON", "copy it again"]),
        ("target", "model.safetensors", ["model.safetensors", "truncated", "download or convert the target"]),
        ("target", "config.json", ["config.json", "not valid JSON", "download or convert the target"]),
    ],
)
def test_eval_truncated_checkpoint_files(world, side, damaged, fragments):
    copy = _copy(world, f"{side}_{damaged}", side)
    _truncate(os.path.join(copy, damaged))
    before = digest_tree(copy, world["earlier"])
    proc = _eval(world, **{side: copy})
    line = assert_one_error(proc, *fragments, code=2)
    assert os.path.join(copy, damaged) in line
    assert_unchanged(before, copy, world["earlier"])


def test_eval_missing_draft_path_says_it_does_not_exist(world):
    missing = str(world["root"] / "no_such_checkpoint")
    assert_one_error(_eval(world, draft=missing), missing, "does not exist")
    assert not os.path.exists(missing)


def test_eval_diverged_draft_is_refused_at_load(world):
    from safetensors.torch import load_file

    copy = _copy(world, "diverged")
    weights = os.path.join(copy, "model.safetensors")
    state = load_file(weights)
    state["fc.weight"][0, 0] = float("nan")
    rewrite_draft_weights(copy, state)
    before = digest_tree(copy, world["earlier"])
    assert_one_error(
        _eval(world, draft=copy),
        copy,
        "weights are not finite (the training diverged); use an earlier checkpoint",
        "fc.weight",
    )
    assert_unchanged(before, copy, world["earlier"])


def test_eval_overflowing_draft_stops_every_worker_with_one_line(world):
    """Finite weights whose scores overflow pass the load check; at run time the decode stops
    with one NumericalError line, also when it happens inside a spawned worker."""
    from safetensors.torch import load_file

    copy = _copy(world, "overflow")
    weights = os.path.join(copy, "model.safetensors")
    state = load_file(weights)
    state["norm.weight"].fill_(3e38)
    rewrite_draft_weights(copy, state)
    before = digest_tree(copy, world["earlier"])
    assert_one_error(
        _eval(world, "--num-workers", "2", "--max-samples", "2", draft=copy),
        "[rank ",
        "non-finite scores (its training diverged); use an earlier checkpoint",
    )
    assert_unchanged(before, copy, world["earlier"])


# ---- eval.py: arguments -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value, fragment",
    [
        ("--temperature", "nan", "--temperature must be a finite number >= 0"),
        ("--temperature", "inf", "--temperature must be a finite number >= 0"),
        ("--temperature", "-0.5", "--temperature must be a finite number >= 0"),
        ("--max-new-tokens", "0", "--max-new-tokens must be a finite number >= 1"),
        ("--max-samples", "-2", "--max-samples must be a finite number >= 1"),
        ("--confidence-threshold", "1.5", "--confidence-threshold must be a finite number >= 0 and <= 1"),
        ("--confidence-threshold", "nan", "--confidence-threshold must be a finite number"),
        ("--survival-threshold", "-0.1", "--survival-threshold must be a finite number >= 0 and <= 1"),
        ("--seed", "-1", "--seed must be an integer in 0..4294967295"),
        ("--num-workers", "0", "--num-workers must be a finite number >= 1"),
        ("--batch-size", "0", "--batch-size must be a finite number >= 1"),
        ("--policy", "greedy", "invalid choice: 'greedy'"),
        ("--split", "train", "invalid choice: 'train'"),
        ("--max-new-tokens", "ten", "invalid int value: 'ten'"),
        ("--dtype", "fp8", "invalid choice: 'fp8'"),
    ],
)
def test_eval_numeric_arguments(world, flag, value, fragment):
    before = digest_tree(world["earlier"])
    assert_one_error(_eval(world, flag, value), fragment, code=2)
    assert_unchanged(before, world["earlier"])


@pytest.mark.parametrize(
    "tasks, fragment",
    [
        (",", "names no task"),
        ("", "names no task"),
        ("gsm8k,nope", "unknown task(s) nope"),
        ("gsm8k,gsm8k", "more than once"),
    ],
)
def test_eval_task_list(world, tasks, fragment):
    line = assert_one_error(_eval(world, "--tasks", tasks), fragment)
    if "task(s)" in fragment or "no task" in fragment:
        assert "gsm8k" in line and "mt-bench" in line  # the valid tasks are listed


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--policy", "scheduled"], "--policy scheduled needs --sps-table"),
        (["--policy", "threshold"], "--policy threshold needs --confidence-threshold > 0"),
        (["--policy", "fixed", "--confidence-threshold", "0.5"], "applies to --policy threshold, not fixed"),
        (["--policy", "cumulative"], "--policy cumulative needs --survival-threshold > 0"),
        (
            ["--policy", "threshold", "--confidence-threshold", "0.5", "--survival-threshold", "0.5"],
            "--survival-threshold applies to --policy cumulative, not threshold",
        ),
        (
            ["--confidence-threshold", "0.5", "--survival-threshold", "0.5"],
            "pass only one of --confidence-threshold",
        ),
        (["--sps-table", "table.json"], "--sps-table is read by --policy scheduled only"),
        (["--policy", "scheduled", "--sps-table", "missing.json"], "SPS table missing.json is unreadable"),
        (["--split", "calibration", "--max-samples", "1000"], "would overlap the reported ones"),
    ],
)
def test_eval_policy_and_split_arguments(world, args, fragment):
    """Verification policy, SPS table and prompt split: refused before any model loads."""
    before = digest_tree(world["earlier"])
    assert_one_error(_eval(world, *args), fragment, code=2)
    assert_unchanged(before, world["earlier"])


def test_calibration_cli_and_file_errors(world, tmp_path):
    """``python -m deepspec.eval.calibration`` on a missing run, and damaged calibration files
    next to a draft: one line each, the draft untouched."""
    from deepspec.drafts import load_draft
    from deepspec.drafts.checkpoint import CALIBRATION_NAME
    from deepspec.errors import DataError

    draft = _copy(world, "calibrated")
    before = digest_tree(draft)
    cli = ["-m", "deepspec.eval.calibration", "--draft", draft]
    assert_one_error(
        run_cli([*cli, "--rounds", str(tmp_path / "none")]), "the calibration run", "is not a directory"
    )
    assert_one_error(
        run_cli([*cli[:-2], "--draft", str(tmp_path / "none"), "--rounds", world["earlier"]]),
        "is not a draft checkpoint directory",
    )
    assert_unchanged(before, draft)
    for text, fragment in (
        ("{", "not valid JSON"),
        ('{"temperatures": [1.0, -2, 1.0]}', "non-empty list of numbers > 0"),
        ('{"temperatures": [1.0, 2.0]}', "holds 2 temperatures for a block of 3"),
    ):
        with open(os.path.join(draft, CALIBRATION_NAME), "w") as fh:
            fh.write(text)
        with pytest.raises(DataError) as info:
            load_draft(draft)
        assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)
    os.remove(os.path.join(draft, CALIBRATION_NAME))


def test_eval_output_dir_that_is_a_file_or_under_one(world):
    blocker = world["root"] / "a_file"
    blocker.write_text("keep me\n")
    before = digest_tree(str(blocker))
    assert_one_error(_eval(world, "--output-dir", str(blocker), output=False), "is a file", str(blocker))
    assert_one_error(
        _eval(world, "--output-dir", str(blocker / "sub"), output=False), "lies under", "which is a file"
    )
    assert_unchanged(before, str(blocker))


def test_eval_output_dir_read_only(world, tmp_path):
    out = os.path.join(unwritable_dir(tmp_path), "out")
    assert_one_error(_eval(world, "--output-dir", out, output=False), "cannot write in")
    assert not os.path.exists(out)


def test_eval_baseline_from_missing_torn_and_foreign(world):
    missing = str(world["root"] / "no_run")
    assert_one_error(
        _eval(world, "--baseline-from", missing, output=False), "--baseline-from", "not a directory"
    )

    torn = _copy(world, "torn_run", "earlier")
    _truncate(os.path.join(torn, "results.json"), 0.4)
    before = digest_tree(torn, world["earlier"])
    assert_one_error(_eval(world, "--baseline-from", torn), "unreadable results", "run eval.py --output-dir")
    assert_unchanged(before, torn, world["earlier"])

    # valid JSON rows that were not written with this results.json (an interrupted write)
    foreign = _copy(world, "foreign_run", "earlier")
    samples = os.path.join(foreign, "samples.jsonl")
    rows = [json.loads(line) for line in open(samples, encoding="utf-8")]
    rows[0]["baseline_seconds"] += 1.0
    with open(samples, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    assert_one_error(
        _eval(world, "--baseline-from", foreign), "samples.jsonl does not belong to results.json"
    )

    assert_one_error(_eval(world, "--baseline-from", world["earlier"], "--no-baseline"), "only one of them")


# ---- python -m deepspec.targets -------------------------------------------------------------


def test_targets_cli_bad_inputs(world):
    missing = str(world["root"] / "no_target")
    assert_one_error(run_cli(["-m", "deepspec.targets", "spec", missing]), missing, "does not exist")
    copy = _copy(world, "target_spec_torn", "target")
    _truncate(os.path.join(copy, "config.json"))
    before = digest_tree(copy)
    assert_one_error(run_cli(["-m", "deepspec.targets", "spec", copy]), "config.json", "not valid JSON")
    assert_unchanged(before, copy)
    assert_one_error(
        run_cli(["-m", "deepspec.targets", "resolve", "embedded:nope"]),
        "unknown embedded target 'nope'",
        "embedded:smollm2-135m-instruct",
    )
    assert_one_error(run_cli(["-m", "deepspec.targets", "resolve", "just-a-name"]), "not found")
    assert_one_error(run_cli(["-m", "deepspec.targets", "bogus"]), "invalid choice: 'bogus'")
    assert_one_error(
        run_cli(["-m", "deepspec.targets", "chat", world["target"], "hi", "--max-new-tokens", "0"]),
        "--max-new-tokens must be a finite number >= 1",
    )


# ---- python -m deepspec.eval.report ----------------------------------------------------------


def test_report_cli_bad_inputs(world):
    out = world["root"] / "report"
    report = ["-m", "deepspec.eval.report", "--out", str(out)]
    missing = str(world["root"] / "no_run")
    assert_one_error(run_cli([*report, "--run", f"a@1.0={missing}"]), missing, "does not exist")
    torn = _copy(world, "report_torn", "earlier")
    _truncate(os.path.join(torn, "results.json"), 0.4)
    before = digest_tree(torn, world["earlier"])
    assert_one_error(
        run_cli([*report, "--run", f"good@0={world['earlier']}", "--run", f"torn@0={torn}"]),
        "results.json",
        "not valid JSON",
    )
    assert not out.exists()  # a bad run leaves no half-written report
    assert_unchanged(before, torn, world["earlier"])
    assert_one_error(
        run_cli([*report, "--run", f"a1.0={world['earlier']}"]), "expected LABEL@TEMPERATURE=DIR"
    )
    assert_one_error(run_cli([*report, "--run", f"a@nan={world['earlier']}"]), "finite number")
    assert_one_error(run_cli([*report, "--run", f"../up@1={world['earlier']}"]), "label '../up'")
    blocker = world["root"] / "report_file"
    blocker.write_text("x\n")
    assert_one_error(
        run_cli(["-m", "deepspec.eval.report", "--out", str(blocker), "--run", f"a@0={world['earlier']}"]),
        "--out",
        "is a file",
    )
    assert blocker.read_text() == "x\n"
    assert_one_error(run_cli(["-m", "deepspec.eval.report", "--out", str(out)]), "required: --run")


# ---- train.py --config ------------------------------------------------------------------------


CONFIGS = [
    (
        "syntax.yaml",
        "algorithm: dspark\nmodel:\n  target_layer_ids: [1, 2\ntrain:\n  lr: 1.0e-3\n",
        ["syntax.yaml:4:", "invalid YAML", "flow sequence started at line 3"],
    ),
    (
        "dup.yaml",
        "train:\n  lr: 1.0e-3\n  weight_decay: 0.1\n  lr: 2.0e-3\n",
        ["dup.yaml:4:3", "duplicate key 'lr'", "first given on line 2"],
    ),
    ("unknown.yaml", "model:\n  blok_size: 3\n", ["model.blok_size", "unknown key", "model.block_size"]),
    ("type.yaml", "model:\n  block_size: seven\n", ["model.block_size", "expected an integer"]),
    ("nan.yaml", "train:\n  lr: .nan\n", ["train.lr", "finite"]),
    (
        "negative.yaml",
        "train:\n  lr: -1.0e-4\n  weight_decay: -0.1\n",
        ["train.lr", "must be > 0", "train.weight_decay", "must be >= 0"],
    ),
    ("beta.yaml", "train:\n  adam_beta2: 1.0\n", ["train.adam_beta2", "must be < 1"]),
    (
        "syntax.py",
        "algorithm = 'dspark'\nmodel = dict(\n    block_size=3,,\n)\n",
        ["syntax.py:3:", "invalid Python"],
    ),
    (
        "raises.py",
        "algorithm = 'dspark'\nimport math\nseed = math.sqrt(-1)\n",
        ["raises.py:3", "ValueError", "math domain error"],
    ),
    ("config.toml", "algorithm = 'dspark'\n", ["unsupported extension '.toml'"]),
]


@pytest.mark.parametrize("name, text, fragments", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_train_config_errors_stop_before_any_work(tmp_path, name, text, fragments):
    config = tmp_path / name
    config.write_text(text)
    home = tmp_path / "home"
    home.mkdir()
    before = digest_tree(str(tmp_path))
    proc = run_cli(["train.py", "--config", str(config)], env={"HOME": str(home)}, timeout=120)
    assert_one_error(proc, *fragments, code=2)
    assert_unchanged(before, str(tmp_path))
    assert os.listdir(home) == []  # no checkpoint or TensorBoard directory was made


def test_train_missing_config_file(tmp_path):
    missing = str(tmp_path / "missing.yaml")
    assert_one_error(run_cli(["train.py", "--config", missing]), "config file not found", missing)
    assert_one_error(run_cli(["train.py", "--config", str(tmp_path)]), "is a directory")


# ---- in-process: the loaders behind the commands --------------------------------------------


def test_load_draft_errors_are_one_line(world, tmp_path):
    """``load_draft`` itself (also used by benchmarks and tests): each problem is one
    DataError line naming the path."""
    from safetensors.torch import load_file

    from deepspec.drafts import load_draft
    from deepspec.errors import DataError

    assert load_draft(world["draft"]).algorithm == "dspark"
    cases = {}
    cases["missing"] = (str(tmp_path / "missing"), "does not exist")
    (tmp_path / "file").write_text("x")
    cases["file"] = (str(tmp_path / "file"), "is a file, not a directory")
    (tmp_path / "empty").mkdir()
    cases["empty"] = (str(tmp_path / "empty"), "has no config.json")
    nodata = shutil.copytree(world["draft"], tmp_path / "noweights")
    os.remove(nodata / "model.safetensors")
    cases["noweights"] = (str(nodata), "has no model.safetensors")
    shape = shutil.copytree(world["draft"], tmp_path / "shape")
    state = load_file(shape / "model.safetensors")
    state["fc.weight"] = state["fc.weight"][:, :5].contiguous()
    rewrite_draft_weights(shape, state)
    cases["shape"] = (str(shape), "does not match its config.json")
    inf = shutil.copytree(world["draft"], tmp_path / "inf")
    state = load_file(inf / "model.safetensors")
    state["norm.weight"][0] = float("inf")
    rewrite_draft_weights(inf, state)
    cases["inf"] = (str(inf), "weights are not finite (the training diverged)")
    fields = shutil.copytree(world["draft"], tmp_path / "fields")
    raw = json.loads((fields / "config.json").read_text())
    del raw["target"]
    (fields / "config.json").write_text(json.dumps(raw))
    cases["fields"] = (str(fields), "is not a draft config")
    for name, (path, fragment) in cases.items():
        with pytest.raises(DataError) as info:
            load_draft(path)
        assert fragment in str(info.value) and "\n" not in str(info.value), (name, str(info.value))


def test_output_dir_probe_reports_a_read_only_file_system(tmp_path, monkeypatch):
    """The read-only branch, without needing a read-only mount (root ignores permissions)."""
    import errno
    import tempfile

    from deepspec.errors import EnvironmentProblem
    from deepspec.eval.settings import check_output_dir

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(
        EnvironmentProblem, match=r"--output-dir .*out: cannot write in .* \(Read-only file system\)"
    ):
        check_output_dir(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
