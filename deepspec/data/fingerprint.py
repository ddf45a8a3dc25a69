"""Fingerprints that tie a target cache to the exact target and tokenization it came from.

* :func:`target_fingerprint` — xxh3-128 over the target's ``config.json`` (volatile keys
  such as ``transformers_version`` removed) and the full content of every weight file.
  Content hashes are memoised per file (keyed by real path, size and mtime) in
  ``<cache_root>/fingerprints.json``, so checking a cache against a multi-GB target costs
  one read of the weights the first time and a ``stat`` afterwards.
* :func:`chat_fingerprint` — xxh3-128 over the tokenizer (its full serialised form and
  special tokens), the effective chat template text, the system prompt and the thinking
  flag: everything that decides which token ids a conversation becomes.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import xxhash

from deepspec.errors import TargetError
from deepspec.targets.resolve import cache_root
from deepspec.utils.io import atomic_write_json

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")
_CHUNK = 16 << 20


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def file_xxh3_128(path: str | os.PathLike[str]) -> str:
    """Hex xxh3-128 of a file's content, read in 16 MiB chunks."""
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _memo_path() -> str:
    return os.path.join(cache_root(), "fingerprints.json")


def _load_memo() -> dict[str, str]:
    try:
        with open(_memo_path(), encoding="utf-8") as fh:
            memo = json.load(fh)
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def _file_hash_memoised(path: str, memo: dict[str, str]) -> tuple[str, bool]:
    real = os.path.realpath(path)
    st = os.stat(real)
    key = f"{real}:{st.st_size}:{st.st_mtime_ns}"
    if key in memo:
        return memo[key], False
    digest = file_xxh3_128(real)
    memo[key] = digest
    return digest, True


def target_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """``xxh3-128:<hex>`` of a local HF target directory (config + weight contents)."""
    model_dir = os.fspath(model_dir)
    config_path = os.path.join(model_dir, "config.json")
    try:
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        raise TargetError(f"cannot read {config_path}: {exc}") from None
    for key in VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    weights = []
    for root, _, files in os.walk(model_dir, followlinks=True):
        for name in files:
            if name.endswith(WEIGHT_SUFFIXES) and not name.startswith("."):
                weights.append(os.path.relpath(os.path.join(root, name), model_dir))
    if not weights:
        raise TargetError(f"target directory {model_dir} has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    memo = _load_memo()
    hasher = xxhash.xxh3_128()
    hasher.update(_canonical(config))
    changed = False
    for rel in sorted(weights):
        digest, new = _file_hash_memoised(os.path.join(model_dir, rel), memo)
        changed |= new
        hasher.update(_canonical([rel, os.path.getsize(os.path.join(model_dir, rel)), digest]))
    if changed:
        with contextlib.suppress(OSError):
            atomic_write_json(_memo_path(), memo)
    return "xxh3-128:" + hasher.hexdigest()


def chat_fingerprint(
    tokenizer: Any,
    *,
    chat_template: str | None,
    system_prompt: str | None,
    enable_thinking: bool,
) -> str:
    """``xxh3-128:<hex>`` of a tokenizer plus the rendering options.

    ``chat_template`` is the template *text* that overrides the tokenizer's own (None =
    the tokenizer's template).
    """
    hasher = xxhash.xxh3_128()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        hasher.update(backend.to_str().encode())
    else:
        hasher.update(_canonical(sorted(tokenizer.get_vocab().items())))
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    hasher.update(
        _canonical(
            {
                "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
                "chat_template": template,
                "system_prompt": system_prompt,
                "enable_thinking": bool(enable_thinking),
                "bos_eos": [
                    getattr(tokenizer, "bos_token_id", None),
                    getattr(tokenizer, "eos_token_id", None),
                ],
            }
        )
    )
    return "xxh3-128:" + hasher.hexdigest()
