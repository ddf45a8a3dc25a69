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
from deepspec.drafts.blocks import block_targets, sample_anchors
from deepspec.drafts.checkpoint import write_draft_files
from deepspec.drafts.fused_head import use_compiled_vocab_rows
from deepspec.drafts.losses import block_weights
from deepspec.errors import DataError, DeepSpecError
from deepspec.train import checkpoint as ckpt
from deepspec.train.data import DataCursor, EpochOrder, FeatureSource, OnlineSamples, collate
from deepspec.train.schedule import build_scheduler, warmup_steps
from deepspec.utils import distributed as dist_utils


class NonFiniteLoss(DeepSpecError):
    """The loss became NaN or infinite."""


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


def sample_generators(seed: int, epoch: int, indices: list[int]) -> list[torch.Generator]:
    """One generator per sample, from (seed, epoch, sample index): anchors do not depend on
    the world size, the batch a sample lands in, or where a run was resumed."""
    return [torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + i) for i in indices]


def prepare_micro_batch(cfg: Any, batch: dict[str, torch.Tensor], generator):
    """Sample what the forward needs (anchors) and the batch's local loss normalizer."""
    if cfg.algorithm == "eagle3" and cfg.model.eagle3_num_positions:
        anchors, keep = sample_anchors(batch["loss_mask"], cfg.model.eagle3_num_positions, generator)
        S = batch["input_ids"].shape[1]
        counts = []
        for s in range(cfg.model.ttt_length):  # step s at anchor a predicts token a + 1 + s
            pos = anchors + 1 + s
            supervised = torch.gather(batch["loss_mask"], 1, pos.clamp(max=S - 1)).bool()
            counts.append((keep & (anchors >= 1) & (pos < S) & supervised).sum())
        return {"anchors": anchors, "keep": keep}, torch.stack(counts).double()
    if cfg.algorithm == "eagle3":
        ids, lm = batch["input_ids"], batch["loss_mask"]
        S = ids.shape[1]
        t = torch.arange(S - 1)
        counts = []
        for s in range(cfg.model.ttt_length):
            pos = t + 2 + s
            valid = (pos < S) & lm[:, pos.clamp(max=S - 1)].bool()
            counts.append(valid.sum())
        return {}, torch.stack(counts).double()
    anchors, keep = sample_anchors(batch["loss_mask"], cfg.model.num_anchors, generator)
    *_, eval_mask = block_targets(batch["input_ids"], batch["loss_mask"], anchors, keep, cfg.model.block_size)
    weight = block_weights(eval_mask, cfg.model.loss_decay_gamma, torch.float64).sum()
    return {"anchors": anchors, "keep": keep}, weight


@dataclass
class RunResult:
    step: int
    metrics: dict[str, float]
    checkpoint: str | None
    stopped_early: bool = False


class Trainer:
    def __init__(self, cfg: Any, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.info = dist_utils.get_info()
        self.progress = progress and self.info.is_main
        self.stop_requested = False

    # -- setup -------------------------------------------------------------------------
    def _log(self, message: str) -> None:
        if self.info.is_main:
            print(message, flush=True)

    def _dataset(self, target_dir: str):
        cfg = self.cfg
        if cfg.data.mode == "offline":
            from deepspec.data.cache_reader import validate_cache_for_config

            if not cfg.data.target_cache_path:
                raise DataError(
                    "data.mode=offline needs data.target_cache_path (build one with "
                    "scripts/data/prepare_target_cache.py), or use data.mode=online"
                )
            dataset = validate_cache_for_config(
                os.path.expanduser(cfg.data.target_cache_path), cfg, target_dir
            )
            dataset.verify_samples = False  # shards were checked at open; per-read hashing is slow
            return dataset
        return OnlineSamples(cfg, target_dir)

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

    def _install_sigterm(self):
        """Ask the loop to save and stop on SIGTERM; returns the previous handler."""

        def handler(signum, frame):
            self.stop_requested = True

        with contextlib.suppress(ValueError):  # not in the main thread
            return signal.signal(signal.SIGTERM, handler)
        return None

    # -- the run -----------------------------------------------------------------------
    def run(self) -> RunResult:
        from deepspec.targets import load_family_spec, resolve_target

        cfg, info = self.cfg, self.info
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
        dataset = self._dataset(target_dir)
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
        draft = build_draft(cfg, target_dir).to(device)
        alg = get_algorithm(cfg.algorithm)
        module = TrainModule(draft, alg.loss, alg.loss_kwargs(cfg))
        cursor, start_step = DataCursor(), 0
        resume_from = ckpt.latest_checkpoint(root) if cfg.train.resume else None
        shared = rank_state = None
        if resume_from:
            meta = ckpt.load_meta(resume_from)
            ckpt.check_compatible(
                meta, world_size=world, global_batch=global_batch, local_batch=local_batch, path=resume_from
            )
            from safetensors.torch import load_file

            draft.load_state_dict(load_file(os.path.join(resume_from, "model.safetensors")), strict=False)
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
        scheduler = build_scheduler(optimizer, total, cfg.train.warmup_ratio)
        if shared is not None:
            _load_optimizer_state(wrapped, optimizer, shared["optimizer"])
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
        previous_handler = self._install_sigterm()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
        compiled_before = use_compiled_vocab_rows(cfg.train.torch_compile)
        batches = order.micro_batches(cursor)
        metrics: dict[str, float] = {}
        last_ckpt = resume_from
        step = start_step
        try:
            while step < total:
                t0 = time.perf_counter()
                micro = []
                for _ in range(accum):
                    epoch = cursor.epoch  # the position before this micro-batch
                    idx, cursor = next(batches)
                    batch = features(collate([dataset[i] for i in idx], pad_id))
                    batch = {k: v.to(device) for k, v in batch.items()}
                    extra, weight = prepare_micro_batch(cfg, batch, sample_generators(cfg.seed, epoch, idx))
                    micro.append((batch, extra, weight))
                local = torch.stack([w for *_, w in micro]).sum(0)  # scalar, or [K] for Eagle3
                normalizer = torch.tensor(
                    dist_utils.all_reduce_sum(local.reshape(-1).tolist()), dtype=torch.float64, device=device
                ).reshape(local.shape)
                step_metrics: dict[str, float] = {}
                loss_sum = 0.0
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
                    raise NonFiniteLoss(
                        f"non-finite loss ({total_loss}) at step {step + 1}; last good checkpoint: "
                        f"{last_ckpt or 'none'} (lower train.lr or check the data)"
                    )
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    params, cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
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
                logger.step(step, metrics)
                stop = dist_utils.all_reduce_sum([float(self.stop_requested)])[0] > 0
                if step % cfg.logging.checkpointing_steps == 0 or step == total or stop:
                    last_ckpt = self._save(
                        root, step, total, wrapped, draft, optimizer, scheduler, cursor, metrics
                    )
                if stop:
                    self._log(f"stopped by SIGTERM after step {step}; checkpoint {last_ckpt}")
                    return RunResult(step, metrics, last_ckpt, stopped_early=True)
        finally:
            logger.close()
            use_compiled_vocab_rows(compiled_before)
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        return RunResult(step, metrics, last_ckpt)

    def _board(self, dataset, order: EpochOrder, total: int, accum: int, draft, start_step: int) -> None:
        cfg = self.cfg
        trainable, frozen = draft.num_parameters()
        lines = [
            f"algorithm        {cfg.algorithm} on {cfg.model.target_model_name_or_path} (layers "
            f"{list(cfg.model.target_layer_ids)})",
            f"data             {cfg.data.mode}: {len(dataset)} samples",
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

    def _save(self, root, step, total, wrapped, draft, optimizer, scheduler, cursor, metrics) -> str:
        info, cfg = self.info, self.cfg
        full_state = _full_state_dict(wrapped, draft)
        optim_state = _optimizer_state(wrapped, optimizer)
        tmp = dist_utils.broadcast_object(ckpt.begin_save(root, step) if info.is_main else None)
        error = None
        try:
            ckpt.save_rank_state(
                tmp, info.rank, {"cursor": cursor.to_dict(), "torch_rng": torch.get_rng_state()}
            )
        except OSError as exc:
            error = exc
        failed = dist_utils.all_reduce_sum([float(error is not None)])[0] > 0
        final = None
        if info.is_main and not failed:
            try:
                write_draft_files(draft, tmp, full_state)
                save_config(cfg, os.path.join(tmp, ckpt.STATE_DIR, "config.yaml"))
                meta = {
                    "step": step,
                    "total_steps": total,
                    "world_size": info.world_size,
                    "global_batch_size": cfg.train.global_batch_size,
                    "local_batch_size": cfg.train.local_batch_size,
                    "algorithm": cfg.algorithm,
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
            except OSError as exc:
                error = exc
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

        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not progress)
        os.makedirs(cfg.logging.checkpoint_dir, exist_ok=True)
        self.jsonl = open(os.path.join(cfg.logging.checkpoint_dir, "metrics.jsonl"), "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(cfg.logging.tensorboard_dir)
        except Exception:  # TensorBoard is optional at run time
            self.writer = None

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            tau_prob=f"{metrics.get('tau_probabilistic', 0):.2f}",
            lr=f"{metrics['lr']:.2e}",
            sps=f"{metrics['samples_per_second']:.2f}",
        )
        if step % self.every == 0 or step == 1:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
            if self.writer is not None:
                for k, v in metrics.items():
                    self.writer.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
