"""Losses and training metrics (docs/DESIGN.md §2). Pure functions: they return terms and metrics;
the trainer reduces across ranks and logs.

The vocabulary-sized work runs through :mod:`deepspec.drafts.fused_head` (chunked, with an
analytic backward), so no ``[rows, V]`` tensor outlives its chunk.

Block drafters (DFlash, DSpark), position weights ``w_k = exp(-k / loss_decay_gamma)``
over the contiguous valid prefix of each block:
``L = (α_ce Σ w·CE + α_tv Σ w·‖p_d − p_t‖₁ + α_conf Σ w·BCE(c_k, c*_k)) / Σ w``,
``c*_k = 1 − ½‖p_d − p_t‖₁`` (detached). Eagle3: soft cross-entropy to ``p_t`` per TTT
step, mean over valid positions, weighted by ``step_loss_decay^s`` (the rows and normaliser
differ from the DeepSpec reference's on purpose: docs/REFERENCE.md).

Metrics with a ``ref_`` prefix follow the DeepSpec reference's definitions
(``ref_tau_probabilistic``: the mean over blocks of ``1 + Σ_k Π_{i<=k} a_i``, where deepspec's
``tau_probabilistic`` takes the product of per-slot means), so logged numbers can be compared
with the reference's and its paper's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from deepspec.drafts.fused_head import head_loss_rows


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backpropagate
    normalizer: torch.Tensor  # the weight sum(s) the loss was divided by (local unless given)
    metrics: dict[str, float] = field(default_factory=dict)


def position_weights(gamma: int, decay: float, device: torch.device | None = None) -> torch.Tensor:
    """``w_k = exp(-k / decay)`` for ``k = 0 .. gamma-1`` (float64)."""
    return torch.exp(-torch.arange(gamma, dtype=torch.float64, device=device) / decay)


def _float_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype loss maths runs in: fp64 stays fp64, everything else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def block_weights(eval_mask: torch.Tensor, decay_gamma: float, dtype: torch.dtype) -> torch.Tensor:
    """Position weights on the valid prefix: ``[..., G]`` (the local normalizer is its sum)."""
    G = eval_mask.shape[-1]
    return position_weights(G, decay_gamma, eval_mask.device).to(dtype) * eval_mask


def _reference_confidence_metrics(
    c: torch.Tensor, accept: torch.Tensor, mask: torch.Tensor, w: torch.Tensor
) -> dict[str, float]:
    """The confidence head's errors as the DeepSpec reference reports them: weighted by the
    loss's position decay ``w`` [R, G]; its cumulative products run over masked slots."""
    ws = w.sum().clamp(min=1e-12)
    err = c - accept
    cum = torch.cumprod(c * mask, -1) - torch.cumprod(accept * mask, -1)
    return {
        "ref_conf_abs_err": float((err.abs() * w).sum() / ws),
        "ref_conf_bias": float((err * w).sum() / ws),
        "ref_conf_cumprod_bias": float((cum * w).sum() / ws),
    }


def block_loss(
    model,
    out,
    *,
    ce_alpha: float,
    l1_alpha: float,
    conf_alpha: float,
    decay_gamma: float,
    normalizer: torch.Tensor | None = None,
) -> LossOutput:
    """Loss of a DFlash/DSpark :class:`BlockTrainOutput` ``out``.

    ``normalizer`` (the global Σw over ranks) defaults to the local Σw.
    """
    G, d = out.hidden.shape[-2:]
    keep = out.keep.reshape(-1)
    dtype = _float_dtype(out.hidden)
    mask = out.eval_mask.reshape(-1, G)[keep]  # [R, G]
    w = block_weights(mask, decay_gamma, dtype)
    W = w.sum() if normalizer is None else normalizer.to(dtype)
    wf = (w / W).reshape(-1)  # per row, normalised
    markov = None
    W2 = None
    if out.markov is not None:
        markov = out.markov.reshape(-1, G, out.markov.shape[-1])[keep].reshape(-1, out.markov.shape[-1])
        W2 = model.markov_head.W2.weight
    targets = model.draft_index(out.targets.reshape(-1, G)[keep].reshape(-1))
    rows = head_loss_rows(
        out.hidden.reshape(-1, G, d)[keep].reshape(-1, d),
        out.target_hidden.reshape(-1, G, d)[keep].reshape(-1, d),
        targets,
        model.lm_head.weight,
        a_ce=ce_alpha * wf,
        a_l1=l1_alpha * wf,
        a_soft=torch.zeros_like(wf),
        markov=markov,
        W2=W2,
        softcap=model.spec.final_logit_softcapping,
        target_lse=None if out.target_lse is None else out.target_lse.reshape(-1, G)[keep].reshape(-1),
    )
    loss = rows.loss
    ce, l1, accept, hit = (t.view(-1, G) for t in (rows.ce, rows.l1, rows.overlap, rows.hit))
    metrics: dict[str, float] = {}
    ws = w.sum().clamp(min=1e-12)
    if out.confidence_logits is not None:
        conf_logits = out.confidence_logits.reshape(-1, G)[keep].to(dtype)
        bce = F.binary_cross_entropy_with_logits(conf_logits, accept.clamp(0, 1), reduction="none")
        loss = loss + conf_alpha * (w * bce).sum() / W
        c = torch.sigmoid(conf_logits.detach())
        n = mask.sum().clamp(min=1)
        metrics["conf_loss"] = float((w * bce.detach()).sum() / ws)
        metrics["conf_abs_err"] = float(((c - accept).abs() * mask).sum() / n)
        metrics["conf_bias"] = float(((c - accept) * mask).sum() / n)
        cum_bias = (torch.cumprod(c, -1) - torch.cumprod(accept, -1)) * mask
        metrics["conf_cumprod_bias"] = float(cum_bias.sum() / n)
        metrics.update(_reference_confidence_metrics(c, accept, mask, w))
    labelled = (targets >= 0).view(-1, G).to(dtype)
    metrics["ce"] = float((w * labelled * ce).sum() / (w * labelled).sum().clamp(min=1e-12))
    metrics["l1"] = float((w * l1).sum() / ws)
    if model.pruned:
        metrics["draft_vocab_miss"] = float(((1 - labelled) * mask).sum() / mask.sum().clamp(min=1))
    per_pos = (accept * mask).sum(0) / mask.sum(0).clamp(min=1)  # [G] exact acceptance probability
    acc = (hit * mask).sum(0) / mask.sum(0).clamp(min=1)  # [G] argmax == label (teacher-forced)
    for k in range(G):
        metrics[f"accuracy@{k + 1}"] = float(acc[k])
        metrics[f"accept_rate@{k + 1}"] = float(per_pos[k])
    metrics["tau_probabilistic"] = float(1 + torch.cumprod(per_pos, 0).sum())
    metrics["ref_tau_probabilistic"] = float((1 + torch.cumprod(accept * mask, -1).sum(-1)).mean())
    metrics["supervised_positions"] = float(mask.sum())
    metrics.update(out.attention_probe)
    return LossOutput(loss, W, metrics)


def eagle3_loss(model, out, *, step_loss_decay: float, normalizer: torch.Tensor | None = None) -> LossOutput:
    """Loss of an :class:`Eagle3TrainOutput`. ``normalizer`` [K]: global valid counts per step."""
    B, K, T, d = out.hidden.shape
    dtype = _float_dtype(out.hidden)
    mask = out.mask.permute(1, 0, 2).reshape(K, -1).to(dtype)  # [K, B*T]
    counts = mask.sum(1) if normalizer is None else normalizer.to(dtype)
    decay = torch.tensor([step_loss_decay**s for s in range(K)], dtype=dtype, device=mask.device)
    a_soft = (mask * (decay / counts.clamp(min=1))[:, None]).reshape(-1)
    zeros = torch.zeros_like(a_soft)
    flat = lambda t: t.transpose(0, 1).reshape(K * B * T, *t.shape[3:])  # noqa: E731  [K*B*T, ...]
    rows = head_loss_rows(
        flat(out.hidden),
        flat(out.target_hidden),
        model.draft_index(flat(out.targets)),
        model.lm_head.weight,
        a_ce=zeros,
        a_l1=zeros,
        a_soft=a_soft,
        softcap=model.spec.final_logit_softcapping,
        target_lse=None if out.target_lse is None else flat(out.target_lse),
    )
    soft_ce, accept, hit = (t.view(K, B * T) for t in (rows.soft_ce, rows.overlap, rows.hit))
    metrics: dict[str, float] = {}
    n = mask.sum(1).clamp(min=1)
    for s in range(K):
        metrics[f"loss@{s + 1}"] = float((soft_ce[s] * mask[s]).sum() / n[s])
        metrics[f"accuracy@{s + 1}"] = float((hit[s] * mask[s]).sum() / n[s])
        metrics[f"accept_rate@{s + 1}"] = float((accept[s] * mask[s]).sum() / n[s])
    rates = torch.tensor([metrics[f"accept_rate@{s + 1}"] for s in range(K)])
    metrics["tau_probabilistic"] = float(1 + torch.cumprod(rates, 0).sum())
    metrics["supervised_positions"] = float(mask[0].sum())
    return LossOutput(rows.loss, counts, metrics)
