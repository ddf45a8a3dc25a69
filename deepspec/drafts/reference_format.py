"""The DeepSpec reference implementation's draft format, read and written as it is.

The released drafts (``deepseek-ai/dspark_qwen3_4b_block7``, ``eagle3_qwen3_4b_ttt7``, …) are
the reference trainers' ``save_pretrained`` output: ``config.json`` is the target's HF text
config with the draft's fields added (``architectures`` ``Qwen3DSparkModel``,
``Gemma4DSparkModel``, ``Qwen3Eagle3Model``, ``Gemma4Eagle3Model`` or the older
``Eagle3DraftModel``; ``num_hidden_layers`` = draft layers, ``num_target_layers`` = target
layers), and ``model.safetensors`` holds every tensor, ``lm_head`` included. The reference's
DFlash is its DSpark class with ``markov_rank: 0`` and ``enable_confidence_head: false``.

Everything else is the same algorithm (same layer ids, anchor-first blocks, block attention,
RoPE positions, Markov and confidence heads); only names differ:

==========================================  ==========================================
reference                                   deepspec
==========================================  ==========================================
``hidden_norm`` (block drafts)              ``context_norm``
``markov_head.markov_w1`` / ``markov_w2``   ``markov_head.W1`` / ``W2``
``markov_head.gate_proj`` / ``joint_proj``  ``markov_head.W_g`` / ``W_gco``
Gemma 4 ``post_attention_layernorm``        ``post_attn_out_norm`` (on the attention output)
Gemma 4 ``pre_feedforward_layernorm``       ``post_attention_layernorm`` (before the MLP)
Gemma 4 ``post_feedforward_layernorm``      ``post_mlp_norm``
Gemma 4 ``layer_scalar`` (a buffer of 1)    (none)
Eagle3 ``layers.0.input_layernorm``         ``embed_norm`` (normalises the token embedding)
Eagle3 ``layers.0.hidden_norm``             ``layers.0.input_layernorm``
==========================================  ==========================================

:func:`read_reference_config` and :func:`tensors_from_reference` read that format;
:func:`reference_config` and :func:`tensors_to_reference` write it
(``python -m deepspec.export DRAFT --to deepspec-reference``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from deepspec.algorithms import ALGORITHMS
from deepspec.drafts.base import DraftConfig
from deepspec.errors import DataError
from deepspec.targets.family import FamilySpec, family_spec_from_config

REFERENCE_FORMAT = "deepspec-reference"
# reference architecture -> (deepspec algorithm family, target family it is built for)
BLOCK_ARCHITECTURES = {"Qwen3DSparkModel": "qwen3", "Gemma4DSparkModel": "gemma4_text"}
EAGLE3_ARCHITECTURES = {
    "Qwen3Eagle3Model": "qwen3",
    "Gemma4Eagle3Model": "gemma4_text",
    "Eagle3DraftModel": "qwen3",
}
REFERENCE_ARCHITECTURES = {**BLOCK_ARCHITECTURES, **EAGLE3_ARCHITECTURES}
# recorded in what deepspec exports, so that a round trip restores the target's own family
# (a Llama target's draft is written as the reference's Qwen3 class, which is the same
# layer once it has q/k norms); the reference ignores the key
FAMILY_KEY = "deepspec_target_family"
# the reference's training settings, kept in DraftConfig.extra and written back on export
TRAINING_KEYS = ("num_anchors", "step_loss_decay", "initializer_range")

_GEMMA_NORMS = {  # reference layer norm -> deepspec layer norm (sandwich-norm families)
    "post_attention_layernorm": "post_attn_out_norm",
    "pre_feedforward_layernorm": "post_attention_layernorm",
    "post_feedforward_layernorm": "post_mlp_norm",
}
_BLOCK_NAMES = {
    "hidden_norm.weight": "context_norm.weight",
    "markov_head.markov_w1.weight": "markov_head.W1.weight",
    "markov_head.markov_w2.weight": "markov_head.W2.weight",
    "markov_head.gate_proj.weight": "markov_head.W_g.weight",
    "markov_head.gate_proj.bias": "markov_head.W_g.bias",
    "markov_head.joint_proj.weight": "markov_head.W_gco.weight",
    "markov_head.joint_proj.bias": "markov_head.W_gco.bias",
}
_EAGLE3_NAMES = {
    "layers.0.input_layernorm.weight": "embed_norm.weight",
    "layers.0.hidden_norm.weight": "layers.0.input_layernorm.weight",
}


def is_reference_config(raw: dict[str, Any]) -> bool:
    """``raw`` (a ``config.json``) is the reference's format."""
    arch = raw.get("architectures")
    return isinstance(arch, list) and bool(arch) and arch[0] in REFERENCE_ARCHITECTURES


def _int(raw: dict[str, Any], key: str, path: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"reference draft {path}: config.json field {key} must be an integer, got {value!r}")
    return value


def _target_spec(raw: dict[str, Any], path: str) -> FamilySpec:
    """The target's :class:`FamilySpec` from the copy of its text config the draft carries."""
    text = copy.deepcopy(raw)
    text["num_hidden_layers"] = _int(raw, "num_target_layers", path)
    if raw.get(FAMILY_KEY):
        text["model_type"] = raw[FAMILY_KEY]
    text.pop("layer_types", None)  # the draft's (all full attention), not the target's
    try:
        return family_spec_from_config(text)
    except Exception as exc:  # noqa: BLE001 - TargetError or a malformed field
        raise DataError(
            f"reference draft {path}: its config.json does not describe the target ({exc})"
        ) from None


def read_reference_config(raw: dict[str, Any], path: str) -> tuple[str, DraftConfig]:
    """``(deepspec architecture, DraftConfig)`` of a reference ``config.json`` ``raw``."""
    arch = raw["architectures"][0]
    spec = _target_spec(raw, path)
    layer_ids = raw.get("target_layer_ids")
    if not isinstance(layer_ids, list) or not all(isinstance(i, int) for i in layer_ids):
        raise DataError(f"reference draft {path}: config.json has no target_layer_ids list")
    draft_layers = _int(raw, "num_hidden_layers", path)
    extra = {k: raw[k] for k in TRAINING_KEYS if k in raw}
    common = dict(
        target=spec.to_dict(),
        target_model_name_or_path=str(raw.get("target_model_name_or_path") or ""),
        target_layer_ids=list(layer_ids),
        context_window=0,
        extra={"source_format": REFERENCE_FORMAT, **extra},
    )
    if arch in EAGLE3_ARCHITECTURES:
        if draft_layers != 1:
            raise DataError(
                f"reference draft {path}: an Eagle3 draft of {draft_layers} layers; deepspec reads the "
                "one-layer Eagle3 of the released drafts (every reference layer takes [embedding; features])"
            )
        config = DraftConfig(
            algorithm="eagle3",
            ttt_length=_int(raw, "ttt_length", path, 7),
            draft_num_hidden_layers=1,
            **common,
        )
        return ALGORITHMS["eagle3"].architecture, config
    markov_rank = _int(raw, "markov_rank", path, 0)
    confidence = bool(raw.get("enable_confidence_head", False))
    algorithm = "dspark" if markov_rank > 0 or confidence else "dflash"
    config = DraftConfig(
        algorithm=algorithm,
        block_size=_int(raw, "block_size", path),
        num_draft_layers=draft_layers,
        mask_token_id=_int(raw, "mask_token_id", path),
        markov_rank=markov_rank,
        markov_head_type=str(raw.get("markov_head_type") or "vanilla"),
        confidence_head=confidence,
        confidence_head_with_markov=bool(raw.get("confidence_head_with_markov", False)),
        qk_norm=True,
        **common,
    )
    return ALGORITHMS[algorithm].architecture, config


def _block(config: DraftConfig) -> bool:
    """A block draft (the reference's DSpark class, DFlash included), else an Eagle3 chain."""
    return ALGORITHMS[config.algorithm].block


def _rename(name: str, config: DraftConfig, to_reference: bool) -> str | None:
    """The other format's name of tensor ``name`` (``None``: the tensor has no counterpart)."""
    table = _BLOCK_NAMES if _block(config) else _EAGLE3_NAMES
    if to_reference:
        table = {v: k for k, v in table.items()}
    if name in table:
        return table[name]
    if config.spec.rule.sandwich_norm and name.startswith("layers."):
        layer, _, rest = name.partition(".")[2].partition(".")
        norms = _GEMMA_NORMS if not to_reference else {v: k for k, v in _GEMMA_NORMS.items()}
        norm, _, tail = rest.partition(".")
        if norm in norms and tail == "weight":
            return f"layers.{layer}.{norms[norm]}.weight"
        if rest == "layer_scalar":
            return None
    return name


def tensors_from_reference(
    state: dict[str, torch.Tensor], config: DraftConfig, path: str
) -> dict[str, torch.Tensor]:
    """A reference ``model.safetensors`` state under deepspec's names. Gemma 4's
    ``layer_scalar`` buffers must be 1 (deepspec's layers have no such scale)."""
    out = {}
    for name, tensor in state.items():
        new = _rename(name, config, to_reference=False)
        if new is None:
            if not bool((tensor.float() == 1).all()):
                raise DataError(
                    f"reference draft {path}: {name} is not 1; deepspec's Gemma layers have no layer scale"
                )
            continue
        out[new] = tensor
    return out


def tensors_to_reference(state: dict[str, torch.Tensor], config: DraftConfig) -> dict[str, torch.Tensor]:
    """deepspec tensors under the reference's names, ``lm_head`` stored even when tied (the
    reference unties it) and Gemma's ``layer_scalar`` buffers added."""
    out = {}
    for name, tensor in state.items():
        out[_rename(name, config, to_reference=True) or name] = tensor
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    if config.spec.rule.sandwich_norm:
        layers = config.num_draft_layers if _block(config) else config.draft_num_hidden_layers
        for i in range(layers):
            out[f"layers.{i}.layer_scalar"] = torch.ones(1, dtype=out["norm.weight"].dtype)
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


QWEN3_LIKE = ("llama", "mistral", "qwen2")  # exported as the reference's Qwen3 class, with q/k norms


def reference_export_problem(config: DraftConfig) -> tuple[str, str] | None:
    """``(why, fix)`` when the reference's classes cannot hold this draft, else ``None``."""
    spec = config.spec
    retrain = "train it with {} to export it"
    if spec.family not in ("qwen3", "gemma4_text", *QWEN3_LIKE):
        return (
            f"the reference has no draft class for a {spec.family} target",
            "Qwen3 and Gemma 4 targets only",
        )
    if spec.family in QWEN3_LIKE and (not _block(config) or not config.qk_norm):
        why = f"its {spec.family} layers have no q/k norms and the reference's Qwen3 layers do"
        return why, retrain.format("model.qk_norm=true (block drafts)")
    if config.draft_vocab_size:
        why = "it has a pruned draft vocabulary (d2t/t2d); the reference drafts over the whole vocabulary"
        return why, retrain.format("model.draft_vocab_size=0")
    if config.context_window:
        why = f"it attends to a sliding window of {config.context_window} context positions; the reference's see all"
        return why, retrain.format("model.context_window=0")
    if _block(config) and config.mask_token_id is None:
        why = "it uses a learned mask embedding; the reference's blocks use a mask_token_id"
        return why, retrain.format("model.mask_token_id set")
    if not _block(config) and config.draft_num_hidden_layers != 1:
        why = "it has more than one Eagle3 layer; the reference's layers all take [embedding; features]"
        return why, retrain.format("model.draft_num_hidden_layers=1")
    return None


def _text_config(spec: FamilySpec) -> dict[str, Any]:
    """An HF text config of the target (the reference copies the target's own)."""
    gemma = spec.family == "gemma4_text"
    out: dict[str, Any] = {
        "model_type": "gemma4_text" if gemma else "qwen3",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "rms_norm_eps": spec.rms_norm_eps,
        "max_position_embeddings": spec.max_position_embeddings,
        "attention_bias": spec.attention_bias,
        "attention_dropout": 0.0,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": list(spec.eos_token_ids) if len(spec.eos_token_ids) != 1 else spec.eos_token_ids[0],
        "pad_token_id": spec.pad_token_id,
        "use_cache": True,
    }
    if gemma:
        out.update(
            hidden_activation=spec.hidden_act,
            rope_parameters={"full_attention": dict(spec.rope_parameters)},
            final_logit_softcapping=spec.final_logit_softcapping,
            global_head_dim=spec.full_head_dim,
            num_global_key_value_heads=spec.full_kv_heads,
            attention_k_eq_v=spec.attention_k_eq_v,
            # the fields the reference's Gemma 4 classes assert
            enable_moe_block=False,
            hidden_size_per_layer_input=0,
            num_kv_shared_layers=0,
            use_double_wide_mlp=False,
            target_model_type="gemma4",
            target_text_model_type="gemma4_text",
        )
    else:
        out.update(
            hidden_act=spec.hidden_act,
            rope_parameters=dict(spec.rope_parameters),
            use_sliding_window=False,
            sliding_window=None,
        )
    if spec.family not in ("qwen3", "gemma4_text"):
        out[FAMILY_KEY] = spec.family
    return out


def reference_config(config: DraftConfig) -> dict[str, Any]:
    """The reference's ``config.json`` for a deepspec draft (see :func:`reference_export_problem`)."""
    spec = config.spec
    gemma = spec.family == "gemma4_text"
    extra = config.extra or {}
    out = _text_config(spec)
    out.update(
        num_target_layers=spec.num_hidden_layers,
        target_layer_ids=list(config.target_layer_ids),
        tie_word_embeddings=False,
        initializer_range=extra.get("initializer_range", 0.02),
        dtype="float32",
    )
    if config.target_model_name_or_path:
        out["target_model_name_or_path"] = config.target_model_name_or_path
    if not _block(config):
        out.update(
            architectures=["Gemma4Eagle3Model" if gemma else "Qwen3Eagle3Model"],
            num_hidden_layers=1,
            draft_num_hidden_layers=1,
            ttt_length=config.ttt_length,
            step_loss_decay=extra.get("step_loss_decay", 0.8),
        )
    else:
        out.update(
            architectures=["Gemma4DSparkModel" if gemma else "Qwen3DSparkModel"],
            num_hidden_layers=config.num_draft_layers,
            block_size=config.block_size,
            mask_token_id=config.mask_token_id,
            num_anchors=extra.get("num_anchors", 512),
            markov_rank=config.markov_rank,
            enable_confidence_head=config.confidence_head,
        )
        if config.markov_rank > 0:
            out["markov_head_type"] = config.markov_head_type
        if config.confidence_head:
            out["confidence_head_with_markov"] = config.confidence_head_with_markov
    out["layer_types"] = ["full_attention"] * out["num_hidden_layers"]
    return out
