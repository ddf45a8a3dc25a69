"""Training samples, their order, and batches.

Two sources with the same sample order (conversation files read in order, dropped rows
skipped): the offline target cache (:class:`CacheDataset`, features on disk) and online
samples (tokenized conversations; the target runs inside the worker, see
:class:`FeatureSource`). Given the same data they produce identical batches.

Order: each epoch is a permutation seeded by ``(seed, epoch)``, trimmed to a whole number of
global batches; rank ``r`` takes every ``world``-th sample. The position in that order is the
:class:`DataCursor` saved in checkpoints, so a resumed run continues with the same batches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from deepspec.config import Config
from deepspec.data.cache_reader import sample_tokens_of
from deepspec.data.chat import ChatTokenizer
from deepspec.data.conversations import read_conversations
from deepspec.data.target_features import TargetFeatureExtractor
from deepspec.errors import DataError


@dataclass
class DataCursor:
    epoch: int = 0
    micro_batch: int = 0  # micro-batches of this rank already consumed in the epoch

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class OnlineSamples(torch.utils.data.Dataset):
    """Tokenized conversations from ``data.train_data_paths`` (no features)."""

    def __init__(self, cfg: Config, target_dir: str) -> None:
        from transformers import AutoTokenizer  # lazy: heavy, and only online runs need it

        if not cfg.data.train_data_paths:
            raise DataError(
                "data.mode=online needs data.train_data_paths (regenerated conversation JSONL files)"
            )
        chat = ChatTokenizer(
            AutoTokenizer.from_pretrained(target_dir),
            chat_template=cfg.data.chat_template,
            max_length=cfg.data.max_length,
            min_loss_tokens=cfg.data.min_loss_tokens,
            system_prompt=cfg.data.system_prompt,
            enable_thinking=cfg.data.enable_thinking,
        )
        self.samples = []
        for path in cfg.data.train_data_paths:
            for conv in read_conversations(path, can_skip=False):  # train.py has no skip flag
                sample = chat(conv.messages)
                if sample is not None:
                    self.samples.append((sample.input_ids, sample.loss_mask))
        self.stats = chat.stats

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, mask = self.samples[i]
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "loss_mask": torch.tensor(mask, dtype=torch.uint8),
        }


def check_heldout_split(num_samples: int, cfg: Config, source: str) -> None:
    """Refuse a ``data.heldout_samples`` that leaves fewer training samples than one global
    batch (the trainer holds out the last samples), naming the held-out count and a value
    that works. ``source`` names the data (a cache directory, the conversation files)."""
    n, held, batch = int(num_samples), int(cfg.data.heldout_samples or 0), int(cfg.train.global_batch_size)
    if held <= 0 or n - held >= batch:
        return
    room = n - batch  # the most samples that can be held out
    if room >= 1:
        fix = f"hold out at most {room} (e.g. --opts data.heldout_samples={min(room, max(1, n // 10))})"
    elif room == 0:
        fix = "set --opts data.heldout_samples=0 (no held-out scoring), lower train.global_batch_size or add data"
    else:
        fix = f"add data or lower train.global_batch_size (even without held-out samples {n} < {batch})"
    left = max(n - held, 0)
    raise DataError(
        f"data.heldout_samples={held} holds out {min(held, n)} of the {n} samples of {source}, leaving {left} "
        f"for training, fewer than one global batch (train.global_batch_size={batch}); {fix}"
    )


def split_heldout(dataset: Any, cfg: Config, source: str) -> tuple[Any, range | None]:
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


class FirstSamples:
    """The first ``n`` samples of a dataset as their own dataset (``data.max_samples``,
    ``data.heldout_samples``); keeps its ``manifest``."""

    def __init__(self, dataset: Any, n: int) -> None:
        self.dataset = dataset
        self.n = min(n, len(dataset))
        self.manifest = getattr(dataset, "manifest", None)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.dataset[i]

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return sample_tokens_of(self.dataset, i)


class EpochOrder:
    """Deterministic, rank-sharded sample order with a resumable cursor."""

    def __init__(
        self,
        num_samples: int,
        *,
        global_batch: int,
        local_batch: int,
        rank: int,
        world: int,
        seed: int,
        shuffle: bool,
    ) -> None:
        if num_samples < global_batch:
            raise DataError(
                f"the dataset has {num_samples} samples, fewer than one global batch of {global_batch}; "
                f"lower train.global_batch_size or add data"
            )
        self.num_samples, self.global_batch, self.local_batch = num_samples, global_batch, local_batch
        self.rank, self.world, self.seed, self.shuffle = rank, world, seed, shuffle
        self.steps_per_epoch = num_samples // global_batch
        self.micro_per_epoch = self.steps_per_epoch * global_batch // (world * local_batch)

    def rank_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            perm = list(range(self.num_samples))
        used = perm[: self.steps_per_epoch * self.global_batch]
        return used[self.rank :: self.world]

    def micro_batches(self, cursor: DataCursor):
        """Yield ``(indices, cursor_after)`` forever, starting at ``cursor``."""
        epoch, micro = cursor.epoch, cursor.micro_batch
        while True:
            order = self.rank_indices(epoch)
            for m in range(micro, self.micro_per_epoch):
                idx = order[m * self.local_batch : (m + 1) * self.local_batch]
                nxt = DataCursor(epoch, m + 1) if m + 1 < self.micro_per_epoch else DataCursor(epoch + 1, 0)
                yield idx, nxt
            epoch, micro = epoch + 1, 0


def sample_generators(seed: int, epoch: int, indices: list[int]) -> list[torch.Generator]:
    """One generator per sample, from (seed, epoch, sample index): anchors do not depend on
    the world size, the batch a sample lands in, or where a run was resumed."""
    return [torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + i) for i in indices]


def collate(samples: list[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into a batch; padding has ``loss_mask`` 0."""
    S = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    batch = {
        "input_ids": torch.full((B, S), pad_id, dtype=torch.long),
        "loss_mask": torch.zeros(B, S, dtype=torch.long),
        "attention_mask": torch.zeros(B, S, dtype=torch.long),
    }
    for key in ("hidden_states", "last_hidden_states"):
        if key in samples[0]:
            t = samples[0][key]
            batch[key] = torch.zeros(B, S, t.shape[-1], dtype=t.dtype)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        batch["input_ids"][b, :n] = torch.as_tensor(s["input_ids"])
        batch["loss_mask"][b, :n] = torch.as_tensor(s["loss_mask"]).long()
        batch["attention_mask"][b, :n] = 1
        for key in ("hidden_states", "last_hidden_states"):
            if key in batch:
                batch[key][b, :n] = s[key]
    return batch


class FeatureSource:
    """Adds target features to a batch: from the cache (offline) or by running the frozen
    target (online) with :class:`TargetFeatureExtractor`."""

    def __init__(self, mode: str, target_dir: str, layer_ids: list[int], device: str) -> None:
        self.extractor = None
        if mode == "online":
            self.extractor = TargetFeatureExtractor.from_pretrained(target_dir, layer_ids, device=device)

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.extractor is not None:
            feats = self.extractor(batch["input_ids"], batch["attention_mask"])
            batch["hidden_states"] = feats.hidden_states
            batch["last_hidden_states"] = feats.last_hidden_states
        return batch
