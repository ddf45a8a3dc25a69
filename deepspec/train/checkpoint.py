"""Training checkpoints: ``<checkpoint_dir>/step_<N>/`` and an atomic ``step_latest`` link.

A step directory holds the draft in its loadable format (``config.json`` +
``model.safetensors``, so ``eval.py --draft_name_or_path .../step_latest`` works) and
``trainer_state/``: optimizer, scheduler, per-rank RNG and data cursor, the resolved
config, the last metrics and ``meta.json`` (step, world size, batch sizes).

Writing: rank 0 creates ``.step_<N>.tmp-*``, every rank writes its own RNG/cursor file,
rank 0 writes the rest and ``COMPLETE`` last, renames the directory to ``step_<N>`` and then
repoints ``step_latest`` with a rename over it (never unlink-then-create). A crash or a
full disk at any point leaves the previous checkpoint loadable. Only directories with
``COMPLETE`` count, and resuming always takes the newest complete one (``step_latest`` is
for people and ``eval.py``; a missing, dangling or stale link changes nothing).

Reading: ``trainer_state/*.pt`` hold tensors and plain data only and are loaded with
``torch.load(weights_only=True)``, so a crafted file cannot run code on resume; a damaged
file is one error line naming it. Before resuming, :func:`resume_differences` and
:func:`check_compatible` refuse a run that would not continue the saved one.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from typing import Any

import torch
import yaml

from deepspec.errors import DeepSpecError
from deepspec.utils.io import atomic_write_json, fsync_dir, make_dir_public, writing

COMPLETE = "COMPLETE"
LATEST = "step_latest"
STATE_DIR = "trainer_state"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(DeepSpecError):
    """A checkpoint cannot be written or does not fit this run."""


def step_dirs(root: str) -> list[tuple[int, str]]:
    """Complete step directories under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, COMPLETE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    """The checkpoint to resume from: the newest complete step directory, else None.

    ``step_latest`` normally names it; it is not trusted: a crash between the rename of a
    new step and the update of the link, or a dangling, missing or non-link ``step_latest``,
    must not lose (or invent) progress."""
    complete = step_dirs(root)
    return complete[-1][1] if complete else None


def _replace_latest(root: str, step_name: str) -> None:
    tmp = os.path.join(root, f".{LATEST}.tmp-{os.getpid()}")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(step_name, tmp)
    squatter = os.path.join(root, LATEST)
    if os.path.isdir(squatter) and not os.path.islink(squatter):  # a real directory on the name:
        if os.path.isfile(os.path.join(squatter, COMPLETE)):  # a copied step checkpoint goes,
            shutil.rmtree(squatter)
        else:  # anything else is moved out of the way, never deleted
            os.rename(squatter, tempfile.mkdtemp(prefix=f"{LATEST}.moved-", dir=root) + "/" + LATEST)
    os.replace(tmp, os.path.join(root, LATEST))
    fsync_dir(root)


def begin_save(root: str, step: int) -> str:
    """Rank 0: a fresh temporary directory for step ``step``."""
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # leftovers of killed saves
        if name.startswith(f".step_{step}.tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f".step_{step}.tmp-", dir=root)
    make_dir_public(tmp)
    os.makedirs(os.path.join(tmp, STATE_DIR))
    return tmp


def save_rank_state(tmp: str, rank: int, state: dict[str, Any]) -> None:
    _save(state, os.path.join(tmp, STATE_DIR, f"rank{rank}.pt"))


def _save(obj: Any, path: str) -> None:
    """``torch.save`` whose write errors name ``path`` (:func:`deepspec.utils.io.writing`)."""
    with writing(path):
        torch.save(obj, path)


def finish_save(
    root: str, tmp: str, step: int, shared: dict[str, Any], meta: dict[str, Any], keep_last: int
) -> str:
    """Rank 0: write shared state + marker, rename into place, repoint ``step_latest``, prune."""
    _save(shared, os.path.join(tmp, STATE_DIR, "shared.pt"))
    atomic_write_json(os.path.join(tmp, STATE_DIR, "meta.json"), meta)
    with open(os.path.join(tmp, COMPLETE), "w") as fh:
        fh.write(f"{step}\n")
        fh.flush()
        os.fsync(fh.fileno())
    final = os.path.join(root, f"step_{step}")
    if os.path.exists(final):
        old = tempfile.mkdtemp(prefix=f".step_{step}.old-", dir=root)
        os.rename(final, os.path.join(old, "x"))
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    _replace_latest(root, f"step_{step}")
    if keep_last > 0:
        for _, path in step_dirs(root)[:-keep_last]:
            if os.path.realpath(path) != os.path.realpath(final):
                shutil.rmtree(path, ignore_errors=True)
    return final


def abort_save(tmp: str) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def _state_file_error(path: str, name: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path}: {STATE_DIR}/{name} {why}; delete that step directory to resume from "
        f"the previous one, or start fresh with --opts train.resume=false"
    )


def load_meta(path: str) -> dict[str, Any]:
    file = os.path.join(path, STATE_DIR, "meta.json")
    try:
        with open(file, encoding="utf-8") as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise _state_file_error(path, "meta.json", "is missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _state_file_error(path, "meta.json", f"is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise _state_file_error(path, "meta.json", "has no step number")
    return meta


def _load_state(path: str, name: str) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: tensors and plain data only, so a crafted
    or foreign file cannot run code while a run resumes."""
    file = os.path.join(path, STATE_DIR, name)
    if not os.path.isfile(file):
        raise _state_file_error(path, name, "is missing")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = " ".join(str(exc).split())
        if "weights only" in detail.lower() or "weights_only" in detail:
            raise _state_file_error(
                path,
                name,
                "holds objects other than tensors and plain data and was not loaded "
                "(not written by deepspec; possibly crafted)",
            ) from None
        raise _state_file_error(path, name, f"is unreadable ({detail[:200]})") from None
    except (RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise _state_file_error(path, name, f"is unreadable ({detail[:200]})") from None
    if not isinstance(state, dict):
        raise _state_file_error(path, name, f"holds a {type(state).__name__}, not a dict")
    return state


def load_shared(path: str) -> dict[str, Any]:
    state = _load_state(path, "shared.pt")
    if not {"optimizer", "scheduler"} <= set(state):
        raise _state_file_error(path, "shared.pt", "lacks the optimizer or scheduler state")
    return state


def load_rank_state(path: str, rank: int) -> dict[str, Any]:
    file = os.path.join(path, STATE_DIR, f"rank{rank}.pt")
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint {path} has no state for rank {rank}")
    state = _load_state(path, f"rank{rank}.pt")
    cursor, rng = state.get("cursor"), state.get("torch_rng")
    if (
        not isinstance(cursor, dict)
        or not all(isinstance(cursor.get(k), int) for k in ("epoch", "micro_batch"))
        or not isinstance(rng, torch.Tensor)
        or rng.dtype != torch.uint8
    ):
        raise _state_file_error(path, f"rank{rank}.pt", "lacks the data cursor or the RNG state")
    return state


def load_saved_config(path: str) -> dict[str, Any]:
    """The resolved config saved with a checkpoint, as a flat ``{key.path: value}`` dict."""
    file = os.path.join(path, STATE_DIR, "config.yaml")
    try:
        with open(file, encoding="utf-8") as fh:
            tree = yaml.safe_load(fh)
    except FileNotFoundError:
        raise _state_file_error(path, "config.yaml", "is missing") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise _state_file_error(
            path, "config.yaml", f"is not valid YAML ({str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(tree, dict):
        raise _state_file_error(path, "config.yaml", "does not hold a mapping")
    return _flatten(tree)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Resuming continues one run, so what the draft is and what it reads must not change.
# Compared on resume (old -> new; any difference is refused):
#   * the draft's architecture: every field of its ``config.json`` (``algorithm``,
#     ``model.target_layer_ids``, ``model.block_size``, ``model.num_draft_layers``,
#     ``model.draft_num_hidden_layers``, ``model.mask_token_id``, ``model.markov_rank``,
#     ``model.markov_head_type``, ``model.confidence_head_alpha`` being 0 or not,
#     ``model.confidence_head_with_markov``, ``model.ttt_length``, ``model.context_window``, the
#     target's family spec);
#   * the target's identity (fingerprint of its config and weights; the path may move);
#   * the data: ``DATA_KEYS`` below, the number of samples and, offline, the cache's content
#     checksum (the cache directory may move);
#   * the order: ``seed``, ``data.shuffle``, world size and batch sizes.
# Free to change: every other ``train.*`` key (lr, warmup, step budget, clipping,
# precision, sharding, torch_compile), ``logging.*``, the loss weights and
# sampling (``model.num_anchors``, ``model.eagle3_num_positions``, ``model.loss_decay_gamma``,
# ``model.ce_loss_alpha``, ``model.l1_loss_alpha``, ``model.step_loss_decay``, a non-zero
# ``model.confidence_head_alpha``), ``model.attention_backend``, ``model.output_norm_init``
# (initialisation only) and the paths of the target and the cache.
ORDER_KEYS = ("seed", "data.shuffle", "data.mode")
DATA_KEYS = {
    "offline": (),
    "online": (
        "data.train_data_paths",
        "data.chat_template",
        "data.system_prompt",
        "data.enable_thinking",
        "data.max_length",
        "data.min_loss_tokens",
    ),
}
_DRAFT_KEY_NAMES = {
    "algorithm": "algorithm",
    "confidence_head": "model.confidence_head_alpha > 0",
    "target": "target architecture",
}
# not settings: the target's identity is compared through meta.json, the checksum is the weights'
_IGNORED_DRAFT_FIELDS = {
    "architectures",
    "deepspec_version",
    "target_model_name_or_path",
    "target_fingerprint",
    "weights_checksum",
}


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def resume_differences(
    path: str,
    *,
    saved_cfg: dict[str, Any],
    cfg: dict[str, Any],
    meta: dict[str, Any],
    draft_config: dict[str, Any],
    identity: dict[str, Any],
) -> list[str]:
    """``key old -> new`` for everything that may not change on resume (see above).

    ``cfg`` is the current config flattened, ``draft_config`` the new draft's
    ``config.json`` and ``identity`` the current ``{"target_fingerprint", "data"}``."""
    problems = []
    saved_draft_file = os.path.join(path, "config.json")
    try:
        with open(saved_draft_file, encoding="utf-8") as fh:
            saved_draft = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: config.json is unreadable ({exc}); delete that step directory to resume "
            f"from the previous one, or start fresh with --opts train.resume=false"
        ) from None
    for key in sorted(set(saved_draft) | set(draft_config)):
        if key in _IGNORED_DRAFT_FIELDS:
            continue
        old, new = saved_draft.get(key), draft_config.get(key)
        if old != new:
            name = _DRAFT_KEY_NAMES.get(key, f"model.{key}")
            if key == "target":
                problems.append(
                    f"target architecture of model.target_model_name_or_path "
                    f"{saved_cfg.get('model.target_model_name_or_path')!r} -> "
                    f"{cfg.get('model.target_model_name_or_path')!r}"
                )
            else:
                problems.append(f"{name} {_short(old)} -> {_short(new)}")
    mode = cfg.get("data.mode")
    for key in (*ORDER_KEYS, *DATA_KEYS.get(mode, ())):
        if key in saved_cfg and saved_cfg[key] != cfg.get(key):
            problems.append(f"{key} {_short(saved_cfg[key])} -> {_short(cfg.get(key))}")
    old_fp, new_fp = meta.get("target_fingerprint"), identity.get("target_fingerprint")
    if old_fp and new_fp and old_fp != new_fp:
        problems.append(
            f"target weights (model.target_model_name_or_path "
            f"{saved_cfg.get('model.target_model_name_or_path')!r} -> "
            f"{cfg.get('model.target_model_name_or_path')!r}, fingerprint {old_fp} -> {new_fp})"
        )
    old_data, new_data = meta.get("data") or {}, identity.get("data") or {}
    if old_data.get("mode") == new_data.get("mode"):
        if old_data.get("samples") not in (None, new_data.get("samples")):
            problems.append(f"number of training samples {old_data['samples']} -> {new_data.get('samples')}")
        old_sum, new_sum = old_data.get("cache_checksum"), new_data.get("cache_checksum")
        if old_sum and new_sum and old_sum != new_sum:
            problems.append(
                f"target cache content (data.target_cache_path {saved_cfg.get('data.target_cache_path')!r} "
                f"-> {cfg.get('data.target_cache_path')!r}, index checksum {old_sum} -> {new_sum})"
            )
    return problems


def check_compatible(
    meta: dict[str, Any],
    *,
    world_size: int,
    global_batch: int,
    local_batch: int,
    path: str,
    differences: list[str] | None = None,
) -> None:
    """Refuse to resume when something that defines the run changed: the world size or
    batch size (the data order and the per-rank RNG streams would not continue) or any of
    ``differences`` (from :func:`resume_differences`). A new step budget is allowed: the LR
    schedule is recomputed for the new horizon and the run says so."""
    problems = []
    if meta.get("world_size") != world_size:
        problems.append(f"world size {meta.get('world_size')} -> {world_size}")
    if meta.get("global_batch_size") != global_batch:
        problems.append(f"train.global_batch_size {meta.get('global_batch_size')} -> {global_batch}")
    if meta.get("local_batch_size") != local_batch:
        problems.append(f"train.local_batch_size {meta.get('local_batch_size')} -> {local_batch}")
    problems.extend(differences or [])
    if problems:
        raise CheckpointError(
            f"cannot resume from {path}: {', '.join(problems)}; keep the saved values, or start fresh with "
            f"--opts train.resume=false or a new exp_name"
        )
