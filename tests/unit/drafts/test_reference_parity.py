"""Parity with the DeepSpec reference implementation on drafts it saved itself.

``tests/data/reference_fixtures`` holds tiny drafts
written by the reference's trainers (Qwen3 DSpark, Qwen3 Eagle3, Gemma 4 DSpark with the
global-attention geometry and K = V) next to their random targets, with the reference's own
recorded outputs: the first round's proposals after prefill (fp32, temperature 0) and every
loss term on one batch with the anchors it drew. deepspec loads each draft as it is and must
reproduce them: proposal tokens equal, probabilities and confidences within 1e-5, loss terms
within 1e-5. Eagle3's loss keeps deepspec's rows and normaliser (docs/REFERENCE.md); the
reference's total is recomputed from deepspec's per-row values with the reference's masks.
"""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch

from deepspec.drafts import get_algorithm, load_draft
from deepspec.drafts.fused_head import head_loss_rows
from tests.conftest import ROOT

FIXTURES = os.path.join(ROOT, "tests", "data", "reference_fixtures")
BLOCK, EAGLE3 = ("qwen3_dspark", "gemma4_dspark"), ("qwen3_eagle3",)
TOL = dict(atol=1e-5, rtol=0)


def fixture_path(name: str, *parts: str) -> str:
    return os.path.join(FIXTURES, name, *parts)


@functools.cache
def load_case(name: str):
    """(name, draft, target model, recorded outputs) in fp32."""
    from transformers import AutoModelForCausalLM

    with open(fixture_path(name, "reference_outputs.json"), encoding="utf-8") as fh:
        recorded = json.load(fh)
    draft = load_draft(fixture_path(name, "draft")).float()
    model = AutoModelForCausalLM.from_pretrained(fixture_path(name, "target"), dtype=torch.float32).eval()
    return name, draft, model, recorded


@torch.no_grad()
def first_round(draft, model, prompt_ids: list[int]):
    """The decode loop's first round: prefill, the target's greedy token as anchor, propose."""
    from deepspec.eval.target import HFTarget

    target = HFTarget(model, draft.config.target_layer_ids)
    prompt = torch.tensor(prompt_ids)
    logits, features = target.forward(prompt)
    anchor = int(logits[-1].argmax())
    state = draft.new_state(1)
    draft.extend(state, features[None], torch.tensor([len(prompt_ids)]), tokens=prompt[None])
    return anchor, draft.propose(state, torch.tensor([anchor]), temperature=0.0)


@pytest.mark.parametrize("name", BLOCK + EAGLE3)
def test_first_round_proposals_equal_the_reference(name):
    _, draft, model, recorded = load_case(name)
    prompts = recorded["proposal"]["prompts"]
    assert prompts
    for p in prompts:
        anchor, proposal = first_round(draft, model, p["prompt_ids"])
        assert anchor == p["first_target_token"]
        assert proposal.tokens[0].tolist() == p["proposal_tokens"]
        probs = torch.softmax(proposal.logits[0].double(), -1)  # the reference's probs: T = 1
        torch.testing.assert_close(probs, torch.tensor(p["probs"], dtype=torch.float64), **TOL)
        assert probs.topk(5).indices.tolist() == p["top5_ids"]
        if "confidence_logits" in p:
            logits = torch.logit(proposal.confidence[0].double())
            torch.testing.assert_close(
                logits, torch.tensor(p["confidence_logits"], dtype=torch.float64), atol=2e-5, rtol=0
            )
            torch.testing.assert_close(
                proposal.confidence[0].double(),
                torch.tensor(p["confidence_sigmoid"], dtype=torch.float64),
                **TOL,
            )


@torch.no_grad()
def training_forward(draft, model, recorded: dict, **anchors):
    from deepspec.data.target_features import TargetFeatureExtractor

    batch = {k: torch.tensor(v) for k, v in recorded["batch"].items()}
    features = TargetFeatureExtractor(model, draft.config.target_layer_ids)(
        batch["input_ids"], batch["attention_mask"]
    )
    out = draft(
        batch["input_ids"], batch["loss_mask"], features.hidden_states, features.last_hidden_states, **anchors
    )
    return batch, out


@pytest.mark.parametrize("name", BLOCK)
def test_block_training_loss_equals_the_reference(name):
    _, draft, model, recorded = load_case(name)
    ref = recorded["training_loss"]
    anchors = dict(anchors=torch.tensor(ref["anchors"]), keep=torch.tensor(ref["block_keep_mask"]))
    _, out = training_forward(draft, model, ref, **anchors)
    assert out.eval_mask.long().tolist() == ref["eval_mask"]
    assert (out.targets * out.eval_mask).tolist() == (
        torch.tensor(ref["target_ids"]) * out.eval_mask
    ).tolist()
    s = ref["settings"]
    with torch.enable_grad():
        loss = get_algorithm(draft.config.algorithm).loss(
            draft,
            out,
            ce_alpha=s["ce_loss_alpha"],
            l1_alpha=s["l1_loss_alpha"],
            conf_alpha=s["confidence_head_alpha"],
            decay_gamma=s["loss_decay_gamma"],
        )
    m, want = loss.metrics, ref["metrics"]
    pairs = {
        "loss": (float(loss.loss.detach()), want["train/loss"]),
        "ce": (m["ce"], want["train/ce_loss"]),
        "l1": (m["l1"], want["train/l1_loss"]),
        "confidence": (m["conf_loss"], want["train/confidence_loss"]),
        # the reference's metric definitions, reported beside deepspec's
        "tau_probabilistic": (m["ref_tau_probabilistic"], want["train/tau_probabilistic"]),
        "confidence_abs_error": (m["ref_conf_abs_err"], want["train/confidence_abs_error"]),
        "confidence_bias": (m["ref_conf_bias"], want["train/confidence_bias"]),
        "confidence_cumprod_bias": (m["ref_conf_cumprod_bias"], want["train/confidence_cumprod_bias"]),
    }
    pairs.update(
        {
            f"accept_rate@{k}": (m[f"accept_rate@{k + 1}"], want[f"train/accept_rate@{k}"])
            for k in range(draft.block_size)
        }
    )
    for term, (got, expected) in pairs.items():
        assert got == pytest.approx(expected, abs=1e-5), term


@pytest.mark.parametrize("name", EAGLE3)
def test_eagle3_rows_equal_the_reference(name):
    """Per-row soft cross-entropies equal the reference's. deepspec supervises step ``s`` at
    index ``t`` where the predicted token ``t+2+s`` is an assistant token and divides each step
    by its supervised count; the reference uses ``loss_mask[t+s]`` and ``batch x seq_len``.
    The reference's total follows from deepspec's rows with its masks and normaliser."""
    _, draft, model, recorded = load_case(name)
    ref = recorded["training_loss"]
    batch, out = training_forward(draft, model, ref)
    B, K, T, _ = out.hidden.shape
    flat = lambda t: t.transpose(0, 1).reshape(K * B * T, *t.shape[3:])  # noqa: E731
    zeros = torch.zeros(K * B * T)
    rows = head_loss_rows(
        flat(out.hidden),
        flat(out.target_hidden),
        flat(out.targets),
        draft.lm_head.weight,
        a_ce=zeros,
        a_l1=zeros,
        a_soft=zeros + 1,
    )
    soft_ce = rows.soft_ce.view(K, B, T)
    lm = batch["loss_mask"]
    S = lm.shape[1]
    decay = ref["settings"]["step_loss_decay"]
    ref_total = 0.0
    own_total = 0.0
    for s, step in enumerate(ref["per_step"]):
        ref_rows = torch.tensor(step["row_soft_ce_unmasked"])[:, :T]
        valid = out.mask[:, s].bool()  # deepspec's rows: the predicted token's own mask
        torch.testing.assert_close(soft_ce[s][valid], ref_rows[valid], atol=1e-4, rtol=1e-5)
        pos = torch.arange(T) + 2 + s
        own = (pos < S) & lm[:, pos.clamp(max=S - 1)].bool()
        assert torch.equal(valid, own)
        ref_mask = torch.tensor(step["position_mask"])[:, :T].bool()
        assert float(step["normalizer"]) == B * S
        ref_total += decay**s * float(soft_ce[s][ref_mask].sum()) / (B * S)
        own_total += decay**s * float(soft_ce[s][valid].sum()) / max(int(valid.sum()), 1)
    assert ref_total == pytest.approx(ref["loss"], abs=1e-4)
    with torch.enable_grad():
        loss = get_algorithm("eagle3").loss(draft, out, step_loss_decay=decay)
    assert float(loss.loss.detach()) == pytest.approx(own_total, rel=1e-5)
