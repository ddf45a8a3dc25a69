"""Draft models: train/inference consistency, masking, gradients, losses, checkpoints, overfit."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from deepspec.config import load_config
from deepspec.drafts import build_draft, get_algorithm, load_draft
from deepspec.drafts.blocks import block_attention, sample_anchors
from deepspec.drafts.losses import position_weights
from deepspec.targets.tiny import TINY_FAMILIES
from tests.helpers import (
    LAYER_IDS,
    D,
    V,
    block_attention_inputs,
    hand_block_loss,
    infer,
    make_draft,
    random_batch,
)

VARIANTS = [
    ("dflash", {}),
    ("dspark", {"model.markov_head_type": "vanilla"}),
    ("dspark", {"model.markov_head_type": "gated"}),
    ("dspark", {"model.markov_head_type": "rnn"}),
    ("dspark", {"model.markov_head_type": "vanilla", "model.confidence_head_with_markov": False}),
    ("dspark", {"model.context_window": 6, "model.qk_norm": True}),
    ("dflash", {"model.context_window": 5, "model.qk_norm": False}),
    ("dspark", {"model.draft_vocab_size": 48}),
    ("dflash", {"model.draft_vocab_size": 48}),
    ("eagle3", {"model.draft_vocab_size": 48}),
    ("eagle3", {}),
]
IDS = [
    "dflash",
    "dspark-vanilla",
    "dspark-gated",
    "dspark-rnn",
    "dspark-conf-no-markov",
    "dspark-window-qknorm",
    "dflash-window-no-qknorm",
    "dspark-pruned",
    "dflash-pruned",
    "eagle3-pruned",
    "eagle3",
]


# ---- the key test: the packed training forward equals inference ---------------------------


@pytest.mark.parametrize("algo, overrides", VARIANTS, ids=IDS)
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "gemma4_text"])
def test_train_inference_consistency(algo, overrides, family):
    cfg, model = make_draft(algo, family, **overrides)
    model.eval()
    ids, loss_mask, feats, last = random_batch(1, 40)
    a = 17
    prop = infer(model, ids, feats, a)
    k = prop.tokens.shape[1]
    seq = ids.clone()
    seq[0, a + 1 : a + 1 + k] = prop.tokens[0]  # the sequence the draft itself proposed
    with torch.no_grad():
        if algo == "eagle3":
            out = model(seq, loss_mask, feats, last)
            train_logits = model.lm_logits(out.hidden[0, :, a - 1])  # step s at index a-1
        else:
            out = model(seq, loss_mask, feats, last, anchors=torch.tensor([[5, a, 30]]))
            markov = None if out.markov is None else out.markov[0, 1]
            train_logits = model.block_logits(out.hidden[0, 1], markov)
    torch.testing.assert_close(train_logits.float(), prop.logits[0], atol=1e-5, rtol=1e-5)
    if prop.confidence is not None:
        torch.testing.assert_close(
            torch.sigmoid(out.confidence_logits[0, 1]), prop.confidence[0], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
@pytest.mark.parametrize("family", ["gemma3_text", "gemma4_text", "qwen3"])
def test_training_loss_scores_the_distribution_propose_samples(head, family):
    """The fused LM-head loss sees ``softcap(W h) + W2 m``, the logits ``propose()`` samples
    from (Gemma's cap bounds the backbone's logits; the Markov bias comes after it)."""
    from deepspec.drafts.fused_head import head_loss_rows

    cap = {"final_logit_softcapping": 2.0} if family.startswith("gemma") else {}
    _, model = make_draft("dspark", family, target=cap, **{"model.markov_head_type": head})
    model.eval()
    with torch.no_grad():  # a non-zero Markov bias, large enough that the cap matters
        model.markov_head.W2.weight.normal_(std=2.0)
    ids, loss_mask, feats, last = random_batch(1, 40)
    a = 17
    prop = infer(model, ids, feats, a)
    seq = ids.clone()
    seq[0, a + 1 : a + 1 + prop.tokens.shape[1]] = prop.tokens[0]
    with torch.no_grad():
        out = model(seq, loss_mask, feats, last, anchors=torch.tensor([[a]]))
        ones = torch.ones(prop.tokens.shape[1])
        rows = head_loss_rows(
            out.hidden[0, 0],
            out.target_hidden[0, 0],
            prop.tokens[0],
            model.lm_head.weight,
            a_ce=ones,
            a_l1=ones * 0,
            a_soft=ones * 0,
            markov=out.markov[0, 0],
            W2=model.markov_head.W2.weight,
            softcap=model.spec.final_logit_softcapping,
        )
    want = -torch.log_softmax(prop.logits[0].double(), -1).gather(-1, prop.tokens[0][:, None])[:, 0]
    assert model.spec.final_logit_softcapping == cap.get("final_logit_softcapping")
    torch.testing.assert_close(rows.ce.double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("algo, overrides", VARIANTS[:2] + VARIANTS[-1:], ids=["dflash", "dspark", "eagle3"])
def test_batched_ragged_inference_equals_per_row(algo, overrides):
    _, model = make_draft(algo, **overrides)
    model.eval()
    ids, _, feats, _ = random_batch(3, 40)
    anchors = torch.tensor([9, 23, 14])
    batched = infer(model, ids, feats, anchors)
    for b in range(3):
        single = infer(model, ids[b : b + 1], feats[b : b + 1], anchors[b : b + 1])
        torch.testing.assert_close(batched.logits[b], single.logits[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(batched.tokens[b], single.tokens[0])


@pytest.mark.parametrize("algo", ["dflash", "dspark", "eagle3"])
def test_incremental_extend_equals_one_extend(algo):
    """Decoding extends the context a few verified tokens at a time."""
    _, model = make_draft(algo)
    model.eval()
    ids, _, feats, _ = random_batch(1, 40)
    once = infer(model, ids, feats, 20)
    state = model.new_state(1)
    for start, stop in ((0, 8), (8, 9), (9, 15), (15, 20)):
        model.extend(state, feats[:, start:stop], torch.tensor([stop - start]), tokens=ids[:, start:stop])
    steps = model.propose(state, ids[:, 20], temperature=0.0)
    torch.testing.assert_close(steps.logits, once.logits, atol=1e-5, rtol=1e-5)


# ---- masking ------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["dflash", "dspark"])
def test_block_sees_only_context_before_anchor_and_its_own_block(algo):
    _, model = make_draft(algo)
    ids, loss_mask, feats, last = random_batch(1, 48)
    anchors = torch.tensor([[6, 20, 33]])
    with torch.no_grad():
        base = model(ids, loss_mask, feats, last, anchors=anchors)
        feats2 = feats.clone()
        feats2[:, 20:] += torch.randn_like(feats2[:, 20:])  # context at/after the middle anchor
        ids2 = ids.clone()
        ids2[0, 6] = (ids[0, 6] + 1) % V  # the first block's anchor token
        ids2[0, 33] = (ids[0, 33] + 1) % V  # the last block's anchor token
        changed = model(ids2, loss_mask, feats2, last, anchors=anchors)
    torch.testing.assert_close(changed.hidden[0, 1], base.hidden[0, 1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(changed.hidden[0, 2], base.hidden[0, 2])


def test_eagle3_training_is_causal():
    _, model = make_draft("eagle3")
    ids, loss_mask, feats, last = random_batch(1, 30)
    with torch.no_grad():
        base = model(ids, loss_mask, feats, last)
        feats2, ids2 = feats.clone(), ids.clone()
        feats2[:, 15:] += 1.0
        ids2[0, 20:] = (ids2[0, 20:] + 1) % V
        changed = model(ids2, loss_mask, feats2, last)
    # step s at index t reads tokens up to t+1+s and features up to t
    torch.testing.assert_close(changed.hidden[0, 0, :15], base.hidden[0, 0, :15], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(changed.hidden[0, 3, :15], base.hidden[0, 3, :15], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(changed.hidden[0, 0, 15:], base.hidden[0, 0, 15:])


def test_flex_equals_dense_block_attention():
    q, kb, vb, kc, vc, anchors = block_attention_inputs(0)
    dense = block_attention(q, kb, vb, kc, vc, anchors, 0.25, backend="sdpa", chunk=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = block_attention(q, kb, vb, kc, vc, anchors, 0.25, backend="flex")
    torch.testing.assert_close(dense, flex, atol=1e-5, rtol=1e-5)
    # chunking never changes the result
    torch.testing.assert_close(
        dense, block_attention(q, kb, vb, kc, vc, anchors, 0.25, backend="sdpa", chunk=1)
    )


def _reference_block_attention(q, kb, vb, kc, vc, anchors, scale, window):
    """One query at a time, with its visible keys gathered explicitly: slot ``s`` of the
    block at ``a`` sees context ``j < a`` with ``a + s - j < window`` (a sliding window)."""
    B, N, H, G, hd = q.shape
    groups = H // kc.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for n in range(N):
            a = int(anchors[b, n])
            for s in range(G):
                lo = max(0, a + s - window + 1) if window > 0 else 0
                lo = min(lo, a)
                k = torch.cat([kc[b, :, lo:a], kb[b, n]], 1).repeat_interleave(groups, 0)  # [H, T, hd]
                v = torch.cat([vc[b, :, lo:a], vb[b, n]], 1).repeat_interleave(groups, 0)
                w = torch.softmax(q[b, n, :, s : s + 1] @ k.transpose(-1, -2) * scale, -1)  # [H, 1, T]
                out[b, n, :, s : s + 1] = w @ v
    return out


@pytest.mark.parametrize("window", [0, 1, 2, 3, 7])
def test_windowed_block_attention_equals_reference(window):
    q, kb, vb, kc, vc, anchors = block_attention_inputs(window)
    g = torch.Generator().manual_seed(100 + window)
    anchors[0, 0] = 0  # a block with no context at all
    inputs = [t.requires_grad_() for t in (q, kb, vb, kc, vc)]
    ref = _reference_block_attention(q, kb, vb, kc, vc, anchors, 0.25, window)
    w = torch.randn(ref.shape, generator=g)
    ref_grads = torch.autograd.grad((ref * w).sum(), inputs)
    for chunk in (1, 4, 64):
        dense = block_attention(q, kb, vb, kc, vc, anchors, 0.25, backend="sdpa", chunk=chunk, window=window)
        torch.testing.assert_close(dense, ref, atol=1e-5, rtol=1e-5)
        for got, want in zip(torch.autograd.grad((dense * w).sum(), inputs), ref_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    ref, q, kb, vb, kc, vc = (t.detach() for t in (ref, q, kb, vb, kc, vc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = block_attention(q, kb, vb, kc, vc, anchors, 0.25, backend="flex", window=window)
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [0, 5])
def test_recent_context_attention_probe(window):
    """Zero queries attend uniformly: the probe returns exactly the uniform share. Queries
    aligned with the newest context key put nearly all their mass there."""
    from deepspec.drafts.blocks import recent_context_attention

    g = torch.Generator().manual_seed(0)
    B, N, H, G, hd, KVH, S = 1, 4, 2, 3, 8, 1, 30
    kb = torch.randn(B, N, KVH, G, hd, generator=g)
    kc = torch.randn(B, KVH, S, hd, generator=g)
    anchors = torch.tensor([[0, 6, 15, 29]])  # the first has no context: skipped
    keep = torch.ones(B, N, dtype=torch.bool)
    mass, uniform = recent_context_attention(torch.zeros(B, N, H, G, hd), kb, kc, anchors, keep, 1.0, window)
    visible = [min(a, window - 1) if window else a for a in (6, 15, 29)]  # slot 0 sees W-1
    expected = sum(min(8, n) / (n + G) for n in visible) / 3
    assert mass == pytest.approx(expected) and uniform == pytest.approx(expected)
    q = torch.zeros(B, N, H, G, hd)
    for n, a in enumerate(anchors[0].tolist()):
        if a:
            q[0, n, :, 0] = 50.0 * kc[0, 0, a - 1] / kc[0, 0, a - 1].norm()
    kc[0, 0] = kc[0, 0] / kc[0, 0].norm(dim=-1, keepdim=True)  # unit keys: the match wins
    kb = kb / kb.norm(dim=-1, keepdim=True)
    mass, _ = recent_context_attention(q, kb, kc, anchors, keep, 1.0, window)
    assert mass > 0.95


@pytest.mark.parametrize("algo", ["dflash", "dspark"])
def test_context_window_hides_older_context_in_training_and_inference(algo):
    W, a = 5, 20
    _, model = make_draft(algo, **{"model.context_window": W})
    model.eval()
    ids, loss_mask, feats, last = random_batch(1, 40)
    oldest = a - W + 1  # slot 0 sees the newest W-1 positions
    older = feats.clone()
    older[:, :oldest] += torch.randn_like(older[:, :oldest])  # outside the window
    inside = feats.clone()
    inside[:, oldest] += 1.0  # the oldest position inside it
    anchors = torch.tensor([[a]])
    with torch.no_grad():
        hidden = {
            n: model(ids, loss_mask, f, last, anchors=anchors).hidden
            for n, f in (("base", feats), ("older", older), ("inside", inside))
        }
    proposals = {
        n: infer(model, ids, f, a) for n, f in (("base", feats), ("older", older), ("inside", inside))
    }
    torch.testing.assert_close(hidden["older"], hidden["base"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(proposals["older"].logits, proposals["base"].logits, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(hidden["inside"], hidden["base"])
    assert not torch.allclose(proposals["inside"].logits, proposals["base"].logits)


@pytest.mark.parametrize("algo", ["dflash", "dspark"])
def test_windowed_cache_trims_and_still_equals_training(algo):
    """A long incremental decode: the cache drops positions no row can see (offset > 0,
    small buffers), and every proposal equals the packed training forward at that anchor."""
    W = 6
    _, model = make_draft(algo, **{"model.context_window": W})
    model.eval()
    S = 260
    ids, loss_mask, feats, last = random_batch(2, S)
    state = model.new_state(2)
    lengths = torch.tensor([0, 0])
    checked = 0
    for step in range(40):
        counts = torch.tensor([7, 5]) if step % 2 else torch.tensor([3, 6])
        counts = torch.minimum(counts, S - 10 - lengths)
        T = int(counts.max())
        rows = torch.stack([feats[b, int(lengths[b]) : int(lengths[b]) + T] for b in range(2)])
        if rows.shape[1] < T:
            break
        model.extend(state, rows, counts)
        lengths = lengths + counts
        if step % 10 == 9:
            prop = model.propose(state, ids[torch.arange(2), lengths], temperature=0.0)
            for b in range(2):
                seq = ids[b : b + 1].clone()
                seq[0, int(lengths[b]) + 1 : int(lengths[b]) + 1 + prop.tokens.shape[1]] = prop.tokens[b]
                with torch.no_grad():
                    out = model(seq, loss_mask[:1], feats[b : b + 1], last[:1], anchors=lengths[b].view(1, 1))
                markov = None if out.markov is None else out.markov[0, 0]
                torch.testing.assert_close(
                    model.block_logits(out.hidden[0, 0], markov).float(), prop.logits[b], atol=1e-5, rtol=1e-5
                )
                checked += 1
    assert checked >= 6
    assert state.offset > 64  # trimmed
    assert state.k[0].shape[1] < int(lengths.min())  # the buffers hold less than the context


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("qk_norm", [None, True, False])
def test_qk_norm_switch(tmp_path, family, qk_norm):
    _, model = make_draft("dspark", family, **{"model.qk_norm": qk_norm})
    expected = (family == "qwen3") if qk_norm is None else qk_norm
    attn = model.layers[0].self_attn
    assert (attn.q_norm is not None) == expected and (attn.k_norm is not None) == expected
    model.save_pretrained(str(tmp_path / "d"))
    loaded = load_draft(str(tmp_path / "d"))
    assert (loaded.layers[0].self_attn.q_norm is not None) == expected
    assert loaded.config.qk_norm == qk_norm


def test_anchor_sampling():
    loss_mask = torch.zeros(3, 20, dtype=torch.long)
    loss_mask[0, 5:15] = 1  # valid anchors 5..13 (9)
    loss_mask[1, 18:] = 1  # valid anchor 18 only
    anchors, keep = sample_anchors(loss_mask, 4, torch.Generator().manual_seed(0))
    assert anchors.shape == (3, 4)
    assert keep[0].all() and keep[1].tolist() == [True, False, False, False] and not keep[2].any()
    real = anchors[0]
    assert (real >= 5).all() and (real <= 13).all() and (real.diff() > 0).all()
    assert anchors[1, 0] == 18
    counts = torch.zeros(20)
    for seed in range(400):  # uniform over the valid positions
        a, _ = sample_anchors(loss_mask[:1], 3, torch.Generator().manual_seed(seed))
        counts[a[0]] += 1
    assert counts[:5].sum() == 0 and counts[14:].sum() == 0
    assert counts[5:14].min() > 0.6 * counts[5:14].mean()


# ---- gradients and losses -----------------------------------------------------------------


@pytest.mark.parametrize("algo, overrides", VARIANTS, ids=IDS)
def test_only_trainable_parameters_change(algo, overrides):
    cfg, model = make_draft(algo, **overrides)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert {"embed_tokens.weight"} <= set(frozen)
    ids, loss_mask, feats, last = random_batch(2, 32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(ids, loss_mask, feats, last, num_anchors=6)
    alg = get_algorithm(algo)
    alg.loss(model, out, **alg.loss_kwargs(cfg)).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    opt.step()
    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], before)


def test_block_loss_matches_hand_computation():
    cfg, model = make_draft("dspark", dtype=torch.float64)
    ids, loss_mask, feats, last = random_batch(2, 30, dtype=torch.float64)
    loss_mask[1, 20:] = 0
    out = model(ids, loss_mask, feats, last, num_anchors=5, generator=torch.Generator().manual_seed(3))
    alg = get_algorithm("dspark")
    res = alg.loss(model, out, **alg.loss_kwargs(cfg))
    # by hand, all blocks at once
    logits = model.lm_logits(out.hidden) + model.markov_head.W2(out.markov)
    p_d = torch.softmax(logits, -1)
    p_t = torch.softmax(model.lm_logits(out.target_hidden), -1)
    ce = -torch.log(p_d.gather(-1, out.targets[..., None]).squeeze(-1))
    expected, w = hand_block_loss(cfg, out, ce, (p_d - p_t).abs().sum(-1))
    torch.testing.assert_close(res.loss, expected, atol=1e-10, rtol=1e-10)
    assert res.metrics["ce"] == pytest.approx(float((w * ce).sum().detach() / w.sum()))
    # the eval mask is the contiguous supervised prefix of each kept block
    for b in range(2):
        for n in range(out.anchors.shape[1]):
            a = int(out.anchors[b, n])
            for k in range(5):
                ok = bool(out.keep[b, n]) and all(
                    a + 1 + j < 30 and loss_mask[b, a + 1 + j] for j in range(k + 1)
                )
                assert bool(out.eval_mask[b, n, k]) == ok
    # a global normalizer (other ranks' weights) scales the loss
    doubled = alg.loss(model, out, **alg.loss_kwargs(cfg), normalizer=2 * w.sum())
    torch.testing.assert_close(doubled.loss, expected / 2)
    assert position_weights(3, 4.0).tolist() == pytest.approx([1.0, 0.7788007, 0.6065307])


def test_eagle3_loss_matches_hand_computation():
    cfg, model = make_draft("eagle3", dtype=torch.float64)
    ids, loss_mask, feats, last = random_batch(2, 20, dtype=torch.float64)
    loss_mask[0, :6] = 0
    out = model(ids, loss_mask, feats, last)
    res = get_algorithm("eagle3").loss(model, out, step_loss_decay=0.8)
    logp = F.log_softmax(model.lm_logits(out.hidden), -1)
    p_t = torch.softmax(model.lm_logits(out.target_hidden), -1)
    soft_ce = -(p_t * logp).sum(-1)  # [B, K, T]
    mask = out.mask.double()
    expected = sum(0.8**s * (soft_ce[:, s] * mask[:, s]).sum() / mask[:, s].sum() for s in range(4))
    torch.testing.assert_close(res.loss, expected, atol=1e-10, rtol=1e-10)
    # targets: step s at index t predicts x_{t+2+s}; masks follow the loss mask
    assert torch.equal(out.targets[0, 2, :10], ids[0, 4:14])
    assert not out.mask[0, 0, :4].any() and out.mask[0, 0, 4:18].all() and not out.mask[0, 0, 18:].any()


# ---- families, checkpoints, overfit -------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("algo", ["dspark", "eagle3"])
def test_every_family_trains_and_round_trips(tmp_path, family, algo):
    cfg, model = make_draft(algo, family)
    ids, loss_mask, feats, last = random_batch(1, 24)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    alg = get_algorithm(algo)
    loss = alg.loss(model, model(ids, loss_mask, feats, last, num_anchors=4), **alg.loss_kwargs(cfg)).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    model.eval()
    model.save_pretrained(str(tmp_path / "draft"))
    loaded = load_draft(str(tmp_path / "draft"))
    assert type(loaded) is type(model) and loaded.config == model.config
    a, b = infer(model, ids, feats, 12), infer(loaded, ids, feats, 12)
    assert torch.equal(a.logits, b.logits)


def test_checkpoint_records_conventions_and_loads_embedded_target_embeddings(tmp_path, smollm2_dir):
    import json

    from deepspec.targets import load_family_spec

    cfg = load_config(
        "config/dspark/dspark_smollm2_135m.py", ["model.num_draft_layers=1", "model.draft_vocab_size=0"]
    )
    model = build_draft(cfg, smollm2_dir)
    from safetensors import safe_open

    with safe_open(f"{smollm2_dir}/model.safetensors", "pt") as fh:
        assert torch.equal(model.embed_tokens.weight, fh.get_tensor("model.embed_tokens.weight"))
    assert model.lm_head.weight is model.embed_tokens.weight  # SmolLM2 ties them
    model.save_pretrained(str(tmp_path / "d"))
    with open(tmp_path / "d" / "config.json") as fh:
        saved = json.load(fh)
    assert saved["architectures"] == ["DSparkDraft"]
    assert saved["layer_id_convention"] == "output" and saved["anchor_convention"] == "anchor_first"
    assert saved["window_convention"] == "sliding"
    assert saved["target_layer_ids"] == [1, 7, 14, 21, 27] and saved["target"]["family"] == "llama"
    assert saved["mask_token_id"] is None and saved["markov_rank"] == 128
    assert load_family_spec(smollm2_dir).to_dict() == saved["target"]
    trainable, frozen = model.num_parameters()
    assert frozen == 49152 * 576 and trainable > 0
    # the shipped config prunes the head to 8192 rows of the (tied) target head: its own tensor
    pruned = build_draft(load_config("config/dspark/dspark_smollm2_135m.py"), smollm2_dir)
    assert pruned.lm_head.weight is not pruned.embed_tokens.weight
    assert torch.equal(pruned.lm_head.weight, pruned.embed_tokens.weight[pruned.draft_ids])
    assert pruned.num_parameters()[1] == (49152 + 8192) * 576


def test_fresh_draft_logits_start_near_uniform(smollm2_dir):
    """The calibrated final norm gives a fresh draft logits of std ~1 through the target's
    head (CE near ln V); with weight 1 the head's own scale (~3.2 on SmolLM2) applies."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(512, 576, generator=gen)
    for algo in ("dflash", "eagle3"):
        stds = {}
        for init, scale in (("calibrated", 1.0), ("ones", 1.0), ("calibrated", 2.5)):
            opts = [
                f"model.output_norm_init={init}",
                f"model.output_norm_scale={scale}",
                "model.draft_vocab_size=0",
            ]
            model = build_draft(load_config(f"config/{algo}/{algo}_smollm2_135m.py", opts), smollm2_dir)
            with torch.no_grad():
                stds[init, scale] = model.lm_logits(model.norm(h)).std().item()
        assert 0.9 < stds["calibrated", 1.0] < 1.1, stds
        assert stds["ones", 1.0] > 3.0, stds
        assert stds["calibrated", 2.5] == pytest.approx(2.5 * stds["calibrated", 1.0], rel=1e-3)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("algo", ["dspark", "eagle3"])
def test_target_output_norm_reproduces_the_target_distribution(tmp_path, family, algo):
    """With ``output_norm_init=target``, a draft whose last pre-norm state equals the
    target's gives exactly the target's logits (including Gemma's (1 + w) norm offset)."""
    from transformers import AutoModelForCausalLM

    from deepspec.targets.tiny import build_tiny_target

    target_dir = build_tiny_target(family, tmp_path / "t", seed=3)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        target.model.norm.weight.uniform_(0.5, 2.0)  # far from the calibrated weight
    target.save_pretrained(target_dir)
    ids = torch.randint(0, target.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    captured = {}  # the last decoder layer's output: the state before the final norm
    hook = target.model.layers[-1].register_forward_hook(
        lambda m, i, o: captured.update(h=o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        logits = target(ids).logits
    hook.remove()
    pre_norm = captured["h"]
    cfg = load_config(
        opts=[f"algorithm={algo}", "model.target_layer_ids=[0]", "model.output_norm_init=target"]
    )
    draft = build_draft(cfg, target_dir)
    with torch.no_grad():
        drafted = draft.lm_logits(draft.norm(pre_norm))
    torch.testing.assert_close(drafted, logits, atol=1e-4, rtol=1e-4)
    calibrated = build_draft(
        load_config(opts=[f"algorithm={algo}", "model.target_layer_ids=[0]"]), target_dir
    )
    with torch.no_grad():
        assert not torch.allclose(calibrated.lm_logits(calibrated.norm(pre_norm)), logits, atol=1e-2)


@pytest.mark.parametrize("algo", ["dflash", "dspark", "eagle3"])
def test_overfit_one_batch(algo):
    """200 steps on one batch: CE near 0 and per-position acceptance above 0.95."""
    cfg, model = make_draft(algo, "llama", seed=0)
    g = torch.Generator().manual_seed(5)
    S = 32
    ids = torch.randint(3, V, (1, S), generator=g)
    loss_mask = torch.ones(1, S, dtype=torch.long)
    feats = torch.randn(1, S, len(LAYER_IDS) * D, generator=g)
    # a target whose next-token distribution is peaked on the true next token
    with torch.no_grad():
        last = torch.zeros(1, S, D)
        last[0, :-1] = 60.0 * model.embed_tokens.weight[ids[0, 1:]]
    anchors = torch.tensor([[1, 6, 11, 16, 21, 25]])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    alg = get_algorithm(algo)
    for _ in range(200):
        opt.zero_grad()
        out = model(ids, loss_mask, feats, last, anchors=anchors)
        res = alg.loss(model, out, **alg.loss_kwargs(cfg))
        res.loss.backward()
        opt.step()
    rates = [v for k, v in res.metrics.items() if k.startswith("accept_rate@")]
    assert min(rates) > 0.95, res.metrics
    if algo != "eagle3":
        assert res.metrics["ce"] < 0.1, res.metrics
    else:
        assert min(v for k, v in res.metrics.items() if k.startswith("accuracy@")) == 1.0


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("with_markov", [False, True])
def test_fused_head_gradients_equal_autograd(softcap, with_markov):
    """The analytic backward of the chunked LM-head loss equals autograd of the plain formula."""
    from deepspec.drafts.fused_head import head_loss_rows

    g = torch.Generator().manual_seed(0)
    R, d, r, Vs = 11, 8, 3, 13
    h = torch.randn(R, d, generator=g, dtype=torch.float64, requires_grad=True)
    th = torch.randn(R, d, generator=g, dtype=torch.float64)
    W = torch.randn(Vs, d, generator=g, dtype=torch.float64)
    m = torch.randn(R, r, generator=g, dtype=torch.float64, requires_grad=True) if with_markov else None
    W2 = torch.randn(Vs, r, generator=g, dtype=torch.float64, requires_grad=True) if with_markov else None
    y = torch.randint(0, Vs, (R,), generator=g)
    a_ce, a_l1, a_soft = (torch.rand(R, generator=g, dtype=torch.float64) for _ in range(3))
    rows = head_loss_rows(
        h,
        th,
        y,
        W,
        a_ce=a_ce,
        a_l1=a_l1,
        a_soft=a_soft,
        markov=m,
        W2=W2,
        softcap=softcap,
        max_chunk_elements=4 * Vs,
    )  # several chunks
    got = torch.autograd.grad(rows.loss, [t for t in (h, m, W2) if t is not None])

    def cap(z):
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    z = cap(h @ W.T) + (m @ W2.T if with_markov else 0)  # the Markov bias after the cap
    logp = torch.log_softmax(z, -1)
    q = torch.softmax(cap(th @ W.T), -1)
    ref_loss = (
        a_ce * -logp[torch.arange(R), y]
        + a_l1 * (logp.exp() - q).abs().sum(-1)
        + a_soft * -(q * logp).sum(-1)
    ).sum()
    want = torch.autograd.grad(ref_loss, [t for t in (h, m, W2) if t is not None])
    torch.testing.assert_close(rows.loss, ref_loss)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(rows.overlap, torch.minimum(logp.exp(), q).sum(-1))


def test_eagle3_sampled_positions_equal_the_full_unroll_at_those_positions():
    _, model = make_draft("eagle3")
    ids, loss_mask, feats, last = random_batch(2, 30)
    anchors = torch.tensor([[0, 4, 11, 25], [3, 7, 8, 28]])
    keep = torch.tensor([[True, True, True, True], [True, True, False, True]])
    with torch.no_grad():
        full = model(ids, loss_mask, feats, last)
        part = model(ids, loss_mask, feats, last, anchors=anchors, keep=keep)
    for b in range(2):
        for n in range(4):
            t = int(anchors[b, n]) - 1
            if t < 0:
                assert not part.mask[b, :, n].any()  # anchor 0 has no draft index
                continue
            torch.testing.assert_close(part.hidden[b, :, n], full.hidden[b, :, t])
            assert torch.equal(part.targets[b, :, n], full.targets[b, :, t])
            assert torch.equal(part.mask[b, :, n], full.mask[b, :, t] & keep[b, n])


@pytest.mark.slow
def test_compiled_vocab_kernel_equals_eager(monkeypatch):
    """``train.torch_compile`` routes the LM-head loss's vocabulary work through
    torch.compile: the same losses, statistics and input gradients as eager, for ragged
    chunks, with and without softcap and soft CE, and for a pruned draft vocabulary (labels
    outside it, the target's normaliser given); the switch restores eager afterwards."""
    from deepspec.drafts import fused_head

    gen = torch.Generator().manual_seed(0)
    R, d, V = 70, 16, 1000
    W = torch.randn(V, d, generator=gen)
    y = torch.randint(0, V, (R,), generator=gen)
    th = torch.randn(R, d, generator=gen)
    a = {k: torch.rand(R, generator=gen) for k in ("a_ce", "a_l1", "a_soft")}
    y_pruned = torch.where(torch.rand(R, generator=gen) < 0.3, -1, y)
    lse = torch.logsumexp(th @ W.T, -1) + 0.5  # the target's mass outside the draft vocabulary
    for cap, soft, pruned in ((None, False, False), (30.0, True, False), (None, False, True)):
        coeffs = {**a, "a_soft": a["a_soft"] if soft else torch.zeros(R)}
        if pruned:
            coeffs["target_lse"] = lse
        runs = []
        for compiled in (False, True):
            before = fused_head.use_compiled_vocab_rows(compiled)  # builds the compiled kernel
            eager_calls = []
            eager = fused_head.vocab_rows
            monkeypatch.setattr(
                fused_head, "vocab_rows", lambda *x, calls=eager_calls, f=eager: calls.append(1) or f(*x)
            )
            h = torch.randn(R, d, generator=torch.Generator().manual_seed(1), requires_grad=True)
            labels = y_pruned if pruned else y
            rows = fused_head.head_loss_rows(
                h, th, labels, W, softcap=cap, max_chunk_elements=32 * V, **coeffs
            )
            rows.loss.backward()
            runs.append((rows, h.grad))
            monkeypatch.setattr(fused_head, "vocab_rows", eager)
            fused_head.use_compiled_vocab_rows(before)
            assert len(eager_calls) == (0 if compiled else 3)  # 3 chunks: 32 + 32 + 6 rows
        (eager, g_eager), (fast, g_fast) = runs
        for name in ("loss", "ce", "l1", "soft_ce", "overlap", "hit"):
            torch.testing.assert_close(getattr(fast, name), getattr(eager, name), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g_fast, g_eager, rtol=1e-4, atol=1e-6)
    eager_lse = fused_head.target_lse(th, W, 30.0)
    before = fused_head.use_compiled_vocab_rows(True)
    torch.testing.assert_close(fused_head.target_lse(th, W, 30.0), eager_lse, rtol=1e-5, atol=1e-5)
    fused_head.use_compiled_vocab_rows(before)
    assert fused_head._use_compiled is False


@pytest.mark.parametrize("algo", ["dflash", "dspark"])
def test_overfit_six_sequences_with_the_cpu_recipe(algo):
    """The memorization check: 6 random sequences, 60 steps of batch 2 with the SmolLM2
    config's recipe (optimizer, LR schedule, loss weights and curriculum, anchors, context
    window, qk-norm, output-norm init and scale, and the same initial weight gain
    ``init_std * sqrt(hidden)``). Every position is a unique random key, so the draft must
    look up its context features to memorize; then, on those sequences, teacher-forced
    acc@1 > 0.6 and tau_prob > 2.5 (block size 5)."""
    from deepspec.train.schedule import build_scheduler

    recipe = load_config(f"config/{algo}/{algo}_smollm2_135m.py")
    m, t = recipe.model, recipe.train
    keys = (
        "context_window qk_norm ce_loss_alpha l1_loss_alpha confidence_head_alpha tv_ramp_ratio "
        "loss_decay_gamma num_anchors"
    ).split()
    cfg, model = make_draft(algo, "llama", seed=0, **{f"model.{k}": getattr(m, k) for k in keys})
    model.reset_parameters(std=m.init_std * (576 / D) ** 0.5)  # the same gain: SmolLM2's d is 576
    model.init_output_norm(m.output_norm_init, scale=m.output_norm_scale)
    g = torch.Generator().manual_seed(7)
    N, S, steps = 6, 48, 60
    ids = torch.randint(3, V, (N, S), generator=g)
    loss_mask = torch.ones(N, S, dtype=torch.long)
    feats = torch.randn(N, S, len(LAYER_IDS) * D, generator=g)
    with torch.no_grad():  # a target whose next-token distribution is peaked on the true token
        last = torch.zeros(N, S, D)
        last[:, :-1] = 60.0 * model.embed_tokens.weight[ids[:, 1:]]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
    sched = build_scheduler(opt, steps, t.warmup_ratio, t.lr_scheduler, t.decay_ratio)
    alg = get_algorithm(algo)
    for step in range(steps):
        rows = [(2 * step) % N, (2 * step + 1) % N]
        gens = [torch.Generator().manual_seed(1000 * step + r) for r in rows]
        anchors, keep = sample_anchors(loss_mask[rows], m.num_anchors, gens)
        out = model(ids[rows], loss_mask[rows], feats[rows], last[rows], anchors=anchors, keep=keep)
        res = alg.loss(model, out, **alg.loss_kwargs(cfg, step / steps))
        opt.zero_grad()
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        sched.step()
    every = torch.arange(S - 1).expand(N, -1)  # every position is an anchor
    with torch.no_grad():
        res = alg.loss(model, model(ids, loss_mask, feats, last, anchors=every), **alg.loss_kwargs(cfg))
    assert res.metrics["accuracy@1"] > 0.6, res.metrics
    assert res.metrics["tau_probabilistic"] > 2.5, res.metrics


def test_a_checkpoint_with_the_earlier_fixed_window_is_refused(tmp_path):
    """A window trained before the sliding-window convention drafts differently now: load
    says so and how to fix it, instead of drafting with another mask."""
    import json

    from deepspec.drafts import load_draft
    from deepspec.errors import DataError

    _, model = make_draft("dspark", **{"model.context_window": 6, "model.qk_norm": True})
    model.save_pretrained(str(tmp_path / "d"))
    load_draft(str(tmp_path / "d"))  # the current convention loads
    path = tmp_path / "d" / "config.json"
    raw = json.loads(path.read_text())
    del raw["window_convention"]
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="earlier fixed context window .* retrain it"):
        load_draft(str(tmp_path / "d"))
    raw["context_window"] = 0  # without a window nothing changed: it loads
    path.write_text(json.dumps(raw))
    load_draft(str(tmp_path / "d"))


@pytest.mark.parametrize("positions", [None, 6])
def test_eagle3_normaliser_counts_the_rows_its_forward_supervises(positions):
    """The trainer's global normaliser (prepare_batch) and the forward's mask are one rule."""
    from deepspec.algorithms import get_algorithm

    cfg, model = make_draft("eagle3", **{"model.eagle3_num_positions": positions or "null"})
    ids, loss_mask, feats, last = random_batch(2, 30)
    loss_mask[0, :9] = 0  # a prompt: its tokens are not supervised
    loss_mask[1, 22:] = 0  # padding after an answer
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    extra, counts = get_algorithm("eagle3").prepare_batch(
        cfg, {"input_ids": ids, "loss_mask": loss_mask}, gens
    )
    with torch.no_grad():
        out = model(ids, loss_mask, feats, last, **extra)
    assert torch.equal(counts, out.mask.sum(dim=(0, 2)).double())
    assert counts[0] > counts[-1] > 0  # later steps run out of answer sooner
