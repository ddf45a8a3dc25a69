"""Speculative decoding, generic over draft algorithms (batch 1 per call).

One round, with ``a`` the anchor (last emitted token, not yet seen by the target):

1. the draft proposes ``x_1..x_k`` from its context state and ``a``;
2. the verification policy (:mod:`deepspec.eval.policies`) keeps a prefix: the whole
   block, the prefix before the first slot whose confidence ``c_j`` (DSpark) is below a
   threshold, the prefix whose cumulative survival ``prod_{i<=j} c_i`` stays >= a threshold,
   or the prefix scheduler's choice;
3. the target scores ``[a, x_1..x_k]`` in one forward: ``k+1`` distributions;
4. verification (``verify.py``) accepts ``m`` tokens and draws the next token ``y``
   (the correction at the first rejection, or the bonus);
5. the target cache is cropped to the anchor + accepted tokens, the draft's context is
   extended with their features, and ``y`` becomes the anchor.

Output = accepted drafts + ``y`` each round, cut at the first EOS and at ``max_new_tokens``.
Proposals are shortened so that a round never emits more than the tokens still allowed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from deepspec.errors import NumericalError, check_number
from deepspec.eval.policies import VerifyPolicy
from deepspec.eval.target import Target
from deepspec.eval.verify import probs_from_logits, sample_from_probs, verify_greedy, verify_sampling


@dataclass
class DecodeResult:
    output_ids: list[int]  # generated tokens (EOS included when produced)
    proposed: list[int] = field(default_factory=list)  # per round: draft tokens verified
    accepted: list[int] = field(default_factory=list)  # per round: draft tokens accepted
    confidences: list[list[float]] = field(default_factory=list)  # per round, untruncated (DSpark)
    seconds: float = 0.0  # wall time of the whole generation
    target_seconds: float = 0.0  # of which target forwards
    draft_seconds: float = 0.0  # of which draft extend + propose


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """One token from the target's logits [V]."""
    probs = probs_from_logits(logits[None], temperature)
    if temperature == 0:
        return int(probs.argmax())
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=probs.device)
    return int(sample_from_probs(probs, u))


_DIVERGED = "the draft gives non-finite scores (its training diverged); use an earlier checkpoint"


def _propose(draft, state, anchor: torch.Tensor, temperature: float, generator, vocab: int):
    """``draft.propose`` whose non-finite outputs become a one-line :class:`NumericalError`
    (a diverged draft must never turn into out-of-vocabulary token ids)."""
    try:
        proposal = draft.propose(state, anchor, temperature=temperature, generator=generator)
    except FloatingPointError as exc:
        raise NumericalError(f"draft proposal failed ({exc}): {_DIVERGED}") from None
    except RuntimeError as exc:  # torch.multinomial on a distribution with inf/NaN mass
        if "probability tensor" not in str(exc):
            raise
        raise NumericalError(f"draft proposal failed (invalid sampling distribution): {_DIVERGED}") from None
    tokens = proposal.tokens
    if tokens.numel() and (int(tokens.min()) < 0 or (vocab and int(tokens.max()) >= vocab)):
        raise NumericalError(f"the draft proposed token ids outside the vocabulary of {vocab}: {_DIVERGED}")
    conf = proposal.confidence
    if conf is not None and conf.numel() and not bool(torch.isfinite(conf).all()):
        raise NumericalError(f"the draft's confidences are NaN or inf: {_DIVERGED}")
    return proposal


def _check_limits(max_new_tokens: int, temperature: float) -> None:
    check_number("max_new_tokens", max_new_tokens, low=1)
    check_number("temperature", temperature, low=0)


def _cut(tokens: list[int], eos_ids: set[int], room: int) -> tuple[list[int], bool]:
    """Tokens up to and including the first EOS, at most ``room``; whether generation ends."""
    for i, t in enumerate(tokens[:room]):
        if t in eos_ids:
            return tokens[: i + 1], True
    return tokens[:room], len(tokens) >= room


@torch.inference_mode()
def speculative_generate(
    target: Target,
    draft,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_ids: set[int],
    generator: torch.Generator | None = None,
    policy: VerifyPolicy | None = None,
) -> DecodeResult:
    """Generate with ``draft`` proposing and ``target`` verifying; lossless by construction.
    ``policy`` (default: verify the whole block) picks how many drafted tokens to verify."""
    _check_limits(max_new_tokens, temperature)
    policy = policy or VerifyPolicy()
    start = time.perf_counter()
    params = list(draft.parameters()) if hasattr(draft, "parameters") else []
    device = params[0].device if params else torch.device("cpu")
    ids = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    clock = time.perf_counter
    vocab = int(getattr(target, "vocab_size", 0) or 0)
    target.reset()
    prompt = ids(prompt_ids)
    t0 = clock()
    logits, features = target.forward(prompt)
    t1 = clock()
    state = draft.new_state(1, device)
    draft.extend(state, features[None], ids([len(prompt_ids)]), tokens=prompt[None])
    output, done = _cut([_sample(logits[-1], temperature, generator)], eos_ids, max_new_tokens)
    result = DecodeResult(output_ids=output, target_seconds=t1 - t0, draft_seconds=clock() - t1)
    while not done:
        anchor = output[-1]
        t0 = clock()
        proposal = _propose(draft, state, ids([anchor]), temperature, generator, vocab)
        result.draft_seconds += clock() - t0
        confidence = None
        if proposal.confidence is not None:
            result.confidences.append(proposal.confidence[0].tolist())
            confidence = proposal.confidence.double().tolist()
        k = policy.lengths([proposal.tokens.shape[1]], confidence)[0]
        k = min(k, max_new_tokens - len(output) - 1)  # a round emits at most k + 1 tokens
        drafted = proposal.tokens[:, :k]
        t0 = clock()
        logits, features = target.forward(torch.cat([ids([anchor]), drafted[0]]))
        result.target_seconds += clock() - t0
        if temperature == 0:
            verdict = verify_greedy(drafted, logits[None])
        else:
            verdict = verify_sampling(
                drafted,
                proposal.probs[:, :k],
                probs_from_logits(logits[None], temperature),
                generator=generator,
            )
        m = int(verdict.num_accepted[0])
        result.proposed.append(k)
        result.accepted.append(m)
        emitted, done = _cut(verdict.emitted_lists()[0], eos_ids, max_new_tokens - len(output))
        output.extend(emitted)
        if done:
            break
        # keep anchor + accepted drafts in the target cache; their features feed the draft
        target.crop(len(prompt_ids) + len(output) - 1)
        kept = ids([anchor] + emitted[:-1])
        t0 = clock()
        draft.extend(state, features[None, : m + 1], ids([m + 1]), tokens=kept[None])
        result.draft_seconds += clock() - t0
    result.seconds = time.perf_counter() - start
    return result


@torch.inference_mode()
def plain_generate(
    target: Target,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_ids: set[int],
    generator: torch.Generator | None = None,
) -> DecodeResult:
    """Target-only decoding, one token per forward (the speedup baseline)."""
    _check_limits(max_new_tokens, temperature)
    start = time.perf_counter()
    target.reset()
    step = getattr(target, "plain_forward", None) or (lambda t: target.forward(t)[0])
    logits = step(torch.tensor(prompt_ids, dtype=torch.long))
    output: list[int] = []
    while True:
        token = _sample(logits[-1], temperature, generator)
        output.append(token)
        if token in eos_ids or len(output) >= max_new_tokens:
            break
        logits = step(torch.tensor([token]))
    return DecodeResult(output_ids=output, seconds=time.perf_counter() - start)
