"""Export a trained draft to the serving engines: llama.cpp (GGUF), vLLM, SGLang, speculators,
or to the DeepSpec reference implementation's own format (its released drafts' layout).

``python -m deepspec.export <draft dir> --to {llamacpp,vllm,sglang,speculators,deepspec-reference} --out <dir>``

Layer-id conventions (deepspec stores "output of target layer k", 0-based):

=======================================  ==================  ==================
reader                                   meaning of id k     deepspec id i ->
=======================================  ==================  ==================
deepspec, z-lab DFlash, SGLang,          output of layer k   i
llama.cpp DFlash/DSpark converter
vLLM ``eagle_aux_hidden_state_layer_ids``  input of layer k   i + 1
speculators ``aux_hidden_state_layer_ids``  input of layer k   i + 1
llama.cpp Eagle3                         input of layer k    i + 1
=======================================  ==================  ==================
"""

from __future__ import annotations

import os
from typing import Any

from deepspec.drafts.checkpoint import check_draft_dir, check_draft_target, resolve_draft
from deepspec.errors import ConfigError
from deepspec.export import engines
from deepspec.export.source import MANIFEST, ExportRefused, check_out, is_export_dir, read_source
from deepspec.targets import resolve_target

FORMATS = ("llamacpp", "vllm", "sglang", "speculators", "deepspec-reference")
OUTTYPES = ("f32", "bf16", "f16", "q8_0")


def _local_target(target: str, to: str) -> str | None:
    """The local directory ``--target`` names (resolved like every target name), or None
    for a hub id that speculators only records. A path that does not exist is refused."""
    looks_local = target.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(target))
    if to == "speculators" and not looks_local and ":" not in target:
        return None  # a hub name: recorded as the verifier, checked by whoever loads it
    if looks_local and not os.path.exists(os.path.expanduser(target)):
        raise ConfigError(f"--target {target} does not exist; pass the target's HF directory, GGUF or name")
    return resolve_target(target)


def export_draft(
    draft_dir: str,
    to: str,
    out: str,
    *,
    target_dir: str | None = None,
    outtype: str | None = None,
    mask_host_id: int | None = None,
    allow_other_target: bool = False,
) -> dict[str, Any]:
    """Write ``draft_dir`` in engine ``to``'s format into ``out``; returns the manifest
    (also written as ``out/deepspec_export.json``).

    Checked before anything is written: ``out`` (:func:`check_out`), the draft's weights
    against their checksum, and ``target_dir`` against the target the draft was trained
    for (``allow_other_target`` skips that one)."""
    if to not in FORMATS:
        raise ExportRefused(f"unknown export format {to!r}; choose one of {', '.join(FORMATS)}")
    if outtype is not None and to != "llamacpp":
        raise ConfigError(f"--outtype applies to --to llamacpp only (a GGUF weight type); drop it for {to}")
    if outtype is not None and outtype not in OUTTYPES:
        raise ConfigError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    if target_dir is not None and to not in ("llamacpp", "speculators"):
        raise ConfigError(f"--target is read by --to llamacpp and speculators only; drop it for {to}")
    draft_dir = check_draft_dir(resolve_draft(draft_dir))
    out = check_out(out, draft_dir, target_dir and os.path.expanduser(target_dir))
    src = read_source(draft_dir)
    local_target = None
    if target_dir is not None:
        local_target = _local_target(target_dir, to)
    elif to == "llamacpp":
        local_target = resolve_target(src.config.target_model_name_or_path)
    if local_target is not None:
        check_draft_target(
            draft_dir, local_target, allow_other=allow_other_target, flag="--allow-other-target"
        )
    if to == "llamacpp":
        manifest = engines.export_llamacpp(
            src, out, target_dir=local_target, outtype=outtype or "f32", mask_host=mask_host_id
        )
    elif to == "deepspec-reference":
        manifest = engines.export_reference(src, out)
    elif to == "speculators":
        manifest = engines.export_speculators(src, out, mask_host=mask_host_id, verifier=target_dir)
    else:
        manifest = engines.export_hf_style(
            src, out, engine={"vllm": "vLLM", "sglang": "SGLang"}[to], mask_host=mask_host_id
        )
    return manifest


__all__ = ["FORMATS", "MANIFEST", "ExportRefused", "export_draft", "is_export_dir"]
