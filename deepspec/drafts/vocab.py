"""A pruned draft vocabulary (``model.draft_vocab_size``): the draft scores only the N
target tokens it will most often have to draft.

The vocabulary is the N most frequent *supervised* tokens (loss mask 1: what the draft is
trained to predict) of the training samples, ties broken by the lower id; when fewer than
N distinct tokens are seen, the lowest unseen ids fill it up. Draft index ``i`` stands for
target id ``draft_ids[i]``, with ``draft_ids`` ascending. Stored as the engines read it:

* ``d2t`` [N] int64 offsets, ``target = draft + d2t[draft]`` (vLLM, SGLang, llama.cpp);
* ``t2d`` [V] bool, which target ids the draft vocabulary holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepspec.data.cache_reader import REBUILD_HINT, sample_tokens_of
from deepspec.errors import DataError


@dataclass(frozen=True)
class DraftVocab:
    draft_ids: torch.Tensor  # [N] int64, ascending target ids
    coverage: float  # share of the counted supervised tokens inside the vocabulary
    seen: int  # distinct supervised tokens in the data
    counted: int  # supervised tokens counted

    def describe(self) -> str:
        n = int(self.draft_ids.numel())
        fill = f" ({n - self.seen} unseen ids fill it up)" if self.seen < n else ""
        return (
            f"draft vocabulary: {n} of the target's tokens cover {100 * self.coverage:.2f}% of "
            f"{self.counted} supervised training tokens ({self.seen} distinct){fill}"
        )


def count_supervised_tokens(
    dataset: Any, vocab_size: int, indices: Sequence[int] | None = None, progress: bool = False
) -> np.ndarray:
    """How often each target id appears at a supervised position (int64 ``[vocab_size]``)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    indices = range(len(dataset)) if indices is None else indices
    it = indices
    if progress:
        from tqdm import tqdm

        it = tqdm(indices, desc="draft vocabulary", unit="sample", leave=False)
    for i in it:
        ids, mask = sample_tokens_of(dataset, int(i))
        picked = np.asarray(ids)[np.asarray(mask).astype(bool)]
        if picked.size and (int(picked.min()) < 0 or int(picked.max()) >= vocab_size):
            low, high = int(picked.min()), int(picked.max())
            raise _bad_token_id(dataset, int(i), low if low < 0 else high, vocab_size)
        counts += np.bincount(picked, minlength=vocab_size)
    return counts


def _bad_token_id(dataset: Any, i: int, token: int, vocab_size: int) -> DataError:
    """The error for sample ``i`` holding ``token`` outside ``[0, vocab_size)``.

    The scan reads token ids without the per-sample checksum (it would hash every hidden
    state); a target cache checks the sample now (its checksum, and its ids when it knows
    the vocabulary), so damaged bytes are reported as a damaged cache naming its shard and
    row, not as data built for another target."""
    cache = dataset
    while not hasattr(cache, "check_sample") and hasattr(cache, "dataset"):  # FirstSamples
        cache = cache.dataset
    if not hasattr(cache, "check_sample"):  # conversations tokenized in the run
        return DataError(
            f"training sample {i} holds token id {token} outside the target vocabulary [0, {vocab_size}); "
            "the data was tokenized for another target: rebuild it with this target"
        )
    verify = f"python -m deepspec.data.cache_reader {cache.path} checks every sample"
    try:
        cache.check_sample(i)
    except DataError as exc:
        return DataError(f"{exc} ({verify})")
    return DataError(
        f"target cache {cache.path}: sample {i} holds token id {token} outside the target's vocabulary "
        f"[0, {vocab_size}) although its checksum matches; {REBUILD_HINT} ({verify})"
    )


def select_draft_vocab(counts: np.ndarray, size: int) -> DraftVocab:
    """The ``size`` most frequent ids of ``counts`` (ties: lower id), unseen ids (lowest
    first) when fewer are seen; ``draft_ids`` ascending."""
    V = int(counts.shape[0])
    if not 0 < size <= V:
        raise ValueError(f"draft vocabulary size {size} must be in 1..{V} (the target vocabulary)")
    order = np.lexsort((np.arange(V), -counts))  # count descending, then id ascending
    chosen = np.sort(order[:size])
    total = int(counts.sum())
    return DraftVocab(
        draft_ids=torch.from_numpy(chosen.astype(np.int64)),
        coverage=float(counts[chosen].sum() / total) if total else 0.0,
        seen=int((counts > 0).sum()),
        counted=total,
    )


def build_draft_vocab(
    dataset: Any, vocab_size: int, size: int, indices: Sequence[int] | None = None, progress: bool = False
) -> DraftVocab:
    """Count the supervised tokens of ``dataset`` and keep the ``size`` most frequent."""
    return select_draft_vocab(count_supervised_tokens(dataset, vocab_size, indices, progress), size)


def d2t_from_ids(draft_ids: torch.Tensor) -> torch.Tensor:
    """Offsets ``d2t[i] = draft_ids[i] - i`` (int64 ``[N]``)."""
    return draft_ids.long() - torch.arange(draft_ids.numel(), device=draft_ids.device)


def t2d_from_ids(draft_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool ``[vocab_size]``: True at the ids in ``draft_ids``."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=draft_ids.device)
    mask[draft_ids.long()] = True
    return mask


def check_vocab_maps(d2t: torch.Tensor, t2d: torch.Tensor) -> torch.Tensor:
    """The target ids of a stored ``(d2t, t2d)`` pair, after checking they agree: strictly
    ascending ids inside the vocabulary, exactly the ids ``t2d`` marks. Raises ``ValueError``."""
    ids = d2t.long() + torch.arange(d2t.numel(), device=d2t.device)
    V = t2d.numel()
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= V:
        raise ValueError(f"d2t maps outside the target vocabulary [0, {V})")
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError("d2t does not give strictly ascending target ids")
    if int(t2d.sum()) != ids.numel() or not bool(t2d[ids].all()):
        raise ValueError("t2d does not mark exactly the target ids of d2t")
    return ids
