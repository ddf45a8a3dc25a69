"""Draft checkpoints: a directory with ``config.json`` (architectures + every draft field,
the target's family spec and the layer-id / anchor conventions) and ``model.safetensors``.

The frozen target embedding and LM head are included, so a checkpoint loads and drafts
without the training config or the target's weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

from deepspec.drafts.base import DraftConfig, DraftModel
from deepspec.errors import DataError
from deepspec.utils.io import fsync_dir, make_dir_public

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def write_draft_files(
    model: DraftModel, directory: str, state: dict[str, torch.Tensor] | None = None
) -> None:
    """Write ``config.json`` + ``model.safetensors`` into an existing ``directory``.

    ``state`` defaults to the model's own state dict (a trainer passes the gathered full
    state of a sharded model). A tied LM head is stored once, as ``embed_tokens.weight``.
    """
    state = model.state_dict() if state is None else state
    tied = model.spec.tie_word_embeddings
    tensors = {
        k: v.detach().contiguous().cpu() for k, v in state.items() if not (tied and k == "lm_head.weight")
    }
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as fh:
        json.dump(model.config_json(), fh, indent=2)


def save_draft(model: DraftModel, out_dir: str) -> None:
    """Write the draft atomically: a temporary directory renamed over ``out_dir``."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    make_dir_public(tmp)
    try:
        write_draft_files(model, tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_draft_config(path: str) -> tuple[str, DraftConfig]:
    """``(architecture, DraftConfig)`` of a checkpoint directory."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise DataError(f"draft checkpoint {path} has no {CONFIG_NAME}")
    with open(cfg_path, encoding="utf-8") as fh:
        raw = json.load(fh)
    arch = (raw.pop("architectures", None) or [""])[0]
    raw.pop("deepspec_version", None)
    known = set(DraftConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DataError(f"draft checkpoint {path}: unknown config fields {unknown}")
    return arch, DraftConfig(**raw)


def load_draft(
    path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> DraftModel:
    """Load a draft checkpoint directory and return the right class (DSpark/DFlash/Eagle3)."""
    from deepspec.drafts.registry import ARCHITECTURES

    path = os.path.expanduser(path)
    arch, config = read_draft_config(path)
    algorithm = ARCHITECTURES.get(arch)
    if algorithm is None:
        raise DataError(
            f"draft checkpoint {path}: unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}"
        )
    model = algorithm.model_cls(config)
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise DataError(f"draft checkpoint {path} has no {WEIGHTS_NAME}")
    state = load_file(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.spec.tie_word_embeddings)]
    if missing or unexpected:
        raise DataError(
            f"draft checkpoint {path} does not match {arch}: missing {missing}, unexpected {unexpected}"
        )
    model = model.to(device=device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()
