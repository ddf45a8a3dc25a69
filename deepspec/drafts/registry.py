"""Algorithm registry: name → draft class and loss. Trainer and evaluator use only this."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deepspec.drafts import dflash, eagle3
from deepspec.drafts.base import DraftModel
from deepspec.drafts.dflash import DFlashDraft
from deepspec.drafts.dspark import DSparkDraft
from deepspec.drafts.eagle3 import Eagle3Draft
from deepspec.drafts.losses import LossOutput, block_loss, eagle3_loss


@dataclass(frozen=True)
class Algorithm:
    name: str
    model_cls: type[DraftModel]
    loss: Callable[..., LossOutput]
    # (training config, progress = step / total steps in [0, 1]) → loss keyword arguments
    loss_kwargs: Callable[..., dict[str, Any]]
    # (training config, micro-batch, generators, probe) → (forward keyword arguments, the
    # batch's local loss normaliser, summed over ranks by the trainer)
    prepare_batch: Callable[..., tuple[dict[str, Any], Any]]


def _block_kwargs(cfg: Any, progress: float = 1.0) -> dict[str, Any]:
    """The block loss weights at ``progress``. With ``model.tv_ramp_ratio`` r > 0 the TV
    weight ramps linearly from 0 to ``l1_loss_alpha`` over the first r of training while the
    CE weight gives up the same amount (CE first: the TV term has almost no gradient while
    the draft's distribution is flat)."""
    m = cfg.model
    ramp = m.tv_ramp_ratio
    f = 1.0 if ramp <= 0 else min(1.0, max(0.0, progress) / ramp)
    return dict(
        ce_alpha=m.ce_loss_alpha + (1.0 - f) * m.l1_loss_alpha,
        l1_alpha=f * m.l1_loss_alpha,
        conf_alpha=m.confidence_head_alpha,
        decay_gamma=m.loss_decay_gamma,
    )


def _eagle_kwargs(cfg: Any, progress: float = 1.0) -> dict[str, Any]:
    return dict(step_loss_decay=cfg.model.step_loss_decay)


ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> None:
    if algorithm.name in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm.name!r} is already registered")
    ALGORITHMS[algorithm.name] = algorithm


register(Algorithm("dspark", DSparkDraft, block_loss, _block_kwargs, dflash.prepare_batch))
register(Algorithm("dflash", DFlashDraft, block_loss, _block_kwargs, dflash.prepare_batch))
register(Algorithm("eagle3", Eagle3Draft, eagle3_loss, _eagle_kwargs, eagle3.prepare_batch))

ARCHITECTURES = {a.model_cls.__name__: a for a in ALGORITHMS.values()}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; registered: {', '.join(ALGORITHMS)}") from None
