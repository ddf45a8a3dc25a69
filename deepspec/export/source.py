"""A trained draft checkpoint as the exporters see it: its config, its tensors, and the
facts every engine asks about (layer ids, head, vocabulary, mask vector).

Layer ids: deepspec's ``target_layer_ids`` mean "output of target layer k" (0-based), as
DFlash, SGLang and llama.cpp's DFlash/DSpark converter read them. vLLM's
``eagle_aux_hidden_state_layer_ids``, speculators' ``aux_hidden_state_layer_ids`` and
llama.cpp's Eagle3 mean "input of layer k": one higher. :func:`input_layer_ids` shifts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from deepspec.algorithms import ALGORITHMS
from deepspec.drafts.base import DraftConfig
from deepspec.drafts.checkpoint import (
    check_finite_weights,
    draft_fingerprint,
    read_draft_config,
    read_draft_state,
)
from deepspec.errors import DataError
from deepspec.targets.family import FamilySpec
from deepspec.utils.io import check_replaceable

MANIFEST = "deepspec_export.json"


def is_export_dir(path: str) -> bool:
    """``path`` holds an export deepspec wrote earlier (its manifest is a JSON object)."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as fh:
            return isinstance(json.load(fh), dict)
    except (OSError, ValueError):
        return False


# what an export's --out may replace (deepspec.utils.io.check_replaceable / atomic_directory)
EXPORT_OUT = {"flag": "--out", "ours": is_export_dir, "what": "an earlier deepspec export"}


def check_out(out: str, draft_dir: str, target_dir: str | None = None) -> str:
    """``out`` made absolute when an export may be written there: new, empty or an earlier
    export, and neither the draft, the target nor the working directory inside it."""
    protect = [draft_dir] + ([target_dir] if target_dir and os.path.exists(target_dir) else [])
    return check_replaceable(out, **EXPORT_OUT, protect=protect)


class ExportRefused(DataError):
    """The engine cannot represent this draft (one line: what, why, and the way out)."""


@dataclass
class DraftSource:
    path: str
    architecture: str
    config: DraftConfig
    tensors: dict[str, torch.Tensor]
    checksum: str  # what identifies the draft's weights (drafts.checkpoint.draft_fingerprint)

    @property
    def algorithm(self) -> str:
        return self.config.algorithm

    @property
    def block(self) -> bool:
        """A block draft (DFlash/DSpark: the engines' block-draft graphs), else a chain (Eagle3)."""
        return ALGORITHMS[self.algorithm].block

    @property
    def markov(self) -> bool:
        """An algorithm with DSpark's Markov and confidence heads."""
        return ALGORITHMS[self.algorithm].markov

    @property
    def spec(self) -> FamilySpec:
        return self.config.spec

    @property
    def pruned(self) -> bool:
        return self.config.draft_vocab_size > 0

    @property
    def draft_vocab_size(self) -> int:
        return self.config.draft_vocab_size or self.spec.vocab_size

    @property
    def qk_norm(self) -> bool:
        """Do the draft's attention layers carry per-head q/k norms?"""
        return "layers.0.self_attn.q_norm.weight" in self.tensors

    def head(self) -> torch.Tensor:
        """The draft's LM head rows ``[draft_vocab_size, d]`` (the embedding when tied)."""
        return self.tensors.get("lm_head.weight", self.tensors["embed_tokens.weight"])

    def norm(self, name: str) -> torch.Tensor:
        """An RMSNorm weight as a plain ``x * w`` norm (a family's ``1 + w`` offset folded in)."""
        return self.tensors[name].float() + self.spec.rule.norm_offset

    def layer_prefixes(self) -> list[str]:
        n = self.config.num_draft_layers if self.block else self.config.draft_num_hidden_layers
        return [f"layers.{i}." for i in range(n)]

    def refuse(self, engine: str, reason: str, fix: str) -> ExportRefused:
        return ExportRefused(f"cannot export {self.path} ({self.algorithm}) to {engine}: {reason}; {fix}")


def read_source(path: str) -> DraftSource:
    """Read a checkpoint directory written by ``train.py`` (one-line errors when it is not
    one, or when its weights hold NaN or inf: a diverged run exports nowhere)."""
    architecture, config = read_draft_config(path)
    if config.algorithm not in ALGORITHMS:
        raise DataError(f"draft checkpoint {path}: unknown algorithm {config.algorithm!r}")
    path = os.path.expanduser(path)
    tensors = read_draft_state(path, config)  # checked against the checksum config.json records
    check_finite_weights(tensors.items(), path)
    return DraftSource(path, architecture, config, tensors, draft_fingerprint(path))


def input_layer_ids(src: DraftSource, engine: str) -> list[int]:
    """deepspec's "output of layer k" ids as "input of layer k+1" ids (vLLM Eagle3,
    speculators, llama.cpp Eagle3). The last layer's output is no layer's input."""
    last = src.spec.num_hidden_layers - 1
    ids = list(src.config.target_layer_ids)
    if any(i >= last for i in ids) or any(i < -1 for i in ids):
        raise src.refuse(
            engine,
            f"target_layer_ids {ids} include the last layer's output ({last}), which {engine} "
            "reads as the input of a layer that does not exist",
            "train with ids below the last layer",
        )
    return [i + 1 for i in ids]


def check_plain_layers(src: DraftSource, engine: str) -> None:
    """Refuse what the engines' Llama/Qwen3-style draft graphs do not compute."""
    spec, rule = src.spec, src.spec.rule
    problems = []
    if rule.v_norm:
        problems.append("per-head value norms")
    if rule.sandwich_norm:
        problems.append("sandwich norms")
    if rule.scale_embeddings:
        problems.append("scaled embeddings")
    if rule.attn_scale != "head_dim":
        problems.append(f"attention scale {rule.attn_scale!r}")
    if spec.attention_bias:
        problems.append("attention biases")
    if spec.hidden_act != "silu":
        problems.append(f"activation {spec.hidden_act!r}")
    if problems:
        raise src.refuse(
            engine,
            f"its {spec.family} draft layers use {', '.join(problems)}, which the engine's draft "
            "graph does not compute",
            "serve it with deepspec's own decoder (eval.py)",
        )


def mask_host_id(src: DraftSource, requested: int | None) -> int:
    """The target token id whose embedding row carries the learned mask vector in engines
    that read the mask as a token (llama.cpp, vLLM's ``mask_embedding.pt``).

    Default: the highest id outside a pruned draft vocabulary (the draft never scores it,
    so only the input side of that one rare token changes), else the last id."""
    V = src.spec.vocab_size
    if requested is not None:
        if not 0 <= requested < V:
            raise DataError(f"--mask-host-id {requested} is outside the target vocabulary 0..{V - 1}")
        return requested
    if src.pruned:
        outside = (~src.tensors["t2d"].bool()).nonzero().flatten()
        if outside.numel():
            return int(outside[-1])
    return V - 1
