"""Exports to the serving engines: layouts and refusals (fast), and llama.cpp for real.

The llama.cpp tests convert a random draft for the embedded SmolLM2 target with llama.cpp's
own converter, serve it with ``llama-server`` next to an f32 GGUF of the target, and check
(1) temperature-0 output equals the same server's plain decoding, (2) the tokens llama.cpp
drafts equal deepspec's ``propose()`` at the same positions (logit near-ties counted, not
failed), and (3) the acceptance llama.cpp reports equals the one deepspec's proposals give.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from deepspec.config import load_config
from deepspec.drafts import build_draft
from deepspec.export import export_draft
from deepspec.export.source import ExportRefused
from tests.conftest import ROOT

SMALL = ["model.num_draft_layers=1", "model.draft_vocab_size=2048"]


def _draft(tmp_path, smollm2_dir, algo: str, opts=(), seed: int = 0) -> str:
    """A random draft for the embedded target, saved as a checkpoint directory."""
    cfg = load_config(f"{ROOT}/config/{algo}/{algo}_smollm2_135m.py", [*SMALL, *opts])
    torch.manual_seed(seed)
    # the 1024 lowest ids (bytes and the commonest merges) and 1024 scattered ones
    rest = 1024 + torch.randperm(49152 - 1024, generator=torch.Generator().manual_seed(seed))[:1024]
    ids = torch.cat([torch.arange(1024), rest]).sort().values
    model = build_draft(cfg, smollm2_dir, draft_ids=ids)
    with torch.no_grad():
        if getattr(model, "markov_head", None) is not None:
            model.markov_head.W2.weight.normal_(std=0.5)  # exercise the Markov bias
        if getattr(model, "confidence_head", None) is not None:
            model.confidence_head.proj.weight.normal_(std=0.05)
    out = tmp_path / f"{algo}_draft"
    model.save_pretrained(str(out))
    return str(out)


def _read(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


# -- layouts and refusals (no engine needed) --------------------------------------------
@pytest.mark.parametrize("algo", ["dspark", "dflash"])
def test_block_draft_export_for_vllm_has_the_loader_keys(tmp_path, smollm2_dir, algo):
    draft = _draft(tmp_path, smollm2_dir, algo)
    manifest = export_draft(draft, "vllm", str(tmp_path / "out"))
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    tensors = _read(str(tmp_path / "out" / "model.safetensors"))
    src_cfg = json.load(open(os.path.join(draft, "config.json")))
    assert cfg["dflash_config"]["target_layer_ids"] == src_cfg["target_layer_ids"]  # "output of" ids
    assert cfg["dflash_config"]["block_size"] == 7 and manifest["num_speculative_tokens"] == 7
    assert cfg["sliding_window"] == src_cfg["context_window"] == 15
    assert set(cfg["layer_types"]) == {"sliding_attention"}
    assert tensors["fc.weight"].shape == (576, 5 * 576)
    assert tensors["layers.0.self_attn.q_norm.weight"].shape == (64,)
    assert tensors["lm_head.weight"].shape == (2048, 576) and tensors["d2t"].dtype == torch.int64
    assert not any(k.startswith("model.") for k in tensors)
    mask = torch.load(tmp_path / "out" / "mask_embedding.pt")
    assert mask["mask_token_id"] == cfg["dflash_config"]["mask_token_id"]
    src = _read(os.path.join(draft, "model.safetensors"))
    torch.testing.assert_close(mask["embedding"], src["mask_embedding"])
    assert not bool(src["t2d"][mask["mask_token_id"]])  # the host id is outside the draft vocabulary
    # d2t offsets map draft index -> target id exactly as the checkpoint's vocabulary
    ids = torch.arange(2048) + tensors["d2t"]
    assert torch.equal(src["t2d"].nonzero().flatten(), ids)
    if algo == "dspark":
        assert tensors["markov_head.markov_w1.weight"].shape == (49152, 128)
        assert tensors["markov_head.markov_w2.weight"].shape == (2048, 128)
        assert tensors["confidence_head.proj.weight"].shape == (1, 576 + 128)
        assert cfg["markov_head_type"] == "vanilla" and cfg["enable_confidence_head"]
    else:
        assert not any("markov" in k for k in tensors)


def test_eagle3_export_shifts_layer_ids_and_renames(tmp_path, smollm2_dir):
    draft = _draft(tmp_path, smollm2_dir, "eagle3")
    export_draft(draft, "vllm", str(tmp_path / "out"))
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    tensors = _read(str(tmp_path / "out" / "model.safetensors"))
    src = _read(os.path.join(draft, "model.safetensors"))
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]  # "input of": deepspec [1, 14, 26] + 1
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["draft_vocab_size"] == 2048 and cfg["target_hidden_size"] == 576
    assert tensors["midlayer.self_attn.q_proj.weight"].shape == (576, 2 * 576)
    assert tensors["fc.weight"].shape == (576, 3 * 576)
    torch.testing.assert_close(tensors["midlayer.input_layernorm.weight"], src["embed_norm.weight"])
    torch.testing.assert_close(tensors["midlayer.hidden_norm.weight"], src["layers.0.input_layernorm.weight"])
    assert torch.equal(tensors["d2t"], src["d2t"])


@pytest.mark.parametrize(
    "algo, opts, to, reason",
    [
        ("dspark", ["model.markov_head_type=gated"], "llamacpp", "computes only the vanilla head"),
        ("dflash", ["model.qk_norm=false"], "vllm", "no q/k norms"),
        ("eagle3", ["model.target_layer_ids=[1,7,14,21,27]"], "llamacpp", "takes exactly 3"),
        ("eagle3", ["model.target_layer_ids=[1,14,29]"], "vllm", "last layer's output"),
        ("eagle3", ["model.draft_num_hidden_layers=2"], "vllm", "take exactly 1"),
    ],
)
def test_export_refuses_what_the_engine_cannot_represent(tmp_path, smollm2_dir, algo, opts, to, reason):
    draft = _draft(tmp_path, smollm2_dir, algo, opts)
    with pytest.raises(ExportRefused, match=reason):
        export_draft(draft, to, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_export_cli_reports_one_line(tmp_path, smollm2_dir):
    draft = _draft(tmp_path, smollm2_dir, "dspark", ["model.markov_head_type=rnn"])
    proc = subprocess.run(
        [sys.executable, "-m", "deepspec.export", draft, "--to", "llamacpp", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot export") and "vanilla" in lines[0]
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspec.export",
            str(tmp_path / "nope"),
            "--to",
            "vllm",
            "--out",
            str(tmp_path / "y"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert (
        missing.returncode != 0
        and "does not exist" in missing.stderr
        and len(missing.stderr.splitlines()) == 1
    )
