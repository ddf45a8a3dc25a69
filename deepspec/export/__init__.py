"""Export a trained draft to the serving engines: llama.cpp (GGUF), vLLM, SGLang, speculators.

``python -m deepspec.export <draft dir> --to {llamacpp,vllm,sglang,speculators} --out <dir>``

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

from deepspec.export.source import ExportRefused, read_source

FORMATS = ("llamacpp", "vllm", "sglang", "speculators")


def export_draft(
    draft_dir: str,
    to: str,
    out: str,
    *,
    target_dir: str | None = None,
    outtype: str = "f32",
    mask_host_id: int | None = None,
) -> dict[str, Any]:
    """Write ``draft_dir`` in engine ``to``'s format into ``out``; returns the manifest
    (also written as ``out/deepspec_export.json``)."""
    from deepspec.export import engines

    if to not in FORMATS:
        raise ExportRefused(f"unknown export format {to!r}; choose one of {', '.join(FORMATS)}")
    src = read_source(draft_dir)
    if to == "llamacpp":
        if target_dir is None:
            from deepspec.targets import resolve_target

            target_dir = resolve_target(src.config.target_model_name_or_path)
        manifest = engines.export_llamacpp(
            src, out, target_dir=target_dir, outtype=outtype, mask_host=mask_host_id
        )
    elif to == "speculators":
        manifest = engines.export_speculators(src, out, mask_host=mask_host_id, verifier=target_dir)
    else:
        manifest = engines.export_hf_style(
            src, out, engine={"vllm": "vLLM", "sglang": "SGLang"}[to], mask_host=mask_host_id
        )
    return {"format": to, "algorithm": src.algorithm, "source": os.path.abspath(src.path), **manifest}


__all__ = ["FORMATS", "ExportRefused", "export_draft"]
