"""Verification (deepspec.eval.verify): losslessness laws, mutation controls, edges, properties.

TESTING.md #1 (residual law), #2 (chain laws, first-token and two-token laws), #4 (broken
samplers fail the same checks), #7 (edge table), #8 (hypothesis properties), #9 (NaN/Inf),
plus exact greedy cases. Vocabulary V=16, float64 tables, 200k draws per law.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from deepspec.errors import DeepSpecError, NumericalError
from deepspec.eval.verify import (
    VerifyResult,
    probs_from_logits,
    residual_probs,
    sample_from_probs,
    verify_greedy,
    verify_sampling,
)

V = 16
DRAWS = 200_000
P_MIN = 1e-4  # chi-square p-value a correct sampler must exceed
TV_MAX = 0.01  # total-variation bound for laws over <= 16 cells at 200k draws

# (draft_tokens [B, k], draft_probs [B, k, V], target_probs [B, k+1, V], generator)
#   -> (num_accepted [B], emitted [B, k + 2] padded with -1)
Sampler = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]
]


# ----------------------------------------------------------------------------- helpers


@dataclass
class LawCheck:
    name: str
    p_value: float
    tv: float
    tv_bound: float
    draws: int

    @property
    def ok(self) -> bool:
        return self.p_value > P_MIN and self.tv < self.tv_bound


def check_law(
    name: str, samples: np.ndarray, expected: np.ndarray, tv_bound: float | None = None
) -> LawCheck:
    """Chi-square goodness of fit (cells with expected count < 5 pooled) and TV distance.

    A draw in a cell of probability exactly 0 gives p = 0. Without ``tv_bound`` the bound is
    max(TV_MAX, 3 x the expected TV of an exact sampler at this sample size).
    """
    expected = np.asarray(expected, dtype=np.float64).ravel()
    expected = expected / expected.sum()
    counts = np.bincount(np.asarray(samples).ravel(), minlength=expected.size).astype(np.float64)
    assert counts.size == expected.size, "a sample fell outside the cells"
    n = counts.sum()
    tv = 0.5 * np.abs(counts / n - expected).sum()
    if tv_bound is None:
        tv_bound = max(TV_MAX, 3 * 0.5 * np.sum(np.sqrt(2 * expected * (1 - expected) / (math.pi * n))))
    if counts[expected == 0].sum() > 0:
        return LawCheck(name, 0.0, tv, tv_bound, int(n))
    exp_counts, obs = expected[expected > 0] * n, counts[expected > 0]
    small = exp_counts < 5
    if small.any():
        exp_counts = np.append(exp_counts[~small], exp_counts[small].sum())
        obs = np.append(obs[~small], obs[small].sum())
    p_value = 1.0 if obs.size < 2 else float(stats.chisquare(obs, exp_counts).pvalue)
    return LawCheck(name, p_value, tv, tv_bound, int(n))


def random_dist(rng: np.random.Generator, shape: tuple[int, ...], zero_frac: float = 0.25) -> np.ndarray:
    """``[*shape, V]`` float64 distributions with some exact zeros (never an all-zero row)."""
    p = rng.dirichlet(np.ones(V), size=shape)
    zero = rng.random(p.shape) < zero_frac
    np.put_along_axis(zero, p.argmax(-1)[..., None], False, axis=-1)
    p = np.where(zero, 0.0, p)
    return p / p.sum(-1, keepdims=True)


def sample_rows(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One inverse-CDF draw per row of ``probs`` ``[B, V]`` (test-side, independent of the module)."""
    cdf = probs.cumsum(-1)
    return np.minimum((cdf <= rng.random(probs.shape[0])[:, None]).sum(-1), probs.shape[-1] - 1)


def correct_sampler(draft_tokens, draft_probs, target_probs, gen):
    result = verify_sampling(draft_tokens, draft_probs, target_probs, generator=gen)
    return result.num_accepted, torch.nn.functional.pad(result.emitted_tokens(), (0, 1), value=-1)


def broken_sampler(mode: str) -> Sampler:
    """Speculative sampling with one deliberate bug (``mode``), written independently."""

    def sample(draft_tokens, draft_probs, target_probs, gen):
        batch, k = draft_tokens.shape
        u = torch.rand(batch, k, generator=gen, dtype=torch.float64)
        x = draft_tokens.unsqueeze(-1)
        p_t = target_probs[:, :k].gather(-1, x).squeeze(-1)  # target's probability of x_j
        p_d = draft_probs.gather(-1, x).squeeze(-1)  # draft's probability of x_j
        if mode == "accept_always":
            accept = torch.ones_like(u, dtype=torch.bool)
        elif mode == "inverted_ratio":
            accept = u * p_t < p_d  # BUG: min(1, p_d / p_t)
        else:
            accept = u * p_d < p_t  # min(1, p_t / p_d)
        n = accept.long().cumprod(-1).sum(-1)
        rows = torch.arange(batch)
        stop_t, stop_d = target_probs[rows, n], draft_probs[rows, n.clamp(max=k - 1)]
        if mode == "no_residual":
            residual = stop_t  # BUG: resample from p_t
        elif mode == "abs_residual":
            residual = (stop_t - stop_d).abs()  # BUG: |p_t - p_d|
        else:
            residual = (stop_t - stop_d).clamp_min(0)  # max(0, p_t - p_d)
        dist = torch.where((n == k)[:, None], stop_t, residual)
        emitted = torch.full((batch, k + 2), -1, dtype=torch.long)
        emitted[:, :k] = torch.where(torch.arange(k) < n[:, None], draft_tokens, -1)
        if mode == "reused_uniform":  # BUG: the rejected test's uniform (biased) drives the resample
            level = torch.where(n < k, u.gather(1, n.clamp(max=k - 1)[:, None]).squeeze(1), 0.5)
            cdf = dist.cumsum(-1) / dist.sum(-1, keepdim=True)
            emitted[rows, n] = (cdf <= level[:, None]).sum(-1).clamp(max=dist.shape[-1] - 1)
        else:
            emitted[rows, n] = torch.multinomial(dist, 1, generator=gen).squeeze(1)
        if mode == "bonus_after_reject":  # BUG: also emit a "bonus" from p_t after the rejected x_j
            rej = rows[n < k]
            extra = torch.multinomial(target_probs[rej, n[rej] + 1], 1, generator=gen).squeeze(1)
            emitted[rej, n[rej] + 1] = extra
        return n, emitted

    return sample


BROKEN = [
    "no_residual",
    "abs_residual",
    "inverted_ratio",
    "accept_always",
    "bonus_after_reject",
    "reused_uniform",
]


def exact_chain_laws(p_d: np.ndarray, p_t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact laws for position-wise tables ``p_d`` ``[k, V]`` (draft), ``p_t`` ``[k+1, V]`` (target).

    Returns P(N = n) ``[k+1]``, the law of the next token given N = n ``[k+1, V]``, and the
    law of x_j given that it was accepted ``[k, V]``.
    """
    k = p_d.shape[0]
    overlap = np.minimum(p_d, p_t[:k])  # [k, V] P(draft x and accept it) = min(p_d(x), p_t(x))
    a = overlap.sum(-1)  # [k] P(accept j | reached j)
    reach = np.concatenate([[1.0], np.cumprod(a)])  # P(N >= n)
    stop = reach * np.append(1 - a, 1.0)  # P(N = n)
    residual = np.maximum(p_t[:k] - p_d, 0)  # max(0, p_t - p_d)
    next_law = np.concatenate([residual / residual.sum(-1, keepdims=True), p_t[k:]])
    return stop, next_law, overlap / a[:, None]


def chain_law_checks(sampler: Sampler, k: int, seed: int) -> list[LawCheck]:
    """#2: one block with position-wise tables; laws of N, the stop token, accepted tokens."""
    rng = np.random.default_rng(seed)
    p_d, p_t = random_dist(rng, (k,)), random_dist(rng, (k + 1,))
    draft = np.stack([rng.choice(V, DRAWS, p=p_d[j]) for j in range(k)], axis=1)  # x_j ~ p_d[j]
    gen = torch.Generator().manual_seed(seed)
    n, emitted = sampler(
        torch.from_numpy(draft),
        torch.from_numpy(p_d).expand(DRAWS, k, V),
        torch.from_numpy(p_t).expand(DRAWS, k + 1, V),
        gen,
    )
    n, emitted = n.numpy(), emitted.numpy()
    nxt = emitted[np.arange(DRAWS), n]
    stop, next_law, accepted_law = exact_chain_laws(p_d, p_t)
    checks = [
        check_law(f"k={k} num_accepted", n, stop, TV_MAX),
        check_law(f"k={k} next token", nxt, stop @ next_law, TV_MAX),
        check_law(f"k={k} first emitted token = p_t[0]", emitted[:, 0], p_t[0], TV_MAX),
        check_law(f"k={k} joint (num_accepted, next)", n * V + nxt, stop[:, None] * next_law),
    ]
    for stop_at in range(k + 1):  # the token at each stop position (correction or bonus)
        rows = n == stop_at
        if rows.sum() >= 200:
            checks.append(check_law(f"k={k} next | N={stop_at}", nxt[rows], next_law[stop_at]))
    for j in range(k):  # an accepted token follows norm(min(p_d, p_t))
        rows = n > j
        if rows.sum() >= 200:
            checks.append(check_law(f"k={k} x_{j} | accepted", draft[rows, j], accepted_law[j]))
    return checks


def two_token_check(sampler: Sampler, k: int, seed: int, draws: int = DRAWS) -> LawCheck:
    """Joint law of the first two emitted tokens with lookup-table models that depend on the
    previous token; a second round runs where the first emitted only one token."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    target = random_dist(rng, (k + 2, V))  # [pos, prev, V] p_t(. | position, previous token)
    draft = random_dist(rng, (k + 2, V))  # [pos, prev, V] p_d(. | position, previous token)

    def run_round(prev: np.ndarray, start: int) -> np.ndarray:
        rows = prev.size
        tokens = np.empty((rows, k), dtype=np.int64)
        d_probs, t_probs = np.empty((rows, k, V)), np.empty((rows, k + 1, V))
        last = prev
        for j in range(k):
            t_probs[:, j], d_probs[:, j] = target[start + j, last], draft[start + j, last]
            tokens[:, j] = last = sample_rows(rng, d_probs[:, j])
        t_probs[:, k] = target[start + k, last]
        _, emitted = sampler(
            torch.from_numpy(tokens), torch.from_numpy(d_probs), torch.from_numpy(t_probs), gen
        )
        return emitted.numpy()

    emitted = run_round(np.zeros(draws, dtype=np.int64), 0)  # the prompt ends in token 0
    first, second = emitted[:, 0], emitted[:, 1].copy()
    need = second < 0
    second[need] = run_round(first[need], 1)[:, 0]
    expected = target[0, 0][:, None] * target[1]  # p_t(a) * p_t(b | a)
    return check_law(f"k={k} first two tokens", first * V + second, expected)


def residual_check(sampler: Sampler, seed: int) -> LawCheck:
    """#1: the drafted token has p_t = 0, so every row rejects and resamples the residual."""
    rng = np.random.default_rng(seed)
    p_d, p_t = random_dist(rng, (1,)), random_dist(rng, (2,))
    x = int(np.argmax(p_d[0]))
    p_t[0, x] = 0.0
    p_t[0] /= p_t[0].sum()
    n, emitted = sampler(
        torch.full((DRAWS, 1), x),
        torch.from_numpy(p_d).expand(DRAWS, 1, V),
        torch.from_numpy(p_t).expand(DRAWS, 2, V),
        torch.Generator().manual_seed(seed),
    )
    assert (n == 0).all()
    residual = np.maximum(p_t[0] - p_d[0], 0)
    return check_law("residual", emitted[:, 0].numpy(), residual / residual.sum(), TV_MAX)


# ----------------------------------------------------------------------------- #1, #2: laws


def test_residual_distribution():
    check = residual_check(correct_sampler, seed=1)
    assert check.ok, check


@pytest.mark.parametrize("k", [1, 3, 7])
def test_chain_laws(k):
    checks = chain_law_checks(correct_sampler, k, seed=10 + k)
    assert len(checks) >= 4 + k
    failed = [c for c in checks if not c.ok]
    assert not failed, failed


@pytest.mark.parametrize("k", [1, 3, 7])
def test_first_two_tokens_follow_target(k):
    check = two_token_check(correct_sampler, k, seed=20 + k)
    assert check.ok, check


# ----------------------------------------------------------------------------- #4: mutation controls


@pytest.mark.parametrize("mode", BROKEN)
def test_broken_samplers_are_caught(mode):
    sampler = broken_sampler(mode)
    assert not two_token_check(sampler, 3, seed=23).ok
    chain = chain_law_checks(sampler, 3, seed=13)
    if mode == "bonus_after_reject":  # its (N, next) law is right; only the sequence law shows it
        assert all(c.ok for c in chain)
    else:
        assert not all(c.ok for c in chain)
    if mode in ("no_residual", "abs_residual"):
        assert not residual_check(sampler, seed=1).ok


def test_reference_broken_sampler_without_bug_passes():
    """The test-side sampler with no bug enabled passes, so the failures above are the bugs'."""
    sampler = broken_sampler("none")
    assert two_token_check(sampler, 3, seed=23).ok
    assert all(c.ok for c in chain_law_checks(sampler, 3, seed=13))


# ----------------------------------------------------------------------------- #7: edge table


def _tables(rows: int, k: int, p_d: np.ndarray, p_t: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(p_d).expand(rows, k, V), torch.from_numpy(p_t).expand(rows, k + 1, V)


def test_zero_target_probability_is_always_rejected():
    rng = np.random.default_rng(0)
    p_d, p_t = random_dist(rng, (3,), 0.0), random_dist(rng, (4,))
    p_t[1, 5] = 0.0
    p_t[1] /= p_t[1].sum()
    tokens = torch.from_numpy(np.stack([rng.choice(V, 20_000, p=p_d[j]) for j in range(3)], 1))
    tokens[:, 1] = 5
    dp, tp = _tables(20_000, 3, p_d, p_t)
    result = verify_sampling(tokens, dp, tp, generator=torch.Generator().manual_seed(0))
    assert (result.num_accepted <= 1).all() and (result.num_accepted == 1).any()


def test_equal_distributions_are_never_rejected():
    rng = np.random.default_rng(1)
    p = random_dist(rng, (6,))
    tokens = torch.from_numpy(np.stack([rng.choice(V, 20_000, p=p[j]) for j in range(5)], 1))
    dp, tp = _tables(20_000, 5, p[:5], p)
    result = verify_sampling(tokens, dp, tp, generator=torch.Generator().manual_seed(1))
    assert (result.num_accepted == 5).all()
    check = check_law("bonus", result.next_token.numpy(), p[5], TV_MAX)
    assert check.ok, check


def test_draft_lengths_cut_mid_block():
    """Rows propose 2 of 5 slots; later slots (garbage probabilities) are ignored and the bonus
    comes from p_t at position 2."""
    rng = np.random.default_rng(2)
    p = random_dist(rng, (6,))
    rows = 50_000
    tokens = torch.from_numpy(np.stack([rng.choice(V, rows, p=p[j]) for j in range(5)], 1))
    draft_probs = torch.from_numpy(p[:5]).repeat(rows, 1, 1)
    draft_probs[:, 2:] = 0.0  # not a distribution, but beyond the proposal
    result = verify_sampling(
        tokens,
        draft_probs,
        torch.from_numpy(p).expand(rows, 6, V),
        torch.full((rows,), 2),
        torch.Generator().manual_seed(2),
    )
    assert (result.num_accepted == 2).all()
    check = check_law("bonus at the cut", result.next_token.numpy(), p[2])
    assert check.ok, check
    assert all(len(e) == 3 for e in result.emitted_lists())


def test_zero_residual_mass_gives_in_vocab_ids():
    # p_t == p_d and the drafted token has probability 0 under both: rejected, no residual mass.
    p = torch.zeros(V, dtype=torch.float64)
    p[3], p[7] = 0.25, 0.75
    tokens = torch.full((1000, 1), 15)
    result = verify_sampling(
        tokens, p.expand(1000, 1, V), p.expand(1000, 2, V), generator=torch.Generator().manual_seed(0)
    )
    assert (result.num_accepted == 0).all()
    assert set(result.next_token.tolist()) <= {3, 7}  # fell back to p_t
    # one-hot target and draft (temperature 0 on both sides), a different drafted token
    onehot = torch.zeros(4, 2, V)
    onehot[..., 9] = 1.0
    result = verify_sampling(torch.full((4, 1), 2), onehot[:, :1], onehot)
    assert result.num_accepted.tolist() == [0] * 4 and result.next_token.tolist() == [9] * 4
    # float32 near-equal distributions: the rounding residual still yields valid ids
    q = torch.softmax(torch.randn(64, 3, 50_000, generator=torch.Generator().manual_seed(0)), -1)
    noisy = (q * (1 + 1e-6 * torch.rand(q.shape, generator=torch.Generator().manual_seed(1)))).float()
    noisy = noisy / noisy.sum(-1, keepdim=True)
    result = verify_sampling(q[:, :2].argmax(-1), noisy[:, :2], q, uniforms=torch.full((64, 3), 1 - 2**-53))
    assert ((result.next_token >= 0) & (result.next_token < 50_000)).all()


def test_inverse_cdf_never_returns_zero_probability_or_out_of_range():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    top = torch.full((3,), 1 - 2**-53, dtype=torch.float64)
    assert sample_from_probs(probs, top).tolist() == [1, 3, 1]
    assert sample_from_probs(probs, torch.zeros(3, dtype=torch.float64)).tolist() == [0, 3, 1]


def test_sampling_with_no_draft_tokens_draws_the_bonus():
    p = torch.from_numpy(random_dist(np.random.default_rng(3), (1,)))
    result = verify_sampling(
        torch.zeros(DRAWS, 0, dtype=torch.long),
        torch.zeros(DRAWS, 0, V, dtype=torch.float64),
        p.expand(DRAWS, 1, V),
        generator=torch.Generator().manual_seed(3),
    )
    assert (result.num_accepted == 0).all()
    check = check_law("bonus only", result.next_token.numpy(), p[0].numpy(), TV_MAX)
    assert check.ok, check


# ----------------------------------------------------------------------------- greedy


def _logits_with_argmax(best: list[list[int]]) -> torch.Tensor:
    logits = torch.randn(len(best), len(best[0]), V, generator=torch.Generator().manual_seed(0))
    for b, row in enumerate(best):
        for j, tok in enumerate(row):
            logits[b, j, tok] = 10.0
    return logits


def test_greedy_perfect_match_takes_the_bonus():
    logits = _logits_with_argmax([[4, 5, 6, 7]])
    result = verify_greedy(torch.tensor([[4, 5, 6]]), logits)
    assert result.num_accepted.tolist() == [3] and result.next_token.tolist() == [7]
    assert result.emitted_lists() == [[4, 5, 6, 7]]


def test_greedy_early_mismatch():
    logits = _logits_with_argmax([[4, 5, 6, 7], [1, 2, 3, 4]])
    result = verify_greedy(torch.tensor([[4, 9, 6], [0, 2, 3]]), logits)  # later matches don't count
    assert result.num_accepted.tolist() == [1, 0]
    assert result.next_token.tolist() == [5, 1]
    assert result.emitted_lists() == [[4, 5], [1]]
    assert result.emitted_tokens().tolist() == [[4, 5, -1, -1], [1, -1, -1, -1]]


def test_greedy_bonus_only():
    logits = _logits_with_argmax([[8]])
    result = verify_greedy(torch.zeros(1, 0, dtype=torch.long), logits)
    assert result.num_accepted.tolist() == [0] and result.next_token.tolist() == [8]
    logits = _logits_with_argmax([[4, 5, 6], [4, 5, 6]])
    result = verify_greedy(torch.tensor([[4, 5], [4, 5]]), logits, torch.tensor([0, 1]))
    assert result.num_accepted.tolist() == [0, 1] and result.next_token.tolist() == [4, 5]


def test_greedy_equals_sampling_with_one_hot_probabilities():
    logits = _logits_with_argmax([[4, 5, 6, 7], [1, 2, 3, 4]])
    tokens = torch.tensor([[4, 5, 0], [1, 2, 3]])
    greedy = verify_greedy(tokens, logits)
    one_hot = probs_from_logits(logits, 0.0)
    sampled = verify_sampling(tokens, one_hot[:, :3], one_hot)
    assert torch.equal(greedy.num_accepted, sampled.num_accepted)
    assert torch.equal(greedy.next_token, sampled.next_token)


def test_probs_from_logits():
    logits = torch.randn(3, 4, V, dtype=torch.bfloat16)
    probs = probs_from_logits(logits, 0.7)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(logits.float() / 0.7, -1))
    one_hot = probs_from_logits(logits.double(), 0.0)
    assert one_hot.dtype == torch.float64 and torch.equal(one_hot.argmax(-1), logits.float().argmax(-1))
    assert torch.equal(one_hot.sum(-1), torch.ones(3, 4, dtype=torch.float64))


def test_invalid_arguments():
    logits = torch.zeros(2, 3, V)
    with pytest.raises(ValueError, match="draft_lengths"):
        verify_greedy(torch.zeros(2, 2, dtype=torch.long), logits, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"\[B, k \+ 1, V\]"):
        verify_greedy(torch.zeros(2, 3, dtype=torch.long), logits)
    with pytest.raises(ValueError, match="in \\[0, 16\\)"):
        verify_greedy(torch.full((2, 2), V), logits)
    with pytest.raises(ValueError, match="temperature"):
        probs_from_logits(logits, -1.0)


# ----------------------------------------------------------------------------- #9: NaN / Inf


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_non_finite_logits_raise(bad, temperature):
    logits = torch.randn(2, 3, V)
    logits[1, 2, 5] = bad
    with pytest.raises(NumericalError) as info:
        probs_from_logits(logits, temperature)
    assert isinstance(info.value, DeepSpecError)
    with pytest.raises(NumericalError):
        verify_greedy(torch.zeros(2, 2, dtype=torch.long), logits)


def test_all_neg_inf_row_raises_but_some_neg_inf_is_fine():
    logits = torch.randn(1, 2, V)
    logits[0, 0, :3] = -math.inf
    probs = probs_from_logits(logits, 1.0)
    assert (probs[0, 0, :3] == 0).all()
    logits[0, 1] = -math.inf
    with pytest.raises(NumericalError, match="all -inf"):
        probs_from_logits(logits, 1.0)


def test_bad_probabilities_raise():
    p = torch.softmax(torch.randn(2, 3, V), -1)
    tokens = torch.zeros(2, 2, dtype=torch.long)
    for name in ("draft", "target"):
        for bad in (math.nan, math.inf, -0.1):
            d, t = p[:, :2].clone(), p.clone()
            (d if name == "draft" else t)[0, 1, 4] = bad
            with pytest.raises(NumericalError, match=f"{name}_probs"):
                verify_sampling(tokens, d, t)
    with pytest.raises(NumericalError, match="sum to 1"):
        verify_sampling(tokens, p[:, :2], torch.randn(2, 3, V).abs())  # not normalised
    with pytest.raises(NumericalError, match="overflowed"):
        probs_from_logits(torch.tensor([[3e38, 0.0]]), 1e-3)


# ----------------------------------------------------------------------------- #8: properties


@st.composite
def sampling_cases(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    batch, k, vocab = draw(st.integers(1, 4)), draw(st.integers(0, 5)), draw(st.integers(2, 16))
    zero_frac = draw(st.sampled_from([0.0, 0.4, 0.8]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    rng = np.random.default_rng(seed)

    def dist(shape):
        p = rng.dirichlet(np.ones(vocab), size=shape) * (rng.random((*shape, vocab)) >= zero_frac)
        p[..., rng.integers(vocab)] += 1e-3  # never an all-zero row
        return torch.from_numpy(p / p.sum(-1, keepdims=True)).to(dtype)

    draft_probs, target_probs = dist((batch, k)), dist((batch, k + 1))
    if draw(st.booleans()):  # tokens drawn from the draft, or arbitrary (p_d(x) may be 0)
        flat = draft_probs.reshape(-1, vocab).double().numpy()
        tokens = torch.from_numpy(sample_rows(rng, flat).reshape(batch, k))
    else:
        tokens = torch.from_numpy(rng.integers(0, vocab, (batch, k)))
    if draw(st.booleans()):  # sometimes make the target equal to the draft
        target_probs[:, :k] = draft_probs
    lengths = torch.from_numpy(rng.integers(0, k + 1, batch))
    return seed, tokens, draft_probs, target_probs, lengths


@settings(max_examples=150, deadline=None)
@given(sampling_cases())
def test_sampling_properties(case):
    seed, tokens, draft_probs, target_probs, lengths = case
    batch, k = tokens.shape
    vocab = target_probs.shape[-1]
    result = verify_sampling(tokens, draft_probs, target_probs, lengths, torch.Generator().manual_seed(seed))
    n, nxt = result.num_accepted, result.next_token
    assert n.dtype == torch.long and nxt.dtype == torch.long and n.shape == nxt.shape == (batch,)
    assert ((nxt >= 0) & (nxt < vocab)).all()
    assert ((n >= 0) & (n <= lengths)).all()
    for b, emitted in enumerate(result.emitted_lists()):
        m = int(n[b])
        assert len(emitted) == m + 1  # emitted = accepted + 1
        assert emitted[:m] == tokens[b, :m].tolist()  # the accepted part is the drafted prefix
        assert all(target_probs[b, j, tokens[b, j]] > 0 for j in range(m))  # p_t(x) = 0 never accepted
        if m < lengths[b]:
            assert residual_probs(target_probs[b, m], draft_probs[b, m])[nxt[b]] > 0
        else:
            assert target_probs[b, m, nxt[b]] > 0
    residual = residual_probs(target_probs[:, :k], draft_probs)
    assert (residual >= 0).all()
    torch.testing.assert_close(
        residual.sum(-1).double(), torch.ones(batch, k, dtype=torch.float64), atol=1e-6, rtol=0
    )

    again = verify_sampling(tokens, draft_probs, target_probs, lengths, torch.Generator().manual_seed(seed))
    assert torch.equal(again.num_accepted, n) and torch.equal(again.next_token, nxt)  # seeded = reproducible

    # generator path = explicit uniforms drawn the documented way
    uniforms = torch.rand(batch, k + 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    explicit = verify_sampling(tokens, draft_probs, target_probs, lengths, uniforms=uniforms)
    assert torch.equal(explicit.num_accepted, n) and torch.equal(explicit.next_token, nxt)
    for b in range(batch):  # batched = per request, given each row's uniforms
        row = verify_sampling(
            tokens[b : b + 1], draft_probs[b : b + 1], target_probs[b : b + 1], lengths[b : b + 1],
            uniforms=uniforms[b : b + 1],
        )  # fmt: skip
        assert row.num_accepted.item() == n[b] and row.next_token.item() == nxt[b]


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(0, 6), st.integers(2, 16))
def test_greedy_properties(seed, batch, k, vocab):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, 3, (batch, k + 1, vocab), generator=gen).double()  # many ties
    best = logits.argmax(-1)
    tokens = torch.where(
        torch.rand(batch, k, generator=gen) < 0.7,
        best[:, :k],
        torch.randint(0, vocab, (batch, k), generator=gen),
    )
    lengths = torch.randint(0, k + 1, (batch,), generator=gen)
    result = verify_greedy(tokens, logits, lengths)
    for b in range(batch):
        m = int(result.num_accepted[b])
        assert m <= lengths[b]
        assert torch.equal(tokens[b, :m], best[b, :m])
        assert m == lengths[b] or tokens[b, m] != best[b, m]
        assert result.next_token[b] == best[b, m]
        assert logits[b, m, result.next_token[b]] == logits[b, m].max()
    batched = [verify_greedy(tokens[b : b + 1], logits[b : b + 1], lengths[b : b + 1]) for b in range(batch)]
    assert torch.cat([r.next_token for r in batched]).tolist() == result.next_token.tolist()


def test_verify_result_shapes():
    result = VerifyResult(torch.tensor([0, 2]), torch.tensor([7, 9]), torch.tensor([[1, 2], [3, 4]]))
    assert result.num_emitted.tolist() == [1, 3]
    assert result.emitted_tokens(pad_id=0).tolist() == [[7, 0, 0], [3, 4, 9]]
