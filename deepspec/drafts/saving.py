"""Writing a draft checkpoint: its file names, what ``config.json`` records besides the
draft's config, and the atomic save behind ``DraftModel.save_pretrained``.

Reading, checking and loading checkpoints is :mod:`deepspec.drafts.checkpoint`; this module
sits below :class:`~deepspec.drafts.base.DraftModel`
(it takes the model it writes as an argument and imports no draft module), so that
``save_pretrained`` needs nothing above the base class.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from deepspec.algorithms import ARCHITECTURES  # names only: the registry imports no draft
from deepspec.data.fingerprint import file_xxh3_128, target_fingerprint
from deepspec.utils.io import atomic_directory, save_tensors, writing

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_CHECKSUM = "weights_checksum"  # xxh3-128 of model.safetensors, in config.json
TARGET_FINGERPRINT = "target_fingerprint"  # deepspec.data.fingerprint of the target trained for
IDENTITY_KEYS = (WEIGHTS_CHECKSUM, TARGET_FINGERPRINT)


def weights_checksum(path: str) -> str:
    """``xxh3-128:<hex>`` of a checkpoint directory's ``model.safetensors``."""
    return "xxh3-128:" + file_xxh3_128(os.path.join(path, WEIGHTS_NAME))


def write_draft_files(
    model: Any,
    directory: str,
    state: dict[str, torch.Tensor] | None = None,
    *,
    target_fingerprint: str | None = None,
) -> None:
    """Write ``config.json`` + ``model.safetensors`` of the draft ``model`` (a
    :class:`~deepspec.drafts.base.DraftModel`) into an existing ``directory``.

    ``state`` defaults to the model's own state dict (a trainer passes the gathered full
    state of a sharded model). A tied LM head is stored once, as ``embed_tokens.weight``.
    ``config.json`` records the weights' checksum and, when given, the fingerprint of the
    target the draft was trained for; :func:`~deepspec.drafts.checkpoint.read_weights` and
    :func:`~deepspec.drafts.checkpoint.check_draft_target` check them.
    """
    state = model.state_dict() if state is None else state
    tied = model.head_is_tied
    tensors = {
        k: v.detach().contiguous().cpu() for k, v in state.items() if not (tied and k == "lm_head.weight")
    }
    save_tensors(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    config = model.config_json()
    config[WEIGHTS_CHECKSUM] = weights_checksum(directory)
    if target_fingerprint:
        config[TARGET_FINGERPRINT] = target_fingerprint
    config_path = os.path.join(directory, CONFIG_NAME)
    with writing(config_path), open(config_path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)


def is_draft_dir(path: str) -> bool:
    """``path`` holds a draft checkpoint deepspec wrote (a config.json naming one of its
    architectures, and weights) and nothing more: a training step directory (``COMPLETE``,
    ``trainer_state/``, see :mod:`deepspec.train.checkpoint`) is not replaceable."""
    if any(os.path.exists(os.path.join(path, name)) for name in ("COMPLETE", "trainer_state")):
        return False

    try:
        with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as fh:
            arch = (json.load(fh).get("architectures") or [""])[0]
    except (OSError, ValueError, AttributeError, TypeError):
        return False
    return arch in ARCHITECTURES and os.path.isfile(os.path.join(path, WEIGHTS_NAME))


def save_draft(model: Any, out_dir: str) -> None:
    """Write the draft ``model`` atomically: a temporary directory renamed over ``out_dir``, which
    may only be new, empty or an earlier draft checkpoint. The target's fingerprint is
    recorded when known: the one a loaded draft recorded, else that of the target directory
    :func:`~deepspec.drafts.build_draft` built it from."""
    fingerprint, target = model.target_fingerprint, model.target_dir
    if fingerprint is None and target and os.path.isfile(os.path.join(target, CONFIG_NAME)):
        fingerprint = target_fingerprint(target)
    with atomic_directory(
        out_dir, flag="save_pretrained", ours=is_draft_dir, what="a draft checkpoint"
    ) as tmp:
        write_draft_files(model, tmp, target_fingerprint=fingerprint)
