"""One micro-batch, from sample indices to what the draft's forward and loss take.

Shared by the training step (:mod:`deepspec.train.trainer`) and the held-out scorer
(:mod:`deepspec.train.heldout`), so both see the same batches, anchors and normaliser.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from deepspec.algorithms import get_algorithm
from deepspec.config import Config
from deepspec.train.data import collate, sample_generators

Batch = dict[str, torch.Tensor]
# (batch on the device, the forward's keyword arguments, the local loss normaliser Σw)
MicroBatch = tuple[Batch, dict[str, Any], torch.Tensor]


class TrainModule(nn.Module):
    """Draft + its loss in one forward, so DDP/FSDP see every parameter use inside forward."""

    def __init__(self, draft: nn.Module, loss_fn, loss_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.draft = draft
        self.loss_fn = loss_fn
        self.loss_kwargs = loss_kwargs

    def forward(self, batch: Batch, extra: dict[str, Any], normalizer: torch.Tensor):
        out = self.draft(
            batch["input_ids"],
            batch["loss_mask"],
            batch["hidden_states"],
            batch["last_hidden_states"],
            **extra,
        )
        return self.loss_fn(self.draft, out, normalizer=normalizer, **self.loss_kwargs)


def prepare_micro_batch(
    cfg: Config,
    dataset: Any,
    indices: Sequence[int],
    *,
    epoch: int,
    pad_id: int = 0,
    features: Callable[[Batch], Batch] | None = None,
    device: torch.device | str = "cpu",
    probe: bool = False,
) -> MicroBatch:
    """Samples ``dataset[indices]`` padded into one batch, with the target's features
    (``features``, when the samples lack them), on ``device``, and the algorithm's
    ``prepare_batch``: anchors drawn from the per-sample generators of ``epoch`` (no global
    RNG); ``probe`` asks the forward to measure where block slot 0 looks (logged steps)."""
    batch = collate([dataset[i] for i in indices], pad_id)
    if features is not None:
        batch = features(batch)
    batch = {k: v.to(device) for k, v in batch.items()}
    gens = sample_generators(cfg.seed, epoch, indices)
    extra, weight = get_algorithm(cfg.algorithm).prepare_batch(cfg, batch, gens, probe=probe)
    return batch, extra, weight
