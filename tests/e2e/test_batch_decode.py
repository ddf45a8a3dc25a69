"""Batched speculative decoding: the ragged target equals per-request forwards; batched
decoding is greedy-exact, runs the same rounds as the single-request loop, and is
lossless at temperature 1 with several requests in flight; the verification policies."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from deepspec.drafts import Proposal
from deepspec.errors import ConfigError
from deepspec.eval.batch_decode import plain_generate_batch, speculative_generate_batch
from deepspec.eval.decode import speculative_generate
from deepspec.eval.policies import VerifyPolicy
from deepspec.eval.ragged_target import RaggedTarget
from deepspec.eval.scheduler import SPSTable
from deepspec.eval.target import HFTarget
from deepspec.targets.tiny import TINY_FAMILIES
from tests.helpers import (
    DRAFT_IDS,
    DRAFTS,
    PROMPT,
    V_SMALL,
    draft_for,
    greedy_reference,
    law_check,
    tiny_model,
)

PROMPTS = [[5, 9, 3], [17, 4, 4, 80, 2, 31, 64], [1], [40, 2, 77, 13], [90, 91], [5, 50, 60, 70], [8, 8]]
FLAT = SPSTable.from_mapping({1: 10.0, 512: 10.0})


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_ragged_target_equals_one_request_at_a_time(tmp_path_factory, single_thread, family):  # noqa: F811
    """Packed forwards of ragged feeds, with crops in between, give each request the logits
    and features of its own cached forward."""
    _, model = tiny_model(tmp_path_factory, family, vocab=96)
    single, ragged = HFTarget(model, [0, 1]), RaggedTarget(model, [0, 1], rows=3)
    history = {0: list(PROMPTS[1]) * 3, 1: PROMPTS[0], 2: [7]}
    feeds = [
        dict(history),
        {0: [3, 4, 5], 2: [8, 9]},  # row 1 idle
        {0: [6], 1: [1, 2, 3, 4]},
    ]
    crops = [{}, {0: len(history[0]) + 1}, {}]  # keep one of row 0's three tokens
    for step, (feed, crop) in enumerate(zip(feeds, crops, strict=True)):
        if step:
            for r, extra in feed.items():
                history[r] = history[r] + extra
        out = ragged.forward({r: torch.tensor(t) for r, t in feed.items()})
        assert sorted(out) == sorted(feed)
        for r, tokens in feed.items():
            single.reset()
            logits, feats = single.forward(torch.tensor(history[r]))
            n = len(tokens)
            torch.testing.assert_close(out[r][0], logits[-n:], atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(out[r][1], feats[-n:], atol=2e-4, rtol=1e-4)
        for r, length in crop.items():
            ragged.crop(r, length)
            history[r] = history[r][:length]
        assert ragged.lengths.tolist() == [len(history[r]) for r in range(3)]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("algo, extra", DRAFTS, ids=DRAFT_IDS)
def test_batched_greedy_is_exact_and_runs_the_single_loops_rounds(
    tmp_path_factory,
    single_thread,  # noqa: F811
    family,
    algo,
    extra,
):
    target_dir, model = tiny_model(tmp_path_factory, family, vocab=96)
    draft = draft_for(target_dir, algo, extra, block=4)
    eos = {7}
    singles = [
        speculative_generate(HFTarget(model, [0, 1]), draft, p, max_new_tokens=30, temperature=0, eos_ids=eos)
        for p in PROMPTS
    ]
    for p, s in zip(PROMPTS, singles, strict=True):
        ref = greedy_reference(model, p, 30)
        assert s.output_ids == (ref[: ref.index(7) + 1] if 7 in ref else ref)
    for batch in (2, 5):
        run = speculative_generate_batch(
            RaggedTarget(model, [0, 1], batch), draft, PROMPTS, max_new_tokens=30, temperature=0, eos_ids=eos
        )
        for s, b in zip(singles, run.results, strict=True):
            assert b.output_ids == s.output_ids
            assert (b.proposed, b.accepted) == (s.proposed, s.accepted)  # tau agrees
        assert sum(st.emitted for st in run.steps) == sum(len(s.output_ids) for s in singles)
        assert sum(st.prefill for st in run.steps) == sum(len(p) for p in PROMPTS)
        assert max(st.requests for st in run.steps) == batch
        assert run.seconds >= sum(r.seconds for r in run.results) * 0.99
    plain = plain_generate_batch(
        RaggedTarget(model, [0, 1], 3), PROMPTS, max_new_tokens=30, temperature=0, eos_ids=eos
    )
    assert [r.output_ids for r in plain.results] == [s.output_ids for s in singles]


class HistoryOracle:
    """A batched draft that proposes the target's greedy continuation of each row's history,
    with the token at a pseudo-random position changed: acceptance lengths vary 0..k."""

    algorithm = "oracle"

    def __init__(self, model, k: int, vocab: int) -> None:
        self.model, self.k, self.vocab = model, k, vocab

    def new_state(self, batch, device="cpu"):
        return [[] for _ in range(batch)]

    def reset_rows(self, state, rows):
        for r in torch.nonzero(rows).flatten().tolist():
            state[r] = []

    def extend(self, state, features, counts, tokens=None):
        for r, n in enumerate(counts.tolist()):
            state[r] += tokens[r, :n].tolist()

    def propose(self, state, anchor, temperature=0.0, generator=None):
        rows = []
        for r, history in enumerate(state):
            seq = history + [int(anchor[r])]
            block = greedy_reference(self.model, seq, self.k)
            wrong = (sum(seq) * 7 + len(seq)) % (self.k + 2)  # >= k: no wrong token
            if wrong < self.k:
                block[wrong] = (block[wrong] + 1) % self.vocab
            rows.append(block)
        tokens = torch.tensor(rows)
        probs = torch.nn.functional.one_hot(tokens, self.vocab).float()
        conf = torch.linspace(0.95, 0.4, self.k).expand(len(rows), -1)
        return Proposal(tokens, probs, probs.log(), conf.clone())


def test_batched_greedy_with_mixed_acceptance_eos_and_length_limits(tmp_path_factory, single_thread):  # noqa: F811
    _, model = tiny_model(tmp_path_factory, "llama", vocab=96)
    draft = HistoryOracle(model, k=5, vocab=96)
    refs = [greedy_reference(model, p, 40) for p in PROMPTS]
    eos = {refs[0][11]}  # ends prompt 0 early (and any other that reaches it)
    expect = [r[: r.index(next(iter(eos))) + 1] if eos & set(r) else r for r in refs]
    policies = [
        VerifyPolicy(),
        VerifyPolicy("fixed", 2),
        VerifyPolicy("threshold", 0.5),
        VerifyPolicy("cumulative", 0.5),
        VerifyPolicy("scheduled", sps=FLAT),
        VerifyPolicy("scheduled", sps=SPSTable.from_mapping({1: 10.0, 4: 8.0, 16: 2.0})),
    ]
    verified, longest = [], {}
    for policy in policies:
        for batch in (1, 3, 7):
            run = speculative_generate_batch(
                RaggedTarget(model, [0, 1], batch),
                draft,
                PROMPTS,
                max_new_tokens=40,
                temperature=0,
                eos_ids=eos,
                policy=policy,
            )
            assert [r.output_ids for r in run.results] == expect
            accepted = [m for r in run.results for m in r.accepted]
            if policy == VerifyPolicy():
                assert len(set(accepted)) >= 4  # mixed acceptance lengths across the batch
            verified.append(sum(st.verified for st in run.steps))
            longest[policy.name, policy.value] = max(k for r in run.results for k in r.proposed)
            if batch == 1:  # the single-request loop takes the same policies, same choices
                for p, r in zip(PROMPTS, run.results, strict=True):
                    single = speculative_generate(
                        HFTarget(model, [0, 1]),
                        draft,
                        p,
                        max_new_tokens=40,
                        temperature=0,
                        eos_ids=eos,
                        policy=policy,
                    )
                    assert (single.output_ids, single.proposed) == (r.output_ids, r.proposed)
        limited = speculative_generate_batch(
            RaggedTarget(model, [0, 1], 3), draft, PROMPTS, max_new_tokens=6, temperature=0, eos_ids=set()
        )
        assert [r.output_ids for r in limited.results] == [r[:6] for r in refs]
    fixed_all, _, _, _, flat, steep = (verified[i * 3 : i * 3 + 3] for i in range(6))
    # confidences .95 .8125 .675 .5375 .4: the first slot below .5 is the fifth (threshold
    # verifies 4 of 5); the running product .95 .772 .521 .280 falls below .5 at the fourth
    assert longest["fixed", 0.0] == 5
    assert longest["threshold", 0.5] == 4 and longest["cumulative", 0.5] == 3
    assert flat == fixed_all  # a flat SPS table admits every token with survival > 0
    assert all(s < f for s, f in zip(steep[1:], flat[1:], strict=True))  # a steep one admits fewer


def test_policies_choose_lengths_and_refuse_bad_settings():
    confidence = [[0.9, 0.6, 0.3], [0.8, 0.2, 0.1]]  # per slot; survival .9 .54 .162 and .8 .16 .016
    assert VerifyPolicy().lengths([3, 3], None) == [3, 3]
    assert VerifyPolicy("fixed", 2).lengths([3, 1], None) == [2, 1]
    assert VerifyPolicy("threshold", 0.5).lengths([3, 3], confidence) == [2, 1]
    assert VerifyPolicy("threshold", 0.5).lengths([1, 3], confidence) == [1, 1]  # within what was drafted
    assert VerifyPolicy("cumulative", 0.5).lengths([3, 3], confidence) == [2, 1]
    assert VerifyPolicy("threshold", 0.35).lengths([3, 3], confidence) == [2, 1]  # .3 and .2 are below
    assert VerifyPolicy("cumulative", 0.15).lengths([3, 3], confidence) == [3, 2]  # .162 stays, .016 not
    assert VerifyPolicy("scheduled", sps=FLAT).lengths([3, 3], confidence) == [3, 3]
    steep = SPSTable.from_mapping({2: 10.0, 3: 6.0})  # a third token costs 40% of the steps
    assert VerifyPolicy("scheduled", sps=steep).lengths([3, 3], confidence) == [0, 0]
    with pytest.raises(ConfigError, match="unknown verification policy"):
        VerifyPolicy("greedy")
    with pytest.raises(ConfigError, match="needs an SPS table"):
        VerifyPolicy("scheduled")
    for name in ("threshold", "cumulative"):
        with pytest.raises(ConfigError, match=rf"the {name} policy's threshold must lie in \[0, 1\]"):
            VerifyPolicy(name, 1.5)
        with pytest.raises(ConfigError, match="confidence head"):
            VerifyPolicy(name, 0.5).lengths([3], None)
    with pytest.raises(ConfigError, match="integer >= 0"):
        VerifyPolicy("fixed", 1.5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "algo, extra, policy",
    [
        ("dspark", [], VerifyPolicy("threshold", 0.5)),  # confidences near .5: slot 0 is often cut
        ("dspark", [], VerifyPolicy("cumulative", 0.5)),
        ("dspark", ["model.context_window=2", "model.qk_norm=true"], VerifyPolicy("scheduled", sps=FLAT)),
        ("eagle3", [], VerifyPolicy()),
    ],
    ids=["dspark-threshold", "dspark-cumulative", "dspark-window-scheduled", "eagle3"],
)
def test_batched_speculative_sampling_is_lossless(small_target, single_thread, algo, extra, policy):  # noqa: F811
    """4 requests in flight, each request's first three tokens follow the target's law."""
    target_dir, model, exact = small_target
    draft = draft_for(target_dir, algo, extra, layer_ids=(-1, 0), block=2)
    if algo == "dspark":  # make the confidence head cut proposals often
        with torch.no_grad():
            draft.confidence_head.proj.bias.fill_(0.0)
    n = 12_000
    run = speculative_generate_batch(
        RaggedTarget(model, [-1, 0], 4),
        draft,
        [PROMPT] * n,
        max_new_tokens=3,
        temperature=1.0,
        eos_ids=set(),
        generator=torch.Generator().manual_seed(0),
        policy=policy,
    )
    counts = np.zeros((V_SMALL,) * 3)
    for r in run.results:
        counts[tuple(r.output_ids)] += 1
    accepted = {m for r in run.results for m in r.accepted}
    assert accepted >= {0, 1}  # rows accept different numbers of tokens in the same round
    if policy.name in ("threshold", "cumulative"):  # a first round has room for 1 drafted token
        assert 0 < sum(r.proposed[0] == 0 for r in run.results) < n  # the cut at slot 0 happens
    pvalue, tv, bound = law_check(counts, exact)
    assert pvalue > 1e-4 and tv < bound, (pvalue, tv, bound)


@pytest.mark.slow
def test_eval_cli_batched_scheduled_and_sts_round_trip(tmp_path, tiny_target):
    """eval.py decodes a calibration split at batch 2 and the report split with the scheduler
    at batch 3, greedy-exact against the batched baseline; the calibration CLI fits STS on
    the first run, stores it with the draft, load_draft applies it, and a run recorded with
    other temperatures is refused."""
    import json

    from deepspec.drafts import load_draft, save_draft
    from tests.badinput import assert_one_error, run_cli
    from tests.conftest import ROOT, tiny_dspark

    target = tiny_target("llama")
    draft = str(tmp_path / "draft")
    save_draft(tiny_dspark(target), draft)
    table = tmp_path / "sps.json"
    table.write_text(json.dumps({"steps_per_second": {"1": 20.0, "4": 18.0, "16": 9.0}}))
    base = ["eval.py", "--target_name_or_path", target, "--draft_name_or_path", draft, "--tasks", "gsm8k"]
    base += ["--max-samples", "3", "--max-new-tokens", "12", "--temperature", "0"]
    base += ["--eval-datasets-dir", f"{ROOT}/eval_datasets"]
    runs = {
        "cal": ["--split", "calibration", "--batch-size", "2"],
        "rep": ["--policy", "scheduled", "--sps-table", str(table), "--batch-size", "3"],
    }
    proc = run_cli([*base, *runs["cal"], "--output-dir", str(tmp_path / "cal")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    cal = json.loads((tmp_path / "cal" / "results.json").read_text())
    assert cal["datasets"][0]["greedy_match_rate"] == 1.0
    assert cal["config"]["split"] == "calibration" and cal["config"]["confidence_temperatures"] is None
    fit = run_cli(
        ["-m", "deepspec.eval.calibration", "--rounds", str(tmp_path / "cal"), "--draft", draft]
        + ["--plots", str(tmp_path / "plots")]
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "calibration after" in fit.stdout
    stored = json.loads((tmp_path / "draft" / "confidence_calibration.json").read_text())
    assert len(stored["temperatures"]) == 3 and stored["rounds"] > 0
    assert sorted(os.listdir(tmp_path / "plots")) == [
        "reliability_calibration_after.png",
        "reliability_calibration_before.png",
    ]
    assert load_draft(draft).confidence_temperatures.tolist() == pytest.approx(stored["temperatures"])
    proc = run_cli([*base, *runs["rep"], "--output-dir", str(tmp_path / "rep")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert rep["datasets"][0]["greedy_match_rate"] == 1.0
    assert rep["config"]["policy"] == "scheduled" and rep["config"]["batch_size"] == 3
    assert rep["config"]["confidence_temperatures"] == pytest.approx(stored["temperatures"])
    again = run_cli(["-m", "deepspec.eval.calibration", "--rounds", str(tmp_path / "cal"), "--draft", draft])
    assert_one_error(again, "decoded with other confidence temperatures")
