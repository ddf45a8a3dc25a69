"""The training loop, generic over algorithms (registry: model class + loss).

One optimizer step = ``accum`` micro-batches per rank, ``accum = global_batch_size /
(world × local_batch_size)``. Loss terms are divided by their weight sum over *all* ranks
and micro-batches of the step (computed up front, one all-reduce), so the gradient is the
same whatever the world size; DDP averages gradients, hence the ``× world`` on the loss.

:class:`Trainer` sets a run up and runs its steps (docs/DESIGN.md §6). The parts it uses:
micro-batches and the draft+loss module (:mod:`~deepspec.train.batch`), DDP/FSDP wrapping
(:mod:`~deepspec.train.parallelize`), resume and save (:mod:`~deepspec.train.checkpointer`),
the metrics log (:mod:`~deepspec.train.metrics_log`) and held-out scoring
(:mod:`~deepspec.train.heldout`).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepspec.config import Config, save_config, validate_against_target
from deepspec.data.cache_reader import validate_cache_for_config
from deepspec.data.fingerprint import target_fingerprint
from deepspec.drafts import build_draft, get_algorithm
from deepspec.drafts.checkpoint import load_weights, read_draft_config, resolve_draft
from deepspec.drafts.fused_head import check_compile_toolchain, use_compiled_vocab_rows
from deepspec.drafts.vocab import build_draft_vocab
from deepspec.errors import ConfigError, DataError, Preempted
from deepspec.targets import load_family_spec, resolve_target
from deepspec.train.batch import MicroBatch, TrainModule, prepare_micro_batch
from deepspec.train.checkpointer import Checkpointer
from deepspec.train.data import EpochOrder, FeatureSource, OnlineSamples, split_heldout
from deepspec.train.heldout import flat_metrics, score
from deepspec.train.metrics_log import MetricsLogger
from deepspec.train.parallelize import parallelize
from deepspec.train.schedule import build_scheduler, warmup_steps
from deepspec.utils import distributed as dist_utils
from deepspec.utils.io import check_writable_dir
from deepspec.utils.locks import directory_lock

# Signals that save a checkpoint and stop (exit 75, see errors.Preempted). A second Ctrl-C
# aborts at once (the previous checkpoint stays: saves are atomic).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class RunResult:
    step: int
    metrics: dict[str, float]
    checkpoint: str | None


class Trainer:
    """One training run of ``cfg``: :meth:`run` checks the config, takes the checkpoint
    directory's lock, :meth:`setup` builds (or resumes) everything, then steps
    (:meth:`train_step`), logs, scores the held-out samples and saves until the step budget
    or a stop signal."""

    def __init__(self, cfg: Config, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.info = dist_utils.get_info()
        self.progress = progress and self.info.is_main
        self.stop_requested = False
        self.stop_signal = "SIGTERM"

    def _log(self, message: str) -> None:
        if self.info.is_main:
            print(message, flush=True)

    # -- the run -----------------------------------------------------------------------
    def run(self) -> RunResult:
        """Train up to the step budget, resuming from the newest checkpoint: the last step,
        its metrics and the last checkpoint. :class:`Preempted` after a stop signal (saved)."""
        cfg = self.cfg
        with self._session() as (target_dir, spec):
            self.setup(target_dir, spec)
            logger = MetricsLogger(
                cfg, self.total, self.step, enabled=self.info.is_main, progress=self.progress
            )
            compiled_before = use_compiled_vocab_rows(cfg.train.torch_compile)
            metrics: dict[str, float] = {}
            last_ckpt = self.checkpointer.resume_from
            try:
                while self.step < self.total:
                    t0 = time.perf_counter()
                    probe = logger.due(self.step + 1)  # logged steps also measure where block slot 0 looks
                    metrics = self.train_step(self._micro_batches(probe))
                    metrics.update(
                        step_seconds=time.perf_counter() - t0,
                        samples_per_second=cfg.train.global_batch_size / max(time.perf_counter() - t0, 1e-9),
                    )
                    scored = self._heldout_due()
                    if scored:
                        metrics.update(self._score_heldout())
                    logger.step(self.step, metrics, force=scored)
                    # non-finite weights give a non-finite loss at the next step; a save checks them
                    stop = dist_utils.all_reduce_sum([float(self.stop_requested)])[0] > 0
                    if self.step % cfg.logging.checkpointing_steps == 0 or self.step == self.total or stop:
                        last_ckpt = self.checkpointer.save(self.step, self.cursor, metrics)
                    if stop and self.step < self.total:
                        name = self.stop_signal if self.stop_requested else "a signal to another worker"
                        self._log(f"stopped by {name} after step {self.step}; checkpoint {last_ckpt}")
                        raise Preempted(
                            f"stopped by {name} after step {self.step} of {self.total}; checkpoint {last_ckpt} "
                            f"saved; rerun the same command to resume"
                        )
            finally:
                logger.close()
                use_compiled_vocab_rows(compiled_before)
            return RunResult(self.step, metrics, last_ckpt)

    @contextlib.contextmanager
    def _session(self) -> Iterator[tuple[str, Any]]:
        """The checks that read no data (one line each), then, for the whole run, rank 0's lock
        on the checkpoint directory and the stop handlers. Yields ``(target_dir, spec)``."""
        cfg, info = self.cfg, self.info
        check_optimizer_settings(cfg)
        target_dir = resolve_target(cfg.model.target_model_name_or_path)
        spec = load_family_spec(target_dir)
        validate_against_target(cfg, spec)
        world, local_batch, global_batch = (
            info.world_size,
            cfg.train.local_batch_size,
            cfg.train.global_batch_size,
        )
        if global_batch % (world * local_batch):
            raise DataError(
                f"train.global_batch_size {global_batch} is not divisible by world size {world} x "
                f"train.local_batch_size {local_batch}"
            )
        self.accum = global_batch // (world * local_batch)
        check_output_dirs(cfg)  # before any data is read: a read-only root fails here, in one line
        if cfg.train.torch_compile and info.device == "cpu":
            check_compile_toolchain()
        with contextlib.ExitStack() as held:
            dist_utils.run_on_main(lambda: held.enter_context(experiment_lock(cfg)))
            previous_handlers = self._install_stop_handlers()
            try:
                yield target_dir, spec
            finally:
                for sig, handler in previous_handlers.items():
                    if handler is not None:
                        signal.signal(sig, handler)

    def _install_stop_handlers(self) -> dict[int, Any]:
        """SIGTERM / Ctrl-C ask the loop to save and stop after the current step; a second
        Ctrl-C raises KeyboardInterrupt at once. Returns the previous handlers."""

        interrupts = []

        def handler(signum, frame):
            if signum == signal.SIGINT:
                interrupts.append(signum)
                if len(interrupts) > 1:  # a second Ctrl-C (a SIGTERM before it does not count)
                    raise KeyboardInterrupt
            if not self.stop_requested or signum == signal.SIGINT:  # Ctrl-C names the stop
                self.stop_signal = signal.Signals(signum).name
            self.stop_requested = True

        previous: dict[int, Any] = {}
        with contextlib.suppress(ValueError):  # not in the main thread
            for sig in STOP_SIGNALS:
                previous[sig] = signal.signal(sig, handler)
        return previous

    # -- setup -------------------------------------------------------------------------
    def setup(self, target_dir: str, spec: Any) -> None:
        """Data, draft, resume, wrapping, optimizer, scheduler and feature source: everything
        :meth:`train_step` uses; ``self.step`` and ``self.cursor`` say where the run starts."""
        cfg, info = self.cfg, self.info
        self._load_data(target_dir)
        torch.manual_seed(cfg.seed)
        self.device = torch.device(info.device)
        draft = self._build_draft(target_dir, spec)
        identity = self._identity(target_dir)
        self.checkpointer = Checkpointer(cfg, info, draft, identity=identity, total=self.total)
        if cfg.model.init_from_draft and not self.checkpointer.resume_from:
            init_from_draft(draft, cfg.model.init_from_draft)
            self._log(f"initialised from the draft {cfg.model.init_from_draft}")
        draft.to(self.device)  # in place: the checkpointer holds this module
        self.alg = get_algorithm(cfg.algorithm)
        self.module = TrainModule(draft, self.alg.loss, self.alg.loss_kwargs(cfg))
        self.step, self.cursor = self.checkpointer.resume_draft()
        self.wrapped = parallelize(self.module, cfg, info)
        self.params = [p for p in self.wrapped.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        )
        self.scheduler = build_scheduler(
            self.optimizer, self.total, cfg.train.warmup_ratio, cfg.train.lr_scheduler, cfg.train.decay_ratio
        )
        self.checkpointer.bind(self.wrapped, self.optimizer, self.scheduler)
        self.features = FeatureSource(
            cfg.data.mode, target_dir, list(cfg.model.target_layer_ids), info.device
        )
        self.pad_id = spec.pad_token_id if spec.pad_token_id is not None else 0
        self._board()
        if info.is_main:
            os.makedirs(cfg.logging.checkpoint_dir, exist_ok=True)
            save_config(cfg, os.path.join(cfg.logging.checkpoint_dir, "config.yaml"))
        self.autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"
        )
        self.batches = self.order.micro_batches(self.cursor)

    def _load_data(self, target_dir: str) -> None:
        """All samples, the training samples, the held-out sample indices (or None), their
        order and the step budget."""
        cfg, info = self.cfg, self.info
        source = f"data.train_data_paths ({', '.join(cfg.data.train_data_paths)})"
        if cfg.data.mode == "offline":
            if not cfg.data.target_cache_path:
                raise DataError(
                    "data.mode=offline needs data.target_cache_path (build one with "
                    "scripts/data/prepare_target_cache.py), or use data.mode=online"
                )
            # samples are verified as they are read (the cache reader's default)
            dataset = validate_cache_for_config(
                os.path.expanduser(cfg.data.target_cache_path), cfg, target_dir
            )
            source = f"target cache {dataset.path}"
        else:
            dataset = OnlineSamples(cfg, target_dir)
        self.dataset_all = dataset
        self.dataset, self.heldout = split_heldout(dataset, cfg, source)
        self.order = EpochOrder(
            len(self.dataset),
            global_batch=cfg.train.global_batch_size,
            local_batch=cfg.train.local_batch_size,
            rank=info.rank,
            world=info.world_size,
            seed=cfg.seed,
            shuffle=cfg.data.shuffle,
        )
        self.total = cfg.train.max_train_steps or cfg.train.num_train_epochs * self.order.steps_per_epoch

    def _build_draft(self, target_dir: str, spec: Any) -> nn.Module:
        """A fresh draft, on the draft vocabulary when ``model.draft_vocab_size`` is set."""
        cfg = self.cfg
        draft_ids = None
        if cfg.model.draft_vocab_size > 0:  # every rank counts the same samples: same vocabulary
            vocab = build_draft_vocab(
                self.dataset, spec.vocab_size, cfg.model.draft_vocab_size, progress=self.progress
            )
            draft_ids = vocab.draft_ids
            self._log(vocab.describe())
        return build_draft(cfg, target_dir, draft_ids=draft_ids)

    def _identity(self, target_dir: str) -> dict[str, Any]:
        """What a resumed run must read again: the target's fingerprint, the sample count
        and (offline) the cache's content checksum. Stored in each checkpoint's meta."""
        data: dict[str, Any] = {"mode": self.cfg.data.mode, "samples": len(self.dataset)}
        manifest = getattr(self.dataset, "manifest", None)
        if isinstance(manifest, dict):
            data["cache_checksum"] = (manifest.get("index") or {}).get("checksum")
        return {"target_fingerprint": dist_utils.run_on_main(target_fingerprint, target_dir), "data": data}

    def _board(self) -> None:
        cfg, info = self.cfg, self.info
        trainable, frozen = self.module.draft.num_parameters()
        lines = [
            f"algorithm        {cfg.algorithm} on {cfg.model.target_model_name_or_path} (layers "
            f"{list(cfg.model.target_layer_ids)})",
            f"data             {cfg.data.mode}: {len(self.dataset)} samples"
            + (f", {cfg.data.heldout_samples} held out" if cfg.data.heldout_samples else ""),
            f"workers          {info.world_size} ({info.device}, {cfg.train.sharding_strategy}), "
            f"{cfg.train.precision}",
            f"batch            global {cfg.train.global_batch_size} = {info.world_size} x "
            f"local {cfg.train.local_batch_size} x accum {self.accum}",
            f"steps            {self.total} ({self.order.steps_per_epoch}/epoch), warmup "
            f"{warmup_steps(self.total, cfg.train.warmup_ratio)}, from step {self.step}",
            f"parameters       {trainable / 1e6:.2f}M trainable, {frozen / 1e6:.2f}M frozen",
            f"checkpoints      {cfg.logging.checkpoint_dir} (every {cfg.logging.checkpointing_steps} steps)",
        ]
        self._log("\n".join(lines))

    # -- one step ----------------------------------------------------------------------
    def _micro_batches(self, probe: bool) -> list[MicroBatch]:
        """This rank's next ``accum`` micro-batches; advances ``self.cursor``."""
        micro = []
        for _ in range(self.accum):
            epoch = self.cursor.epoch  # the position before this micro-batch
            idx, self.cursor = next(self.batches)
            micro.append(
                prepare_micro_batch(
                    self.cfg,
                    self.dataset,
                    idx,
                    epoch=epoch,
                    pad_id=self.pad_id,
                    features=self.features,
                    device=self.device,
                    probe=probe,
                )
            )
        return micro

    def train_step(self, micro_batches: list[MicroBatch]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches: the step's metrics averaged over
        ranks, its loss, learning rate and gradient norm. A non-finite loss or gradient norm
        raises :class:`~deepspec.train.checkpointer.NonFiniteLoss` before the update."""
        cfg, step = self.cfg, self.step
        local = torch.stack([w for *_, w in micro_batches]).sum(0)  # scalar, or [K] for Eagle3
        normalizer = torch.tensor(
            dist_utils.all_reduce_sum(local.reshape(-1).tolist()), dtype=torch.float64, device=self.device
        ).reshape(local.shape)
        self.module.loss_kwargs = self.alg.loss_kwargs(cfg, step / max(1, self.total))
        loss_sum, step_metrics = self._forward_backward(micro_batches, normalizer)
        total_loss = dist_utils.all_reduce_sum([loss_sum])[0]
        if not math.isfinite(total_loss):
            raise self.checkpointer.diverged(f"non-finite loss ({total_loss}) at step {step + 1}", step)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
        )
        if not math.isfinite(float(grad_norm)):  # the same on every rank (synced gradients)
            raise self.checkpointer.diverged(
                f"non-finite gradient norm ({float(grad_norm)}) at step {step + 1}", step
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        reduced = dist_utils.all_reduce_sum(list(step_metrics.values()))
        metrics = {k: v / self.info.world_size for k, v in zip(step_metrics, reduced)}
        metrics.update(loss=total_loss, lr=self.scheduler.get_last_lr()[0], grad_norm=float(grad_norm))
        return metrics

    def _forward_backward(
        self, micro_batches: list[MicroBatch], normalizer: torch.Tensor
    ) -> tuple[float, dict[str, float]]:
        """Forward and backward of each micro-batch (DDP syncs gradients at the last one):
        this rank's loss sum and its metrics averaged over the micro-batches."""
        accum, world = len(micro_batches), self.info.world_size
        loss_sum, step_metrics = 0.0, {}
        for i, (batch, extra, _) in enumerate(micro_batches):
            sync = contextlib.nullcontext()
            if i < accum - 1 and hasattr(self.wrapped, "no_sync"):
                sync = self.wrapped.no_sync()
            with sync, self.autocast:
                res = self.wrapped(batch, extra, normalizer)
                (res.loss * world).backward()
            loss_sum += float(res.loss.detach())
            for k, v in res.metrics.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + v / accum
        return loss_sum, step_metrics

    # -- held-out samples --------------------------------------------------------------
    def _heldout_due(self) -> bool:
        """Is the step just taken scored on the held-out samples (every
        ``logging.heldout_steps`` and at the end)?"""
        every = self.cfg.logging.heldout_steps
        return self.heldout is not None and ((every and self.step % every == 0) or self.step == self.total)

    def _score_heldout(self) -> dict[str, float]:
        """Held-out CE, acc@1, accept@1 and tau_prob with real and zeroed features. Every rank
        scores all held-out samples (the same inputs, so the same numbers; FSDP needs every
        rank in each forward). Uses no global RNG: training continues exactly as without it."""
        scores = score(
            self.module,
            self.cfg,
            self.dataset_all,
            self.heldout,
            batch=self.cfg.train.local_batch_size,
            pad_id=self.pad_id,
            features=self.features,
            device=self.device,
        )
        return flat_metrics(scores)


def check_optimizer_settings(cfg: Config) -> None:
    """AdamW's first update moves a weight by up to ``lr / (1 - adam_beta1)``; past the
    float32 range torch fails inside the step with a traceback, so refuse it up front."""
    limit = torch.finfo(torch.float32).max * (1 - cfg.train.adam_beta1)
    if not cfg.train.lr < limit:
        raise ConfigError(
            f"train.lr={cfg.train.lr:g} is too large for AdamW with train.adam_beta1={cfg.train.adam_beta1:g} "
            f"(the first update would overflow float32; must be < {limit:.3g}); use a learning rate such as 1e-3"
        )


def check_output_dirs(cfg: Config) -> None:
    """Refuse, before any data is read, checkpoint and TensorBoard directories that are
    files or cannot be written (a read-only root fails here, not at the first save)."""
    for key, path in (
        ("logging.checkpoint_root", cfg.logging.checkpoint_dir),
        ("logging.tensorboard_root", cfg.logging.tensorboard_dir),
    ):
        check_writable_dir(path, f"{key} (or its _dir)")


def experiment_lock(cfg: Config) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock on the run's checkpoint directory, held by rank 0 for the whole run:
    a second run into the same directory (which would resume from the first one's live
    checkpoints and interleave its metrics) is refused in one line naming the holder."""
    root = cfg.logging.checkpoint_dir
    return directory_lock(
        root,
        f"checkpoint directory {root}",
        "another train.py is writing it; wait for it to finish, stop it, or set another exp_name "
        "(or logging.checkpoint_dir)",
    )


def init_from_draft(draft: nn.Module, name: str) -> None:
    """``draft`` takes the weights of the draft ``name`` (a checkpoint directory in deepspec's
    or the DeepSpec reference's format, or a hub id); one-line :class:`ConfigError` when it is
    another algorithm or its tensors do not fit this run's config."""
    flag = f"model.init_from_draft={name}"
    path = resolve_draft(name)
    _, config = read_draft_config(path)
    if config.algorithm != draft.config.algorithm:
        raise ConfigError(f"{flag} is a {config.algorithm} draft; this run trains {draft.config.algorithm}")
    try:
        load_weights(draft, path)
    except DataError as exc:
        raise ConfigError(
            f"{flag} does not fit this run's draft ({str(exc).split(': ', 1)[-1]}); set the model.* sizes "
            "to that draft's (its config.json) or drop the option"
        ) from None
