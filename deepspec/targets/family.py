"""Target families: what a draft layer must copy from the target's HF config.

One small table (``FAMILIES``) holds the few differences between families; everything
else is read from the config. A :class:`FamilySpec` is all the draft needs to build
layers in the target's style — no per-family model files.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from deepspec.errors import TargetError
from deepspec.utils.io import read_json_object


@dataclass(frozen=True)
class FamilyRule:
    """The per-family differences a draft layer has to reproduce."""

    qk_norm: bool = False  # RMSNorm on per-head queries and keys (Qwen3, Gemma3/4)
    v_norm: bool = False  # scale-free RMSNorm on per-head values (Gemma4)
    norm_offset: float = 0.0  # RMSNorm weight is (offset + w): 1.0 for Gemma3
    scale_embeddings: bool = False  # embeddings multiplied by sqrt(hidden_size) (Gemma)
    sandwich_norm: bool = False  # extra post-attention / post-MLP norms (Gemma3/4)
    attn_scale: str = "head_dim"  # head_dim**-0.5 | query_pre_attn_scalar**-0.5 | one


FAMILIES: dict[str, FamilyRule] = {
    "llama": FamilyRule(),
    "mistral": FamilyRule(),
    "qwen2": FamilyRule(),
    "qwen3": FamilyRule(qk_norm=True),
    "gemma3_text": FamilyRule(
        qk_norm=True,
        norm_offset=1.0,
        scale_embeddings=True,
        sandwich_norm=True,
        attn_scale="query_pre_attn_scalar",
    ),
    "gemma4_text": FamilyRule(
        qk_norm=True, v_norm=True, scale_embeddings=True, sandwich_norm=True, attn_scale="one"
    ),
}

# Multimodal wrappers whose text model lives in ``config.text_config``.
TEXT_CONFIG_WRAPPERS = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}


@dataclass(frozen=True)
class FamilySpec:
    """Architecture facts of a target, read from its HF config (text part)."""

    family: str  # key of FAMILIES, e.g. "qwen3" or "gemma3_text"
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    hidden_act: str
    rms_norm_eps: float
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_parameters: dict[str, Any]  # {"rope_type", "rope_theta", ...} for full attention
    attention_bias: bool = False
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Gemma 4's full-attention layers: their own head dim and KV heads, and K = V (no
    # v_proj). None / False: the full-attention layers have the fields above.
    global_head_dim: int | None = None
    num_global_key_value_heads: int | None = None
    attention_k_eq_v: bool = False
    rule: FamilyRule = field(default_factory=FamilyRule)

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters.get("rope_theta", 10000.0))

    @property
    def full_head_dim(self) -> int:
        """Head dim of the target's full-attention layers, which draft layers copy (drafts
        attend over the whole context): Gemma 4's ``global_head_dim``, else ``head_dim``."""
        return self.global_head_dim or self.head_dim

    @property
    def full_kv_heads(self) -> int:
        """KV heads of the target's full-attention layers (see :attr:`full_head_dim`)."""
        return self.num_global_key_value_heads or self.num_key_value_heads

    @property
    def attention_scaling(self) -> float:
        """Softmax scale of q·k in the family's attention."""
        if self.rule.attn_scale == "one":
            return 1.0
        if self.rule.attn_scale == "query_pre_attn_scalar" and self.query_pre_attn_scalar:
            return float(self.query_pre_attn_scalar) ** -0.5
        return float(self.full_head_dim) ** -0.5

    @property
    def embed_scale(self) -> float:
        return float(self.hidden_size) ** 0.5 if self.rule.scale_embeddings else 1.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FamilySpec:
        data = dict(data)
        data["rule"] = FamilyRule(**data.get("rule", {}))
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        return cls(**data)


def _get(config: dict[str, Any], name: str, default: Any = None) -> Any:
    value = config.get(name, default)
    return default if value is None else value


def _required_int(config: dict[str, Any], name: str) -> int:
    value = config.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TargetError(f"config field {name} must be a positive integer, got {value!r}")
    return value


def _text_config(config: Any) -> Any:
    model_type = _get(config, "model_type")
    if model_type in TEXT_CONFIG_WRAPPERS:
        text = _get(config, "text_config")
        if not isinstance(text, dict):
            raise TargetError(f"{model_type} config has no text_config")
        return text
    return config


def _full_attention_rope(config: Any) -> dict[str, Any]:
    """RoPE parameters for full attention, across transformers 4.x / 5.x layouts."""
    params = _get(config, "rope_parameters")
    if isinstance(params, dict) and params:
        if "full_attention" in params:  # per-layer-type layout (Gemma3/4)
            params = params["full_attention"]
        return {k: v for k, v in dict(params).items() if v is not None}
    out: dict[str, Any] = {"rope_type": "default", "rope_theta": _get(config, "rope_theta", 10000.0)}
    scaling = _get(config, "rope_scaling")
    if isinstance(scaling, dict):
        out.update({k: v for k, v in scaling.items() if v is not None})
        out["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    return out


def family_spec_from_config(config: Any) -> FamilySpec:
    """Build a :class:`FamilySpec` from an HF config object or its ``config.json`` dict."""
    if not isinstance(config, dict):
        # the serialised form: heterogeneous configs (Gemma4) refuse global attribute reads
        config = config.to_dict()
    text = _text_config(config)
    family = _get(text, "model_type")
    if family not in FAMILIES:
        supported = ", ".join(sorted(set(FAMILIES) | set(TEXT_CONFIG_WRAPPERS)))
        raise TargetError(f"unsupported target family {family!r}; supported: {supported}")
    rule = FAMILIES[family]
    hidden = _required_int(text, "hidden_size")
    heads = _required_int(text, "num_attention_heads")
    head_dim = _get(text, "head_dim") or hidden // heads
    eos = _get(text, "eos_token_id", _get(config, "eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (int(eos),))
    tie = _get(config, "tie_word_embeddings", _get(text, "tie_word_embeddings", False))
    return FamilySpec(
        family=family,
        num_hidden_layers=_required_int(text, "num_hidden_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=int(_get(text, "num_key_value_heads") or heads),
        head_dim=int(head_dim),
        intermediate_size=_required_int(text, "intermediate_size"),
        hidden_act=str(_get(text, "hidden_act") or _get(text, "hidden_activation") or "silu"),
        rms_norm_eps=float(_get(text, "rms_norm_eps", 1e-6)),
        vocab_size=_required_int(text, "vocab_size"),
        tie_word_embeddings=bool(tie),
        max_position_embeddings=int(_get(text, "max_position_embeddings", 4096)),
        rope_parameters=_full_attention_rope(text),
        attention_bias=bool(_get(text, "attention_bias", False)),
        query_pre_attn_scalar=_get(text, "query_pre_attn_scalar"),
        final_logit_softcapping=_get(text, "final_logit_softcapping"),
        bos_token_id=_get(text, "bos_token_id", _get(config, "bos_token_id")),
        eos_token_ids=eos_ids,
        pad_token_id=_get(text, "pad_token_id", _get(config, "pad_token_id")),
        **_full_attention_geometry(text),
        rule=rule,
    )


def _full_attention_geometry(text: dict[str, Any]) -> dict[str, Any]:
    """Gemma 4's full-attention geometry where the config has one; nothing for other families.

    Two layouts: transformers < 5.2x writes ``global_head_dim`` and
    ``num_global_key_value_heads`` (the latter used only with ``attention_k_eq_v``, as in
    its attention layer); later versions write ``per_layer_config`` overrides per layer."""
    if _get(text, "model_type") != "gemma4_text":
        return {}
    k_eq_v = bool(_get(text, "attention_k_eq_v", False))
    global_dim = _get(text, "global_head_dim")
    global_kv = _get(text, "num_global_key_value_heads") if k_eq_v else None
    per_layer = _get(text, "per_layer_config", {})
    types = _get(text, "layer_types", [])
    if isinstance(per_layer, dict) and "full_attention" in types:
        overrides = per_layer.get(str(types.index("full_attention"))) or {}
        global_dim = overrides.get("head_dim", global_dim)
        global_kv = overrides.get("num_key_value_heads", global_kv)
    return {
        "global_head_dim": int(global_dim) if global_dim else None,
        "num_global_key_value_heads": int(global_kv) if global_kv else None,
        "attention_k_eq_v": k_eq_v,
    }


def load_family_spec(model_dir: str | os.PathLike[str]) -> FamilySpec:
    """Read ``<model_dir>/config.json`` and build its :class:`FamilySpec`."""
    path = os.path.join(os.fspath(model_dir), "config.json")
    fix = "download or convert the target again"
    try:
        config = read_json_object(path, fix, TargetError)
    except FileNotFoundError:
        raise TargetError(f"{model_dir} has no config.json; pass an HF model directory") from None
    try:
        return family_spec_from_config(config)
    except TargetError as exc:
        raise TargetError(f"{path}: {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise TargetError(
            f"{path} is not a complete HF causal-LM config ({type(exc).__name__}: {exc}); {fix}"
        ) from None
