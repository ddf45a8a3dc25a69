"""Bad inputs to the shell entry points that wrap the Python CLIs: one ``error:`` line, exit 2,
before anything is installed, started or written."""

from __future__ import annotations

import os

import pytest

from tests.badinput import assert_one_error, run_cli


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"STEPS": "abc"}, "STEPS=abc"),
        ({"NUM_PROMPTS": "0"}, "NUM_PROMPTS=0"),
        ({"MAX_NEW": "-5"}, "MAX_NEW=-5"),
        ({"BATCH": "2.5"}, "BATCH=2.5"),
        ({"TEMPERATURES": "nan 0"}, "'nan'"),
    ],
)
def test_quickstart_refuses_bad_profile_values_before_any_work(tmp_path, env, fragment):
    work = tmp_path / "work"
    proc = run_cli(["bash", "scripts/quickstart.sh", "--fast"], env={**env, "WORK": str(work)}, timeout=60)
    assert_one_error(proc, fragment, code=2)
    assert not os.path.exists(work)
    assert "== 1/5" not in proc.stdout  # stopped before the install stage


def test_quickstart_unknown_option(tmp_path):
    proc = run_cli(
        ["bash", "scripts/quickstart.sh", "--fastest"], env={"WORK": str(tmp_path / "w")}, timeout=60
    )
    assert_one_error(proc, "unknown option --fastest", code=2)


@pytest.mark.parametrize(
    "args",
    [
        ["train.py"],
        ["eval.py"],
        ["scripts/data/generate_train_data.py"],
        ["scripts/data/prepare_target_cache.py", "--nproc", "two"],
        ["scripts/data/download_and_split.py", "--no-such-flag"],
        ["-m", "deepspec.targets"],
        ["-m", "deepspec.data.cache_reader"],
        ["-m", "deepspec.eval.report"],
    ],
)
def test_missing_or_malformed_arguments_are_one_line(args):
    assert_one_error(run_cli(args, timeout=120), "see --help", code=2)
