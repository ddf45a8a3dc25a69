"""Targets: resolving names to local model directories and reading their family specs."""

from deepspec.targets.family import FAMILIES, FamilySpec, family_spec_from_config, load_family_spec
from deepspec.targets.resolve import (
    DEFAULT_TARGET,
    EMBEDDED_TARGETS,
    cache_root,
    embedded_bf16_gguf_path,
    embedded_gguf_path,
    llama_server_bin,
    resolve_target,
)

__all__ = [
    "DEFAULT_TARGET",
    "EMBEDDED_TARGETS",
    "FAMILIES",
    "FamilySpec",
    "cache_root",
    "embedded_bf16_gguf_path",
    "embedded_gguf_path",
    "family_spec_from_config",
    "llama_server_bin",
    "load_family_spec",
    "resolve_target",
]
