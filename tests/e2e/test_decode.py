"""The speculative decoding loop: greedy exactness, losslessness at temperature 1, EOS and
length limits, self-drafting, and the eval.py command on the embedded target."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import deepspec.eval.decode as decode
from deepspec.config import load_config
from deepspec.drafts import Proposal, build_draft
from deepspec.eval.decode import plain_generate, speculative_generate
from deepspec.eval.policies import VerifyPolicy
from deepspec.eval.target import HFTarget
from tests.conftest import ROOT
from tests.helpers import DRAFT_IDS, DRAFTS, PROMPT, V_SMALL, draft_for, law_check, tiny_model

# ---- greedy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("algo, extra", DRAFTS, ids=DRAFT_IDS)
def test_greedy_equals_transformers_generate(tmp_path_factory, single_thread, family, algo, extra):
    target_dir, model = tiny_model(tmp_path_factory, family, vocab=96)
    target = HFTarget(model, [0, 1])
    for block in (1, 3, 6):
        draft = draft_for(target_dir, algo, extra, block=block)
        for prompt in ([5, 9, 3], [17, 4, 4, 80, 2, 31, 64], [1]):
            out = speculative_generate(target, draft, prompt, max_new_tokens=40, temperature=0, eos_ids=set())
            ref = model.generate(
                torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0
            )[0, len(prompt) :].tolist()
            assert out.output_ids == ref
            assert len(out.output_ids) == 40
            # every round emits accepted + 1 tokens; the first token comes from the prefill
            assert 1 + sum(m + 1 for m in out.accepted) == 40
            assert all(0 <= m <= k <= block for m, k in zip(out.accepted, out.proposed))


class OracleDraft:
    """A draft that proposes the target's own greedy continuation (a self-draft)."""

    algorithm = "oracle"

    def __init__(self, continuation: list[int], prompt_len: int, vocab: int, k: int) -> None:
        self.continuation, self.prompt_len, self.vocab, self.k = continuation, prompt_len, vocab, k

    def new_state(self, batch, device="cpu"):
        return {"length": 0}

    def extend(self, state, features, counts, tokens=None):
        state["length"] += int(counts[0])

    def propose(self, state, anchor, temperature=0.0, generator=None):
        start = state["length"] - self.prompt_len + 1  # index of the token after the anchor
        tokens = (self.continuation[start : start + self.k] + [0] * self.k)[: self.k]
        probs = torch.nn.functional.one_hot(torch.tensor([tokens]), self.vocab).float()
        return Proposal(torch.tensor([tokens]), probs, probs.log())


def test_self_draft_accepts_everything_and_stops_at_eos_and_length(tmp_path_factory, single_thread):
    target_dir, model = tiny_model(tmp_path_factory, "llama", vocab=96)
    target = HFTarget(model, [0, 1])
    for prompt in ([7, 8, 9], [40, 2, 77, 13], [90, 91], [5, 50, 60, 70]):
        ref = plain_generate(target, prompt, max_new_tokens=60, temperature=0, eos_ids=set()).output_ids
        fresh = [i for i in range(3, 40) if ref[i] not in ref[:i]]  # tokens that first appear at i
        if fresh:
            break
    assert fresh, "no prompt gives a varied greedy continuation"
    draft = OracleDraft(ref, len(prompt), 96, k=5)
    full = speculative_generate(target, draft, prompt, max_new_tokens=60, temperature=0, eos_ids=set())
    assert full.output_ids == ref
    assert all(m == k for m, k in zip(full.accepted, full.proposed))  # every proposed token accepted
    assert full.proposed[:-1] == [5] * (len(full.proposed) - 1)
    # max_new_tokens cut in the middle of a block: exactly the limit, never more
    for limit in (1, 2, 4, 9, 13):
        out = speculative_generate(target, draft, prompt, max_new_tokens=limit, temperature=0, eos_ids=set())
        assert out.output_ids == ref[:limit]
    # an EOS inside an accepted block ends generation right after it
    eos_at = fresh[0]
    eos = ref[eos_at]
    out = speculative_generate(target, draft, prompt, max_new_tokens=60, temperature=0, eos_ids={eos})
    assert out.output_ids == ref[: eos_at + 1]
    plain = plain_generate(target, prompt, max_new_tokens=60, temperature=0, eos_ids={eos})
    assert plain.output_ids == ref[: eos_at + 1]


def test_cache_argument_follows_the_installed_transformers(tmp_path_factory, single_thread):
    """The KV cache goes in under the name ``forward`` declares (``cache`` in newer 5.x,
    ``past_key_values`` before), so decoding raises no deprecation warning."""
    import inspect
    import warnings

    from deepspec.eval.target import cache_argument

    _, model = tiny_model(tmp_path_factory, "qwen3", vocab=96)
    declared = inspect.signature(model.forward).parameters
    assert cache_argument(model) == ("cache" if "cache" in declared else "past_key_values")

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return None

    assert cache_argument(Old()) == "past_key_values"
    target = HFTarget(model, [0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        plain = plain_generate(target, [5, 9, 3], max_new_tokens=12, temperature=0, eos_ids=set())
    ref = model.generate(
        torch.tensor([[5, 9, 3]]), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0
    )[0, 3:].tolist()
    assert plain.output_ids == ref


def test_non_finite_draft_is_a_numerical_error_never_a_token(tmp_path_factory, single_thread):
    """A diverged draft (NaN weights) or one proposing ids outside the vocabulary stops the
    decode with a one-line NumericalError; nothing out of range is ever emitted."""
    from deepspec.errors import ConfigError, NumericalError

    target_dir, model = tiny_model(tmp_path_factory, "llama", vocab=96)
    target = HFTarget(model, [0, 1])
    diverged = r"non-finite scores \(its training diverged\); use an earlier checkpoint"
    for (algo, extra), corrupt in itertools.product(DRAFTS, ("nan", "overflow")):
        draft = draft_for(target_dir, algo, extra)
        with torch.no_grad():
            if corrupt == "nan":
                draft.fc.weight.fill_(float("nan"))
            else:  # finite weights whose scores overflow to inf
                draft.fc.weight.fill_(3e38)
                draft.lm_head.weight.fill_(3e38)
        for temperature in (0.0, 1.0):
            with pytest.raises(NumericalError, match=diverged) as info:
                speculative_generate(
                    target,
                    draft,
                    [5, 9, 3],
                    max_new_tokens=8,
                    temperature=temperature,
                    eos_ids=set(),
                    generator=torch.Generator().manual_seed(0),
                )
            assert "\n" not in str(info.value)

    class OutOfVocab(OracleDraft):
        def propose(self, state, anchor, temperature=0.0, generator=None):
            proposal = super().propose(state, anchor, temperature, generator)
            return Proposal(proposal.tokens + 96, proposal.probs, proposal.logits)

    with pytest.raises(NumericalError, match="outside the vocabulary of 96"):
        speculative_generate(
            target,
            OutOfVocab([1] * 10, 3, 96, k=2),
            [5, 9, 3],
            max_new_tokens=8,
            temperature=0,
            eos_ids=set(),
        )

    class NanConfidence(OracleDraft):
        def propose(self, state, anchor, temperature=0.0, generator=None):
            p = super().propose(state, anchor, temperature, generator)
            return Proposal(p.tokens, p.probs, p.logits, torch.full(p.tokens.shape, float("nan")))

    with pytest.raises(NumericalError, match="confidences are NaN"):
        speculative_generate(
            target,
            NanConfidence([1] * 10, 3, 96, k=2),
            [5, 9, 3],
            max_new_tokens=8,
            temperature=0,
            eos_ids=set(),
        )
    for bad in ({"temperature": float("nan")}, {"temperature": -1.0}, {"max_new_tokens": 0}):
        kwargs = {"max_new_tokens": 4, "temperature": 0.0, **bad}
        with pytest.raises(ConfigError, match="must be a finite number"):
            plain_generate(target, [5, 9, 3], eos_ids=set(), **kwargs)


# ---- losslessness at temperature 1 ----------------------------------------------------------

N_SAMPLES = 20_000


def empirical_joint(target, draft, n: int, threshold: float = 0.0, seed: int = 0) -> np.ndarray:
    counts = np.zeros((V_SMALL,) * 3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        out = speculative_generate(
            target,
            draft,
            PROMPT,
            max_new_tokens=3,
            temperature=1.0,
            eos_ids=set(),
            generator=g,
            policy=VerifyPolicy("threshold", threshold) if threshold else None,
        )
        counts[tuple(out.output_ids)] += 1
    return counts


@pytest.mark.slow
@pytest.mark.parametrize(
    "algo, extra, threshold",
    [
        ("dflash", [], 0.0),
        ("dspark", [], 0.0),
        ("dspark", ["model.markov_head_type=gated", "model.context_window=2", "model.qk_norm=true"], 0.5),
        ("dspark", ["model.draft_vocab_size=3"], 0.0),
        ("eagle3", [], 0.0),
    ],
    ids=["dflash", "dspark", "dspark-threshold-window-qknorm", "dspark-pruned", "eagle3"],
)
def test_speculative_sampling_is_lossless(small_target, single_thread, algo, extra, threshold):
    target_dir, model, exact = small_target
    draft = draft_for(target_dir, algo, extra, layer_ids=(-1, 0), block=2)
    if threshold:  # make the confidence head cut proposals often
        with torch.no_grad():
            draft.confidence_head.proj.bias.fill_(0.0)
    counts = empirical_joint(HFTarget(model, [-1, 0]), draft, N_SAMPLES, threshold)
    pvalue, tv, bound = law_check(counts, exact)
    assert pvalue > 1e-4 and tv < bound, (pvalue, tv, bound)


@pytest.mark.slow
def test_broken_acceptance_rule_is_caught(small_target, single_thread, monkeypatch):
    """The same check fails when the loop accepts every drafted token."""
    target_dir, model, exact = small_target
    draft = draft_for(target_dir, "dflash", [], layer_ids=(-1, 0), block=2)
    real = decode.verify_sampling

    def accept_all(drafted, draft_probs, target_probs, **kw):
        ones = torch.ones_like(target_probs[..., :1, :1]).squeeze(-1).squeeze(-1)
        result = real(drafted, draft_probs, target_probs, **kw)
        return type(result)(ones.long() * drafted.shape[1], result.next_token, drafted)

    monkeypatch.setattr(decode, "verify_sampling", accept_all)
    counts = empirical_joint(HFTarget(model, [-1, 0]), draft, 5_000)
    pvalue, tv, bound = law_check(counts, exact)
    assert pvalue < 1e-4 or tv > bound


# ---- eval.py ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_cli_on_embedded_target(tmp_path, smollm2_dir):
    """The eval command prints the table and writes results, samples and plots; greedy
    outputs equal plain greedy decoding of the target."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(f"{ROOT}/config/dspark/dspark_smollm2_135m.py", ["model.num_draft_layers=1"])
    torch.manual_seed(0)
    build_draft(cfg, smollm2_dir).save_pretrained(str(tmp_path / "draft"))
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "eval.py",
            "--target_name_or_path",
            "embedded:smollm2-135m-instruct",
            "--draft_name_or_path",
            str(tmp_path / "draft"),
            "--tasks",
            "gsm8k,mt-bench",
            "--max-samples",
            "2",
            "--max-new-tokens",
            "24",
            "--temperature",
            "0",
            "--output-dir",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accept_len" in proc.stdout and "gsm8k" in proc.stdout and "macro" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert [d["dataset"] for d in results["datasets"]] == ["gsm8k", "mt-bench"]
    for d in results["datasets"]:
        assert d["acceptance_length"] >= 1 and d["speedup"] > 0 and d["greedy_match_rate"] == 1.0
        assert d["calibration"] and d["threshold_sweep"]
    for name in ("conditional_acceptance.png", "reliability_gsm8k.png", "threshold_sweep.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    for s in samples:
        assert set(s) >= {"dataset", "index", "prompt_token_ids", "output_token_ids", "accepted_per_round"}
        ref = model.generate(
            torch.tensor([s["prompt_token_ids"]]),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=2,
        )[0, len(s["prompt_token_ids"]) :].tolist()
        assert s["output_token_ids"] == ref


def test_eval_cli_bad_inputs(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"turns": ["ok"]}\nnot json\n')
    for task, fragment in (("empty", "has no prompts"), ("bad", "bad.jsonl:2: invalid JSON")):
        proc = subprocess.run(
            [
                sys.executable,
                "eval.py",
                "--target_name_or_path",
                "embedded:smollm2-135m-instruct",
                "--draft_name_or_path",
                str(tmp_path),
                "--tasks",
                task,
                "--eval-datasets-dir",
                str(tmp_path),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and fragment in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_prompts_split_across_two_workers_give_the_same_samples(tmp_path, tiny_target):
    """Two workers (CPU processes here, GPUs in production) decode disjoint prompt subsets;
    the merged greedy samples equal a single worker's."""
    from deepspec.eval.runner import EvalSettings, evaluate

    target = tiny_target("qwen3")
    draft_dir = str(tmp_path / "draft")
    draft_for(target, "dspark", []).save_pretrained(draft_dir)
    outs = {}
    for workers in (1, 2):
        settings = EvalSettings(
            tasks=["mt-bench", "gsm8k"],
            max_samples=3,
            max_new_tokens=12,
            temperature=0,
            eval_datasets_dir=f"{ROOT}/eval_datasets",
            output_dir=str(tmp_path / f"w{workers}"),
            progress=False,
        )
        results = evaluate(target, draft_dir, settings, num_workers=workers)
        assert results["config"]["workers"] == workers
        outs[workers] = [
            json.loads(x) for x in (tmp_path / f"w{workers}" / "samples.jsonl").read_text().splitlines()
        ]

    def strip(rows):
        return [(r["dataset"], r["index"], r["output_token_ids"], r["accepted_per_round"]) for r in rows]

    assert strip(outs[1]) == strip(outs[2]) and len(outs[1]) == 6


def test_baseline_from_reuses_plain_runs_and_refuses_other_settings(tmp_path, tiny_target, monkeypatch):
    """A second draft evaluated with ``baseline_from`` takes the first run's plain decoding
    (same outputs and times, no plain decode run) and refuses a run decoded differently."""
    import deepspec.eval.runner as runner
    from deepspec.errors import DataError
    from deepspec.eval.runner import EvalSettings, evaluate

    target = tiny_target("llama")
    drafts = {}
    for algo in ("dspark", "dflash"):
        drafts[algo] = str(tmp_path / algo)
        draft_for(target, algo, []).save_pretrained(drafts[algo])

    def settings(out, **kw):
        kw = {"max_samples": 2, **kw}
        return EvalSettings(
            tasks=["gsm8k"],
            max_new_tokens=10,
            temperature=0,
            eval_datasets_dir=f"{ROOT}/eval_datasets",
            output_dir=str(tmp_path / out),
            progress=False,
            **kw,
        )

    first = evaluate(target, drafts["dspark"], settings("a"))
    plain_calls = []
    real_plain = runner.plain_generate
    monkeypatch.setattr(
        runner, "plain_generate", lambda *a, **k: plain_calls.append(1) or real_plain(*a, **k)
    )
    second = evaluate(target, drafts["dflash"], settings("b", baseline_from=str(tmp_path / "a")))
    assert plain_calls == []  # neither the warm-up nor any prompt decodes the baseline again
    rows = {
        name: [json.loads(x) for x in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
        for name in ("a", "b")
    }
    for ra, rb in zip(rows["a"], rows["b"]):
        assert rb["baseline_output_token_ids"] == ra["baseline_output_token_ids"]
        assert rb["baseline_seconds"] == ra["baseline_seconds"]
        assert rb["output_token_ids"] == ra["baseline_output_token_ids"]  # greedy fp32: lossless
    assert (
        second["datasets"][0]["baseline_tokens_per_second"]
        == first["datasets"][0]["baseline_tokens_per_second"]
    )
    assert second["config"]["baseline_from"] == str(tmp_path / "a")
    with pytest.raises(DataError, match="max_new_tokens 10 there, 12 here"):
        evaluate(
            target,
            drafts["dflash"],
            EvalSettings(
                tasks=["gsm8k"],
                max_samples=2,
                max_new_tokens=12,
                temperature=0,
                eval_datasets_dir=f"{ROOT}/eval_datasets",
                progress=False,
                baseline_from=str(tmp_path / "a"),
            ),
        )
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "a", broken)
    text = (broken / "samples.jsonl").read_text()
    (broken / "samples.jsonl").write_text(text[: text.index("\n") // 2])  # a torn first line
    with pytest.raises(DataError, match="unreadable results"):
        evaluate(target, drafts["dflash"], settings("d", baseline_from=str(broken)))
    with pytest.raises(DataError, match="no record of gsm8k prompt"):
        evaluate(target, drafts["dflash"], settings("c", max_samples=3, baseline_from=str(tmp_path / "a")))
