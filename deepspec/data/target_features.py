"""Capture the frozen target's context features: hidden states of chosen decoder layers.

Layer-id convention (recorded in every cache and checkpoint):

* ``i >= 0`` — the **output of decoder layer i** (0-based), before the final norm. This is
  ``output_hidden_states[i + 1]`` of a Hugging Face model for every ``i`` except the last
  layer, where HF returns the *normed* state instead.
* ``-1`` — the **embedding output**, after any family scaling (Gemma multiplies by
  ``sqrt(hidden_size)``), i.e. the input of decoder layer 0 (``output_hidden_states[0]``).

``last_hidden_states`` is the final normed hidden state, the LM head's input.

Only the base model runs (no LM head, no ``[B, S, V]`` logits): forward hooks on the
decoder layers collect what is needed, and the base model's own output is the final
normed state. Used by the offline cache writer and the trainer's online mode.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deepspec.errors import TargetError

LAYER_ID_CONVENTION = "output of decoder layer i (0-based); -1 = embedding output after scaling"


@dataclass
class TargetFeatures:
    """Features of one batch, in the dtype the target ran in."""

    hidden_states: torch.Tensor  # [B, S, L*d]: layer outputs in target_layer_ids order
    last_hidden_states: torch.Tensor  # [B, S, d]: final normed hidden state (LM head input)


def find_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The base decoder (embeddings + ``layers`` + final norm) of a CausalLM or base model."""
    base = model
    if hasattr(model, "get_decoder"):
        try:
            base = model.get_decoder()
        except (AttributeError, NotImplementedError):
            base = model
    if base is None or not hasattr(base, "layers"):
        base = getattr(model, "model", model)
    if hasattr(base, "language_model") and not hasattr(base, "layers"):
        base = base.language_model
    if not hasattr(base, "layers"):
        raise TargetError(f"cannot find the decoder layers of {type(model).__name__}")
    return base


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple | list) else value


@contextlib.contextmanager
def capture_layers(base: torch.nn.Module, layer_ids: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Forward hooks that store, while the context is open, the output of decoder layer
    ``i`` (``-1``: the input of layer 0, i.e. the scaled embedding) in the yielded dict."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer_id in layer_ids:
        if layer_id < 0:

            def embed_hook(module: Any, args: tuple, kwargs: dict) -> None:
                captured[-1] = args[0] if args else kwargs["hidden_states"]

            handles.append(base.layers[0].register_forward_pre_hook(embed_hook, with_kwargs=True))
        else:

            def layer_hook(module: Any, args: tuple, output: Any, layer_id: int = layer_id) -> None:
                captured[layer_id] = _first_tensor(output)

            handles.append(base.layers[layer_id].register_forward_hook(layer_hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class TargetFeatureExtractor:
    """Run the target's base model and return :class:`TargetFeatures`.

    ``model`` is an HF CausalLM (or its base model), already on its device and in eval
    mode; ``layer_ids`` follow the module docstring's convention and must be distinct and
    inside ``-1 .. num_layers - 1``.
    """

    def __init__(self, model: torch.nn.Module, layer_ids: Sequence[int]) -> None:
        self.model = model
        self.base = find_decoder(model)
        self.num_layers = len(self.base.layers)
        self.layer_ids = [int(i) for i in layer_ids]
        bad = [i for i in self.layer_ids if i < -1 or i >= self.num_layers]
        if not self.layer_ids or bad or len(set(self.layer_ids)) != len(self.layer_ids):
            raise TargetError(
                f"target_layer_ids {self.layer_ids} invalid for a target with {self.num_layers} layers "
                f"(distinct ids in -1..{self.num_layers - 1})"
            )
        self.hidden_size = int(self.base.config.hidden_size)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike[str],
        layer_ids: Sequence[int],
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        attn_implementation: str | None = "sdpa",
    ) -> TargetFeatureExtractor:
        """Load a local HF target directory frozen, in ``dtype`` on ``device``."""
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"dtype": dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(os.fspath(model_dir), **kwargs)
        except Exception as exc:
            raise TargetError(f"cannot load target {model_dir}: {type(exc).__name__}: {exc}") from exc
        model.to(device).eval().requires_grad_(False)
        return cls(model, layer_ids)

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base.parameters()).dtype

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TargetFeatures:
        """``input_ids`` / ``attention_mask``: ``[B, S]`` (right padding; 1 = real token).

        Returns features for every position; rows of padded positions are meaningless.
        """
        with capture_layers(self.base, self.layer_ids) as captured:
            out = self.base(
                input_ids=input_ids.to(self.device),
                attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                use_cache=False,
            )
        missing = [i for i in self.layer_ids if i not in captured]
        if missing:
            raise TargetError(f"the target's forward did not run layers {missing}")
        hidden = torch.cat([captured[i] for i in self.layer_ids], dim=-1)
        return TargetFeatures(hidden_states=hidden, last_hidden_states=out.last_hidden_state)
