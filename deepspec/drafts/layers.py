"""Decoder building blocks in the target family's style, built from a :class:`FamilySpec`.

One implementation for every family; the differences come from ``spec.rule``:
qk-norm (Qwen3, Gemma), v-norm (Gemma4), ``(1 + w)`` norm weights (Gemma3), sandwich
norms (Gemma), the attention scale, the MLP activation and the RoPE variant.

Attention here takes its keys/values as explicit tensors so that the draft algorithms
can mix context keys (from target features) with their own block keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from deepspec.targets.family import FamilySpec


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; weight used as ``offset + w`` (offset 1 for Gemma3)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            x = x * (self.offset + self.weight.float())
        return x.to(dtype)


def norm_for(spec: FamilySpec, dim: int) -> RMSNorm:
    return RMSNorm(dim, spec.rms_norm_eps, offset=spec.rule.norm_offset)


class RotaryEmbedding(nn.Module):
    """RoPE with the target's parameters (scaling types via transformers' init table)."""

    def __init__(self, spec: FamilySpec) -> None:
        super().__init__()
        params = dict(spec.rope_parameters)
        rope_type = params.get("rope_type", "default")
        head_dim = spec.full_head_dim
        if rope_type == "default" and params.get("partial_rotary_factor", 1.0) == 1.0:
            exponent = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
            inv_freq, scaling = 1.0 / (spec.rope_theta**exponent), 1.0
        else:
            from transformers import LlamaConfig
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            config = LlamaConfig(
                hidden_size=spec.hidden_size,
                num_attention_heads=spec.num_attention_heads,
                head_dim=head_dim,
                max_position_embeddings=spec.max_position_embeddings,
                rope_parameters=params,
            )
            init = ROPE_INIT_FUNCTIONS.get(rope_type)
            if init is None and rope_type != "default":
                raise ValueError(f"unsupported rope_type {rope_type!r}")
            if init is None:
                from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

                init = LlamaRotaryEmbedding.compute_default_rope_parameters
            inv_freq, scaling = init(config, None)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.scaling = float(scaling)
        self.rotary_dim = 2 * inv_freq.numel()

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [...] (long) → ``cos, sin`` [..., rotary_dim] in fp32."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.scaling, emb.sin() * self.scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., T, head_dim] by ``cos/sin`` [..., T, rotary_dim] (broadcast over heads)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = (x_rot.float() * cos + rotated.float() * sin).to(x.dtype)
    return torch.cat((out, x_pass), dim=-1) if x_pass.numel() else out


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, spec: FamilySpec, intermediate_size: int | None = None) -> None:
        super().__init__()
        inter = intermediate_size or spec.intermediate_size
        self.gate_proj = nn.Linear(spec.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, spec.hidden_size, bias=False)
        self.act = ACT2FN[spec.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """GQA projections with the family's per-head norms; attention itself is external.

    The geometry is that of the target's full-attention layers (:attr:`FamilySpec.full_head_dim`,
    :attr:`FamilySpec.full_kv_heads`); with ``attention_k_eq_v`` (Gemma 4) there is no
    ``v_proj``: the values are the raw key projection, before the key norm and RoPE.

    ``project_q(x, cos, sin)`` → ``[..., H, T, hd]``; ``project_kv(x, cos, sin)`` →
    ``k, v`` ``[..., KVH, T, hd]``; ``output(o)`` maps ``[..., H, T, hd]`` back to ``[..., T, d]``.
    """

    def __init__(self, spec: FamilySpec, input_size: int | None = None) -> None:
        super().__init__()
        d_in = input_size or spec.hidden_size
        self.num_heads = spec.num_attention_heads
        self.num_kv_heads = spec.full_kv_heads
        self.head_dim = spec.full_head_dim
        self.scale = spec.attention_scaling
        bias = spec.attention_bias
        self.q_proj = nn.Linear(d_in, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_in, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = (
            None if spec.attention_k_eq_v else nn.Linear(d_in, self.num_kv_heads * self.head_dim, bias=bias)
        )
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, spec.hidden_size, bias=False)
        self.q_norm = norm_for(spec, self.head_dim) if spec.rule.qk_norm else None
        self.k_norm = norm_for(spec, self.head_dim) if spec.rule.qk_norm else None
        self.v_norm = (
            RMSNorm(self.head_dim, spec.rms_norm_eps, with_scale=False) if spec.rule.v_norm else None
        )

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.unflatten(-1, (n, self.head_dim)).transpose(-2, -3)  # [..., n, T, hd]

    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q_proj(x), self.num_heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rope(q, cos.unsqueeze(-3), sin.unsqueeze(-3))

    def project_kv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._heads(self.k_proj(x), self.num_kv_heads)
        v = k if self.v_proj is None else self._heads(self.v_proj(x), self.num_kv_heads)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.v_norm is not None:
            v = self.v_norm(v)
        return apply_rope(k, cos.unsqueeze(-3), sin.unsqueeze(-3)), v

    def output(self, o: torch.Tensor) -> torch.Tensor:
        return self.o_proj(o.transpose(-2, -3).flatten(-2))


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Softmax attention with GQA. ``q`` [..., H, Tq, hd], ``k/v`` [..., KVH, Tk, hd],
    ``mask`` bool broadcastable to [..., H, Tq, Tk] (True = may attend)."""
    groups = q.shape[-3] // k.shape[-3]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention then MLP (Gemma: with sandwich norms).

    Attention itself is supplied by the caller, ``attn(layer, q, k, v) -> [..., H, T, hd]``,
    because each draft algorithm decides which keys a position sees. Everything runs inside
    this module's ``forward`` (FSDP unshards a layer's parameters around its forward).
    """

    def __init__(self, spec: FamilySpec, attn_input_size: int | None = None, layer_idx: int = 0) -> None:
        super().__init__()
        d = spec.hidden_size
        self.layer_idx = layer_idx
        self.input_layernorm = norm_for(spec, d)
        self.self_attn = Attention(spec, attn_input_size)
        self.post_attention_layernorm = norm_for(spec, d)
        self.mlp = MLP(spec)
        self.sandwich = spec.rule.sandwich_norm
        if self.sandwich:
            self.post_attn_out_norm = norm_for(spec, d)
            self.post_mlp_norm = norm_for(spec, d)

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn, prefix: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``h`` [..., T, d] residual states; ``prefix`` [..., T, p] is concatenated before the
        normed states as the attention input (Eagle3's embedding half)."""
        x = self.input_layernorm(h)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=-1)
        q = self.self_attn.project_q(x, cos, sin)
        k, v = self.self_attn.project_kv(x, cos, sin)
        h = self.add_attention(h, self.self_attn.output(attn(self, q, k, v)))
        return self.forward_mlp(h)

    def forward_mlp(self, h: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.post_attention_layernorm(h))
        if self.sandwich:
            out = self.post_mlp_norm(out)
        return h + out

    def add_attention(self, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        if self.sandwich:
            attn_out = self.post_attn_out_norm(attn_out)
        return h + attn_out


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) for linear/embedding weights, zeros for biases (norms keep theirs)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
