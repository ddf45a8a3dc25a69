"""The algorithm registry: one entry per drafter holds everything that differs per algorithm.

An entry names the algorithm's module and, in it, the draft class, the batch preparation
and the loss; it says what kind of drafter it is (``block``: one forward drafts a block of
slots, DFlash/DSpark; otherwise a chain drafted step by step, Eagle3), whether it carries
DSpark's Markov and confidence heads, the config defaults the algorithm applies over the
schema's (:mod:`deepspec.config.loader`), and its loss weights as a function of training
progress. The trainer, the held-out scorer, the checkpoint reader, the config loader and the
exporters read these traits; none of them names an algorithm. A new drafter is one module
plus one :func:`register` call.

This module imports nothing heavy: the config loader and the CLIs read it before torch
loads. The classes and functions an entry names are imported on first use
(:meth:`Algorithm.model_cls`, :meth:`Algorithm.loss`, :meth:`Algorithm.prepare_batch`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the config schema imports this registry
    from deepspec.config import Config


def _block_kwargs(cfg: Config, progress: float = 1.0) -> dict[str, Any]:
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


def _chain_kwargs(cfg: Config, progress: float = 1.0) -> dict[str, Any]:
    return dict(step_loss_decay=cfg.model.step_loss_decay)


@functools.cache  # the training step asks for its batch preparation every micro-batch
def _resolve(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Algorithm:
    name: str
    model: str  # "module:Class" of the draft; the class name is the checkpoint's architecture
    loss_fn: str  # "module:function" (model, forward output, **loss_kwargs) -> LossOutput
    # "module:function" (training config, micro-batch, generator, probe) -> (forward keyword
    # arguments, the batch's local loss normaliser, summed over ranks by the trainer)
    batch_fn: str
    # (training config, progress = step / total steps in [0, 1]) -> loss keyword arguments
    loss_kwargs: Callable[..., dict[str, Any]]
    block: bool  # one forward drafts a block of slots (reads block_size, context_window, qk_norm)
    markov: bool = False  # DSpark's Markov head and confidence head
    # applied over the schema defaults, before the config file ("section.key": value)
    config_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return self.model.partition(":")[2]

    @property
    def model_cls(self) -> type:
        return _resolve(self.model)

    @property
    def loss(self) -> Callable[..., Any]:
        return _resolve(self.loss_fn)

    @property
    def prepare_batch(self) -> Callable[..., tuple[dict[str, Any], Any]]:
        return _resolve(self.batch_fn)


ALGORITHMS: dict[str, Algorithm] = {}
ARCHITECTURES: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> None:
    if algorithm.name in ALGORITHMS or algorithm.architecture in ARCHITECTURES:
        raise ValueError(f"algorithm {algorithm.name!r} ({algorithm.architecture}) is already registered")
    ALGORITHMS[algorithm.name] = algorithm
    ARCHITECTURES[algorithm.architecture] = algorithm


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; registered: {', '.join(ALGORITHMS)}") from None


_NO_HEADS = {"model.markov_rank": 0, "model.confidence_head_alpha": 0.0}
_CE_ONLY = {"model.ce_loss_alpha": 1.0, "model.l1_loss_alpha": 0.0}

register(
    Algorithm(
        "dspark",
        "deepspec.drafts.dspark:DSparkDraft",
        "deepspec.drafts.losses:block_loss",
        "deepspec.drafts.dflash:prepare_batch",
        _block_kwargs,
        block=True,
        markov=True,
    )
)
register(
    Algorithm(
        "dflash",
        "deepspec.drafts.dflash:DFlashDraft",
        "deepspec.drafts.losses:block_loss",
        "deepspec.drafts.dflash:prepare_batch",
        _block_kwargs,
        block=True,
        config_defaults={**_NO_HEADS, **_CE_ONLY},
    )
)
register(
    Algorithm(
        "eagle3",
        "deepspec.drafts.eagle3:Eagle3Draft",
        "deepspec.drafts.losses:eagle3_loss",
        "deepspec.drafts.eagle3:prepare_batch",
        _chain_kwargs,
        block=False,
        config_defaults={**_NO_HEADS, **_CE_ONLY},
    )
)
