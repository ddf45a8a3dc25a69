"""Tiny random targets for tests, one per supported family, built in code (no download).

``build_tiny_target(family, out_dir)`` writes an HF directory (config + random weights +
tokenizer) that every part of deepspec accepts as a target. With ``tokenizer_dir`` the
directory reuses a real tokenizer and chat template (the embedded SmolLM2 one in tests) and
the vocabulary matches it; without, ``vocab_size`` sets a small vocabulary and the
directory has no tokenizer (enough for model-only tests).
"""

from __future__ import annotations

import os
from typing import Any

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma4_text")


def _layer_types(num_layers: int) -> list[str]:
    """Gemma pattern: sliding-window layers with the last layer on full attention."""
    return ["sliding_attention"] * (num_layers - 1) + ["full_attention"]


def tiny_config(
    family: str,
    *,
    vocab_size: int = 256,
    num_hidden_layers: int = 4,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
    pad_token_id: int | None = 2,
    **extra: Any,
) -> Any:
    """An HF config object of ``family`` with tiny sizes (``extra``: other config fields)."""
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=8192,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **extra,
    )
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if family == "mistral":
        from transformers import MistralConfig

        return MistralConfig(sliding_window=None, **common)
    if family == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    if family == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**common)
    if family == "gemma3_text":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            query_pre_attn_scalar=head_dim,
            sliding_window=64,
            layer_types=_layer_types(num_hidden_layers),
            **common,
        )
    if family == "gemma4_text":
        from transformers import Gemma4TextConfig

        return Gemma4TextConfig(
            sliding_window=64,
            layer_types=_layer_types(num_hidden_layers),
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=vocab_size,
            global_head_dim=head_dim * 2,
            **common,
        )
    raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}")


def build_tiny_target(
    family: str,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    **config_kwargs: Any,
) -> str:
    """Write a tiny random ``family`` model to ``out_dir`` and return the directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = os.fspath(out_dir)
    tokenizer = None
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        config_kwargs.setdefault("vocab_size", len(tokenizer))
        for name in ("bos", "eos", "pad"):
            token_id = getattr(tokenizer, f"{name}_token_id")
            if token_id is not None:
                config_kwargs.setdefault(f"{name}_token_id", token_id)
    config = tiny_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
