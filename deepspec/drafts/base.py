"""What every draft shares: its config, the frozen target embedding / LM head and the context
projection. The inference state (KV cache, proposals, sampling) is :mod:`deepspec.drafts.state`;
checkpoints are written by :mod:`deepspec.drafts.saving` and read by :mod:`deepspec.drafts.checkpoint`.

Conventions recorded in every checkpoint (``config.json``):

* ``layer_id_convention = "output"``: ``target_layer_ids`` entry ``i`` is the output of
  target decoder layer ``i`` (0-based); ``-1`` is the embedding output.
* ``anchor_convention = "anchor_first"``: the anchor (last accepted token) is block
  position 0 and every one of the ``block_size`` positions predicts a token.
* ``window_convention = "sliding"``: ``context_window`` W is the engines' sliding window
  (block slot ``k`` sees context ``j`` iff ``a + k - j < W``). Checkpoints without this
  field and with a window were trained with an earlier fixed window per block and are
  refused at load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from deepspec import __version__
from deepspec.algorithms import ALGORITHMS
from deepspec.config import Config
from deepspec.drafts.fused_head import target_lse
from deepspec.drafts.layers import init_weights
from deepspec.drafts.saving import save_draft
from deepspec.drafts.state import sample_tokens
from deepspec.drafts.vocab import check_vocab_maps, d2t_from_ids, t2d_from_ids
from deepspec.errors import TargetError
from deepspec.targets.family import FamilySpec
from deepspec.targets.weights import find_target_tensor, is_final_norm

LAYER_ID_CONVENTION = "output"
ANCHOR_CONVENTION = "anchor_first"
WINDOW_CONVENTION = "sliding"


@dataclass
class DraftConfig:
    """Everything needed to rebuild a draft without the training config."""

    algorithm: str
    target: dict[str, Any]  # FamilySpec.to_dict() of the target
    target_model_name_or_path: str
    target_layer_ids: list[int]
    block_size: int = 7
    num_draft_layers: int = 5
    mask_token_id: int | None = None
    markov_rank: int = 0
    markov_head_type: str = "vanilla"
    confidence_head: bool = False
    confidence_head_with_markov: bool = True
    ttt_length: int = 7
    draft_num_hidden_layers: int = 1
    context_window: int = 0
    qk_norm: bool | None = None  # block drafters: None = the target family's choice
    draft_vocab_size: int = 0  # 0 = the target's vocabulary; N = a pruned head (d2t / t2d)
    layer_id_convention: str = LAYER_ID_CONVENTION
    anchor_convention: str = ANCHOR_CONVENTION
    window_convention: str = WINDOW_CONVENTION
    extra: dict[str, Any] = field(default_factory=dict)  # a released draft's training settings

    @property
    def spec(self) -> FamilySpec:
        return FamilySpec.from_dict(self.target)

    @classmethod
    def from_cfg(cls, cfg: Config, spec: FamilySpec) -> DraftConfig:
        """Build from a validated training config (``deepspec.config``) and the target spec; the
        algorithm's registry entry says which fields it reads (block drafters the window and
        q/k norms, DSpark the Markov and confidence heads)."""
        m = cfg.model
        algorithm = ALGORITHMS[cfg.algorithm]
        block, markov = algorithm.block, algorithm.markov
        return cls(
            algorithm=cfg.algorithm,
            target=spec.to_dict(),
            target_model_name_or_path=m.target_model_name_or_path,
            target_layer_ids=list(m.target_layer_ids),
            block_size=m.block_size,
            num_draft_layers=m.num_draft_layers,
            mask_token_id=m.mask_token_id,
            markov_rank=m.markov_rank if markov else 0,
            markov_head_type=m.markov_head_type,
            confidence_head=markov and m.confidence_head_alpha > 0,
            confidence_head_with_markov=m.confidence_head_with_markov,
            ttt_length=m.ttt_length,
            draft_num_hidden_layers=m.draft_num_hidden_layers,
            context_window=m.context_window if block else 0,
            qk_norm=m.qk_norm if block else None,
            draft_vocab_size=m.draft_vocab_size,
        )

    def to_json(self, architecture: str) -> dict[str, Any]:
        return {"architectures": [architecture], **asdict(self), "deepspec_version": __version__}


class DraftModel(nn.Module):
    """Base class: frozen target embedding + LM head, the ``fc`` over target features.

    With ``config.draft_vocab_size`` N > 0 the head scores N target tokens only: ``lm_head``
    holds those rows of the target's head ([N, d], frozen, stored in the checkpoint) and the
    buffers ``d2t`` / ``t2d`` (:mod:`deepspec.drafts.vocab`) map draft indices to target ids.
    Training then needs the target's full head once per position, for the normaliser of its
    distribution (:meth:`target_logsumexp`): the tied embedding, or ``full_head`` (loaded
    from the target, never saved) for untied targets.

    Subclasses set ``algorithm`` and implement the training forward and the proposer
    protocol (``new_state``, ``extend``, ``propose``).
    """

    algorithm = ""
    # which target the draft belongs to, recorded by save_pretrained: the directory
    # build_draft copied the embeddings from, or the fingerprint a loaded checkpoint carries
    target_dir: str | None = None
    target_fingerprint: str | None = None

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.config = config
        self.spec = spec = config.spec
        d, V = spec.hidden_size, spec.vocab_size
        Vd = config.draft_vocab_size
        if not 0 <= Vd <= V:
            raise ValueError(f"draft_vocab_size {Vd} must be in 0..{V} (the target vocabulary)")
        self.pruned = Vd > 0
        self.embed_tokens = nn.Embedding(V, d)
        self.lm_head = nn.Linear(d, Vd or V, bias=False)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)  # replaced by the target's
        if self.head_is_tied:
            self.lm_head.weight = self.embed_tokens.weight
        for p in (self.embed_tokens.weight, self.lm_head.weight):
            p.requires_grad_(False)
        self.fc = nn.Linear(len(config.target_layer_ids) * d, d, bias=False)
        if self.pruned:
            ids = torch.arange(Vd)
            self.register_buffer("d2t", d2t_from_ids(ids))
            self.register_buffer("t2d", t2d_from_ids(ids, V))
            self.register_buffer("draft_ids", ids.clone(), persistent=False)
            self.register_buffer("target_to_draft", torch.full((V,), -1, dtype=torch.long), persistent=False)
            self.register_buffer("full_head", None, persistent=False)
            self._refresh_vocab()
            self.register_load_state_dict_post_hook(lambda module, _keys: module._refresh_vocab())

    @property
    def head_is_tied(self) -> bool:
        """The LM head is the embedding itself (a tied target, full vocabulary)."""
        return self.spec.tie_word_embeddings and not self.pruned

    # -- the draft vocabulary ----------------------------------------------------------
    def _refresh_vocab(self) -> None:
        """Derive ``draft_ids`` / ``target_to_draft`` from ``d2t`` / ``t2d`` (checked)."""
        ids = check_vocab_maps(self.d2t, self.t2d)
        self.draft_ids = ids
        mapping = torch.full_like(self.target_to_draft, -1)
        mapping[ids] = torch.arange(ids.numel(), device=ids.device)
        self.target_to_draft = mapping

    def set_draft_vocab(self, draft_ids: torch.Tensor) -> None:
        """Use the ascending target ids ``draft_ids`` [N] as the draft vocabulary; the head
        rows follow when the target's head is known (:meth:`load_target_embeddings`)."""
        if not self.pruned or draft_ids.numel() != self.lm_head.weight.shape[0]:
            raise ValueError(
                f"a draft vocabulary of {draft_ids.numel()} ids does not fit draft_vocab_size "
                f"{self.config.draft_vocab_size}"
            )
        with torch.no_grad():
            self.d2t.copy_(d2t_from_ids(draft_ids.to(self.d2t.device)))
            self.t2d.copy_(t2d_from_ids(draft_ids.to(self.t2d.device), self.spec.vocab_size))
        self._refresh_vocab()
        self._slice_head()

    def _full_head_weight(self) -> torch.Tensor:
        if self.spec.tie_word_embeddings:
            return self.embed_tokens.weight
        if getattr(self, "full_head", None) is None:
            raise TargetError(
                "this pruned draft needs the target's full LM head for training; call "
                "load_target_embeddings(target_dir) first"
            )
        return self.full_head

    def _slice_head(self) -> None:
        if self.pruned and (self.spec.tie_word_embeddings or self.full_head is not None):
            with torch.no_grad():
                self.lm_head.weight.copy_(self._full_head_weight()[self.draft_ids])

    def draft_index(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Target ids → draft indices (-1 outside the draft vocabulary); identity when unpruned."""
        return self.target_to_draft[target_ids] if self.pruned else target_ids

    def target_ids(self, draft_index: torch.Tensor) -> torch.Tensor:
        """Draft indices → target ids; identity when unpruned."""
        return self.draft_ids[draft_index] if self.pruned else draft_index

    def target_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """A distribution over the draft vocabulary [..., N] as one over the target's [..., V]
        (zero outside); unchanged when unpruned."""
        if not self.pruned:
            return probs
        full = probs.new_zeros(*probs.shape[:-1], self.spec.vocab_size)
        return full.index_copy_(-1, self.draft_ids, probs)

    def sample(
        self, logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`sample_tokens` on draft logits [..., N]: target ids [...] and the sampling
        distribution over the target vocabulary [..., V]."""
        index, probs = sample_tokens(logits, temperature, generator)
        return self.target_ids(index), self.target_probs(probs)

    @torch.no_grad()
    def target_logsumexp(
        self,
        last_hidden: torch.Tensor,
        needed: torch.Tensor | None = None,
        max_chunk_elements: int = 16 * 2**20,
    ) -> torch.Tensor | None:
        """log Σ_v exp(target logit v) over the full target vocabulary for target final states
        ``last_hidden`` [..., d] → [...] (fp32; fp64 for an fp64 head); +inf where ``needed``
        [...] is False (a target distribution of zero mass on the draft vocabulary, so unused
        rows stay finite). None when the draft vocabulary is not pruned (the loss then
        normalises over the whole head)."""
        if not self.pruned:
            return None
        W = self._full_head_weight()
        work = torch.float64 if W.dtype == torch.float64 else torch.float32
        out = torch.full(last_hidden.shape[:-1], float("inf"), dtype=work, device=last_hidden.device)
        rows = last_hidden.reshape(-1, last_hidden.shape[-1])
        where = torch.arange(rows.shape[0], device=rows.device)
        if needed is not None:
            where = where[needed.reshape(-1).bool()]
        flat = out.view(-1)
        chunk = max(1, max_chunk_elements // W.shape[0])
        for r0 in range(0, where.numel(), chunk):
            idx = where[r0 : r0 + chunk]
            flat[idx] = target_lse(rows[idx], W, self.spec.final_logit_softcapping).to(work)
        return out

    def rows_lse(
        self, last_hidden_states: torch.Tensor, positions: torch.Tensor, used: torch.Tensor
    ) -> torch.Tensor | None:
        """The target's log-normaliser for training rows: ``last_hidden_states`` [B, S, d],
        each row's target position ``positions`` [B, ...] and whether it counts ``used``
        [B, ...] → [B, ...]. Each position is computed once however many rows (overlapping
        blocks, TTT steps) read it; unused rows get +inf. None when not pruned."""
        if not self.pruned:
            return None
        B, S = last_hidden_states.shape[:2]
        pos = positions.reshape(B, -1)
        hits = torch.zeros(B, S, dtype=torch.int32, device=pos.device)
        hits.scatter_add_(1, pos, used.reshape(B, -1).to(torch.int32))
        lse = self.target_logsumexp(last_hidden_states, hits > 0)
        return torch.gather(lse, 1, pos).view(positions.shape)

    # -- frozen target pieces ----------------------------------------------------------
    def load_target_embeddings(self, target_dir: str) -> None:
        """Copy the target's token embedding and LM head (frozen) from its safetensors."""
        embed = find_target_tensor(target_dir, ("embed_tokens.weight",))
        if embed is None:
            raise TargetError(f"no embed_tokens.weight in the safetensors of {target_dir}")
        if tuple(embed.shape) != tuple(self.embed_tokens.weight.shape):
            raise TargetError(
                f"target embedding shape {tuple(embed.shape)} does not match the draft's "
                f"{tuple(self.embed_tokens.weight.shape)}"
            )
        with torch.no_grad():
            self.embed_tokens.weight.copy_(embed)
            if not self.spec.tie_word_embeddings:
                head = find_target_tensor(target_dir, ("lm_head.weight",))
                if head is None:
                    raise TargetError(f"no lm_head.weight in the safetensors of {target_dir}")
                if self.pruned:
                    self.full_head = head.to(self.lm_head.weight)
                else:
                    self.lm_head.weight.copy_(head)
        self._slice_head()

    def init_output_norm(self, mode: str, target_dir: str | None = None, scale: float = 1.0) -> None:
        """Set the final norm's weight: ``calibrated`` (:meth:`calibrate_output_norm`),
        ``target`` (the target's own final-norm weight, so a draft state equal to the
        target's last pre-norm state gives exactly the target's logits) or ``ones``; then
        multiply the effective weight (with the family's offset) by ``scale``."""
        norm = getattr(self, "norm", None)
        if norm is None or getattr(norm, "weight", None) is None:
            return
        if mode == "calibrated":
            self.calibrate_output_norm()
        elif mode == "target":
            weight = find_target_tensor(target_dir, match=is_final_norm) if target_dir else None
            if weight is None or tuple(weight.shape) != tuple(norm.weight.shape):
                raise TargetError(
                    f"no final norm weight of shape {tuple(norm.weight.shape)} in the safetensors of "
                    f"{target_dir}; use --opts model.output_norm_init=calibrated"
                )
            with torch.no_grad():
                norm.weight.copy_(weight)
        elif mode == "ones":
            with torch.no_grad():
                norm.weight.fill_(1.0 - norm.offset)
        else:
            raise ValueError(f"unknown output norm init {mode!r}; choose calibrated, target or ones")
        with torch.no_grad():
            norm.weight.copy_((norm.weight.float() + norm.offset) * scale - norm.offset)

    def calibrate_output_norm(self) -> float:
        """Scale the final norm so a random unit-RMS draft state gives logits of std ~1.

        The frozen LM head turns a unit-RMS state ``h`` into logits of std
        ``rms_i |W_i|`` (3.2 for SmolLM2), so a fresh draft with norm weight 1 starts
        confidently wrong: CE ~14-16 against the uniform ln V = 10.8, with gradient norms
        above 100. Setting the final norm's scale to ``1 / rms_i |W_i|`` starts every draft
        at about the uniform CE; an aligned state still reaches logits of
        ``sqrt(d) * cos`` (24 cos for d = 576), so the head is not capped. Returns the scale.
        """
        norm = getattr(self, "norm", None)
        if norm is None or getattr(norm, "weight", None) is None:
            return 1.0
        with torch.no_grad():
            W = self.lm_head.weight.float()
            scale = float(W.pow(2).sum(-1).mean().rsqrt())
            norm.weight.fill_(scale - norm.offset)
        return scale

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids) * self.spec.embed_scale

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's LM head (with its logit softcapping) on ``hidden`` [..., d]."""
        logits = self.lm_head(hidden)
        cap = self.spec.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    # -- parameters --------------------------------------------------------------------
    def reset_parameters(self, std: float = 0.02) -> None:
        """Fresh ``fc`` (std 0.02) and decoder layers (normal with ``std``; norms keep 1)."""
        init_weights(self.fc)
        init_weights(self.layers, std=std)

    def num_parameters(self) -> tuple[int, int]:
        """(trainable, frozen) parameter counts (a tied tensor counted once)."""
        seen: set[int] = set()
        trainable = frozen = 0
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                trainable += p.numel()
            else:
                frozen += p.numel()
        return trainable, frozen

    # -- checkpoints -------------------------------------------------------------------
    def save_pretrained(self, out_dir: str) -> None:
        """Write ``config.json`` + ``model.safetensors`` (see :mod:`deepspec.drafts.saving`)."""
        save_draft(self, out_dir)

    def config_json(self) -> dict[str, Any]:
        return self.config.to_json(type(self).__name__)
