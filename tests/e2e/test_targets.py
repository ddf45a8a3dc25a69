"""Targets: family specs of every family, resolution errors, the embedded conversion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from deepspec.errors import TargetError
from deepspec.targets import FAMILIES, family_spec_from_config, load_family_spec, resolve_target
from deepspec.targets.tiny import TINY_FAMILIES, tiny_config
from tests.conftest import ROOT


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_family_spec_from_tiny_config(family):
    config = tiny_config(
        family,
        num_hidden_layers=3,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=300,
    )
    spec = family_spec_from_config(config)
    assert spec.family == family
    assert (spec.num_hidden_layers, spec.hidden_size, spec.vocab_size) == (3, 64, 300)
    assert (spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim) == (4, 2, 16)
    assert spec.intermediate_size == 128 and spec.rms_norm_eps > 0 and spec.rope_theta > 0
    assert spec.rule.qk_norm == (family in ("qwen3", "gemma3_text", "gemma4_text"))
    gemma = family.startswith("gemma")
    assert spec.embed_scale == (pytest.approx(8.0) if gemma else 1.0)
    assert spec.hidden_act == ("gelu_pytorch_tanh" if gemma else "silu")
    expected_scale = {"gemma4_text": 1.0}.get(family, 16**-0.5)
    assert spec.attention_scaling == pytest.approx(expected_scale)
    # the same spec from the config.json dict
    assert family_spec_from_config(config.to_dict()) == spec


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_target_builds_and_runs(tiny_target, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_target(family)
    spec = load_family_spec(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert spec.vocab_size == len(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer("hello world", return_tensors="pt")["input_ids"]
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == spec.num_hidden_layers + 1
    assert out.logits.shape == (1, ids.shape[1], spec.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_multimodal_wrapper_unwraps_text_config():
    text = tiny_config("gemma3_text", vocab_size=300).to_dict()
    spec = family_spec_from_config({"model_type": "gemma3", "text_config": text, "tie_word_embeddings": True})
    assert spec.family == "gemma3_text" and spec.vocab_size == 300


def test_legacy_rope_fields():
    cfg = tiny_config("llama").to_dict()
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    spec = family_spec_from_config(cfg)
    assert spec.rope_theta == 500000.0 and spec.rope_parameters["rope_type"] == "llama3"
    assert spec.rope_parameters["factor"] == 8.0


def test_unsupported_family_lists_supported():
    with pytest.raises(TargetError) as info:
        family_spec_from_config({"model_type": "gpt2", "n_layer": 2})
    message = str(info.value)
    assert "gpt2" in message and all(name in message for name in ("llama", "qwen3", "gemma4_text"))
    assert set(TINY_FAMILIES) == set(FAMILIES)


def test_resolve_errors(tmp_path):
    with pytest.raises(TargetError, match="target directory .*nope does not exist"):
        resolve_target(str(tmp_path / "nope"))
    with pytest.raises(TargetError, match="has no config.json"):
        resolve_target(str(tmp_path))
    with pytest.raises(TargetError, match="GGUF file not found"):
        resolve_target(str(tmp_path / "x.gguf"))
    with pytest.raises(TargetError, match="unknown embedded target 'nope'.*smollm2-135m-instruct"):
        resolve_target("embedded:nope")
    with pytest.raises(TargetError, match="not found"):
        resolve_target("just-a-name")


def test_hub_id_offline_fails_fast_with_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(TargetError, match="could not provide it.*download deepspec-test/does-not-exist"):
        resolve_target("deepspec-test/does-not-exist")
    assert time.monotonic() - start < 60


def test_local_directory_resolves_to_itself(tiny_target):
    model_dir = tiny_target("llama")
    assert resolve_target(model_dir) == os.path.abspath(model_dir)


@pytest.mark.slow
def test_embedded_conversion_is_atomic_under_a_race(tmp_path):
    """Two processes convert at once into an empty cache: one converts, both get the
    complete directory, no temporary directory is left, and a later call reuses it."""
    env = {**os.environ, "DEEPSPEC_CACHE_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "deepspec.targets", "resolve", "embedded:smollm2-135m-instruct"]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    dirs = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(dirs) == 1
    model_dir = dirs.pop()
    targets = os.path.dirname(model_dir)
    assert [e for e in os.listdir(targets) if e.startswith(".tmp")] == []
    for name in ("config.json", "model.safetensors", "tokenizer.json", "deepspec_target.json"):
        assert os.path.isfile(os.path.join(model_dir, name))
    with open(os.path.join(model_dir, "deepspec_target.json")) as fh:
        assert json.load(fh)["source"] == "embedded:smollm2-135m-instruct"
    mtime = os.path.getmtime(os.path.join(model_dir, "model.safetensors"))
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == model_dir
    assert os.path.getmtime(os.path.join(model_dir, "model.safetensors")) == mtime
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_converted_model_matches_gguf_greedy(smollm2_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    from deepspec.targets import embedded_gguf_path

    gguf = embedded_gguf_path("smollm2-135m-instruct")
    directory, name = os.path.split(gguf)
    reference = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    spec = load_family_spec(smollm2_dir)
    assert (spec.family, spec.num_hidden_layers, spec.hidden_size, spec.vocab_size) == (
        "llama",
        30,
        576,
        49152,
    )
    assert spec.tie_word_embeddings
    for prompt in ("What is 12 * 7?", "Name a colour of the sky."):
        ids = smollm2_tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.inference_mode():
            a = reference.generate(**ids, max_new_tokens=24, do_sample=False)
            b = converted.generate(**ids, max_new_tokens=24, do_sample=False)
        assert torch.equal(a, b)


@pytest.mark.slow
def test_resolve_cli_and_coherent_chat(smollm2_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "deepspec.targets", "resolve", "embedded:smollm2-135m-instruct"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == smollm2_dir
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspec.targets",
            "chat",
            "embedded:smollm2-135m-instruct",
            "What is the capital of France?",
            "--max-new-tokens",
            "24",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
