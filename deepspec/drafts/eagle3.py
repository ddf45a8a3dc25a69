"""Eagle3: an autoregressive drafter trained with a training-time test (docs/DESIGN.md §2).

Indexing: draft position ``t`` of a sequence of length S (``t = 0 .. S-2``) reads token
``x_{t+1}`` (RoPE position ``t+1``) and the projected target features ``g_t = fc(f_t)`` of
position ``t``, and predicts ``x_{t+2}``; so the first draft after an anchor at position
``a`` uses ``(x_a, g_{a-1})`` and predicts ``x_{a+1}``, as the block drafters do.

The first decoder layer's attention input is ``[RMSNorm(embed(x)) ; RMSNorm(h)]`` (2d) and
its residual stream is ``h``; ``h`` is ``g`` at step 0 and the draft's own output hidden
state at later steps.

Training-time test (TTT), unrolled ``ttt_length`` steps: step ``s`` at index ``t`` reads
token ``x_{t+1+s}`` at position ``t+1+s`` and the output of step ``s-1`` at the same index,
and predicts ``x_{t+2+s}``. It attends to the step-0 keys of indices ``<= t`` and to the keys
of steps ``1..s`` at index ``t`` — exactly what chain drafting with a KV cache sees at
inference, so the two agree position for position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepspec.config import Config
from deepspec.drafts.base import DraftConfig, DraftModel
from deepspec.drafts.blocks import sample_anchors
from deepspec.drafts.layers import DecoderLayer, RotaryEmbedding, attend, norm_for
from deepspec.drafts.state import KVCache, Proposal


@dataclass
class Eagle3TrainOutput:
    """K = ttt_length steps over T = S-1 draft positions.

    hidden:        [B, K, T, d] final-normed draft states per step
    targets:       [B, K, T] ground-truth token t+2+s
    target_hidden: [B, K, T, d] target final hidden state at t+1+s (gives p_t)
    mask:          [B, K, T] supervised and in range
    target_pos:    [B, K, T] position of that target state (t+1+s, clamped)
    target_lse:    [B, K, T] the target's full-vocabulary log-normaliser there (pruned
                   draft vocabulary) or None
    """

    hidden: torch.Tensor
    targets: torch.Tensor
    target_hidden: torch.Tensor
    mask: torch.Tensor
    target_pos: torch.Tensor
    target_lse: torch.Tensor | None = None


def supervised_mask(loss_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """``[B, K, T = S-1]``: step ``s`` at draft index ``t`` predicts token ``t+2+s``; the row is
    supervised when that token is in the sequence and an answer token (``loss_mask``). The
    forward's ``mask`` and the loss normaliser of :func:`prepare_batch` both come from here."""
    S = loss_mask.shape[1]
    t = torch.arange(S - 1, device=loss_mask.device)
    rows = []
    for s in range(steps):
        predicted = t + 2 + s
        rows.append((predicted < S) & loss_mask[:, predicted.clamp(max=S - 1)].bool())
    return torch.stack(rows, 1)


def prepare_batch(cfg: Config, batch: dict[str, torch.Tensor], generator, probe: bool = False):
    """``(forward keyword arguments, [K] supervised rows per step)`` of one micro-batch: every
    draft index, or ``model.eagle3_num_positions`` sampled ones (the anchors' indices)."""
    mask = supervised_mask(batch["loss_mask"], cfg.model.ttt_length)  # [B, K, T]
    if not cfg.model.eagle3_num_positions:
        return {}, mask.sum(dim=(0, 2)).double()
    anchors, keep = sample_anchors(batch["loss_mask"], cfg.model.eagle3_num_positions, generator)
    index = (anchors - 1).clamp(min=0)[:, None, :].expand(-1, mask.shape[1], -1)
    picked = torch.gather(mask, 2, index) & (keep & (anchors >= 1))[:, None, :]
    return {"anchors": anchors, "keep": keep}, picked.sum(dim=(0, 2)).double()


def ttt_attention(q, k0, v0, extra_k, extra_v, scale, chunk: int = 1024) -> torch.Tensor:
    """Step-s attention: causal over step-0 keys ``k0/v0`` [B, KVH, T, hd] plus the
    diagonal keys of later steps (``extra_k/v``: list of [B, KVH, T, hd]); ``q`` [B, H, T, hd]."""
    groups = q.shape[1] // k0.shape[1]
    rep = (lambda t: t.repeat_interleave(groups, dim=1)) if groups > 1 else (lambda t: t)
    k0, v0 = rep(k0), rep(v0)
    ek = torch.stack([rep(k) for k in extra_k], dim=-2)  # [B, H, T, s, hd]
    ev = torch.stack([rep(v) for v in extra_v], dim=-2)
    T = q.shape[2]
    outs = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        qc = q[:, :, t0:t1].float()
        causal = torch.arange(t1, device=q.device)[None, :] <= torch.arange(t0, t1, device=q.device)[:, None]
        s0 = (qc @ k0[:, :, :t1].float().transpose(-1, -2)) * scale
        s0 = s0.masked_fill(~causal, float("-inf"))
        sd = (qc.unsqueeze(-2) * ek[:, :, t0:t1].float()).sum(-1) * scale  # [B, H, c, s]
        p = torch.softmax(torch.cat([s0, sd], -1), dim=-1)
        o = p[..., :t1] @ v0[:, :, :t1].float() + (p[..., t1:].unsqueeze(-1) * ev[:, :, t0:t1].float()).sum(
            -2
        )
        outs.append(o.to(q.dtype))
    return torch.cat(outs, dim=2)


def select_positions(
    out: Eagle3TrainOutput, anchors: torch.Tensor, keep: torch.Tensor | None
) -> Eagle3TrainOutput:
    """Restrict a TTT output to draft indices ``anchors - 1`` (anchor 0 has no index)."""
    index = (anchors - 1).clamp(min=0)  # [B, N]
    valid = anchors >= 1 if keep is None else keep & (anchors >= 1)
    K = out.hidden.shape[1]

    def pick(t: torch.Tensor) -> torch.Tensor:  # [B, K, T, ...] -> [B, K, N, ...]
        idx = index.reshape(index.shape[0], 1, index.shape[1], *([1] * (t.dim() - 3)))
        return torch.gather(t, 2, idx.expand(-1, K, -1, *t.shape[3:]))

    return Eagle3TrainOutput(
        hidden=pick(out.hidden),
        targets=pick(out.targets),
        target_hidden=pick(out.target_hidden),
        mask=pick(out.mask) & valid[:, None, :],
        target_pos=pick(out.target_pos),
    )


@dataclass
class Eagle3State:
    cache: KVCache
    pending: torch.Tensor  # [B, L*d] target features of the last extended position


class Eagle3Draft(DraftModel):
    algorithm = "eagle3"

    def __init__(self, config: DraftConfig) -> None:
        super().__init__(config)
        spec = self.spec
        d = spec.hidden_size
        n = config.draft_num_hidden_layers
        self.layers = nn.ModuleList(
            [DecoderLayer(spec, 2 * d)] + [DecoderLayer(spec, layer_idx=i) for i in range(1, n)]
        )
        self.embed_norm = norm_for(spec, d)
        self.norm = norm_for(spec, d)
        self.rotary = RotaryEmbedding(spec)
        self.reset_parameters()

    @property
    def ttt_length(self) -> int:
        return self.config.ttt_length

    def block_logits(self, hidden: torch.Tensor, markov: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_logits(hidden)

    def _step(
        self, h: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, attn: Callable
    ) -> torch.Tensor:
        """One draft step on residual states ``h`` [B, T, d]; returns new residual states."""
        e = self.embed_norm(self.embed(tokens))
        cos, sin = self.rotary(positions)
        for layer in self.layers:
            h = layer(h, cos, sin, attn, prefix=e if layer.layer_idx == 0 else None)
        return h

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
        **_: object,
    ) -> Eagle3TrainOutput:
        """TTT unroll; shapes as in :class:`Eagle3TrainOutput` (inputs as for DFlash).

        With ``anchors`` [B, N] (and ``keep``), the output covers only draft indices
        ``anchors - 1`` (T becomes N): the same (position, depth) pairs a block drafter with
        those anchors supervises, at a fraction of the LM-head cost.
        """
        B, S = input_ids.shape
        T = S - 1
        t = torch.arange(T, device=input_ids.device)
        h = self.fc(hidden_states[:, :T].to(self.fc.weight.dtype))
        k0: list = [None] * len(self.layers)
        v0: list = [None] * len(self.layers)
        extra_k: list[list] = [[] for _ in self.layers]
        extra_v: list[list] = [[] for _ in self.layers]
        hidden, targets, target_pos = [], [], []
        for s in range(self.ttt_length):
            pos = t + 1 + s
            tokens = input_ids[:, pos.clamp(max=S - 1)]

            def attn(layer, q, k, v, s=s):
                i = layer.layer_idx
                if s == 0:
                    k0[i], v0[i] = k, v
                    groups = q.shape[1] // k.shape[1]
                    return F.scaled_dot_product_attention(
                        q,
                        k.repeat_interleave(groups, 1),
                        v.repeat_interleave(groups, 1),
                        is_causal=True,
                        scale=layer.self_attn.scale,
                    )
                extra_k[i].append(k)
                extra_v[i].append(v)
                return ttt_attention(q, k0[i], v0[i], extra_k[i], extra_v[i], layer.self_attn.scale)

            h = self._step(h, tokens, pos[None].expand(B, -1), attn)
            hidden.append(self.norm(h))
            targets.append(input_ids[:, (pos + 1).clamp(max=S - 1)])
            target_pos.append(pos.clamp(max=S - 1))
        target_pos_t = torch.stack(target_pos)  # [K, T]
        out = Eagle3TrainOutput(
            hidden=torch.stack(hidden, 1),
            targets=torch.stack(targets, 1),
            target_hidden=last_hidden_states[:, target_pos_t],
            mask=supervised_mask(loss_mask, self.ttt_length),
            target_pos=target_pos_t.expand(B, -1, -1),
        )
        if anchors is not None:  # supervise only the sampled positions (draft index a - 1)
            out = select_positions(out, anchors, keep)
        out.target_lse = self.rows_lse(last_hidden_states, out.target_pos, out.mask)
        return out

    # -- inference (proposer protocol) -------------------------------------------------
    def new_state(self, batch_size: int, device: torch.device | str = "cpu") -> Eagle3State:
        spec = self.spec
        cache = KVCache(
            len(self.layers),
            batch_size,
            spec.full_kv_heads,
            spec.full_head_dim,
            self.fc.weight.dtype,
            torch.device(device),
            min_position=1,
        )
        pending = torch.zeros(batch_size, self.fc.in_features, dtype=self.fc.weight.dtype, device=device)
        return Eagle3State(cache, pending)

    def reset_rows(self, state: Eagle3State, rows: torch.Tensor) -> None:
        """Empty the rows ``rows`` (``[B]`` bool) of ``state`` for new sequences."""
        state.cache.reset_rows(rows)
        state.pending[rows] = 0

    def _cached_attn(self, cache: KVCache, starts: torch.Tensor, counts: torch.Tensor):
        """Attention that writes the new keys at ``starts`` and attends causally to the cache."""

        def attn(layer, q, k, v):
            i = layer.layer_idx
            T = q.shape[2]
            cache.write(i, k.transpose(1, 2), v.transpose(1, 2), starts, counts)
            upto = int((starts + T).max())
            kc, vc = cache.view(i, upto)
            last = starts[:, None] + torch.arange(T, device=q.device)  # [B, T] query positions
            j = torch.arange(upto, device=q.device)
            mask = (j[None, None] >= cache.min_position) & (j[None, None] <= last[..., None])
            return attend(q, kc, vc, mask[:, None], layer.self_attn.scale)

        return attn

    @torch.no_grad()
    def extend(
        self,
        state: Eagle3State,
        features: torch.Tensor,
        counts: torch.Tensor,
        tokens: torch.Tensor | None = None,
    ) -> None:
        """Add verified positions ``lengths[b] ...``: ``tokens`` [B, T] with their target
        ``features`` [B, T, L*d]; position ``p`` is keyed by ``(x_p, g_{p-1})``."""
        if tokens is None:
            raise ValueError("Eagle3 needs the tokens of the verified positions")
        cache = state.cache
        feats = features.to(state.pending.dtype)
        prev = torch.cat([state.pending[:, None], feats[:, :-1]], dim=1)
        positions = cache.lengths[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        self._step(self.fc(prev), tokens, positions, self._cached_attn(cache, cache.lengths, counts))
        has = counts > 0
        last = (counts - 1).clamp(min=0)
        state.pending = torch.where(has[:, None], feats[torch.arange(feats.shape[0]), last], state.pending)
        cache.lengths += counts

    @torch.no_grad()
    def propose(
        self,
        state: Eagle3State,
        anchor_tokens: torch.Tensor,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        num_tokens: int | None = None,
    ) -> Proposal:
        """Chain-draft ``num_tokens`` (default ``ttt_length``) tokens after ``anchor_tokens`` [B]."""
        n = num_tokens or self.ttt_length
        cache = state.cache
        cur = cache.lengths.clone()
        ones = torch.ones_like(cur)
        h = self.fc(state.pending)[:, None]
        token = anchor_tokens
        tokens, probs, logits = [], [], []
        for _ in range(n):
            h = self._step(h, token[:, None], cur[:, None], self._cached_attn(cache, cur, ones))
            logit = self.lm_logits(self.norm(h))[:, 0].float()
            token, prob = self.sample(logit, temperature, generator)
            tokens.append(token)
            probs.append(prob)
            logits.append(logit)
            cur = cur + 1
        return Proposal(torch.stack(tokens, 1), torch.stack(probs, 1), torch.stack(logits, 1))
