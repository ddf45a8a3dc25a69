"""TargetFeatureExtractor against HF's own output_hidden_states, for every tiny family."""

from __future__ import annotations

import pytest
import torch

from deepspec.data.target_features import TargetFeatureExtractor
from deepspec.errors import TargetError
from deepspec.targets.tiny import TINY_FAMILIES, build_tiny_target


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    built = {}

    def get(family):
        if family not in built:
            out = build_tiny_target(family, tmp_path_factory.mktemp(family), vocab_size=128)
            built[family] = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        return built[family]

    return get


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_features_equal_hf_hidden_states(family, tiny_models):
    model = tiny_models(family)
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 11))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states  # [emb, layer0, ..., final normed]
    extractor = TargetFeatureExtractor(model, [-1, 0, 2])
    hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in extractor.base.layers]
    feats = extractor(ids, torch.ones_like(ids))
    d = model.config.hidden_size
    assert feats.hidden_states.shape == (2, 11, 3 * d) and feats.last_hidden_states.shape == (2, 11, d)
    assert torch.equal(feats.hidden_states[..., :d], ref[0])  # -1 = embeddings (Gemma: scaled)
    assert torch.equal(feats.hidden_states[..., d : 2 * d], ref[1])  # output of layer 0
    assert torch.equal(feats.hidden_states[..., 2 * d :], ref[3])  # output of layer 2
    assert torch.equal(feats.last_hidden_states, ref[-1])
    hooks_after = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in extractor.base.layers]
    assert hooks_after == hooks_before  # our hooks are gone after the call


def test_last_layer_is_captured_before_the_final_norm(tiny_models):
    model = tiny_models("qwen3")
    ids = torch.randint(3, 128, (1, 7))
    feats = TargetFeatureExtractor(model, [3])(ids)
    base = model.get_decoder()
    torch.testing.assert_close(base.norm(feats.hidden_states), feats.last_hidden_states, rtol=0, atol=1e-6)
    assert not torch.allclose(feats.hidden_states, feats.last_hidden_states)


def test_right_padding_leaves_real_positions_unchanged(tiny_models):
    model = tiny_models("llama")
    torch.manual_seed(1)
    short, long = torch.randint(3, 128, (1, 5)), torch.randint(3, 128, (1, 9))
    extractor = TargetFeatureExtractor(model, [-1, 1])
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0, :5], mask[0, :5] = short[0], 1
    ids[1], mask[1] = long[0], 1
    batched = extractor(ids, mask)
    alone = extractor(short)
    torch.testing.assert_close(batched.hidden_states[0, :5], alone.hidden_states[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        batched.last_hidden_states[0, :5], alone.last_hidden_states[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("layer_ids", [[4], [-2], [], [1, 1]])
def test_invalid_layer_ids_are_rejected(layer_ids, tiny_models):
    with pytest.raises(TargetError, match="target_layer_ids"):
        TargetFeatureExtractor(tiny_models("llama"), layer_ids)
