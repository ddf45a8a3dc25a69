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
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

import torch

from deepspec.errors import DeepSpecError
from deepspec.utils.io import atomic_write_json, fsync_dir, make_dir_public

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
    if os.path.isdir(os.path.join(root, LATEST)) and not os.path.islink(os.path.join(root, LATEST)):
        shutil.rmtree(os.path.join(root, LATEST))  # a real directory squatting on the name
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
    torch.save(state, os.path.join(tmp, STATE_DIR, f"rank{rank}.pt"))


def finish_save(
    root: str, tmp: str, step: int, shared: dict[str, Any], meta: dict[str, Any], keep_last: int
) -> str:
    """Rank 0: write shared state + marker, rename into place, repoint ``step_latest``, prune."""
    torch.save(shared, os.path.join(tmp, STATE_DIR, "shared.pt"))
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


def load_meta(path: str) -> dict[str, Any]:
    with open(os.path.join(path, STATE_DIR, "meta.json"), encoding="utf-8") as fh:
        return json.load(fh)


def load_shared(path: str) -> dict[str, Any]:
    return torch.load(os.path.join(path, STATE_DIR, "shared.pt"), map_location="cpu", weights_only=False)


def load_rank_state(path: str, rank: int) -> dict[str, Any]:
    file = os.path.join(path, STATE_DIR, f"rank{rank}.pt")
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint {path} has no state for rank {rank}")
    return torch.load(file, map_location="cpu", weights_only=False)


def check_compatible(
    meta: dict[str, Any], *, world_size: int, global_batch: int, local_batch: int, path: str
) -> None:
    """Refuse to resume with a different world size or batch size (the data order and the
    per-rank RNG streams would not continue). A new step budget is allowed: the LR
    schedule is recomputed for the new horizon and the run says so."""
    problems = []
    if meta["world_size"] != world_size:
        problems.append(f"world size {meta['world_size']} -> {world_size}")
    if meta["global_batch_size"] != global_batch:
        problems.append(f"train.global_batch_size {meta['global_batch_size']} -> {global_batch}")
    if meta["local_batch_size"] != local_batch:
        problems.append(f"train.local_batch_size {meta['local_batch_size']} -> {local_batch}")
    if problems:
        raise CheckpointError(
            f"cannot resume from {path}: {', '.join(problems)}; keep the saved values, or start fresh with "
            f"--opts train.resume=false or a new exp_name"
        )
