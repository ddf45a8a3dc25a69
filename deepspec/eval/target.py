"""The target side of speculative decoding: a KV-cached HF model that returns, for the
tokens it is fed, both its next-token logits and the context features a draft consumes
(outputs of ``target_layer_ids``; see :mod:`deepspec.data.target_features`).

The decode loop only needs the small protocol below, so tests can also plug in exact
lookup-table targets.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from deepspec.data.target_features import capture_layers, find_decoder


class Target(Protocol):
    vocab_size: int

    def reset(self) -> None:
        """Forget all cached positions."""

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``tokens`` [T] after the cached positions; returns ``logits`` [T, V] (fp32)
        and ``features`` [T, L*d]; the positions join the cache."""

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` cached positions."""


def cache_argument(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of ``model.forward``: ``cache`` in newer transformers 5.x,
    ``past_key_values`` in older 5.x (newer releases still accept it but warn)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def rollback_cache(config: Any) -> Any:
    """A ``DynamicCache`` for a model of ``config`` that can be cropped at any length.

    ``DynamicCache(config=...)`` gives sliding-window layers (Gemma 3/4, Mistral) a
    ``DynamicSlidingWindowLayer`` that drops positions older than the window, so it cannot
    be cropped once the window is full, while speculative decoding crops the rejected drafts
    every round. Here those layers keep every position, like full-attention layers; the
    window still holds, exactly as in ``generate``: the model builds sliding-window masks
    from its config on absolute positions. The price is memory and attention over the whole
    context on sliding-window layers."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=config)
    cache.layers = [
        DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer for layer in cache.layers
    ]
    return cache


class HFTarget:
    """An HF CausalLM with a ``DynamicCache`` that can be cropped at any length
    (:func:`rollback_cache`), batch 1."""

    def __init__(self, model: torch.nn.Module, layer_ids: Sequence[int]) -> None:
        self.model = model.eval()
        self.base = find_decoder(model)
        self.layer_ids = list(layer_ids)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.cache: Any = None
        self._cache_arg = cache_argument(model)

    def _run(self, tokens: torch.Tensor) -> Any:
        """One cached forward of ``tokens``; the model's cache replaces ``self.cache``."""
        out = self.model(
            input_ids=tokens.view(1, -1).to(self.device), use_cache=True, **{self._cache_arg: self.cache}
        )
        # the output field follows the argument's name; reading the other one warns
        self.cache = out[self._cache_arg] if self._cache_arg in out else self.cache
        return out

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset(self) -> None:
        self.cache = rollback_cache(self.model.config)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None:
            self.reset()
        with capture_layers(self.base, self.layer_ids) as captured:
            out = self._run(tokens)
        features = torch.cat([captured[i] for i in self.layer_ids], dim=-1)[0]
        return out.logits[0].float(), features

    @torch.inference_mode()
    def plain_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [T, V] without capturing features (plain decoding baseline)."""
        if self.cache is None:
            self.reset()
        return self._run(tokens).logits[0].float()

    def crop(self, length: int) -> None:
        extra = self.cache.get_seq_length() - length
        if extra > 0:
            self.cache.crop(-extra)  # negative = drop that many (every transformers 5.x)
