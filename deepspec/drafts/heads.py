"""DSpark's sequential (Markov) heads and confidence head (docs/DESIGN.md §2).

With ``e_k = W1[x_{k-1}]`` (``W1``: V x r embedding; ``x_{-1}`` is the anchor) and the
draft hidden state ``h_k`` at block position ``k``, the logit bias added to the parallel
backbone's logits ``U_k`` is:

* ``vanilla``: ``W2 e_k``
* ``gated``:   ``W2 (g ⊙ e_k)``, ``g = sigmoid(W_g [h_k ; e_k])``
* ``rnn``:     ``W2 tanh(W_o z)``, ``z = [s_{k-1} ; e_k ; h_k]``,
  ``s_k = σ(W_g z) ⊙ s_{k-1} + (1 − σ(W_g z)) ⊙ tanh(W_c z)``, ``s_{-1} = 0``
  (``W_g, W_c, W_o`` one joint linear split in three).

Training uses teacher forcing (ground-truth previous tokens); inference calls
:meth:`SequentialHead.step` left to right with the tokens just sampled.
The confidence head predicts ``c_k = sigmoid(w^T [h_k ; e_k])`` (or ``w^T h_k``).
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_TYPES = ("vanilla", "gated", "rnn")


class SequentialHead(nn.Module):
    def __init__(
        self, kind: str, vocab_size: int, rank: int, hidden_size: int, out_size: int | None = None
    ) -> None:
        """``W1`` embeds the previous *target* token (``vocab_size`` rows); ``W2`` writes a
        bias over the draft vocabulary (``out_size``, default ``vocab_size``)."""
        super().__init__()
        if kind not in HEAD_TYPES:
            raise ValueError(f"markov_head_type {kind!r} is not one of {', '.join(HEAD_TYPES)}")
        self.kind = kind
        self.rank = rank
        self.W1 = nn.Embedding(vocab_size, rank)
        self.W2 = nn.Linear(rank, out_size or vocab_size, bias=False)
        if kind == "gated":
            self.W_g = nn.Linear(hidden_size + rank, rank)
        elif kind == "rnn":
            self.W_gco = nn.Linear(2 * rank + hidden_size, 3 * rank)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.W1.weight, std=0.02)
        nn.init.zeros_(self.W2.weight)  # starts as the plain parallel drafter

    def init_state(self, batch_shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        return like.new_zeros(*batch_shape, self.rank) if self.kind == "rnn" else None

    def _mix(self, h: torch.Tensor, e: torch.Tensor, state: torch.Tensor | None):
        """One position: ``h`` [..., d], ``e`` [..., r] → (pre-W2 vector [..., r], new state)."""
        if self.kind == "vanilla":
            return e, state
        if self.kind == "gated":
            return torch.sigmoid(self.W_g(torch.cat([h, e], -1))) * e, state
        z = torch.cat([state, e, h], -1)
        g, c, o = self.W_gco(z).chunk(3, dim=-1)
        g = torch.sigmoid(g)
        new_state = g * state + (1 - g) * torch.tanh(c)
        return torch.tanh(o), new_state

    def forward(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced pre-``W2`` vectors ``[..., G, r]`` for ``hidden`` [..., G, d] and
        ``prev_tokens`` [..., G]; the logit bias is ``self.W2(result)``."""
        e = self.W1(prev_tokens).to(hidden.dtype)
        if self.kind != "rnn":
            return self._mix(hidden, e, None)[0]
        state = self.init_state(hidden.shape[:-2], hidden)
        outs = []
        for k in range(hidden.shape[-2]):
            out, state = self._mix(hidden[..., k, :], e[..., k, :], state)
            outs.append(out)
        return torch.stack(outs, dim=-2)

    def step(
        self, hidden: torch.Tensor, prev_token: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inference at one position: ``hidden`` [B, d], ``prev_token`` [B] →
        (logit bias [B, V_draft], new state)."""
        out, state = self._mix(hidden, self.W1(prev_token).to(hidden.dtype), state)
        return self.W2(out), state


class ConfidenceHead(nn.Module):
    """``c_k = sigmoid(w^T [h_k ; e_k])`` (``e_k`` omitted when ``markov_dim == 0``); returns logits."""

    def __init__(self, hidden_size: int, markov_dim: int) -> None:
        super().__init__()
        self.markov_dim = markov_dim
        self.proj = nn.Linear(hidden_size + markov_dim, 1)

    def forward(self, hidden: torch.Tensor, markov_embed: torch.Tensor | None) -> torch.Tensor:
        x = hidden if self.markov_dim == 0 else torch.cat([hidden, markov_embed.to(hidden.dtype)], -1)
        return self.proj(x).squeeze(-1)
