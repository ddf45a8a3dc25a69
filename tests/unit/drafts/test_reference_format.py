"""The DeepSpec reference implementation's draft format: read as it is, written by
``python -m deepspec.export --to deepspec-reference``, and round trips that draft the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from deepspec.drafts import build_draft, load_draft, save_draft
from deepspec.drafts.reference_format import REFERENCE_ARCHITECTURES
from deepspec.errors import DataError
from deepspec.export import ExportRefused, export_draft
from tests.conftest import ROOT

FIXTURES = os.path.join(ROOT, "tests", "data", "reference_fixtures")
OPTS = {
    "dspark": ["model.markov_rank=8", "model.markov_head_type=gated"],
    "dflash": [],
    "eagle3": ["model.ttt_length=4"],
}


def make_draft(algorithm: str, target_dir: str, seed: int = 0):
    """A draft of ``algorithm`` with every weight random (norms and biases included), so a
    swapped or dropped tensor changes its proposals."""
    from deepspec.config import load_config

    cfg = load_config(
        opts=[
            f"algorithm={algorithm}",
            "model.target_layer_ids=[0, 1]",
            "model.block_size=4",
            "model.num_draft_layers=2",
            "model.mask_token_id=3",
            "model.qk_norm=true",
            "model.context_window=0",
            *OPTS[algorithm],
        ]
    )
    torch.manual_seed(seed)
    draft = build_draft(cfg, target_dir)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if "embed_tokens" not in name and "lm_head" not in name:
                p.add_(torch.randn_like(p) * 0.1)
    return draft


@torch.no_grad()
def proposals(draft, seed: int = 0):
    """Greedy proposals and logits after a random 20-position context."""
    g = torch.Generator().manual_seed(seed)
    d = draft.spec.hidden_size
    feats = torch.randn(1, 20, len(draft.config.target_layer_ids) * d, generator=g)
    tokens = torch.randint(0, draft.spec.vocab_size, (1, 21), generator=g)
    state = draft.new_state(1)
    draft.extend(state, feats, torch.tensor([20]), tokens=tokens[:, :20])
    return draft.propose(state, tokens[:, 20], temperature=0.0)


@pytest.fixture(scope="module")
def targets(tiny_target):
    """A Llama target (deepspec's tiny one) and the fixtures' Qwen3 and Gemma 4 (K = V, a
    global head dim of 32 against 16) targets."""
    return {
        "llama": tiny_target("llama"),
        "qwen3": os.path.join(FIXTURES, "qwen3_dspark", "target"),
        "gemma4": os.path.join(FIXTURES, "gemma4_dspark", "target"),
    }


ROUND_TRIPS = [(a, f) for f in ("llama", "qwen3", "gemma4") for a in ("dspark", "dflash", "eagle3")]
ROUND_TRIPS.remove(("eagle3", "llama"))  # refused: no q/k norms (see the refusal test below)


@pytest.mark.parametrize("algorithm, family", ROUND_TRIPS)
def test_export_to_the_reference_format_round_trips(algorithm, family, targets, tmp_path):
    draft = make_draft(algorithm, targets[family]).eval()
    save_draft(draft, str(tmp_path / "draft"))
    out = tmp_path / "reference"
    manifest = export_draft(str(tmp_path / "draft"), "deepspec-reference", str(out))
    config = json.loads((out / "config.json").read_text())
    assert manifest["architecture"] == config["architectures"][0] in REFERENCE_ARCHITECTURES
    tensors = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" in tensors and "embed_tokens.weight" in tensors
    if algorithm == "eagle3":
        assert {"step_loss_decay", "ttt_length", "target_layer_ids"} <= set(config)
        assert "layers.0.hidden_norm.weight" in tensors and "embed_norm.weight" not in tensors
    else:
        assert {"num_anchors", "mask_token_id", "enable_confidence_head", "markov_rank"} <= set(config)
        assert config["enable_confidence_head"] == (algorithm == "dspark")
        assert "hidden_norm.weight" in tensors and "context_norm.weight" not in tensors
    if family == "gemma4":  # the target's global-attention geometry, K = V, no v_proj
        assert config["global_head_dim"] == 32 and config["attention_k_eq_v"] is True
        assert tensors["layers.0.self_attn.q_proj.weight"].shape[0] == 4 * 32
        assert not any("v_proj" in k for k in tensors)
        assert "layers.0.pre_feedforward_layernorm.weight" in tensors
    back = load_draft(str(out)).eval()
    assert type(back) is type(draft)
    want, got = proposals(draft), proposals(back)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    if want.confidence is not None:
        torch.testing.assert_close(got.confidence, want.confidence, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["qwen3_dspark", "qwen3_eagle3", "gemma4_dspark"])
def test_a_released_draft_exports_back_to_its_own_tensors(name, tmp_path):
    """Import then export: every tensor of the reference's file, under its own name, same values."""
    src = os.path.join(FIXTURES, name, "draft")
    export_draft(src, "deepspec-reference", str(tmp_path / "out"))
    original = load_file(os.path.join(src, "model.safetensors"))
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(written) == set(original)
    for key, tensor in original.items():
        assert torch.equal(written[key].to(tensor.dtype), tensor), key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    with open(os.path.join(src, "config.json"), encoding="utf-8") as fh:
        reference = json.load(fh)
    for key in (
        "architectures",
        "target_layer_ids",
        "num_hidden_layers",
        "num_target_layers",
        "hidden_size",
        "num_attention_heads",
        "vocab_size",
        "block_size",
        "mask_token_id",
        "markov_rank",
        "ttt_length",
        "global_head_dim",
        "num_global_key_value_heads",
        "attention_k_eq_v",
        "num_anchors",
    ):
        assert config.get(key) == reference.get(key), key


def test_gemma4_draft_takes_the_targets_global_attention_geometry(targets):
    draft = make_draft("dspark", targets["gemma4"])
    attn = draft.layers[0].self_attn
    assert (attn.head_dim, attn.num_kv_heads, attn.v_proj) == (32, 1, None)
    # proportional RoPE over the global head dim: a quarter of its 16 frequency pairs rotate
    assert int((draft.rotary.inv_freq != 0).sum()) == 4 and draft.rotary.inv_freq.numel() == 16


def test_reference_export_refuses_what_the_reference_cannot_hold(targets, tmp_path):
    cases = {
        "no q/k norms": make_draft("eagle3", targets["llama"]),
    }
    from deepspec.config import load_config

    windowed = load_config(
        opts=[
            "algorithm=dflash",
            "model.target_layer_ids=[0, 1]",
            "model.context_window=8",
            "model.mask_token_id=3",
            "model.qk_norm=true",
        ]
    )
    cases["sliding window of 8"] = build_draft(windowed, targets["qwen3"])
    for reason, draft in cases.items():
        path = str(tmp_path / reason.replace(" ", "_"))
        save_draft(draft, path)
        with pytest.raises(ExportRefused, match=f"reference format: .*{reason}"):
            export_draft(path, "deepspec-reference", str(tmp_path / "out"))
        assert not (tmp_path / "out").exists()


def test_reference_draft_with_a_layer_scale_is_refused(tmp_path):
    import shutil

    from safetensors.torch import save_file

    src = os.path.join(FIXTURES, "gemma4_dspark", "draft")
    dst = tmp_path / "draft"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors["layers.1.layer_scalar"] = tensors["layers.1.layer_scalar"] * 2
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DataError, match="layers.1.layer_scalar is not 1"):
        load_draft(str(dst))


def test_hub_id_offline_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    target = os.path.join(FIXTURES, "qwen3_dspark", "target")
    cmd = [
        sys.executable,
        os.path.join(ROOT, "eval.py"),
        "--target_name_or_path",
        target,
        "--draft_name_or_path",
        "deepseek-ai/dspark_qwen3_4b_block7",
        "--no-baseline",
        "--max-samples",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: draft 'deepseek-ai/dspark_qwen3_4b_block7' is not a local directory")
    assert "huggingface-cli download deepseek-ai/dspark_qwen3_4b_block7 --local-dir DIR" in lines[0]


def test_convert_writes_deepspec_format_that_drafts_the_same(tmp_path):
    src = os.path.join(FIXTURES, "qwen3_eagle3", "draft")
    cmd = [sys.executable, "-m", "deepspec.drafts", "convert", src, str(tmp_path / "converted")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert config["architectures"] == ["Eagle3Draft"] and config["weights_checksum"].startswith("xxh3-128:")
    want, got = proposals(load_draft(src).eval()), proposals(load_draft(str(tmp_path / "converted")).eval())
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.logits, want.logits)
    again = subprocess.run(cmd[:-1] + [src], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert again.returncode != 0 and again.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "not a draft checkpoint" in again.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        ({"target_layer_ids": None}, "has no target_layer_ids list"),
        ({"num_target_layers": "six"}, "num_target_layers must be an integer"),
        ({"hidden_size": None}, "does not describe the target"),
        ({"num_hidden_layers": 2, "architectures": ["Qwen3Eagle3Model"]}, "an Eagle3 draft of 2 layers"),
    ],
)
def test_malformed_reference_config_is_one_line(change, message, tmp_path):
    import shutil

    dst = tmp_path / "draft"
    shutil.copytree(os.path.join(FIXTURES, "qwen3_dspark", "draft"), dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(change)
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=message) as info:
        load_draft(str(dst))
    assert "\n" not in str(info.value) and str(dst) in str(info.value)
