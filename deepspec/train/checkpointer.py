"""Saving and resuming one training run: a :class:`Checkpointer` holds what both need.

The on-disk format and its readers are :mod:`deepspec.train.checkpoint`; this module
drives them for a run: which checkpoint to resume from, the checks that it continues this
run, the draft's weights, optimizer, scheduler, RNG and data position from it, and the
collective save of every rank's part (rank 0 writes the shared files and renames the step
into place; a failure on any rank leaves the previous checkpoint as it was).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from torch import nn

from deepspec.config import Config, config_to_dict, save_config
from deepspec.drafts.checkpoint import load_weights, weights_are_finite
from deepspec.drafts.saving import write_draft_files
from deepspec.errors import DataError, DeepSpecError, EnvironmentProblem, describe_os_error
from deepspec.train import checkpoint as ckpt
from deepspec.train.data import DataCursor
from deepspec.train.parallelize import full_state_dict, load_optimizer_state, optimizer_state
from deepspec.utils import distributed as dist_utils


class NonFiniteLoss(DeepSpecError):
    """The loss, the gradient norm or the weights became NaN or infinite."""


try:
    from safetensors import SafetensorError
except ImportError:  # pragma: no cover - safetensors always ships it
    SafetensorError = OSError
# what writing a checkpoint raises when the disk is full, a file too large or the directory
# read-only: OSError (deepspec.utils.io.writing names the file), the EnvironmentProblem it
# makes of a library's write error, torch.save's RuntimeError, safetensors' serialisation error
_WRITE_ERRORS = (OSError, EnvironmentProblem, RuntimeError, SafetensorError)


@dataclass
class _Snapshot:
    """What one save writes, taken on every rank before anything is written."""

    step: int
    cursor: DataCursor
    metrics: dict[str, float]
    weights: dict[str, torch.Tensor]  # the draft's full state dict, on CPU
    optimizer: dict[str, Any]  # the optimizer's full state dict


class Checkpointer:
    """Resume and save for one run into ``logging.checkpoint_dir``.

    ``identity`` is what a resumed run must read again (the target's fingerprint and the
    data, see :func:`deepspec.train.checkpoint.resume_differences`), ``total`` the step
    budget. Use: :meth:`resume_draft` before the draft is wrapped, :meth:`bind` once the
    wrapped model, optimizer and scheduler exist, then :meth:`save` from the loop."""

    def __init__(
        self, cfg: Config, info: dist_utils.DistInfo, draft: nn.Module, *, identity: dict, total: int
    ):
        self.cfg, self.info, self.draft = cfg, info, draft
        self.identity, self.total = identity, total
        self.root = cfg.logging.checkpoint_dir
        # the newest complete checkpoint, or None for a fresh run
        self.resume_from = ckpt.latest_checkpoint(self.root) if cfg.train.resume else None
        self.model = self.optimizer = self.scheduler = None
        self._start_step = 0
        self._shared: dict[str, Any] | None = None  # optimizer + scheduler state, until bind

    def _log(self, message: str) -> None:
        if self.info.is_main:
            print(message, flush=True)

    # -- resume ------------------------------------------------------------------------
    def resume_draft(self) -> tuple[int, DataCursor]:
        """``(step, data cursor)`` to start from: ``(0, start)`` for a fresh run; when resuming,
        after refusing a checkpoint that would not continue this run, the draft takes its
        weights and this rank its RNG state."""
        path = self.resume_from
        if not path:
            return 0, DataCursor()
        cfg, info = self.cfg, self.info
        meta = ckpt.load_meta(path)
        differences = ckpt.resume_differences(
            path,
            saved_cfg=ckpt.load_saved_config(path),
            cfg=flat_config(cfg),
            meta=meta,
            draft_config=json.loads(json.dumps(self.draft.config_json())),
            identity=self.identity,
        )
        ckpt.check_compatible(
            meta,
            world_size=info.world_size,
            global_batch=cfg.train.global_batch_size,
            local_batch=cfg.train.local_batch_size,
            path=path,
            differences=differences,
        )
        _load_draft_weights(self.draft, path)
        self._shared, rank_state = ckpt.load_shared(path), ckpt.load_rank_state(path, info.rank)
        self._start_step = int(meta["step"])
        cursor = DataCursor(**rank_state["cursor"])
        torch.set_rng_state(rank_state["torch_rng"])
        if meta.get("total_steps") not in (None, self.total):
            self._log(
                f"note: step budget changed {meta['total_steps']} -> {self.total}; LR schedule recomputed"
            )
        return self._start_step, cursor

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """The wrapped model, optimizer and scheduler that :meth:`save` saves; when resuming,
        the optimizer and scheduler continue from the checkpoint."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        if self._shared is None:
            return
        try:
            load_optimizer_state(model, optimizer, self._shared["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ckpt.CheckpointError(
                f"cannot resume from {self.resume_from}: its optimizer state does not fit this draft "
                f"({' '.join(str(exc).split())[:200]}); start fresh with --opts train.resume=false "
                f"or a new exp_name"
            ) from None
        self._shared = None
        scheduler.last_epoch = self._start_step
        for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
            group["lr"] = lr
        self._log(f"resumed from {self.resume_from} at step {self._start_step}")

    # -- save --------------------------------------------------------------------------
    def save(self, step: int, cursor: DataCursor, metrics: dict[str, float]) -> str:
        """Checkpoint ``step`` (every rank calls it): the path of the new step directory, or
        :class:`~deepspec.train.checkpoint.CheckpointError` with the previous one intact."""
        snap = _Snapshot(
            step,
            cursor,
            metrics,
            full_state_dict(self.model, self.draft),
            optimizer_state(self.model, self.optimizer),
        )
        # never write non-finite weights (the loop checks after every update; this is the
        # last line of defence for what is about to be called a checkpoint)
        finite = self.info.is_main and _all_finite(snap.weights.values())
        if dist_utils.all_reduce_sum([float(self.info.is_main and not finite)])[0] > 0:
            raise NonFiniteLoss(
                f"non-finite weights after the update of step {step} (not saved); last checkpoint with "
                f"finite weights: {self.last_good(step) or 'none'} (lower train.lr or train.max_grad_norm, "
                f"or check the data)"
            )
        tmp = self._begin(step)
        try:
            return self._write(tmp, snap)
        except BaseException:  # a second Ctrl-C or a failure: no temporary directory is left
            if self.info.is_main:
                ckpt.abort_save(tmp)
            raise

    def _begin(self, step: int) -> str:
        """Rank 0 makes the temporary step directory; every rank gets its path."""
        tmp = error = None
        if self.info.is_main:
            try:
                tmp = ckpt.begin_save(self.root, step)
            except OSError as exc:
                error = describe_os_error(exc)
        tmp, error = dist_utils.broadcast_object((tmp, error))
        if error is not None:
            previous = ckpt.latest_checkpoint(self.root)
            raise ckpt.CheckpointError(
                f"saving step {step} failed ({error}); the previous checkpoint {previous or '(none)'} is intact"
            )
        return tmp

    def _write(self, tmp: str, snap: _Snapshot) -> str:
        """Every rank writes its RNG and data position, then rank 0 the draft, config,
        optimizer, scheduler and meta, and renames the step into place."""
        info, cfg = self.info, self.cfg
        error = None
        try:
            ckpt.save_rank_state(
                tmp, info.rank, {"cursor": snap.cursor.to_dict(), "torch_rng": torch.get_rng_state()}
            )
        except _WRITE_ERRORS as exc:
            error = _describe_write_error(exc)
        failed = dist_utils.all_reduce_sum([float(error is not None)])[0] > 0
        final = None
        if info.is_main and not failed:
            try:
                write_draft_files(
                    self.draft, tmp, snap.weights, target_fingerprint=self.identity.get("target_fingerprint")
                )
                save_config(cfg, os.path.join(tmp, ckpt.STATE_DIR, "config.yaml"))
                final = ckpt.finish_save(
                    self.root,
                    tmp,
                    snap.step,
                    {"optimizer": snap.optimizer, "scheduler": self.scheduler.state_dict()},
                    self._meta(snap),
                    cfg.logging.keep_last_checkpoints,
                )
            except _WRITE_ERRORS as exc:  # disk full, file too large, read-only, I/O error
                error = _describe_write_error(exc)
        failed = dist_utils.all_reduce_sum([float(error is not None)])[0] > 0
        if failed:
            if info.is_main:
                ckpt.abort_save(tmp)
            previous = ckpt.latest_checkpoint(self.root)
            raise ckpt.CheckpointError(
                f"saving step {snap.step} failed ({error or 'on another rank'}); the previous "
                f"checkpoint {previous or '(none)'} is intact"
            )
        dist_utils.barrier()
        return dist_utils.broadcast_object(final)

    def _meta(self, snap: _Snapshot) -> dict[str, Any]:
        """``trainer_state/meta.json`` of a save: what :meth:`resume_draft` checks."""
        cfg = self.cfg
        return {
            "step": snap.step,
            "total_steps": self.total,
            "world_size": self.info.world_size,
            "global_batch_size": cfg.train.global_batch_size,
            "local_batch_size": cfg.train.local_batch_size,
            "algorithm": cfg.algorithm,
            "target_fingerprint": self.identity.get("target_fingerprint"),
            "data": self.identity.get("data"),
            "metrics": snap.metrics,
        }

    # -- divergence --------------------------------------------------------------------
    def last_good(self, before: int) -> str | None:
        """The newest complete checkpoint from a step before ``before`` whose weights are
        finite: those weights gave a finite loss at the next step."""
        for step, path in reversed(ckpt.step_dirs(self.root)):
            if step < before and weights_are_finite(path):
                return path
        return None

    def diverged(self, what: str, weights_step: int) -> NonFiniteLoss:
        """The error for a NaN/inf met in the step after ``weights_step``: a checkpoint of
        exactly those weights is not good (resuming from it gives the same NaN)."""
        bad = next((path for step, path in ckpt.step_dirs(self.root) if step == weights_step), None)
        good = self.last_good(weights_step)
        note = ""
        if bad:
            again = f"delete it to resume from {good}, or " if good else ""
            note = (
                f"; {bad} holds the weights that gave it: {again}start fresh with --opts train.resume=false"
            )
        return NonFiniteLoss(
            f"{what}; last good checkpoint: {good or 'none'}{note}; lower train.lr or check the data"
        )


def flat_config(cfg: Config) -> dict[str, Any]:
    """``{key.path: value}`` of a config, as :func:`save_config` writes it (YAML round trip)."""
    tree = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return ckpt._flatten(tree)


def _describe_write_error(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    if isinstance(exc, EnvironmentProblem):
        return str(exc)
    text = " ".join(str(exc).split())[:200] or type(exc).__name__
    return f"{text}; is the disk full?"


def _all_finite(tensors) -> bool:
    """Every element of every tensor (the local shard of a DTensor) is finite."""
    flags = []
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.numel():
            flags.append(torch.isfinite(local.detach()).all())
    return bool(torch.stack(flags).all()) if flags else True


def _load_draft_weights(draft: nn.Module, path: str) -> None:
    """The checkpoint's weights into ``draft``, checked as ``load_draft`` checks them (every
    key, every shape, finite values)."""
    try:
        load_weights(draft, path)
    except DataError as exc:
        raise ckpt.CheckpointError(
            f"cannot resume: {exc}; delete that step directory to resume from the previous one, or "
            f"start fresh with --opts train.resume=false"
        ) from None
