"""Data parallelism for an already built training module, and its full (unsharded) state.

``train.sharding_strategy=no_shard`` wraps the module in DDP; ``shard_grad_op`` and
``full_shard`` apply FSDP2's ``fully_shard`` to each draft layer and then to the whole
module (``full_shard`` reshards the parameters after the forward). A single worker trains
the module as it is. Checkpoints hold full state dicts whatever the wrapping (the sharding
strategy may change on resume).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepspec.config import Config
from deepspec.utils import distributed as dist_utils


def parallelize(module: nn.Module, cfg: Config, info: dist_utils.DistInfo) -> nn.Module:
    """``module`` (a :class:`~deepspec.train.batch.TrainModule`) ready for this world:
    itself on one worker, DDP or FSDP (``cfg.train.sharding_strategy``) on several."""
    if not info.distributed:
        return module
    if cfg.train.sharding_strategy == "no_shard":
        # lazy: only distributed runs need it (torch.distributed may be absent from a build)
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.local_rank] if info.device.startswith("cuda") else None
        return DistributedDataParallel(module, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard  # lazy: as DistributedDataParallel above

    reshard = cfg.train.sharding_strategy == "full_shard"
    for layer in module.draft.layers:
        fully_shard(layer, reshard_after_forward=reshard)
    return fully_shard(module, reshard_after_forward=reshard)


def _unsharded(model: nn.Module) -> bool:
    """Does ``model`` (from :func:`parallelize`) hold full tensors: one worker, or DDP?"""
    return hasattr(model, "module") or not dist_utils.is_initialized()


def full_state_dict(model: nn.Module, draft: nn.Module) -> dict[str, torch.Tensor]:
    """The draft's full (unsharded) state dict on CPU, on every rank; ``model`` is the
    parallelized module that holds ``draft``."""
    if _unsharded(model):
        return {k: v.detach().cpu() for k, v in draft.state_dict().items()}
    # lazy: only sharded runs need it (torch.distributed may be absent from a build)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("draft."): v for k, v in state.items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state dict (on CPU when sharded), as checkpoints store it."""
    if _unsharded(model):
        return optimizer.state_dict()
    # lazy: only sharded runs need it (torch.distributed may be absent from a build)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """The inverse of :func:`optimizer_state`: a full state dict into ``optimizer``."""
    if _unsharded(model):
        optimizer.load_state_dict(state)
        return
    # lazy: only sharded runs need it (torch.distributed may be absent from a build)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
