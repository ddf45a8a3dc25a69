"""Tensor names and configs the engines' draft loaders read, built from a :class:`DraftSource`.

Two layouts cover every engine:

* block drafters (DFlash, DSpark) in the Qwen3-style names of z-lab's DFlash release
  (``fc``, ``hidden_norm``, ``layers.N.*`` with ``q_norm``/``k_norm``, ``norm``), plus
  DSpark's ``markov_head.markov_w{1,2}`` and ``confidence_head.proj``;
* Eagle3 in the EAGLE-3 release's names (``midlayer.*``, ``fc``, ``norm``, ``lm_head``,
  ``d2t``), where ``midlayer.input_layernorm`` normalises the token embedding and
  ``midlayer.hidden_norm`` the projected features (deepspec: ``embed_norm`` and
  ``layers.0.input_layernorm``).
"""

from __future__ import annotations

from typing import Any

import torch

from deepspec.export.source import DraftSource, check_plain_layers, input_layer_ids

LAYER_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
QK_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
LAYER_WEIGHTS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous()


def text_config(src: DraftSource, model_type: str, num_layers: int) -> dict[str, Any]:
    """The HF text-model keys every loader reads (the target's sizes)."""
    spec = src.spec
    rope = dict(spec.rope_parameters)
    return {
        "model_type": model_type,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": spec.hidden_act,
        "rms_norm_eps": spec.rms_norm_eps,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": rope.get("rope_theta", spec.rope_theta),
        "rope_parameters": rope,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": list(spec.eos_token_ids),
    }


def _decoder_layers(src: DraftSource, prefix_out: str, qk_norm: bool) -> dict[str, torch.Tensor]:
    out = {}
    for i, p in enumerate(src.layer_prefixes()):
        for name in LAYER_WEIGHTS:
            out[f"{prefix_out}{i}.{name}"] = _f32(src.tensors[p + name])
        for name in LAYER_NORMS + (QK_NORMS if qk_norm else ()):
            out[f"{prefix_out}{i}.{name}"] = src.norm(p + name)
    return out


def check_block_draft(src: DraftSource, engine: str, *, markov: bool) -> None:
    """What a DFlash/DSpark draft must be for the engines' block-draft graphs."""
    check_plain_layers(src, engine)
    if not src.qk_norm:
        raise src.refuse(
            engine,
            "its draft layers have no q/k norms, which the engine's DFlash/DSpark graph always applies",
            "train with model.qk_norm=true (the SmolLM2 configs do)",
        )
    cfg = src.config
    if markov and src.markov and cfg.markov_rank > 0 and cfg.markov_head_type != "vanilla":
        raise src.refuse(
            engine,
            f"its Markov head is {cfg.markov_head_type!r}; the engine computes only the vanilla head",
            "train with model.markov_head_type=vanilla",
        )


def block_draft_tensors(src: DraftSource, *, dspark: bool) -> dict[str, torch.Tensor]:
    """A DFlash/DSpark draft's tensors in DFlash names (no ``model.`` prefix).

    ``dspark``: add the Markov and confidence heads. A DFlash draft (or a DSpark draft
    without a Markov head) gets rank-1 all-zero ``markov_w1``/``markov_w2``: a bias of
    exactly zero. A confidence head that reads ``h`` only gets zero weights on ``W1[prev]``.
    """
    t = src.tensors
    out = {
        "fc.weight": _f32(t["fc.weight"]),
        "hidden_norm.weight": src.norm("context_norm.weight"),
        "norm.weight": src.norm("norm.weight"),
        **_decoder_layers(src, "layers.", qk_norm=True),
    }
    if src.pruned:
        out["lm_head.weight"] = _f32(src.head())
        out["d2t"] = t["d2t"].long().contiguous()
    if not dspark:
        return out
    V, Vd = src.spec.vocab_size, src.draft_vocab_size
    rank = src.config.markov_rank if src.markov else 0
    if rank > 0:
        out["markov_head.markov_w1.weight"] = _f32(t["markov_head.W1.weight"])
        out["markov_head.markov_w2.weight"] = _f32(t["markov_head.W2.weight"])
    else:
        rank = 1
        out["markov_head.markov_w1.weight"] = torch.zeros(V, 1)
        out["markov_head.markov_w2.weight"] = torch.zeros(Vd, 1)
    if "confidence_head.proj.weight" in t:
        w = _f32(t["confidence_head.proj.weight"])
        if w.shape[1] == src.spec.hidden_size:  # c = sigmoid(w h): zeros for the W1[prev] half
            w = torch.cat([w, torch.zeros(1, rank)], 1)
        out["confidence_head.proj.weight"] = w
        out["confidence_head.proj.bias"] = _f32(t["confidence_head.proj.bias"])
    return out


def mask_vector(src: DraftSource) -> torch.Tensor | None:
    """The learned mask embedding ``[d]`` (None when the draft uses a mask token id)."""
    m = src.tensors.get("mask_embedding")
    return None if m is None else _f32(m)


def check_eagle3(src: DraftSource, engine: str, *, exact_layers: int | None = None) -> list[int]:
    """Refusals shared by the Eagle3 loaders; returns the shifted ("input of") layer ids."""
    check_plain_layers(src, engine)
    if src.config.draft_num_hidden_layers != 1:
        raise src.refuse(
            engine,
            f"it has {src.config.draft_num_hidden_layers} decoder layers; EAGLE-3 loaders take exactly 1",
            "train with model.draft_num_hidden_layers=1",
        )
    if src.qk_norm:
        raise src.refuse(
            engine,
            f"its decoder layer has the {src.spec.family} family's q/k norms; EAGLE-3 loaders "
            "build a Llama layer without them",
            "serve it with deepspec's own decoder (eval.py)",
        )
    ids = input_layer_ids(src, engine)
    if exact_layers is not None and len(ids) != exact_layers:
        raise src.refuse(
            engine,
            f"it reads {len(ids)} target layers and {engine} takes exactly {exact_layers}",
            f"train with {exact_layers} model.target_layer_ids (config/eagle3 files use 3)",
        )
    return ids


def eagle3_tensors(src: DraftSource) -> dict[str, torch.Tensor]:
    """An Eagle3 draft in EAGLE-3 names (``midlayer.*``; no ``model.`` prefix)."""
    t = src.tensors
    out = {
        "fc.weight": _f32(t["fc.weight"]),
        "norm.weight": src.norm("norm.weight"),
        "lm_head.weight": _f32(src.head()).clone(),  # its own storage: a tied head is the embedding
        "midlayer.input_layernorm.weight": src.norm("embed_norm.weight"),
        "midlayer.hidden_norm.weight": src.norm("layers.0.input_layernorm.weight"),
        "midlayer.post_attention_layernorm.weight": src.norm("layers.0.post_attention_layernorm.weight"),
    }
    for name in LAYER_WEIGHTS:
        out[f"midlayer.{name}"] = _f32(t[f"layers.0.{name}"])
    if src.pruned:  # the vocabulary maps (a full vocabulary needs none)
        out["d2t"] = t["d2t"].long().contiguous()
        out["t2d"] = t["t2d"].bool().contiguous()
    return out


def eagle3_config(src: DraftSource, architecture: str, layer_ids: list[int]) -> dict[str, Any]:
    return {
        "architectures": [architecture],
        **text_config(src, "llama", 1),
        "draft_vocab_size": src.draft_vocab_size,
        "target_hidden_size": src.spec.hidden_size,
        "eagle_aux_hidden_state_layer_ids": layer_ids,
        "eagle_config": {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": layer_ids},
        "norm_before_residual": False,
    }
