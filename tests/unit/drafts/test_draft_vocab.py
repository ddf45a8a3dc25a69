"""Pruned draft vocabularies: selection, d2t/t2d maps, losses by hand, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from deepspec.drafts import build_draft, get_algorithm, load_draft
from deepspec.drafts.vocab import (
    build_draft_vocab,
    check_vocab_maps,
    d2t_from_ids,
    select_draft_vocab,
    t2d_from_ids,
)
from deepspec.errors import DataError
from tests.badinput import rewrite_draft_weights
from tests.helpers import hand_block_loss, infer, make_cfg, make_draft, random_batch


def test_selection_keeps_the_most_frequent_ties_by_id_and_fills_with_unseen_ids():
    counts = np.array([0, 5, 2, 5, 0, 9, 2, 0])
    vocab = select_draft_vocab(counts, 4)
    assert vocab.draft_ids.tolist() == [1, 2, 3, 5]  # 9, 5, 5, then the lower of the two 2s
    assert vocab.coverage == pytest.approx(21 / 23)
    assert (vocab.seen, vocab.counted) == (5, 23)
    padded = select_draft_vocab(np.array([0, 3, 0, 0, 1, 0]), 4)
    assert padded.draft_ids.tolist() == [0, 1, 2, 4]  # 2 seen, then the lowest unseen ids
    assert padded.coverage == 1.0 and "2 unseen ids fill it up" in padded.describe()
    with pytest.raises(ValueError, match="must be in 1..8"):
        select_draft_vocab(counts, 9)


def test_counts_only_supervised_tokens():
    samples = [
        {"input_ids": torch.tensor([7, 7, 3, 1]), "loss_mask": torch.tensor([0, 0, 1, 1])},
        {"input_ids": torch.tensor([7, 2, 2]), "loss_mask": torch.tensor([1, 1, 1])},
    ]
    vocab = build_draft_vocab(samples, 10, 3)
    assert vocab.draft_ids.tolist() == [1, 2, 3]  # 2 twice, then 1, 3, 7 once each: lowest ids
    assert vocab.counted == 5
    with pytest.raises(DataError, match="outside the target vocabulary"):
        build_draft_vocab(samples, 5, 3)


def test_maps_follow_the_engines_convention_and_are_checked():
    ids = torch.tensor([0, 4, 5, 9])
    d2t, t2d = d2t_from_ids(ids), t2d_from_ids(ids, 12)
    assert torch.equal(torch.arange(4) + d2t, ids)  # target = draft + d2t[draft]
    assert t2d.nonzero().flatten().tolist() == [0, 4, 5, 9]
    assert torch.equal(check_vocab_maps(d2t, t2d), ids)
    for bad_d2t, bad_t2d in (
        (torch.tensor([0, 3, 3, 5]), t2d),  # ids 0 4 5 8: not the ids t2d marks
        (torch.tensor([0, 4, 3, 5]), t2d),  # ids 0 5 5 8: not ascending
        (torch.tensor([0, 3, 3, 9]), t2d),  # ids 0 4 5 12: outside the vocabulary
    ):
        with pytest.raises(ValueError):
            check_vocab_maps(bad_d2t, bad_t2d)


def _pruned(algo: str, **overrides):
    cfg, model = make_draft(algo, dtype=torch.float64, **{"model.draft_vocab_size": 48, **overrides})
    ids = model.draft_ids
    assert torch.equal(model.lm_head.weight, model.embed_tokens.weight[ids])  # the target's rows
    assert torch.equal(model.target_ids(model.draft_index(ids)), ids)
    return cfg, model


def test_pruned_block_loss_matches_hand_computation():
    """TV counts the target's mass outside the draft vocabulary; labels outside it have no
    CE; the fused backward equals autograd of the written-out loss."""
    cfg, model = _pruned("dspark")
    with torch.no_grad():
        model.markov_head.W2.weight.normal_(std=0.5)
    ids, loss_mask, feats, last = random_batch(2, 30, dtype=torch.float64)
    loss_mask[1, 20:] = 0
    out = model(ids, loss_mask, feats, last, num_anchors=6, generator=torch.Generator().manual_seed(3))
    alg = get_algorithm("dspark")
    res = alg.loss(model, out, **alg.loss_kwargs(cfg))
    fused = torch.autograd.grad(res.loss, [model.fc.weight, model.markov_head.W2.weight], retain_graph=True)

    p_d = torch.softmax(model.lm_logits(out.hidden) + model.markov_head.W2(out.markov), -1)  # [.., 48]
    q_full = torch.softmax(out.target_hidden @ model.embed_tokens.weight.T, -1)  # [.., V]
    q = q_full[..., model.draft_ids]
    l1 = (p_d - q).abs().sum(-1) + (1 - q.sum(-1))
    # 1 - TV/2 is the acceptance probability of the draft seen over the whole vocabulary
    accept = torch.minimum(model.target_probs(p_d), q_full).sum(-1)
    torch.testing.assert_close(1 - 0.5 * l1, accept)
    index = model.draft_index(out.targets)
    labelled = index >= 0
    assert labelled.any() and (~labelled & out.eval_mask).any()  # both kinds of label occur
    ce = -torch.log(p_d.gather(-1, index.clamp(min=0)[..., None]).squeeze(-1)) * labelled
    expected, w = hand_block_loss(cfg, out, ce, l1)
    torch.testing.assert_close(res.loss, expected, atol=1e-10, rtol=1e-10)
    by_hand = torch.autograd.grad(expected, [model.fc.weight, model.markov_head.W2.weight])
    for a, b in zip(fused, by_hand):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert res.metrics["ce"] == pytest.approx(float((w * ce).sum().detach() / (w * labelled).sum()))
    miss = float(((~labelled) & out.eval_mask).sum() / out.eval_mask.sum())
    assert res.metrics["draft_vocab_miss"] == pytest.approx(miss)


def test_pruned_eagle3_loss_matches_hand_computation():
    cfg, model = _pruned("eagle3")
    ids, loss_mask, feats, last = random_batch(2, 20, dtype=torch.float64)
    loss_mask[0, :6] = 0
    out = model(ids, loss_mask, feats, last)
    res = get_algorithm("eagle3").loss(model, out, step_loss_decay=0.8)
    logp = F.log_softmax(model.lm_logits(out.hidden), -1)
    q = torch.softmax(out.target_hidden @ model.embed_tokens.weight.T, -1)[..., model.draft_ids]
    soft_ce = -(q * logp).sum(-1)  # over the draft vocabulary only
    mask = out.mask.double()
    expected = sum(0.8**s * (soft_ce[:, s] * mask[:, s]).sum() / mask[:, s].sum() for s in range(4))
    torch.testing.assert_close(res.loss, expected, atol=1e-10, rtol=1e-10)


def test_proposals_are_target_ids_with_zero_mass_outside():
    _, model = _pruned("dspark")
    model.eval()
    ids, _, feats, _ = random_batch(2, 30, dtype=torch.float64)
    prop = infer(model, ids, feats, torch.tensor([12, 20]))
    outside = ~model.t2d
    assert model.t2d[prop.tokens].all()
    assert prop.probs.shape[-1] == 128 and prop.logits.shape[-1] == 48
    assert prop.probs[..., outside].abs().max() == 0
    torch.testing.assert_close(prop.probs.sum(-1), torch.ones_like(prop.probs[..., 0]))


@pytest.mark.parametrize("algo", ["dspark", "dflash", "eagle3"])
def test_pruned_checkpoint_round_trip_on_an_untied_target(tmp_path, algo):
    from deepspec.targets.tiny import build_tiny_target

    # untied: the full head comes from the target's lm_head
    target_dir = build_tiny_target("llama", tmp_path / "target", vocab_size=96, tie_word_embeddings=False)
    cfg = make_cfg(algo, **{"model.draft_vocab_size": 40, "model.target_layer_ids": [0, 1]})
    spec_v = json.load(open(f"{target_dir}/config.json"))["vocab_size"]
    draft_ids = torch.randperm(spec_v, generator=torch.Generator().manual_seed(0))[:40].sort().values
    model = build_draft(cfg, target_dir, draft_ids=draft_ids).eval()
    head = load_file(f"{target_dir}/model.safetensors")["lm_head.weight"]
    assert torch.equal(model.lm_head.weight, head[draft_ids])
    last = torch.randn(3, model.spec.hidden_size)
    torch.testing.assert_close(model.target_logsumexp(last), torch.logsumexp(last @ head.T, -1))
    model.save_pretrained(str(tmp_path / "draft"))
    saved = load_file(str(tmp_path / "draft" / "model.safetensors"))
    assert saved["lm_head.weight"].shape == (40, model.spec.hidden_size)
    assert torch.equal(saved["d2t"] + torch.arange(40), draft_ids) and int(saved["t2d"].sum()) == 40
    assert "full_head" not in saved and "draft_ids" not in saved
    assert json.load(open(tmp_path / "draft" / "config.json"))["draft_vocab_size"] == 40
    loaded = load_draft(str(tmp_path / "draft"))
    assert torch.equal(loaded.draft_ids, draft_ids)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec_v, (1, 24), generator=g)
    feats = torch.randn(1, 24, 2 * model.spec.hidden_size, generator=g)
    a, b = infer(model, ids, feats, 12), infer(loaded, ids, feats, 12)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs)
    # maps that disagree are refused with one line
    saved["d2t"] = saved["d2t"].flip(0)
    rewrite_draft_weights(tmp_path / "draft", saved)
    with pytest.raises(DataError, match="draft vocabulary maps are inconsistent"):
        load_draft(str(tmp_path / "draft"))
