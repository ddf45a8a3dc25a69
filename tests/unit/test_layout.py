"""Repository layout: shipped data files are credited in NOTICE; entry points parse args."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_every_shipped_data_file_is_credited_in_notice():
    with open(os.path.join(ROOT, "NOTICE"), encoding="utf-8") as fh:
        notice = fh.read()
    for folder in ("eval_datasets", "data/train_prompts"):
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".jsonl"):
                stem = name.split("_00")[0] if name.startswith("mixed_train") else name
                assert stem in notice, f"{folder}/{name} is not credited in NOTICE"
    assert "SmolLM2-135M-Instruct" in notice and "Apache License 2.0" in notice


def test_top_level_layout():
    for name in (
        "config",
        "deepspec",
        "scripts",
        "eval_datasets",
        "train.py",
        "eval.py",
        "requirements.txt",
        "NOTICE",
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "tests",
        ".ci/run",
    ):
        assert os.path.exists(os.path.join(ROOT, name)), name


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    with open(os.path.join(ROOT, ".ci", "run")) as fh:
        ci = fh.read()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci


def test_eval_cli_validates_before_failing(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "eval.py",
            "--target_name_or_path",
            "embedded:smollm2-135m-instruct",
            "--draft_name_or_path",
            str(tmp_path),
            "--tasks",
            "gsm8k,nope",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown task(s) nope" in proc.stderr
