"""End to end: ``scripts/quickstart.sh`` at tiny sizes, the real pipeline on the embedded target.

llama.cpp regenerates 4 answers → bf16 target cache → DSpark, DFlash and Eagle3 train
2 steps each → each is evaluated on 2 prompts at temperature 1 and 0 → comparison table
and report. Every stage's outputs are opened with the loaders the next stage uses, and a
second run must reuse every finished stage.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.conftest import ROOT
from tests.helpers import needs_llamacpp

ALGOS = ("dspark", "dflash", "eagle3")
TEMPS = ("1.0", "0")
TINY = {
    "NUM_PROMPTS": "4",
    "MAX_TOKENS": "48",
    "STEPS": "2",
    "BATCH": "2",
    "EVAL_SAMPLES": "1",
    "MAX_NEW": "12",
    "TASKS": "gsm8k,mt-bench",
    "TRAIN_OPTS": "logging.logging_steps=1",
}


def run_quickstart(work: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **TINY, "WORK": work, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        ["bash", "scripts/quickstart.sh", "--fast"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def table_rows(stdout: str, temperature: str) -> list[list[str]]:
    """Data rows of the comparison table printed for one temperature."""
    block = stdout.split(f"\ntemperature {temperature}\n", 1)[1].split("\n\n", 1)[0]
    lines = [line for line in block.splitlines() if line and not line.startswith("  ")]
    assert lines[0].split()[:1] == ["draft"], block
    return [line.split() for line in lines[1:]]


@pytest.mark.slow
@needs_llamacpp
def test_quickstart_tiny_profile_end_to_end_and_rerun(tmp_path, smollm2_dir):
    from deepspec.config import load_config
    from deepspec.data.cache_reader import validate_cache_for_config
    from deepspec.data.conversations import read_conversations
    from deepspec.drafts import load_draft

    work = str(tmp_path / "qs")
    first = run_quickstart(work)
    out = first.stdout

    # stage 2: regenerated answers (assistant turns written by the target) and the cache
    data = os.path.join(work, "data")
    convs = list(read_conversations(os.path.join(data, "regenerated.jsonl")))
    assert 1 <= len(convs) <= 4
    assert all(c.messages[-1]["role"] == "assistant" and c.messages[-1]["content"].strip() for c in convs)
    cfg = load_config(os.path.join(ROOT, "config", "dspark", "dspark_smollm2_135m.py"))
    cache = validate_cache_for_config(os.path.join(data, "target_cache"), cfg, smollm2_dir)
    assert 1 <= len(cache) <= len(convs)
    cache.verify_shards()

    # stage 3: a complete checkpoint per draft, loadable, with its training metrics
    for algo in ALGOS:
        ck = os.path.join(work, "checkpoints", "deepspec", f"{algo}_smollm2_135m")
        assert os.path.isfile(os.path.join(ck, "step_2", "COMPLETE")), algo
        assert load_draft(os.path.join(ck, "step_2")).algorithm == algo
        with open(os.path.join(ck, "metrics.jsonl"), encoding="utf-8") as fh:
            steps = [json.loads(line)["step"] for line in fh if line.strip()]
        assert steps and max(steps) == 2, (algo, steps)

    # stage 4: results per draft and temperature, over both tasks, with the baseline
    for algo in ALGOS:
        for temp in TEMPS:
            run_dir = os.path.join(work, "eval", f"{algo}_t{temp}")
            with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as fh:
                results = json.load(fh)
            assert results["config"]["draft_algorithm"] == algo
            assert results["config"]["temperature"] == float(temp)
            assert [d["dataset"] for d in results["datasets"]] == ["gsm8k", "mt-bench"]
            for d in results["datasets"]:
                assert d["num_prompts"] == 1
                assert 1.0 <= d["acceptance_length"] <= 8.0
                assert d["speedup"] > 0
            assert os.path.isfile(os.path.join(run_dir, "conditional_acceptance.png"))
            with open(os.path.join(run_dir, "samples.jsonl"), encoding="utf-8") as fh:
                assert sum(1 for line in fh if line.strip()) == 2

    # stage 5: one table per temperature with a row per draft; the report embeds the plots
    for temp in ("1", "0"):
        rows = table_rows(out, temp)
        assert [r[0] for r in rows] == list(ALGOS), rows
        for r in rows:
            assert len(r) == 1 + 2 + 2 and r[-1].endswith("x")
            assert all(1.0 <= float(v) <= 8.0 for v in r[1:4])
    report = open(os.path.join(work, "report", "REPORT.md"), encoding="utf-8").read()
    for algo in ALGOS:
        for temp in ("1", "0"):
            assert f"({algo}_t{temp}/conditional_acceptance.png)" in report
            assert os.path.isfile(
                os.path.join(work, "report", f"{algo}_t{temp}", "conditional_acceptance.png")
            )
    assert re.search(r"finished in \d+s", out)

    # a re-run reuses every finished stage: no file of stages 2-4 is rewritten
    def stamps() -> dict[str, int]:
        paths = [os.path.join(data, "regenerated.jsonl"), os.path.join(data, "target_cache", "manifest.json")]
        for algo in ALGOS:
            paths.append(
                os.path.join(work, "checkpoints", "deepspec", f"{algo}_smollm2_135m", "step_2", "COMPLETE")
            )
            paths += [os.path.join(work, "eval", f"{algo}_t{t}", "results.json") for t in TEMPS]
        return {p: os.stat(p).st_mtime_ns for p in paths}

    before = stamps()
    second = run_quickstart(work).stdout
    assert stamps() == before
    assert "every prompt already answered" in second  # no llama.cpp server started
    for algo in ALGOS:
        assert f"{algo}: trained already" in second
        for temp in TEMPS:
            assert f"{algo} at temperature {temp}: evaluated already" in second
