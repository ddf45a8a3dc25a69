"""Single tensors of a target's safetensors files (the embedding, LM head and final norm a
draft copies), read without loading the rest of the target."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from safetensors import safe_open


def find_target_tensor(
    target_dir: str, suffixes: tuple[str, ...] = (), match: Callable[[str], bool] | None = None
) -> torch.Tensor | None:
    """Read one tensor from the target's safetensors files, without loading the others: the
    first whose name ends with one of ``suffixes`` (tried in order), or the first for which
    ``match(name)`` holds."""
    files = sorted(f for f in os.listdir(target_dir) if f.endswith(".safetensors"))
    tests = [lambda key, s=s: key.endswith(s) for s in suffixes] + ([match] if match else [])
    for test in tests:
        for name in files:
            with safe_open(os.path.join(target_dir, name), framework="pt") as fh:
                for key in fh.keys():
                    if test(key):
                        return fh.get_tensor(key)
    return None


def is_final_norm(key: str) -> bool:
    """``model.norm.weight``, ``model.language_model.norm.weight`` ...: a ``norm.weight``
    outside the decoder layers and any vision/audio/MTP tower."""
    parts = key.split(".")
    return (
        parts[-2:] == ["norm", "weight"]
        and "layers" not in parts
        and not any(t in key for t in ("vision", "audio", "mtp"))
    )
