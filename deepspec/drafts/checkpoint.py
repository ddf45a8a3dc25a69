"""Draft checkpoints: a directory with ``config.json`` (architectures + every draft field,
the target's family spec and the layer-id / anchor conventions) and ``model.safetensors``.

The frozen target embedding and LM head are included, so a checkpoint loads and drafts
without the training config or the target's weights. A pruned draft vocabulary adds
``d2t`` [N] and ``t2d`` [V] and stores its own ``lm_head.weight`` [N, d].

This module reads, checks and loads them (:func:`load_draft` builds the class the
registry names); writing them is :mod:`deepspec.drafts.saving`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch
from safetensors.torch import load_file

from deepspec.algorithms import ARCHITECTURES
from deepspec.data.fingerprint import target_fingerprint
from deepspec.drafts.base import WINDOW_CONVENTION, DraftConfig, DraftModel
from deepspec.drafts.reference_format import (
    is_reference_config,
    read_reference_config,
    tensors_from_reference,
)
from deepspec.drafts.saving import (
    CONFIG_NAME,
    IDENTITY_KEYS,
    TARGET_FINGERPRINT,
    WEIGHTS_CHECKSUM,
    WEIGHTS_NAME,
    weights_checksum,
)
from deepspec.errors import DataError
from deepspec.targets.resolve import hub_snapshot, is_hub_id
from deepspec.utils.io import atomic_write_json, read_json_object, unreadable_safetensors

CONFIG_FIX = "copy it again or use another checkpoint"


def resolve_draft(name_or_path: str) -> str:
    """A local draft directory for ``name_or_path``: the directory itself, else a hub id
    (``deepseek-ai/dspark_qwen3_4b_block7``) downloaded when the hub is reachable, with one
    :class:`DataError` line when it is not."""
    path = os.path.expanduser(os.fspath(name_or_path))
    if os.path.exists(path) or not is_hub_id(path):
        return path

    return hub_snapshot(path, what="draft", error=DataError)


def check_draft_dir(path: str) -> str:
    """``path`` expanded; a :class:`DataError` when it is not a draft checkpoint directory."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise DataError(
            f"draft checkpoint {path} does not exist; pass a checkpoint directory "
            "(e.g. <checkpoint_dir>/step_latest, with config.json and model.safetensors)"
        )
    if not os.path.isdir(path):
        raise DataError(
            f"draft checkpoint {path} is a file, not a directory; pass the checkpoint directory "
            "that holds config.json and model.safetensors"
        )
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise DataError(
            f"draft checkpoint {path} has no {CONFIG_NAME}; pass a directory written by train.py "
            "or save_pretrained (e.g. <checkpoint_dir>/step_latest)"
        )
    return path


def read_draft_config(path: str) -> tuple[str, DraftConfig]:
    """``(architecture, DraftConfig)`` of a checkpoint directory."""
    path = check_draft_dir(path)
    cfg_path = os.path.join(path, CONFIG_NAME)
    raw = read_json_object(cfg_path, CONFIG_FIX)
    if is_reference_config(raw):
        return read_reference_config(raw, path)
    arch = (raw.pop("architectures", None) or [""])[0]
    raw.pop("deepspec_version", None)
    for key in IDENTITY_KEYS:
        raw.pop(key, None)
    known = set(DraftConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DataError(f"draft checkpoint {path}: unknown config fields {unknown}")
    if raw.get("context_window", 0) and raw.get("window_convention") != WINDOW_CONVENTION:
        raise DataError(
            f"draft checkpoint {path} was trained with the earlier fixed context window per block "
            f"(context_window={raw['context_window']}); deepspec and the serving engines now apply a "
            "sliding window, so its drafts would differ: retrain it (the SmolLM2 configs use "
            "model.context_window=15)"
        )
    try:
        config = DraftConfig(**raw)
        config.spec  # noqa: B018 - the target's family spec must parse too
    except (TypeError, ValueError, KeyError) as exc:
        raise DataError(
            f"{cfg_path} is not a draft config ({type(exc).__name__}: {exc}); use a checkpoint "
            "written by train.py or save_pretrained"
        ) from None
    return str(arch), config


def recorded_identity(path: str) -> dict[str, str]:
    """The identity keys (:data:`IDENTITY_KEYS`) a checkpoint's ``config.json`` records
    (none for drafts written before deepspec recorded them, or by other code)."""
    raw = read_json_object(os.path.join(check_draft_dir(path), CONFIG_NAME), CONFIG_FIX)
    return {k: raw[k] for k in IDENTITY_KEYS if isinstance(raw.get(k), str)}


def draft_fingerprint(path: str) -> str:
    """What identifies a draft's weights: the recorded checksum, else the file's own."""
    return recorded_identity(path).get(WEIGHTS_CHECKSUM) or weights_checksum(os.path.expanduser(path))


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory (one-line errors when missing, unreadable, or
    not the bytes its ``config.json`` checksum names)."""
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise DataError(f"draft checkpoint {path} has no {WEIGHTS_NAME}; copy the checkpoint again")
    expected = recorded_identity(path).get(WEIGHTS_CHECKSUM)
    if expected is not None and weights_checksum(path) != expected:
        raise DataError(
            f"draft checkpoint {weights} does not match the {WEIGHTS_CHECKSUM} in its {CONFIG_NAME} "
            "(truncated, damaged or changed after it was written); copy the checkpoint again or use "
            f"an earlier one (if you changed the weights on purpose, delete {WEIGHTS_CHECKSUM} from "
            f"{CONFIG_NAME})"
        )
    try:
        return load_file(weights)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise unreadable_safetensors(
            weights, exc, "copy the checkpoint again or use an earlier one"
        ) from None


def check_draft_target(path: str, target_dir: str, *, allow_other: bool = False, flag: str = "") -> None:
    """Refuse a target that is not the one the draft was trained for (by the fingerprint
    the draft recorded; drafts that recorded none pass). ``allow_other`` lets a user who
    means it through; ``flag`` names the option that does so."""
    recorded = recorded_identity(path).get(TARGET_FINGERPRINT)
    if recorded is None or allow_other:
        return
    actual = target_fingerprint(target_dir)
    if actual != recorded:
        _, config = read_draft_config(path)
        raise DataError(
            f"draft checkpoint {path} was trained for another target than {target_dir} (fingerprint "
            f"{recorded} recorded, {actual} there); use the target it was trained for "
            f"({config.target_model_name_or_path})" + (f", or pass {flag} if you mean it" if flag else "")
        )


def check_finite_weights(named: Iterable[tuple[str, torch.Tensor]], path: str) -> None:
    """A :class:`DataError` when a named tensor holds NaN or inf (a diverged run)."""
    for name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DataError(
                f"draft checkpoint {path}: weights are not finite (the training diverged); "
                f"use an earlier checkpoint (NaN/inf in {name})"
            )


def is_reference_dir(path: str) -> bool:
    """``path`` holds a draft in the DeepSpec reference implementation's format."""
    try:
        return is_reference_config(read_json_object(os.path.join(path, CONFIG_NAME), CONFIG_FIX))
    except (OSError, DataError):
        return False


def read_draft_state(path: str, config: DraftConfig) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory under deepspec's names (a reference-format
    draft's are renamed, see :mod:`deepspec.drafts.reference_format`)."""
    state = read_weights(path)
    return tensors_from_reference(state, config, path) if is_reference_dir(path) else state


def load_weights(model: DraftModel, path: str) -> None:
    """``path``'s weights into ``model``: every key (a tied LM head is stored once), every
    shape and every value (finite) must fit, else one-line :class:`DataError` s."""
    state = read_draft_state(path, model.config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except ValueError as exc:  # d2t / t2d that do not describe one draft vocabulary
        raise DataError(
            f"draft checkpoint {path}: its draft vocabulary maps are inconsistent ({exc}); copy the "
            "checkpoint again"
        ) from None
    except RuntimeError as exc:  # a tensor shape that does not match config.json
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or (first[0] if first else "")
        raise DataError(
            f"draft checkpoint {path}: {WEIGHTS_NAME} does not match its {CONFIG_NAME} ({detail}); "
            "copy the checkpoint again"
        ) from None
    missing = [m for m in missing if not (m == "lm_head.weight" and model.head_is_tied)]
    if missing or unexpected:
        raise DataError(
            f"draft checkpoint {path} does not match {type(model).__name__}: missing {missing}, "
            f"unexpected {unexpected}"
        )
    check_finite_weights([*model.named_parameters(), *model.named_buffers()], path)


def weights_are_finite(path: str) -> bool:
    """The checkpoint's weights can be read and hold no NaN or inf."""
    try:
        check_finite_weights(read_weights(path).items(), path)
    except DataError:
        return False
    return True


CALIBRATION_NAME = "confidence_calibration.json"


def read_calibration(path: str) -> list[float] | None:
    """The STS temperatures per block position stored with a draft checkpoint
    (``confidence_calibration.json``, written by ``python -m deepspec.eval.calibration``),
    or ``None`` when it has none."""
    file = os.path.join(path, CALIBRATION_NAME)
    if not os.path.isfile(file):
        return None
    fix = f"delete {file} (and fit it again with python -m deepspec.eval.calibration)"
    temps = read_json_object(file, fix).get("temperatures")
    numbers = isinstance(temps, list) and temps and all(isinstance(t, int | float) for t in temps)
    if not numbers or not all(math.isfinite(t) and t > 0 for t in temps):
        raise DataError(f"{file}: 'temperatures' must be a non-empty list of numbers > 0; {fix}")
    return [float(t) for t in temps]


def write_calibration(path: str, temperatures: list[float], report: dict) -> str:
    """Store STS ``temperatures`` (and the fit's ``report``) with a draft, atomically."""
    file = os.path.join(path, CALIBRATION_NAME)
    atomic_write_json(file, {"temperatures": [float(t) for t in temperatures], **report})
    return file


def load_draft(
    path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> DraftModel:
    """Load a draft checkpoint directory and return the right class (DSpark/DFlash/Eagle3).

    Refuses, with one-line :class:`DataError` s, a missing or damaged checkpoint and one whose
    weights hold NaN or inf."""
    path = resolve_draft(path)
    arch, config = read_draft_config(path)
    algorithm = ARCHITECTURES.get(arch)
    if algorithm is None:
        raise DataError(
            f"draft checkpoint {path}: unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}"
        )
    try:
        model = algorithm.model_cls(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise DataError(
            f"draft checkpoint {path}: {CONFIG_NAME} does not describe a valid {arch} "
            f"({type(exc).__name__}: {exc}); use a checkpoint written by train.py"
        ) from None
    load_weights(model, path)
    model.target_fingerprint = recorded_identity(path).get(TARGET_FINGERPRINT)
    temperatures = read_calibration(path)
    if temperatures is not None:
        if getattr(model, "confidence_head", None) is None:
            raise DataError(
                f"draft checkpoint {path} has a {CALIBRATION_NAME} but no confidence head; delete the file"
            )
        if len(temperatures) != config.block_size:
            raise DataError(
                f"{os.path.join(path, CALIBRATION_NAME)} holds {len(temperatures)} temperatures for a "
                f"block of {config.block_size}; fit it again with python -m deepspec.eval.calibration"
            )
        model.confidence_temperatures = torch.tensor(temperatures, dtype=torch.float32)
    model = model.to(device=device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()
