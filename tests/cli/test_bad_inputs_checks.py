"""Bad inputs refused early by ``eval.py``: a verification policy that needs a confidence head
with a draft that has none, an SPS table whose steps/s rise with the token count, and an eval
prompt file with a row cut short. Each case runs the real entry point and expects a non-zero
exit, exactly one ``error:`` line, no traceback and its inputs unchanged; the target named is
a path that does not exist, so a case that reached the models would fail with another line.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.badinput import assert_one_error, assert_unchanged, digest_tree, run_cli
from tests.conftest import ROOT

DATASETS = os.path.join(ROOT, "eval_datasets")


@pytest.fixture(scope="module")
def drafts(tmp_path_factory, tiny_target):
    """Two tiny drafts saved by the project's writer: a DSpark without a confidence head and
    a DFlash (none either)."""
    import torch

    from deepspec.config import load_config
    from deepspec.drafts import build_draft, save_draft

    root = tmp_path_factory.mktemp("bad_checks")
    target = tiny_target("llama")
    common = ["model.target_layer_ids=[0, 1]", "model.block_size=3", "model.num_draft_layers=1"]
    out = {"root": root, "target": target}
    for name, opts in (
        ("dspark_no_head", ["algorithm=dspark", "model.markov_rank=8", "model.confidence_head_alpha=0"]),
        ("dflash", ["algorithm=dflash"]),
    ):
        torch.manual_seed(0)
        path = str(root / name)
        save_draft(build_draft(load_config(opts=[*opts, *common]), target), path)
        out[name] = path
    return out


def _eval(draft: str, *extra: str, target: str, datasets: str = DATASETS):
    return run_cli(
        [
            "eval.py", "--target_name_or_path", target, "--draft_name_or_path", draft, "--tasks", "gsm8k",
            "--max-samples", "1", "--max-new-tokens", "4", "--temperature", "0",
            "--eval-datasets-dir", datasets, *extra,
        ]
    )  # fmt: skip


# ---- a policy that reads confidences, a draft without a confidence head ----------------------


@pytest.mark.parametrize(
    "draft, args, asked, what",
    [
        ("dspark_no_head", ["--confidence-threshold", "0.5"], "--confidence-threshold 0.5", "without a confidence head"),
        ("dspark_no_head", ["--policy", "threshold", "--confidence-threshold", "0.3"], "--policy threshold",
         "model.confidence_head_alpha=0"),
        ("dflash", ["--policy", "threshold", "--confidence-threshold", "0.3"], "--policy threshold",
         "a dflash draft, which has no confidence head"),
        ("dspark_no_head", ["--survival-threshold", "0.5"], "--survival-threshold 0.5", "without a confidence head"),
        ("dflash", ["--policy", "cumulative", "--survival-threshold", "0.3"], "--policy cumulative",
         "a dflash draft, which has no confidence head"),
    ],
    ids=["dspark-auto-threshold", "dspark-threshold", "dflash-threshold", "dspark-auto-cumulative",
         "dflash-cumulative"],
)  # fmt: skip
def test_confidence_policy_without_a_head_is_refused_before_any_model_loads(drafts, draft, args, asked, what):
    missing_target = str(drafts["root"] / "no_target")  # never resolved: the draft's config decides
    before = digest_tree(drafts[draft])
    line = assert_one_error(_eval(drafts[draft], *args, target=missing_target), asked,
                            "needs the draft's confidence head", drafts[draft], what, "use --policy fixed",
                            code=2)  # fmt: skip
    assert "no_target" not in line
    assert_unchanged(before, drafts[draft])


def test_scheduled_policy_without_a_head_is_refused_before_any_model_loads(drafts, tmp_path):
    table = tmp_path / "sps.json"
    table.write_text(json.dumps({"steps_per_second": {"1": 20.0, "4": 18.0, "16": 9.0}}))
    before = digest_tree(drafts["dflash"], str(table))
    assert_one_error(
        _eval(drafts["dflash"], "--policy", "scheduled", "--sps-table", str(table), target=str(tmp_path / "none")),
        "--policy scheduled needs the draft's confidence head", "dflash draft", code=2,
    )  # fmt: skip
    assert_unchanged(before, drafts["dflash"], str(table))


# ---- SPS tables ------------------------------------------------------------------------------


def test_sps_table_whose_steps_per_second_rise_is_refused(drafts, tmp_path):
    """Verifying more tokens never makes a step faster: 8 tokens at 12 steps/s after 10 at 4
    (+20%) is a broken profile, named with both token counts."""
    table = tmp_path / "rising.json"
    table.write_text(json.dumps({"steps_per_second": {"1": 11.0, "4": 10.0, "8": 12.0, "16": 6.0}}))
    before = digest_tree(str(table))
    missing_target = str(tmp_path / "no_target")
    line = assert_one_error(
        _eval(drafts["dflash"], "--policy", "scheduled", "--sps-table", str(table), target=missing_target),
        f"SPS table {table}", "from 10 at 4 tokens to 12 at 8 tokens", "+20.0%", "profile again",
        "benchmarks/sps_profile.py", code=2,
    )  # fmt: skip
    assert "no_target" not in line
    assert_unchanged(before, str(table))


def test_sps_table_with_noise_below_the_tolerance_is_accepted(tmp_path):
    """The R = 16 profile of benchmarks/README.md rises 2.9% from 24 to 32 tokens: accepted."""
    from deepspec.eval.scheduler import SPSTable

    ms = {16: 91.5, 24: 98.6, 32: 95.8, 48: 122.0, 64: 129.0, 96: 157.5, 128: 174.5}
    table = tmp_path / "r16.json"
    table.write_text(json.dumps({"steps_per_second": {str(b): 1000 / v for b, v in ms.items()}}))
    assert SPSTable.load(str(table)).tokens == tuple(ms)


# ---- eval prompt files -----------------------------------------------------------------------


def test_cut_eval_prompt_row_reports_its_real_column(drafts, tmp_path):
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    good = json.dumps({"turns": ["What is 2+2?"]})
    cut = '{"turns": ["What is 3+3?",'
    (datasets / "gsm8k.jsonl").write_text(f"{good}\n{cut}\n{good}\n")
    before = digest_tree(str(datasets))
    line = assert_one_error(
        _eval(drafts["dflash"], target=str(tmp_path / "none"), datasets=str(datasets)),
        "gsm8k.jsonl:2: invalid JSON", f"at column {len(cut) + 1}, the end of the line", "cut short",
    )  # fmt: skip
    assert "column 1)" not in line and "column 1," not in line
    assert_unchanged(before, str(datasets))
