"""DFlash: a parallel block drafter conditioned on target features (docs/DESIGN.md §2).

Architecture choices:
- context = RMSNorm(fc(concat of target layer outputs)), one vector per target position;
- ``num_draft_layers`` decoder layers in the target family's style; in attention the
  queries come from the block only, keys/values are ``W_k/W_v`` applied to the context
  *and* to the block (same projections), so a block position sees context ``< anchor``
  and its whole block (bidirectionally);
- per-head q/k norms as the target family has them, or as ``model.qk_norm`` says
  (llama.cpp's DFlash/DSpark graph needs them);
- RoPE: context position ``j`` keeps index ``j``, block position ``k`` has ``a + k``;
- block input: the anchor's embedding, then ``block_size - 1`` mask embeddings (the
  configured ``mask_token_id``'s embedding, or a learned vector when the target has no
  spare id);
- one pass yields ``block_size`` logits; position ``k`` predicts token ``a + 1 + k``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from deepspec.config import Config
from deepspec.drafts.base import DraftConfig, DraftModel
from deepspec.drafts.blocks import block_attention, block_targets, recent_context_attention, sample_anchors
from deepspec.drafts.layers import DecoderLayer, RotaryEmbedding, attend, norm_for
from deepspec.drafts.losses import block_weights
from deepspec.drafts.state import KVCache, Proposal


@dataclass
class BlockTrainOutput:
    """Training forward of a block drafter; N blocks per sequence, G = block_size.

    hidden:        [B, N, G, d] final-normed draft states (the LM head's input)
    prev_tokens:   [B, N, G] token before each position (anchor, then ground truth)
    targets:       [B, N, G] ground-truth token a+1+k
    target_hidden: [B, N, G, d] target final hidden state at a+k (gives p_t)
    eval_mask:     [B, N, G] contiguous valid prefix of each kept block
    keep:          [B, N] False for dummy blocks
    anchors:       [B, N]
    markov:        [B, N, G, r] teacher-forced pre-W2 head vectors (DSpark) or None
    confidence_logits: [B, N, G] (DSpark with a confidence head) or None
    target_lse:    [B, N, G] the target's full-vocabulary log-normaliser at a+k (pruned
                   draft vocabulary) or None
    attention_probe: per layer, block slot 0's attention on the newest context (when asked)
    """

    hidden: torch.Tensor
    prev_tokens: torch.Tensor
    targets: torch.Tensor
    target_hidden: torch.Tensor
    eval_mask: torch.Tensor
    keep: torch.Tensor
    anchors: torch.Tensor
    markov: torch.Tensor | None = None
    confidence_logits: torch.Tensor | None = None
    target_lse: torch.Tensor | None = None
    attention_probe: dict[str, float] = field(default_factory=dict)


def prepare_batch(cfg: Config, batch: dict[str, torch.Tensor], generator, probe: bool = False):
    """``(forward keyword arguments, local loss normaliser Σw)`` of one micro-batch of a block
    drafter: ``model.num_anchors`` anchors per sequence; ``probe`` asks the forward to measure
    where block slot 0 looks (logged steps)."""
    anchors, keep = sample_anchors(batch["loss_mask"], cfg.model.num_anchors, generator)
    *_, eval_mask = block_targets(batch["input_ids"], batch["loss_mask"], anchors, keep, cfg.model.block_size)
    weight = block_weights(eval_mask, cfg.model.loss_decay_gamma, torch.float64).sum()
    return {"anchors": anchors, "keep": keep, "probe_attention": probe}, weight


class DFlashDraft(DraftModel):
    algorithm = "dflash"

    def __init__(self, config: DraftConfig) -> None:
        super().__init__(config)
        spec = self.spec
        d = spec.hidden_size
        self.context_norm = norm_for(spec, d)
        layer_spec = spec
        if config.qk_norm is not None and config.qk_norm != spec.rule.qk_norm:
            layer_spec = replace(spec, rule=replace(spec.rule, qk_norm=config.qk_norm))
        self.layers = nn.ModuleList(
            DecoderLayer(layer_spec, layer_idx=i) for i in range(config.num_draft_layers)
        )
        self.norm = norm_for(spec, d)
        self.rotary = RotaryEmbedding(spec)
        self.mask_embedding = nn.Parameter(torch.zeros(d)) if config.mask_token_id is None else None
        self.attention_backend = "auto"
        self.anchor_chunk = 64
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        super().reset_parameters(std)
        if self.mask_embedding is not None:
            nn.init.normal_(self.mask_embedding, std=0.02)

    # -- pieces ------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.config.block_size

    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """Target features [..., L*d] → context vectors [..., d]."""
        return self.context_norm(self.fc(features.to(self.fc.weight.dtype)))

    def block_inputs(self, anchor_tokens: torch.Tensor) -> torch.Tensor:
        """Anchor tokens [...] → block input embeddings [..., G, d]."""
        first = self.embed(anchor_tokens)
        if self.mask_embedding is None:
            mask = self.embed(torch.full_like(anchor_tokens, self.config.mask_token_id))
        else:
            mask = self.mask_embedding.to(first.dtype).expand_as(first)
        rest = mask.unsqueeze(-2).expand(*first.shape[:-1], self.block_size - 1, first.shape[-1])
        return torch.cat([first.unsqueeze(-2), rest], dim=-2)

    def _layers(self, h: torch.Tensor, positions: torch.Tensor, attn: Callable) -> torch.Tensor:
        """Run the decoder stack on block states ``h`` [..., G, d] at RoPE ``positions``
        [..., G]; ``attn(layer, q, kb, vb)`` returns the attention output of ``layer``."""
        cos, sin = self.rotary(positions)
        for layer in self.layers:
            h = layer(h, cos, sin, attn)
        return self.norm(h)

    def block_logits(self, hidden: torch.Tensor, markov: torch.Tensor | None = None) -> torch.Tensor:
        """Draft logits [..., V] from final states ``hidden`` [..., d] (+ the Markov bias)."""
        return self.lm_logits(hidden)

    # -- training ----------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        hidden_states: torch.Tensor,
        last_hidden_states: torch.Tensor,
        *,
        anchors: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        num_anchors: int = 512,
        generator: torch.Generator | None = None,
        probe_attention: bool = False,
    ) -> BlockTrainOutput:
        """All blocks of each sequence in one pass.

        ``input_ids``/``loss_mask`` [B, S]; ``hidden_states`` [B, S, L*d] target features;
        ``last_hidden_states`` [B, S, d] target final states. Anchors are sampled unless given.
        ``probe_attention`` also measures where block slot 0 looks (``attention_probe``).
        """
        if anchors is None:
            anchors, keep = sample_anchors(loss_mask, num_anchors, generator)
        elif keep is None:
            keep = torch.ones_like(anchors, dtype=torch.bool)
        G = self.block_size
        B, S = input_ids.shape
        prev_tokens, targets, target_pos, eval_mask = block_targets(input_ids, loss_mask, anchors, keep, G)
        ctx = self.project_context(hidden_states)  # [B, S, d]
        ctx_cos, ctx_sin = self.rotary(torch.arange(S, device=ctx.device))
        positions = anchors[..., None] + torch.arange(G, device=anchors.device)

        probe: dict[str, float] = {}

        def attn(layer, q, kb, vb):
            kc, vc = layer.self_attn.project_kv(ctx, ctx_cos, ctx_sin)
            if probe_attention:
                with torch.no_grad():
                    recent, uniform = recent_context_attention(
                        q, kb, kc, anchors, keep, layer.self_attn.scale, self.config.context_window
                    )
                probe[f"attn_recent8/layer{layer.layer_idx}"] = recent
                probe["attn_recent8/uniform"] = uniform
            return block_attention(
                q,
                kb,
                vb,
                kc,
                vc,
                anchors,
                layer.self_attn.scale,
                backend=self.attention_backend,
                chunk=self.anchor_chunk,
                window=self.config.context_window,
            )

        hidden = self._layers(self.block_inputs(prev_tokens[..., 0]), positions, attn)
        d = last_hidden_states.shape[-1]
        target_hidden = torch.gather(
            last_hidden_states, 1, target_pos.flatten(1)[..., None].expand(-1, -1, d)
        ).view(B, -1, G, d)
        out = BlockTrainOutput(
            hidden=hidden,
            prev_tokens=prev_tokens,
            targets=targets,
            target_hidden=target_hidden,
            eval_mask=eval_mask,
            keep=keep,
            anchors=anchors,
            target_lse=self.rows_lse(last_hidden_states, target_pos, eval_mask & keep[..., None]),
            attention_probe=probe,
        )
        return self._add_heads(out)

    def _add_heads(self, out: BlockTrainOutput) -> BlockTrainOutput:
        return out

    # -- inference (proposer protocol) -------------------------------------------------
    def new_state(self, batch_size: int, device: torch.device | str = "cpu") -> KVCache:
        """An empty context cache for ``batch_size`` sequences."""
        spec = self.spec
        return KVCache(
            len(self.layers),
            batch_size,
            spec.full_kv_heads,
            spec.full_head_dim,
            self.fc.weight.dtype,
            torch.device(device),
            window=self.config.context_window,
        )

    def reset_rows(self, state: KVCache, rows: torch.Tensor) -> None:
        """Empty the rows ``rows`` (``[B]`` bool) of ``state`` for new sequences."""
        state.reset_rows(rows)

    @torch.no_grad()
    def extend(
        self, state: KVCache, features: torch.Tensor, counts: torch.Tensor, tokens: torch.Tensor | None = None
    ) -> None:
        """Append target features of newly verified positions: ``features`` [B, T, L*d];
        row ``b`` adds its first ``counts[b]`` rows at positions ``lengths[b]...``."""
        ctx = self.project_context(features)
        positions = state.lengths[:, None] + torch.arange(features.shape[1], device=ctx.device)
        cos, sin = self.rotary(positions)
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.project_kv(ctx, cos, sin)  # [B, KVH, T, hd]
            state.write(i, k.transpose(1, 2), v.transpose(1, 2), state.lengths, counts)
        state.lengths += counts
        state.trim()

    @torch.no_grad()
    def backbone(self, state: KVCache, anchor_tokens: torch.Tensor) -> torch.Tensor:
        """Final block states [B, G, d] for anchors [B] at positions ``state.lengths``."""
        G = self.block_size
        positions = state.lengths[:, None] + torch.arange(G, device=anchor_tokens.device)
        upto = int(state.lengths.max())
        visible = state.mask(upto, G)  # [B, G, upto - offset]
        mask = torch.cat([visible, visible.new_ones(visible.shape[0], G, G)], -1)[:, None]

        def attn(layer, q, kb, vb):
            kc, vc = state.view(layer.layer_idx, upto)
            return attend(q, torch.cat([kc, kb], -2), torch.cat([vc, vb], -2), mask, layer.self_attn.scale)

        return self._layers(self.block_inputs(anchor_tokens), positions, attn)

    @torch.no_grad()
    def propose(
        self,
        state: KVCache,
        anchor_tokens: torch.Tensor,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Proposal:
        """Draft ``block_size`` tokens after ``anchor_tokens`` [B] (one backbone pass)."""
        hidden = self.backbone(state, anchor_tokens)
        logits = self.block_logits(hidden).float()
        tokens, probs = self.sample(logits, temperature, generator)
        return Proposal(tokens=tokens, probs=probs, logits=logits)
