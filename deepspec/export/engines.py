"""One writer per serving engine: the files that engine's draft loader reads.

Every writer builds the export in a temporary directory next to ``out`` and renames it
into place, so a failed or interrupted export never leaves a half-written draft.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

from deepspec.drafts.reference_format import (
    REFERENCE_FORMAT,
    reference_config,
    reference_export_problem,
    tensors_to_reference,
)
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
from deepspec.export.source import (
    EXPORT_OUT,
    MANIFEST,
    DraftSource,
    input_layer_ids,
    mask_host_id,
)
from deepspec.targets import llama_server_bin
from deepspec.utils.io import atomic_directory, atomic_write_json, save_tensors, writing


def write_hf_dir(
    directory: str,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    mask: tuple[int, torch.Tensor] | None = None,
) -> None:
    """``config.json`` + ``model.safetensors`` (+ ``mask_embedding.pt``) into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    save_tensors(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    config_path = os.path.join(directory, "config.json")
    with writing(config_path), open(config_path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    if mask is not None:
        host, vector = mask
        mask_path = os.path.join(directory, "mask_embedding.pt")
        with writing(mask_path):
            torch.save({"mask_token_id": host, "embedding": vector}, mask_path)


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
    if window:  # the non-causal sliding window of vLLM and llama.cpp (deepspec's mask)
        dflash_config.update(use_swa=True, swa_window_size=window, causal=False)
        out["is_causal"] = False
    if dspark:
        rank = cfg.markov_rank if src.markov and cfg.markov_rank > 0 else 1
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


def run_converter(model_dir: str, outfile: str, outtype: str, *extra: str) -> None:
    """``convert_hf_to_gguf.py model_dir --outtype outtype --outfile outfile *extra``."""
    script, gguf_py = llama_cpp_converter()
    env = {**os.environ, "PYTHONPATH": gguf_py + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, script, model_dir, "--outtype", outtype, "--outfile", outfile, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        raise EnvironmentProblem(f"llama.cpp's converter failed on {model_dir}: {last[0].strip()}")


def llama_cpp_layout(src: DraftSource, mask_host: int | None) -> dict[str, Any]:
    """The HF-style directory llama.cpp's converter reads, and how to serve the result."""
    engine = "llama.cpp"
    if not src.block:
        ids = check_eagle3(src, engine, exact_layers=3)
        tensors = eagle3_tensors(src)
        tensors.pop("t2d", None)  # not read at runtime
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
    llama_cpp_converter()  # a missing converter fails before anything is written

    def write(tmp: str) -> dict[str, Any]:
        hf = os.path.join(tmp, "hf")  # the converter's input, removed once it has read it
        write_hf_dir(hf, layout["config"], layout["tensors"], layout["mask"])
        run_converter(hf, os.path.join(tmp, "draft.gguf"), outtype, "--target-model-dir", target_dir)
        shutil.rmtree(hf)
        return {
            "gguf": "draft.gguf",
            "outtype": outtype,
            "spec_type": layout["spec_type"],
            "n_max": layout["n_max"],
            "mask_token_id": layout["config"].get("dflash_config", {}).get("mask_token_id"),
            "serve": shlex.join(
                [
                    "bash",
                    "scripts/serve/llamacpp.sh",
                    "--draft",
                    os.path.join(out, "draft.gguf"),
                    "--spec-type",
                    layout["spec_type"],
                    "--n-max",
                    str(layout["n_max"]),
                ]
            ),
        }

    return _atomic_export(src, "llamacpp", out, write)


# -- vLLM / SGLang (HF-style directories, no prefix) -----------------------------------
def vllm_layout(src: DraftSource, mask_host: int | None, engine: str = "vLLM") -> dict[str, Any]:
    sglang = engine == "SGLang"
    if not src.block:
        ids = check_eagle3(src, engine)
        if sglang:  # SGLang adds the +1 itself: its Eagle3 ids mean "output of layer k"
            ids = [i - 1 for i in ids]
        tensors = eagle3_tensors(src)
        tensors.pop("t2d", None)  # not read at runtime
        config = eagle3_config(src, "LlamaForCausalLMEagle3", ids)
        if sglang:
            del config["norm_before_residual"]  # SGLang keeps the raw residual, as deepspec
        return {
            "config": config,
            "tensors": tensors,
            "mask": None,
            "method": "eagle3",
            "num_speculative_tokens": src.config.ttt_length,
        }
    # Both block drafters go in as the engine's DSpark (a DFlash one with a Markov bias of
    # exactly zero): vLLM's and SGLang's DFlash paths read block slots 1..K (z-lab's layout,
    # one later than deepspec's anchor-first block), their DSpark paths read slots 0..K-1.
    check_block_draft(src, engine, markov=True)
    if sglang:
        check_sglang_block_draft(src)
    mask_id, mask = _mask(src, mask_host)
    tensors = block_draft_tensors(src, dspark=True)
    if sglang and "confidence_head.proj.weight" not in tensors:  # SGLang always runs one:
        rank = tensors["markov_head.markov_w1.weight"].shape[1]  # survival 1, it never cuts
        tensors["confidence_head.proj.weight"] = torch.zeros(1, src.spec.hidden_size + rank)
        tensors["confidence_head.proj.bias"] = torch.full((1,), 30.0)
    if not sglang and mask is not None:  # vLLM's DSpark ignores mask_embedding.pt: the mask
        embed = src.tensors["embed_tokens.weight"].float().clone()  # vector rides on its row
        embed[mask[0]] = mask[1]
        tensors["embed_tokens.weight"] = embed
    return {
        "config": _block_config(src, "DSparkDraftModel", mask_id, dspark=True),
        "tensors": tensors,
        "mask": mask,
        "method": "dspark",
        "num_speculative_tokens": src.config.block_size,
    }


def export_hf_style(
    src: DraftSource, out: str, *, engine: str, mask_host: int | None = None
) -> dict[str, Any]:
    layout = vllm_layout(src, mask_host, engine)

    def write(tmp: str) -> dict[str, Any]:
        write_hf_dir(tmp, layout["config"], layout["tensors"], layout["mask"])
        return {"method": layout["method"], "num_speculative_tokens": layout["num_speculative_tokens"]}

    return _atomic_export(src, "sglang" if engine == "SGLang" else "vllm", out, write)


def check_sglang_block_draft(src: DraftSource) -> None:
    """SGLang's DFlash/DSpark drafts score the target's whole vocabulary through the
    target's head."""
    engine = "SGLang"
    if src.pruned:
        raise src.refuse(
            engine,
            f"its draft vocabulary is pruned to {src.draft_vocab_size} tokens; SGLang's DFlash/DSpark "
            "drafts score the target's full vocabulary",
            "train with model.draft_vocab_size=0 (or serve it with vLLM or llama.cpp)",
        )


# -- speculators (its own config schema; flat names, layers.0.* for Eagle3) -------------
SPECULATORS_ARCHITECTURES = {
    "eagle3": "Eagle3DraftModel",
    "dflash": "DFlashDraftModel",
    "dspark": "DSparkDraftModel",
}


def speculators_layout(src: DraftSource, mask_host: int | None, verifier: str | None) -> dict[str, Any]:
    engine = "speculators"
    cfg = src.config
    ids = input_layer_ids(src, engine)  # speculators' ids mean "input of layer k"
    if not src.block:
        check_eagle3(src, engine)
        mid = eagle3_tensors(src)
        tensors = {k.replace("midlayer.", "layers.0."): v for k, v in mid.items()}
        tensors["embed_tokens.weight"] = src.tensors["embed_tokens.weight"].float().contiguous()
        layer_config = text_config(src, "llama", 1)
        extra: dict[str, Any] = {
            "eagle_aux_hidden_state_layer_ids": ids,
            "norm_before_residual": False,
            "norm_before_fc": False,
            "fc_norm": False,
            "norm_output": False,
            "embed_requires_grad": False,
        }
        mask = None
        tokens = cfg.ttt_length
    else:
        dspark = src.markov
        check_block_draft(src, engine, markov=dspark)
        if dspark and cfg.markov_rank > 0 and not cfg.confidence_head:
            raise src.refuse(engine, "its DSpark has no confidence head", "train with the confidence head on")
        tensors = block_draft_tensors(src, dspark=dspark)
        if src.pruned:
            tensors["t2d"] = src.tensors["t2d"].bool().contiguous()
        block = _block_config(src, "DSparkDraftModel" if dspark else "DFlashDraftModel", 0, dspark=dspark)
        layer_config = {k: block[k] for k in ("layer_types", "use_sliding_window", "sliding_window")}
        layer_config = {**text_config(src, "qwen3", cfg.num_draft_layers), **layer_config}
        mask_id, mask = _mask(src, mask_host)
        extra = {
            "aux_hidden_state_layer_ids": ids,
            "block_size": cfg.block_size,
            "mask_token_id": mask_id,
            "sample_from_anchor": True,  # deepspec's anchor-first block
            "sliding_window_non_causal": True,
        }
        if dspark:
            extra.update({k: block[k] for k in ("markov_rank", "markov_head_type", "enable_confidence_head")})
            extra["confidence_head_with_markov"] = True
        tokens = cfg.block_size
    kind = "dspark" if src.markov else "dflash" if src.block else "eagle3"  # speculators' names
    config = {
        "architectures": [SPECULATORS_ARCHITECTURES[kind]],
        "speculators_model_type": kind,
        "draft_vocab_size": src.draft_vocab_size,
        "target_hidden_size": None,
        "tie_word_embeddings": False,
        "dtype": "float32",
        "transformer_layer_config": layer_config,
        **extra,
        "speculators_config": {
            "algorithm": kind,
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": tokens,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "default_proposal_method": "greedy",
            "verifier": {
                "name_or_path": verifier or cfg.target_model_name_or_path,
                "architectures": [_target_arch(src)],
            },
        },
    }
    notes = []
    if src.block and cfg.context_window:
        notes.append(
            "speculators' own training mask keeps a fixed window per block; deepspec, llama.cpp and "
            "vLLM use a sliding window per block slot (slot k sees W-1-k context positions)"
        )
    if mask is not None:
        notes.append("the learned mask vector is in mask_embedding.pt (speculators' classes do not read it)")
    return {"config": config, "tensors": tensors, "mask": mask, "notes": notes}


def _target_arch(src: DraftSource) -> str:
    family = src.spec.family
    return {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "gemma3_text": "Gemma3ForCausalLM",
        "gemma4_text": "Gemma4ForCausalLM",
    }.get(family, "AutoModelForCausalLM")


def export_speculators(
    src: DraftSource, out: str, *, mask_host: int | None = None, verifier: str | None = None
) -> dict[str, Any]:
    layout = speculators_layout(src, mask_host, verifier)

    def write(tmp: str) -> dict[str, Any]:
        write_hf_dir(tmp, layout["config"], layout["tensors"], layout["mask"])
        return {"notes": layout["notes"]}

    return _atomic_export(src, "speculators", out, write)


def export_reference(src: DraftSource, out: str) -> dict[str, Any]:
    """The DeepSpec reference implementation's own layout (its released drafts' format):
    the target's text config with the draft fields its classes assert, every tensor under
    its names, ``lm_head`` included (:mod:`deepspec.drafts.reference_format`)."""
    problem = reference_export_problem(src.config)
    if problem is not None:
        raise src.refuse("the DeepSpec reference format", *problem)
    config = reference_config(src.config)
    tensors = tensors_to_reference(src.tensors, src.config)

    def write(tmp: str) -> dict[str, Any]:
        write_hf_dir(tmp, config, tensors)
        return {"architecture": config["architectures"][0]}

    return _atomic_export(src, REFERENCE_FORMAT, out, write)


# -- shared ----------------------------------------------------------------------------
def _atomic_export(
    src: DraftSource, fmt: str, out: str, write: Callable[[str], dict[str, Any]]
) -> dict[str, Any]:
    """Run ``write(tmp)`` in a fresh directory that replaces ``out`` (new, empty or an earlier
    export) once it holds the export and its manifest
    (:func:`deepspec.utils.io.atomic_directory`). Returns the manifest."""
    with atomic_directory(out, **EXPORT_OUT, protect=[src.path]) as tmp:
        manifest = {
            "format": fmt,
            "algorithm": src.algorithm,
            "source": os.path.abspath(src.path),
            "source_checksum": src.checksum,
            **write(tmp),
        }
        atomic_write_json(os.path.join(tmp, MANIFEST), manifest)
    return manifest
