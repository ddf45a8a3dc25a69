"""DSpark: the DFlash backbone + a sequential (Markov) head + a confidence head (docs/DESIGN.md §2).

The backbone drafts the block's base logits ``U_k`` in one pass; the sequential head adds
a bias that depends on the previous token, so inference samples left to right:
``x_k ~ softmax(U_k + bias(x_{k-1}, h_k))``. The confidence head estimates the
probability that ``x_k`` survives verification given that ``x_{<k}`` did.
"""

from __future__ import annotations

import torch

from deepspec.drafts.base import DraftConfig
from deepspec.drafts.dflash import BlockTrainOutput, DFlashDraft
from deepspec.drafts.heads import ConfidenceHead, SequentialHead
from deepspec.drafts.layers import init_weights
from deepspec.drafts.state import KVCache, Proposal


class DSparkDraft(DFlashDraft):
    algorithm = "dspark"

    def __init__(self, config: DraftConfig) -> None:
        super().__init__(config)
        spec = self.spec
        rank = config.markov_rank
        self.markov_head = (
            SequentialHead(
                config.markov_head_type,
                spec.vocab_size,
                rank,
                spec.hidden_size,
                out_size=self.lm_head.weight.shape[0],
            )
            if rank > 0
            else None
        )
        if self.markov_head is not None:
            self.markov_head.reset_parameters()
        conf_dim = rank if (rank > 0 and config.confidence_head_with_markov) else 0
        self.confidence_head = ConfidenceHead(spec.hidden_size, conf_dim) if config.confidence_head else None
        if self.confidence_head is not None:
            init_weights(self.confidence_head)
        # STS temperatures per block position [G] in fp32 (deepspec.eval.calibration), read
        # from the checkpoint's calibration file by load_draft; None = 1. Not a buffer: a
        # bf16 draft must not round them.
        self.confidence_temperatures: torch.Tensor | None = None

    def survival_probability(self, confidence_logits: torch.Tensor) -> torch.Tensor:
        """``sigmoid(l_k / T_k)`` of the confidence logits ``[B, G]``: the (calibrated)
        probability that token ``k`` survives given that tokens ``< k`` did."""
        logits = confidence_logits.float()
        if self.confidence_temperatures is not None:
            logits = (
                logits / self.confidence_temperatures.to(logits.device, torch.float32)[: logits.shape[-1]]
            )
        return torch.sigmoid(logits)

    def block_logits(self, hidden: torch.Tensor, markov: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.lm_logits(hidden)
        if markov is not None:
            logits = logits + self.markov_head.W2(markov.to(hidden.dtype)).to(logits.dtype)
        return logits

    def _confidence(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor | None:
        if self.confidence_head is None:
            return None
        e = self.markov_head.W1(prev_tokens) if self.confidence_head.markov_dim else None
        return self.confidence_head(hidden, e)

    def _add_heads(self, out: BlockTrainOutput) -> BlockTrainOutput:
        if self.markov_head is not None:
            out.markov = self.markov_head(out.hidden, out.prev_tokens)
        out.confidence_logits = self._confidence(out.hidden, out.prev_tokens)
        return out

    @torch.no_grad()
    def propose(
        self,
        state: KVCache,
        anchor_tokens: torch.Tensor,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Proposal:
        """Backbone once, then sample left to right through the sequential head."""
        hidden = self.backbone(state, anchor_tokens)  # [B, G, d]
        base = self.lm_logits(hidden).float()  # U_k
        if self.markov_head is None:
            tokens, probs = self.sample(base, temperature, generator)
            conf = self._confidence(hidden, torch.cat([anchor_tokens[:, None], tokens[:, :-1]], 1))
            return Proposal(tokens, probs, base, None if conf is None else self.survival_probability(conf))
        prev = anchor_tokens
        state_h = self.markov_head.init_state((hidden.shape[0],), hidden)
        tokens, probs, logits, prevs = [], [], [], []
        for k in range(self.block_size):
            bias, state_h = self.markov_head.step(hidden[:, k], prev, state_h)
            logit = base[:, k] + bias.float()
            token, prob = self.sample(logit, temperature, generator)
            prevs.append(prev)
            tokens.append(token)
            probs.append(prob)
            logits.append(logit)
            prev = token
        conf = self._confidence(hidden, torch.stack(prevs, 1))
        return Proposal(
            tokens=torch.stack(tokens, 1),
            probs=torch.stack(probs, 1),
            logits=torch.stack(logits, 1),
            confidence=None if conf is None else self.survival_probability(conf),
        )
