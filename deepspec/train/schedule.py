"""Learning-rate schedules: linear warmup, then

* ``cosine``: cosine decay to zero over the remaining steps (the reference setting);
* ``constant``: the peak LR to the end;
* ``wsd`` (warmup-stable-decay): the peak LR, then a linear decay to zero over the last
  ``decay_ratio`` of all steps.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "constant", "wsd")


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return min(total_steps, math.ceil(warmup_ratio * total_steps))


def lr_factor(
    step: int, total_steps: int, warmup: int, schedule: str = "cosine", decay_ratio: float = 0.2
) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay = max(1, math.ceil(decay_ratio * total_steps)) if decay_ratio > 0 else 0
        start = max(warmup, total_steps - decay)
        if step < start or decay == 0:
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - start))
    if schedule != "cosine":
        raise ValueError(f"unknown LR schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_ratio: float,
    schedule: str = "cosine",
    decay_ratio: float = 0.2,
):
    warmup = warmup_steps(total_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, schedule, decay_ratio)
    )
