"""The training loop, generic over algorithms (registry: model class + loss).

One optimizer step = ``accum`` micro-batches per rank, ``accum = global_batch_size /
(world × local_batch_size)``. Loss terms are divided by their weight sum over *all* ranks
and micro-batches of the step (computed up front, one all-reduce), so the gradient is the
same whatever the world size; DDP averages gradients, hence the ``× world`` on the loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepspec.config import save_config, validate_against_target
from deepspec.drafts import build_draft, get_algorithm
from deepspec.drafts.checkpoint import load_weights, weights_are_finite
from deepspec.drafts.fused_head import check_compile_toolchain, use_compiled_vocab_rows
from deepspec.drafts.saving import write_draft_files
from deepspec.drafts.vocab import build_draft_vocab
from deepspec.errors import (
    ConfigError,
    DataError,
    DeepSpecError,
    EnvironmentProblem,
    Preempted,
    describe_os_error,
)
from deepspec.train import checkpoint as ckpt
from deepspec.train.data import (
    DataCursor,
    EpochOrder,
    FeatureSource,
    FirstSamples,
    OnlineSamples,
    check_heldout_split,
    collate,
    sample_generators,
)
from deepspec.train.schedule import build_scheduler, warmup_steps
from deepspec.utils import distributed as dist_utils


class NonFiniteLoss(DeepSpecError):
    """The loss, the gradient norm or the weights became NaN or infinite."""


# Signals that save a checkpoint and stop (exit 75, see errors.Preempted). A second Ctrl-C
# aborts at once (the previous checkpoint stays: saves are atomic).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainModule(nn.Module):
    """Draft + its loss in one forward, so DDP/FSDP see every parameter use inside forward."""

    def __init__(self, draft: nn.Module, loss_fn, loss_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.draft = draft
        self.loss_fn = loss_fn
        self.loss_kwargs = loss_kwargs

    def forward(self, batch: dict[str, torch.Tensor], extra: dict[str, Any], normalizer: torch.Tensor):
        out = self.draft(
            batch["input_ids"],
            batch["loss_mask"],
            batch["hidden_states"],
            batch["last_hidden_states"],
            **extra,
        )
        return self.loss_fn(self.draft, out, normalizer=normalizer, **self.loss_kwargs)


@dataclass
class RunResult:
    step: int
    metrics: dict[str, float]
    checkpoint: str | None


class Trainer:
    def __init__(self, cfg: Any, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.info = dist_utils.get_info()
        self.progress = progress and self.info.is_main
        self.stop_requested = False
        self.stop_signal = "SIGTERM"

    # -- setup -------------------------------------------------------------------------
    def _log(self, message: str) -> None:
        if self.info.is_main:
            print(message, flush=True)

    def _dataset(self, target_dir: str) -> tuple[Any, Any, range | None]:
        """(all samples, the training samples, the held-out sample indices or None)."""
        cfg = self.cfg
        source = f"data.train_data_paths ({', '.join(cfg.data.train_data_paths)})"
        if cfg.data.mode == "offline":
            from deepspec.data.cache_reader import validate_cache_for_config

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
        return (dataset, *split_heldout(dataset, cfg, source))

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.info.distributed:
            return module
        if self.cfg.train.sharding_strategy == "no_shard":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.info.local_rank] if self.info.device.startswith("cuda") else None
            return DistributedDataParallel(module, device_ids=device_ids)
        from torch.distributed.fsdp import fully_shard

        reshard = self.cfg.train.sharding_strategy == "full_shard"
        for layer in module.draft.layers:
            fully_shard(layer, reshard_after_forward=reshard)
        return fully_shard(module, reshard_after_forward=reshard)

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

    # -- the run -----------------------------------------------------------------------
    def run(self) -> RunResult:
        from deepspec.targets import load_family_spec, resolve_target

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
        accum = global_batch // (world * local_batch)
        check_output_dirs(cfg)  # before any data is read: a read-only root fails here, in one line
        if cfg.train.torch_compile and info.device == "cpu":
            check_compile_toolchain()
        with contextlib.ExitStack() as held:
            dist_utils.run_on_main(lambda: held.enter_context(experiment_lock(cfg)))
            previous_handlers = self._install_stop_handlers()
            try:
                return self._run(target_dir, spec, accum)
            finally:
                for sig, handler in previous_handlers.items():
                    if handler is not None:
                        signal.signal(sig, handler)

    def _run(self, target_dir: str, spec: Any, accum: int) -> RunResult:
        cfg, info = self.cfg, self.info
        world, local_batch, global_batch = (
            info.world_size,
            cfg.train.local_batch_size,
            cfg.train.global_batch_size,
        )
        dataset_all, dataset, heldout = self._dataset(target_dir)
        order = EpochOrder(
            len(dataset),
            global_batch=global_batch,
            local_batch=local_batch,
            rank=info.rank,
            world=world,
            seed=cfg.seed,
            shuffle=cfg.data.shuffle,
        )
        total = cfg.train.max_train_steps or cfg.train.num_train_epochs * order.steps_per_epoch
        root = cfg.logging.checkpoint_dir

        torch.manual_seed(cfg.seed)
        device = torch.device(info.device)
        draft_ids = None
        if cfg.model.draft_vocab_size > 0:  # every rank counts the same samples: same vocabulary
            vocab = build_draft_vocab(
                dataset, spec.vocab_size, cfg.model.draft_vocab_size, progress=self.progress
            )
            draft_ids = vocab.draft_ids
            self._log(vocab.describe())
        draft = build_draft(cfg, target_dir, draft_ids=draft_ids)
        resume_from = ckpt.latest_checkpoint(cfg.logging.checkpoint_dir) if cfg.train.resume else None
        if cfg.model.init_from_draft and not resume_from:
            init_from_draft(draft, cfg.model.init_from_draft)
            self._log(f"initialised from the draft {cfg.model.init_from_draft}")
        draft = draft.to(device)
        alg = get_algorithm(cfg.algorithm)
        module = TrainModule(draft, alg.loss, alg.loss_kwargs(cfg))
        cursor, start_step = DataCursor(), 0
        identity = self._identity(dataset, target_dir)
        shared = rank_state = None
        if resume_from:
            meta = ckpt.load_meta(resume_from)
            differences = ckpt.resume_differences(
                resume_from,
                saved_cfg=ckpt.load_saved_config(resume_from),
                cfg=flat_config(cfg),
                meta=meta,
                draft_config=json.loads(json.dumps(draft.config_json())),
                identity=identity,
            )
            ckpt.check_compatible(
                meta,
                world_size=world,
                global_batch=global_batch,
                local_batch=local_batch,
                path=resume_from,
                differences=differences,
            )
            _load_draft_weights(draft, resume_from)
            shared, rank_state = ckpt.load_shared(resume_from), ckpt.load_rank_state(resume_from, info.rank)
            start_step = int(meta["step"])
            cursor = DataCursor(**rank_state["cursor"])
            torch.set_rng_state(rank_state["torch_rng"])
            if meta.get("total_steps") not in (None, total):
                self._log(
                    f"note: step budget changed {meta['total_steps']} -> {total}; LR schedule recomputed"
                )
        wrapped = self._wrap(module)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        )
        scheduler = build_scheduler(
            optimizer, total, cfg.train.warmup_ratio, cfg.train.lr_scheduler, cfg.train.decay_ratio
        )
        if shared is not None:
            try:
                _load_optimizer_state(wrapped, optimizer, shared["optimizer"])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise ckpt.CheckpointError(
                    f"cannot resume from {resume_from}: its optimizer state does not fit this draft "
                    f"({' '.join(str(exc).split())[:200]}); start fresh with --opts train.resume=false "
                    f"or a new exp_name"
                ) from None
            scheduler.last_epoch = start_step
            for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
                group["lr"] = lr
            self._log(f"resumed from {resume_from} at step {start_step}")
        features = FeatureSource(cfg.data.mode, target_dir, list(cfg.model.target_layer_ids), info.device)
        pad_id = spec.pad_token_id if spec.pad_token_id is not None else 0
        self._board(dataset, order, total, accum, draft, start_step)
        if info.is_main:
            os.makedirs(root, exist_ok=True)
            save_config(cfg, os.path.join(root, "config.yaml"))
        logger = _Logger(cfg, total, start_step, enabled=info.is_main, progress=self.progress)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
        compiled_before = use_compiled_vocab_rows(cfg.train.torch_compile)
        batches = order.micro_batches(cursor)
        metrics: dict[str, float] = {}
        last_ckpt = resume_from
        step = start_step
        try:
            while step < total:
                t0 = time.perf_counter()
                logged = logger.due(step + 1)  # logged steps also measure where block slot 0 looks
                micro = []
                for _ in range(accum):
                    epoch = cursor.epoch  # the position before this micro-batch
                    idx, cursor = next(batches)
                    batch = features(collate([dataset[i] for i in idx], pad_id))
                    batch = {k: v.to(device) for k, v in batch.items()}
                    gens = sample_generators(cfg.seed, epoch, idx)
                    extra, weight = alg.prepare_batch(cfg, batch, gens, probe=logged)
                    micro.append((batch, extra, weight))
                local = torch.stack([w for *_, w in micro]).sum(0)  # scalar, or [K] for Eagle3
                normalizer = torch.tensor(
                    dist_utils.all_reduce_sum(local.reshape(-1).tolist()), dtype=torch.float64, device=device
                ).reshape(local.shape)
                step_metrics: dict[str, float] = {}
                loss_sum = 0.0
                module.loss_kwargs = alg.loss_kwargs(cfg, step / max(1, total))
                for i, (batch, extra, _) in enumerate(micro):
                    sync = contextlib.nullcontext()
                    if i < accum - 1 and hasattr(wrapped, "no_sync"):
                        sync = wrapped.no_sync()
                    with sync, autocast:
                        res = wrapped(batch, extra, normalizer)
                        (res.loss * world).backward()
                    loss_sum += float(res.loss.detach())
                    for k, v in res.metrics.items():
                        step_metrics[k] = step_metrics.get(k, 0.0) + v / accum
                total_loss = dist_utils.all_reduce_sum([loss_sum])[0]
                if not math.isfinite(total_loss):
                    raise _diverged(f"non-finite loss ({total_loss}) at step {step + 1}", step, root)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    params, cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
                )
                if not math.isfinite(float(grad_norm)):  # the same on every rank (synced gradients)
                    raise _diverged(
                        f"non-finite gradient norm ({float(grad_norm)}) at step {step + 1}", step, root
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                reduced = dist_utils.all_reduce_sum(list(step_metrics.values()))
                metrics = {k: v / world for k, v in zip(step_metrics, reduced)}
                metrics.update(
                    loss=total_loss,
                    lr=scheduler.get_last_lr()[0],
                    grad_norm=float(grad_norm),
                    step_seconds=time.perf_counter() - t0,
                    samples_per_second=global_batch / max(time.perf_counter() - t0, 1e-9),
                )
                every = cfg.logging.heldout_steps
                scored = heldout is not None and ((every and step % every == 0) or step == total)
                if scored:
                    metrics.update(
                        self._score_heldout(module, dataset_all, heldout, features, pad_id, device)
                    )
                logger.step(step, metrics, force=scored)
                # non-finite weights give a non-finite loss at the next step; a save checks them
                stop = dist_utils.all_reduce_sum([float(self.stop_requested)])[0] > 0
                if step % cfg.logging.checkpointing_steps == 0 or step == total or stop:
                    last_ckpt = self._save(
                        root, step, total, wrapped, draft, optimizer, scheduler, cursor, metrics, identity
                    )
                if stop and step < total:
                    name = self.stop_signal if self.stop_requested else "a signal to another worker"
                    self._log(f"stopped by {name} after step {step}; checkpoint {last_ckpt}")
                    raise Preempted(
                        f"stopped by {name} after step {step} of {total}; checkpoint {last_ckpt} saved; "
                        f"rerun the same command to resume"
                    )
        finally:
            logger.close()
            use_compiled_vocab_rows(compiled_before)
        return RunResult(step, metrics, last_ckpt)

    def _score_heldout(
        self, module, dataset, heldout: range, features, pad_id: int, device
    ) -> dict[str, float]:
        """Held-out CE, acc@1, accept@1 and tau_prob with real and zeroed features. Every rank
        scores all held-out samples (the same inputs, so the same numbers; FSDP needs every
        rank in each forward). Uses no global RNG: training continues exactly as without it."""
        from deepspec.train.heldout import flat_metrics, score

        scores = score(
            module,
            self.cfg,
            dataset,
            heldout,
            batch=self.cfg.train.local_batch_size,
            pad_id=pad_id,
            features=features,
            device=device,
        )
        return flat_metrics(scores)

    def _identity(self, dataset, target_dir: str) -> dict[str, Any]:
        """What a resumed run must read again: the target's fingerprint, the sample count
        and (offline) the cache's content checksum. Stored in each checkpoint's meta."""
        data: dict[str, Any] = {"mode": self.cfg.data.mode, "samples": len(dataset)}
        manifest = getattr(dataset, "manifest", None)
        if isinstance(manifest, dict):
            data["cache_checksum"] = (manifest.get("index") or {}).get("checksum")

        def fingerprint() -> str | None:
            from deepspec.data.fingerprint import target_fingerprint

            return target_fingerprint(target_dir)

        return {"target_fingerprint": dist_utils.run_on_main(fingerprint), "data": data}

    def _board(self, dataset, order: EpochOrder, total: int, accum: int, draft, start_step: int) -> None:
        cfg = self.cfg
        trainable, frozen = draft.num_parameters()
        lines = [
            f"algorithm        {cfg.algorithm} on {cfg.model.target_model_name_or_path} (layers "
            f"{list(cfg.model.target_layer_ids)})",
            f"data             {cfg.data.mode}: {len(dataset)} samples"
            + (f", {cfg.data.heldout_samples} held out" if cfg.data.heldout_samples else ""),
            f"workers          {self.info.world_size} ({self.info.device}, {cfg.train.sharding_strategy}), "
            f"{cfg.train.precision}",
            f"batch            global {cfg.train.global_batch_size} = {self.info.world_size} x "
            f"local {cfg.train.local_batch_size} x accum {accum}",
            f"steps            {total} ({order.steps_per_epoch}/epoch), warmup "
            f"{warmup_steps(total, cfg.train.warmup_ratio)}, from step {start_step}",
            f"parameters       {trainable / 1e6:.2f}M trainable, {frozen / 1e6:.2f}M frozen",
            f"checkpoints      {cfg.logging.checkpoint_dir} (every {cfg.logging.checkpointing_steps} steps)",
        ]
        self._log("\n".join(lines))

    def _save(
        self, root, step, total, wrapped, draft, optimizer, scheduler, cursor, metrics, identity
    ) -> str:
        info = self.info
        full_state = _full_state_dict(wrapped, draft)
        optim_state = _optimizer_state(wrapped, optimizer)
        # never write non-finite weights (the loop checks after every update; this is the
        # last line of defence for what is about to be called a checkpoint)
        finite = info.is_main and _all_finite(full_state.values())
        if dist_utils.all_reduce_sum([float(info.is_main and not finite)])[0] > 0:
            raise NonFiniteLoss(
                f"non-finite weights after the update of step {step} (not saved); last checkpoint with "
                f"finite weights: {_last_good(root, step) or 'none'} (lower train.lr or train.max_grad_norm, "
                f"or check the data)"
            )
        tmp = error = None
        if info.is_main:
            try:
                tmp = ckpt.begin_save(root, step)
            except OSError as exc:
                error = describe_os_error(exc)
        tmp, error = dist_utils.broadcast_object((tmp, error))
        if error is not None:
            previous = ckpt.latest_checkpoint(root)
            raise ckpt.CheckpointError(
                f"saving step {step} failed ({error}); the previous checkpoint {previous or '(none)'} is intact"
            )
        try:
            return self._write_checkpoint(
                root, tmp, step, total, draft, full_state, optim_state, scheduler, cursor, metrics, identity
            )
        except BaseException:  # a second Ctrl-C or a failure: no temporary directory is left
            if info.is_main:
                ckpt.abort_save(tmp)
            raise

    def _write_checkpoint(
        self, root, tmp, step, total, draft, full_state, optim_state, scheduler, cursor, metrics, identity
    ) -> str:
        info, cfg = self.info, self.cfg
        error = None
        try:
            ckpt.save_rank_state(
                tmp, info.rank, {"cursor": cursor.to_dict(), "torch_rng": torch.get_rng_state()}
            )
        except _WRITE_ERRORS as exc:
            error = _describe_write_error(exc)
        failed = dist_utils.all_reduce_sum([float(error is not None)])[0] > 0
        final = None
        if info.is_main and not failed:
            try:
                write_draft_files(
                    draft, tmp, full_state, target_fingerprint=identity.get("target_fingerprint")
                )
                save_config(cfg, os.path.join(tmp, ckpt.STATE_DIR, "config.yaml"))
                meta = {
                    "step": step,
                    "total_steps": total,
                    "world_size": info.world_size,
                    "global_batch_size": cfg.train.global_batch_size,
                    "local_batch_size": cfg.train.local_batch_size,
                    "algorithm": cfg.algorithm,
                    "target_fingerprint": identity.get("target_fingerprint"),
                    "data": identity.get("data"),
                    "metrics": metrics,
                }
                final = ckpt.finish_save(
                    root,
                    tmp,
                    step,
                    {"optimizer": optim_state, "scheduler": scheduler.state_dict()},
                    meta,
                    cfg.logging.keep_last_checkpoints,
                )
            except _WRITE_ERRORS as exc:  # disk full, file too large, read-only, I/O error
                error = _describe_write_error(exc)
        failed = dist_utils.all_reduce_sum([float(error is not None)])[0] > 0
        if failed:
            if info.is_main:
                ckpt.abort_save(tmp)
            previous = ckpt.latest_checkpoint(root)
            raise ckpt.CheckpointError(
                f"saving step {step} failed ({error or 'on another rank'}); the previous "
                f"checkpoint {previous or '(none)'} is intact"
            )
        dist_utils.barrier()
        return dist_utils.broadcast_object(final)


try:
    from safetensors import SafetensorError
except ImportError:  # pragma: no cover - safetensors always ships it
    SafetensorError = OSError
# what writing a checkpoint raises when the disk is full, a file too large or the directory
# read-only: OSError (deepspec.utils.io.writing names the file), the EnvironmentProblem it
# makes of a library's write error, torch.save's RuntimeError, safetensors' serialisation error
_WRITE_ERRORS = (OSError, EnvironmentProblem, RuntimeError, SafetensorError)


def _describe_write_error(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    if isinstance(exc, EnvironmentProblem):
        return str(exc)
    text = " ".join(str(exc).split())[:200] or type(exc).__name__
    return f"{text}; is the disk full?"


def split_heldout(dataset: Any, cfg: Any, source: str) -> tuple[Any, range | None]:
    """(training samples, held-out sample indices or None): the last ``data.heldout_samples``
    are held out (refused when they leave less than a global batch; ``source`` names the
    data); training uses the first ``data.max_samples`` of the rest (all when None).
    Held-out samples keep their cache indices, which seed their anchors."""
    n, heldout, max_samples = len(dataset), cfg.data.heldout_samples, cfg.data.max_samples
    check_heldout_split(n, cfg, source)
    stop = n - heldout
    if max_samples is not None:
        stop = min(stop, max_samples)
    train = dataset if stop == n else FirstSamples(dataset, stop)
    return train, (range(n - heldout, n) if heldout else None)


def flat_config(cfg: Any) -> dict[str, Any]:
    """``{key.path: value}`` of a config, as :func:`save_config` writes it (YAML round trip)."""
    import yaml

    from deepspec.config import config_to_dict

    tree = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return ckpt._flatten(tree)


def check_optimizer_settings(cfg: Any) -> None:
    """AdamW's first update moves a weight by up to ``lr / (1 - adam_beta1)``; past the
    float32 range torch fails inside the step with a traceback, so refuse it up front."""
    limit = torch.finfo(torch.float32).max * (1 - cfg.train.adam_beta1)
    if not cfg.train.lr < limit:
        raise ConfigError(
            f"train.lr={cfg.train.lr:g} is too large for AdamW with train.adam_beta1={cfg.train.adam_beta1:g} "
            f"(the first update would overflow float32; must be < {limit:.3g}); use a learning rate such as 1e-3"
        )


def check_output_dirs(cfg: Any) -> None:
    """Refuse, before any data is read, checkpoint and TensorBoard directories that are
    files or cannot be written (a read-only root fails here, not at the first save)."""
    from deepspec.utils.io import check_writable_dir

    for key, path in (
        ("logging.checkpoint_root", cfg.logging.checkpoint_dir),
        ("logging.tensorboard_root", cfg.logging.tensorboard_dir),
    ):
        check_writable_dir(path, f"{key} (or its _dir)")


def experiment_lock(cfg: Any) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock on the run's checkpoint directory, held by rank 0 for the whole run:
    a second run into the same directory (which would resume from the first one's live
    checkpoints and interleave its metrics) is refused in one line naming the holder."""
    from deepspec.utils.locks import directory_lock

    root = cfg.logging.checkpoint_dir
    return directory_lock(
        root,
        f"checkpoint directory {root}",
        "another train.py is writing it; wait for it to finish, stop it, or set another exp_name "
        "(or logging.checkpoint_dir)",
    )


def _all_finite(tensors) -> bool:
    """Every element of every tensor (the local shard of a DTensor) is finite."""
    flags = []
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.numel():
            flags.append(torch.isfinite(local.detach()).all())
    return bool(torch.stack(flags).all()) if flags else True


def _last_good(root: str, before: int) -> str | None:
    """The newest complete checkpoint under ``root`` from a step before ``before`` whose
    weights are finite: those weights gave a finite loss at the next step."""
    for step, path in reversed(ckpt.step_dirs(root)):
        if step < before and weights_are_finite(path):
            return path
    return None


def _diverged(what: str, weights_step: int, root: str) -> NonFiniteLoss:
    """The error for a NaN/inf met in the step after ``weights_step``: a checkpoint of
    exactly those weights is not good (resuming from it gives the same NaN)."""
    bad = next((path for step, path in ckpt.step_dirs(root) if step == weights_step), None)
    good = _last_good(root, weights_step)
    note = ""
    if bad:
        again = f"delete it to resume from {good}, or " if good else ""
        note = f"; {bad} holds the weights that gave it: {again}start fresh with --opts train.resume=false"
    return NonFiniteLoss(
        f"{what}; last good checkpoint: {good or 'none'}{note}; lower train.lr or check the data"
    )


def init_from_draft(draft: nn.Module, name: str) -> None:
    """``draft`` takes the weights of the draft ``name`` (a checkpoint directory in deepspec's
    or the DeepSpec reference's format, or a hub id); one-line :class:`ConfigError` when it is
    another algorithm or its tensors do not fit this run's config."""
    from deepspec.drafts.checkpoint import read_draft_config, resolve_draft

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


def _full_state_dict(wrapped: nn.Module, draft: nn.Module) -> dict[str, torch.Tensor]:
    """The draft's full (unsharded) state dict on CPU, on every rank."""
    if hasattr(wrapped, "module") or not dist_utils.is_initialized():
        return {k: v.detach().cpu() for k, v in draft.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("draft."): v for k, v in state.items()}


def _optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if hasattr(wrapped, "module") or not dist_utils.is_initialized():
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        wrapped, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def _load_optimizer_state(
    wrapped: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    if hasattr(wrapped, "module") or not dist_utils.is_initialized():
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(wrapped, optimizer, state, options=StateDictOptions(full_state_dict=True))


class _Logger:
    """Rank-0 progress bar, TensorBoard scalars and ``metrics.jsonl`` in the checkpoint dir."""

    def __init__(self, cfg: Any, total: int, start: int, *, enabled: bool, progress: bool) -> None:
        self.enabled = enabled
        self.every = cfg.logging.logging_steps
        self.bar = self.writer = self.jsonl = None
        if not enabled:
            return
        from tqdm import tqdm

        os.makedirs(cfg.logging.checkpoint_dir, exist_ok=True)
        path = os.path.join(cfg.logging.checkpoint_dir, "metrics.jsonl")
        truncate_metrics(path, start)  # a resumed run logs steps after `start` again
        self.jsonl = open(path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional at run time
            SummaryWriter = None
        if SummaryWriter is not None:
            # events of steps after `start` (from before a kill) are dropped by TensorBoard
            self.writer = SummaryWriter(cfg.logging.tensorboard_dir, purge_step=start + 1)
        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not progress)

    def due(self, step: int) -> bool:
        """Is optimizer step ``step`` (1-based) one whose metrics are written?"""
        return step % self.every == 0 or step == 1

    def step(self, step: int, metrics: dict[str, float], force: bool = False) -> None:
        """Advance the bar; write ``metrics`` when the step is :meth:`due` or ``force``."""
        if not self.enabled:
            return
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            tau_prob=f"{metrics.get('tau_probabilistic', 0):.2f}",
            lr=f"{metrics['lr']:.2e}",
            sps=f"{metrics['samples_per_second']:.2f}",
        )
        if self.due(step) or force:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
            if self.writer is not None:
                for k, v in metrics.items():
                    self.writer.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop the lines of ``metrics.jsonl`` for steps after ``last_step`` (logged by a run
    that was killed after its last checkpoint), atomically; a torn last line goes too.

    Other lines are kept as they are."""
    from deepspec.utils.io import atomic_open

    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.readlines()
    except FileNotFoundError:
        return
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            if line.endswith("\n"):
                kept.append(line)  # not ours to judge; only a torn tail is dropped
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, int) and step > last_step:
            continue
        kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        with atomic_open(path, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write("".join(kept))
