"""Draft models: DSpark, DFlash and Eagle3, built from any supported target's family spec.

from deepspec.drafts import build_draft, load_draft
draft = build_draft(cfg, target_dir)        # from a training config
draft = load_draft("~/checkpoints/.../step_latest")
"""

from __future__ import annotations

from typing import Any

from deepspec.algorithms import ALGORITHMS, Algorithm, get_algorithm
from deepspec.config import Config
from deepspec.drafts.base import DraftConfig, DraftModel
from deepspec.drafts.checkpoint import load_draft, read_draft_config
from deepspec.drafts.saving import save_draft
from deepspec.drafts.state import KVCache, Proposal, sample_tokens
from deepspec.targets.family import load_family_spec


def build_draft(
    cfg: Config, target_dir: str | None = None, spec: Any = None, draft_ids: Any = None
) -> DraftModel:
    """A new draft for a training config; embedding + LM head copied from ``target_dir``.
    ``draft_ids`` [N]: the pruned draft vocabulary (``model.draft_vocab_size`` N > 0; see
    :func:`deepspec.drafts.vocab.build_draft_vocab`), else the first N ids."""
    if spec is None:
        spec = load_family_spec(target_dir)
    model = get_algorithm(cfg.algorithm).model_cls(DraftConfig.from_cfg(cfg, spec))
    model.attention_backend = getattr(cfg.model, "attention_backend", "auto")
    model.reset_parameters(std=cfg.model.init_std)
    if draft_ids is not None:
        model.set_draft_vocab(draft_ids)
    if target_dir is not None:
        model.target_dir = target_dir  # save_pretrained records its fingerprint
        model.load_target_embeddings(target_dir)
        model.init_output_norm(cfg.model.output_norm_init, target_dir, scale=cfg.model.output_norm_scale)
    return model


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "DraftConfig",
    "DraftModel",
    "KVCache",
    "Proposal",
    "build_draft",
    "get_algorithm",
    "load_draft",
    "read_draft_config",
    "sample_tokens",
    "save_draft",
]
