"""LM-head losses with an analytic backward, one chunk of rows at a time.

The vocabulary-sized work (draft and target logits, softmaxes) is the bulk of a draft's
training step. This autograd function computes, per chunk of ``R`` rows, the loss and its
gradient with respect to the logits in the same pass, keeps only the small gradients of
the inputs (``[R, d]``, ``[R, r]``, ``[V, r]``) and frees the ``[R, V]`` tensors at once: no
activation recompute, no ``[rows, V]`` tensor kept for backward.

Loss per row ``i`` (``z`` = draft logits: ``softcap(W h) + W2 m`` with DSpark's Markov bias
added after a soft-capped family's cap, as at inference; ``p = softmax(z)``, ``q`` = target distribution):
``a_ce[i]·(−log p[y_i]) + a_l1[i]·‖p − q‖₁ + a_soft[i]·(−Σ q log p)``.
Gradient in ``z``: ``a_ce (p − e_y) + a_l1 p ⊙ (s − Σ s p) + a_soft (p − q)``, ``s = sign(p − q)``.

A pruned draft vocabulary (N of the target's V tokens) changes three things, given the
target's log-normaliser over all V tokens per row (``target_lse``):

* ``q`` is the target's true probability of each draft-vocabulary token (not renormalised);
  its mass outside, ``q_out = 1 − Σ q``, counts fully in ``‖p − q‖₁`` because ``p`` is 0
  there. So ``1 − ½‖p − q‖₁ = Σ min(p, q)`` stays the exact acceptance probability; ``q_out``
  adds no gradient.
* A label outside the draft vocabulary (``y = −1``) has no cross-entropy: its CE term and
  gradient are 0 and it never counts as a hit; the TV term still trains the row.
* The soft cross-entropy sums over the draft vocabulary only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from deepspec.errors import EnvironmentProblem


@dataclass
class HeadLossRows:
    """Per-row values (detached) of one call; ``loss`` carries the gradient."""

    loss: torch.Tensor  # scalar
    ce: torch.Tensor  # [R]
    l1: torch.Tensor  # [R] ‖p − q‖₁
    soft_ce: torch.Tensor  # [R]
    overlap: torch.Tensor  # [R] Σ min(p, q) = 1 − ½‖p − q‖₁ (the acceptance probability)
    hit: torch.Tensor  # [R] argmax p == y


def _softcap(z: torch.Tensor, cap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not cap:
        return z, None
    t = torch.tanh(z / cap)
    return t * cap, 1 - t * t  # capped logits and d(capped)/dz


def vocab_rows(
    z: torch.Tensor,
    zt: torch.Tensor,
    y: torch.Tensor,
    a_ce: torch.Tensor,
    a_l1: torch.Tensor,
    a_soft: torch.Tensor,
    cap: float,
    use_soft: bool,
    lse: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """The vocabulary-sized part of one chunk: raw draft logits ``z`` and target logits
    ``zt`` [R, V] → per-row ``(loss, ce, l1, soft_ce, hit)`` [R], ``d loss / d z`` and
    ``d loss / d bias`` [R, V]. The draft's distribution is ``softmax(softcap(z) + bias)``:
    DSpark's Markov ``bias`` [R, V] is added after the cap, as inference adds it (the cap
    bounds the backbone's logits, not the bias). ``lse`` [R]: the target's log-normaliser
    over its whole vocabulary when ``z`` covers a pruned draft vocabulary (labels outside it
    are ``-1``); None = ``logsumexp(zt)``.

    Element-wise over the vocabulary, so ``torch.compile`` fuses it into a few passes
    (``train.torch_compile``); fp32 math, fp64 when ``z`` is fp64.
    """
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    z, dcap = _softcap(z.to(work), cap)
    if bias is not None:
        z = z + bias.to(work)
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    zt = _softcap(zt.to(work), cap)[0]
    if lse is None:
        q = torch.softmax(zt, dim=-1)
        outside = torch.zeros_like(z[:, 0])
    else:
        q = torch.exp(zt - lse.to(work)[:, None])
        outside = (1 - q.sum(-1)).clamp(min=0)
    labelled = y >= 0
    a_ce = a_ce * labelled
    ce = torch.where(labelled, -logp.gather(-1, y.clamp(min=0)[:, None])[:, 0], 0.0)
    diff = p - q
    l1 = diff.abs().sum(-1) + outside
    soft_ce = -(q * logp).sum(-1) if use_soft else torch.zeros_like(ce)
    loss = a_ce * ce + a_l1 * l1 + a_soft * soft_ce
    s = diff.sign()
    s = s - (s * p).sum(-1, keepdim=True)
    grad = p * (s * a_l1[:, None] + (a_ce + a_soft)[:, None])  # a_l1 p ⊙ (s − Σ s p) + ...
    if use_soft:
        grad = grad - a_soft[:, None] * q
    grad = grad.scatter_add(-1, y.clamp(min=0)[:, None], -a_ce[:, None].to(grad.dtype))
    grad_base = grad if dcap is None else grad * dcap
    hit = (z.argmax(-1) == y).to(z.dtype)
    return loss, ce, l1, soft_ce, hit, grad_base, grad


def check_compile_toolchain() -> None:
    """Fail fast, with one line, when ``torch.compile`` cannot build CPU kernels.

    Inductor compiles CPU kernels with the C++ compiler it finds (``$CXX``, else ``g++``) on
    the first training step; without a working one that step ends in a long compiler
    traceback. This finds the same compiler and builds a trivial program with it (well
    under a second), so a missing or broken compiler is reported before any data is read.
    Errors found later, while compiling the real kernel, are turned into the same kind of
    line by :func:`deepspec.errors.as_user_error`."""
    import shutil
    import subprocess
    import sys
    import tempfile

    fix = "install a working C++ compiler (g++) or run with --opts train.torch_compile=false"
    if sys.platform == "win32":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: the real compile reports problems itself
        return
    try:
        cxx = get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 - inductor's InvalidCxxCompiler and friends
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise EnvironmentProblem(
            f"torch.compile needs a C++ compiler and found none ({first.strip()[:160]}); {fix}"
        ) from None
    with tempfile.TemporaryDirectory(prefix="deepspec-cxx-") as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w", encoding="utf-8") as fh:
            fh.write("#include <cmath>\nint main() { return std::isfinite(1.0) ? 0 : 1; }\n")
        cmd = [cxx, "-x", "c++", src, "-o", os.path.join(tmp, "probe")]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            failed = proc.returncode != 0
            detail = next((ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()), "")
        except (OSError, subprocess.SubprocessError) as exc:
            failed, detail = True, str(exc)
    if failed:
        name = shutil.which(cxx) or cxx
        raise EnvironmentProblem(
            f"the C++ compiler {name} that torch.compile uses cannot build a trivial program "
            f"({detail.strip()[:160] or 'no output'}); {fix}"
        )


def lse_rows(x: torch.Tensor, W: torch.Tensor, cap: float) -> torch.Tensor:
    """``log Σ_v exp(softcap(x @ W.T))`` per row of ``x`` [R, d] (fp32; fp64 for an fp64 ``W``):
    the normaliser of the target's distribution over its whole vocabulary ``W`` [V, d]."""
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    z = _softcap((x.to(W.dtype) @ W.T).to(work), cap)[0]
    return torch.logsumexp(z, dim=-1)


_compiled_vocab_rows = None  # torch.compile(vocab_rows), built on first use
_compiled_lse_rows = None
_use_compiled = False


def use_compiled_vocab_rows(enabled: bool) -> bool:
    """Route the vocabulary work through ``torch.compile`` (compiled once per process,
    ~20 s on a CPU; about 3x faster afterwards) or eager. Returns the previous setting."""
    global _compiled_vocab_rows, _compiled_lse_rows, _use_compiled
    previous, _use_compiled = _use_compiled, enabled
    if enabled and _compiled_vocab_rows is None:
        _compiled_vocab_rows = torch.compile(vocab_rows, dynamic=True)
        _compiled_lse_rows = torch.compile(lse_rows, dynamic=True)
    return previous


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, m, W2, th, y, a_ce, a_l1, a_soft, W, cap, lse):
        z = h.to(W.dtype) @ W.T
        bias = None if m is None else m.to(W2.dtype) @ W2.T
        with torch.no_grad():
            zt = th.to(W.dtype) @ W.T
        fn = _compiled_vocab_rows if _use_compiled else vocab_rows
        loss, ce, l1, soft_ce, hit, grad, grad_bias = fn(
            z, zt, y, a_ce, a_l1, a_soft, float(cap or 0.0), bool(a_soft.any()), lse, bias
        )
        ctx.save_for_backward(
            (grad.to(W.dtype) @ W).to(h.dtype),
            None if m is None else (grad_bias @ W2.to(grad_bias.dtype)).to(m.dtype),
            None
            if m is None or not ctx.needs_input_grad[2]
            else (grad_bias.T @ m.to(grad_bias.dtype)).to(W2.dtype),
        )
        overlap = 1 - 0.5 * l1
        ctx.mark_non_differentiable(ce, l1, soft_ce, overlap, hit)
        return loss.sum(), ce, l1, soft_ce, overlap, hit

    @staticmethod
    def backward(ctx, g_loss, *_):
        g_h, g_m, g_W2 = ctx.saved_tensors
        return (
            g_h * g_loss,
            None if g_m is None else g_m * g_loss,
            None if g_W2 is None else g_W2 * g_loss,
            *([None] * 8),
        )


def target_lse(x: torch.Tensor, W: torch.Tensor, cap: float | None) -> torch.Tensor:
    """:func:`lse_rows`, compiled when the vocabulary kernel is (``train.torch_compile``)."""
    fn = _compiled_lse_rows if _use_compiled else lse_rows
    return fn(x, W, float(cap or 0.0))


def head_loss_rows(
    hidden: torch.Tensor,
    target_hidden: torch.Tensor,
    targets: torch.Tensor,
    lm_weight: torch.Tensor,
    *,
    a_ce: torch.Tensor,
    a_l1: torch.Tensor,
    a_soft: torch.Tensor,
    markov: torch.Tensor | None = None,
    W2: torch.Tensor | None = None,
    softcap: float | None = None,
    target_lse: torch.Tensor | None = None,
    max_chunk_elements: int = 16 * 2**20,
) -> HeadLossRows:
    """Loss and per-row statistics over rows ``hidden`` [R, d] (draft states),
    ``target_hidden`` [R, d], ``targets`` [R]; coefficients ``a_*`` [R] (0 for padding rows).

    ``markov`` [R, r] and ``W2`` [V, r] add DSpark's bias ``markov @ W2.T`` to the logits.
    With a pruned draft vocabulary ``lm_weight`` [N, d] holds its rows, ``targets`` are draft
    indices (-1 outside) and ``target_lse`` [R] the target's full-vocabulary log-normaliser.
    Rows are processed in chunks of at most ``max_chunk_elements`` logits.
    """
    V = lm_weight.shape[0]
    chunk = max(1, max_chunk_elements // V)
    parts = []
    for r0 in range(0, hidden.shape[0], chunk):
        sl = slice(r0, r0 + chunk)
        parts.append(
            _HeadLoss.apply(
                hidden[sl],
                None if markov is None else markov[sl],
                W2,
                target_hidden[sl],
                targets[sl],
                a_ce[sl],
                a_l1[sl],
                a_soft[sl],
                lm_weight,
                softcap,
                None if target_lse is None else target_lse[sl],
            )
        )
    if not parts:
        zero = hidden.sum() * 0
        empty = hidden.new_zeros(0)
        return HeadLossRows(zero, empty, empty, empty, empty, empty)
    cols = list(zip(*parts))
    return HeadLossRows(sum(cols[0]), *(torch.cat(c) for c in cols[1:]))
