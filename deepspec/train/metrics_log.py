"""Training metrics: rank 0's progress bar, TensorBoard scalars and ``metrics.jsonl``.

``metrics.jsonl`` (in the checkpoint directory) gets one JSON line per logged step,
``{"step": N, ...metrics}``; a resumed run first drops the lines of steps after its
checkpoint (:func:`truncate_metrics`), so the file reads as one run.
"""

from __future__ import annotations

import json
import os

from tqdm import tqdm

from deepspec.config import Config
from deepspec.utils.io import atomic_open


class MetricsLogger:
    """Rank-0 progress bar, TensorBoard scalars and ``metrics.jsonl`` in the checkpoint dir."""

    def __init__(self, cfg: Config, total: int, start: int, *, enabled: bool, progress: bool) -> None:
        self.enabled = enabled
        self.every = cfg.logging.logging_steps
        self.bar = self.writer = self.jsonl = None
        if not enabled:
            return
        os.makedirs(cfg.logging.checkpoint_dir, exist_ok=True)
        path = os.path.join(cfg.logging.checkpoint_dir, "metrics.jsonl")
        truncate_metrics(path, start)  # a resumed run logs steps after `start` again
        self.jsonl = open(path, "a", encoding="utf-8")
        try:  # lazy: TensorBoard is optional at run time (and slow to import)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
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
