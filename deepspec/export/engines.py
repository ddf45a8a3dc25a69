"""One writer per serving engine: the files that engine's draft loader reads.

Every writer builds the export in a temporary directory next to ``out`` and renames it
into place, so a failed or interrupted export never leaves a half-written draft.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import save_file

from deepspec.errors import EnvironmentProblem
from deepspec.export.layouts import (
    block_draft_tensors,
    check_block_draft,
    check_eagle3,
    eagle3_config,
    eagle3_tensors,
    mask_vector,
    text_config,
)
from deepspec.export.source import DraftSource, mask_host_id
from deepspec.utils.io import fsync_dir, make_dir_public

MANIFEST = "deepspec_export.json"


def write_hf_dir(
    directory: str,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    mask: tuple[int, torch.Tensor] | None = None,
) -> None:
    """``config.json`` + ``model.safetensors`` (+ ``mask_embedding.pt``) into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    if mask is not None:
        host, vector = mask
        torch.save({"mask_token_id": host, "embedding": vector}, os.path.join(directory, "mask_embedding.pt"))


def _mask(src: DraftSource, requested: int | None) -> tuple[int, tuple[int, torch.Tensor] | None]:
    """``(mask_token_id, (host id, vector) or None)``: a configured mask id is used as is;
    a learned mask vector rides on a host token id (:func:`mask_host_id`)."""
    vector = mask_vector(src)
    if vector is None:
        return int(src.config.mask_token_id), None
    host = mask_host_id(src, requested)
    return host, (host, vector)


def _block_config(src: DraftSource, architecture: str, mask_id: int, *, dspark: bool) -> dict[str, Any]:
    cfg = src.config
    dflash_config: dict[str, Any] = {
        "target_layer_ids": list(cfg.target_layer_ids),  # "output of layer k", as deepspec
        "mask_token_id": mask_id,
        "block_size": cfg.block_size,
    }
    window = cfg.context_window
    out = {
        "architectures": [architecture],
        **text_config(src, "qwen3", cfg.num_draft_layers),
        "block_size": cfg.block_size,
        "dflash_config": dflash_config,
        "layer_types": ["sliding_attention" if window else "full_attention"] * cfg.num_draft_layers,
        "use_sliding_window": bool(window),
        "sliding_window": window or None,
        "sample_from_anchor": True,  # slot 0 (the anchor) predicts the next token
        "draft_vocab_size": src.draft_vocab_size,
    }
    if window:
        dflash_config.update(use_swa=True, swa_window_size=window)
    if dspark:
        rank = cfg.markov_rank if src.algorithm == "dspark" and cfg.markov_rank > 0 else 1
        out.update(
            markov_rank=rank,
            markov_head_type="vanilla",
            enable_confidence_head="confidence_head.proj.weight" in src.tensors,
            confidence_head_with_markov=True,
        )
    return out


# -- llama.cpp ------------------------------------------------------------------------
def llama_cpp_converter() -> tuple[str, str]:
    """``(convert_hf_to_gguf.py, gguf-py dir)`` of the llama.cpp tree ``setup.sh
    --llama-server`` built, or a one-line error naming the fix."""
    from deepspec.targets import llama_server_bin

    root = os.path.dirname(os.path.dirname(os.path.dirname(llama_server_bin())))
    script = os.path.join(root, "convert_hf_to_gguf.py")
    if not os.path.isfile(script):
        raise EnvironmentProblem(
            f"llama.cpp's converter {script} is missing; run `bash scripts/setup.sh --llama-server`"
        )
    try:
        import sentencepiece  # noqa: F401 - the converter imports it for every vocabulary
    except ImportError:
        raise EnvironmentProblem(
            "llama.cpp's converter needs sentencepiece; run `pip install sentencepiece`"
        ) from None
    return script, os.path.join(root, "gguf-py")


def llama_cpp_layout(src: DraftSource, mask_host: int | None) -> dict[str, Any]:
    """The HF-style directory llama.cpp's converter reads, and how to serve the result."""
    engine = "llama.cpp"
    if src.algorithm == "eagle3":
        ids = check_eagle3(src, engine, exact_layers=3)
        tensors = eagle3_tensors(src)
        del tensors["t2d"]
        if not src.pruned:
            del tensors["d2t"]
        return {
            "config": eagle3_config(src, "LlamaForCausalLMEagle3", ids),
            "tensors": tensors,
            "mask": None,
            "spec_type": "draft-eagle3",
            "n_max": src.config.ttt_length,
        }
    check_block_draft(src, engine, markov=True)
    mask_id, mask = _mask(src, mask_host)
    # DFlash runs as a DSpark draft whose Markov bias is exactly zero: llama.cpp's DSpark
    # path reads the block anchor-first, as deepspec trains it (its DFlash path does not)
    return {
        "config": _block_config(src, "DSparkDraftModel", mask_id, dspark=True),
        "tensors": block_draft_tensors(src, dspark=True),
        "mask": mask,
        "spec_type": "draft-dspark",
        "n_max": src.config.block_size,
    }


def export_llamacpp(
    src: DraftSource, out: str, *, target_dir: str, outtype: str = "f32", mask_host: int | None = None
) -> dict[str, Any]:
    layout = llama_cpp_layout(src, mask_host)
    script, gguf_py = llama_cpp_converter()

    def write(tmp: str) -> dict[str, Any]:
        hf = os.path.join(tmp, "hf")
        write_hf_dir(hf, layout["config"], layout["tensors"], layout["mask"])
        gguf = os.path.join(tmp, "draft.gguf")
        env = {**os.environ, "PYTHONPATH": gguf_py + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [
            sys.executable,
            script,
            hf,
            "--target-model-dir",
            target_dir,
            "--outtype",
            outtype,
            "--outfile",
            gguf,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
            raise EnvironmentProblem(f"llama.cpp's converter failed on {hf}: {last[0].strip()}")
        return {
            "gguf": "draft.gguf",
            "spec_type": layout["spec_type"],
            "n_max": layout["n_max"],
            "mask_token_id": layout["config"].get("dflash_config", {}).get("mask_token_id"),
            "serve": (
                f"bash scripts/serve/llamacpp.sh --draft {os.path.join(out, 'draft.gguf')} "
                f"--spec-type {layout['spec_type']} --n-max {layout['n_max']}"
            ),
        }

    return _atomic_export(out, write)


# -- vLLM / SGLang (HF-style directories, no prefix) -----------------------------------
def vllm_layout(src: DraftSource, mask_host: int | None, engine: str = "vLLM") -> dict[str, Any]:
    if src.algorithm == "eagle3":
        ids = check_eagle3(src, engine)
        tensors = eagle3_tensors(src)
        del tensors["t2d"]
        return {
            "config": eagle3_config(src, "LlamaForCausalLMEagle3", ids),
            "tensors": tensors,
            "mask": None,
            "method": "eagle3",
            "num_speculative_tokens": src.config.ttt_length,
        }
    dspark = src.algorithm == "dspark"
    check_block_draft(src, engine, markov=dspark)
    mask_id, mask = _mask(src, mask_host)
    arch = "DSparkDraftModel" if dspark else "DFlashDraftModel"
    return {
        "config": _block_config(src, arch, mask_id, dspark=dspark),
        "tensors": block_draft_tensors(src, dspark=dspark),
        "mask": mask,
        "method": src.algorithm,
        "num_speculative_tokens": src.config.block_size,
    }


def export_hf_style(
    src: DraftSource, out: str, *, engine: str, mask_host: int | None = None
) -> dict[str, Any]:
    layout = vllm_layout(src, mask_host, engine)

    def write(tmp: str) -> dict[str, Any]:
        write_hf_dir(tmp, layout["config"], layout["tensors"], layout["mask"])
        return {"method": layout["method"], "num_speculative_tokens": layout["num_speculative_tokens"]}

    return _atomic_export(out, write)


# -- shared ----------------------------------------------------------------------------
def _atomic_export(out: str, write: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """Run ``write(tmp)`` in a fresh directory next to ``out``, add the manifest, rename."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    make_dir_public(tmp)
    try:
        manifest = write(tmp)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
