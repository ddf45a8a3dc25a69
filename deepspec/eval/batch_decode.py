"""Batched speculative decoding with continuous batching (docs/DESIGN.md §4).

``batch`` rows serve the prompts in order: a row takes the next waiting prompt as soon as
its request ends. One round, over the rows that hold a request:

1. the draft proposes a block for every row in one batched pass;
2. the verification policy (:mod:`deepspec.eval.policies`) picks ``n_r`` tokens per row:
   a fixed length, a confidence threshold, or the prefix scheduler over the whole batch;
3. the target scores ``[anchor_r, x_1..x_{n_r}]`` of every row in one packed forward
   (:class:`~deepspec.eval.ragged_target.RaggedTarget`: ``sum_r (n_r + 1)`` tokens);
4. each row is verified exactly as in the single-request loop (:mod:`deepspec.eval.verify`),
   so every request stays lossless: greedy-exact at temperature 0, distributed as the
   target at temperature > 0;
5. each row's target cache is cropped to its accepted tokens and the draft's context grows
   by their features, independently per row.

A row freed in one round takes its next prompt in the next round: the prompt is prefilled
in that round's packed target forward, beside the other rows' verification (as the plain
baseline prefills beside its decode tokens), and the draft reads its features in the
round's one batched extension. A step's wall time is shared evenly by the requests it
served, so the ``seconds`` of all requests add up to the run's wall time and
``tokens / seconds`` is the batch's throughput.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from deepspec.eval.decode import DecodeResult, _check_limits, _cut, _propose, _sample
from deepspec.eval.policies import VerifyPolicy
from deepspec.eval.ragged_target import RaggedTarget
from deepspec.eval.verify import probs_from_logits, verify_greedy, verify_sampling


@dataclass
class BatchStep:
    """One step of the batch: a decode round of the drafting rows, with the prompts of newly
    admitted requests prefilled in the same target forward."""

    requests: int  # rows that drafted and verified (requests past their first token)
    verified: int  # drafted tokens verified over all rows
    emitted: int  # tokens the step added over all rows (first tokens of new requests included)
    seconds: float
    draft_seconds: float  # proposing, choosing lengths, resetting and extending the draft
    target_seconds: float
    prefill: int = 0  # prompt tokens of requests admitted in this step's forward


@dataclass
class BatchRun:
    results: list[DecodeResult]  # one per prompt, in prompt order
    seconds: float = 0.0  # wall time of the whole run
    steps: list[BatchStep] = field(default_factory=list)


class _Rows:
    """Which request each row serves, and the prompts still waiting."""

    def __init__(self, prompts: Sequence[Sequence[int]], batch: int) -> None:
        self.waiting = deque(range(len(prompts)))
        self.request = [-1] * batch

    def admit(self) -> dict[int, int]:
        """Give every free row the next waiting prompt; ``{row: prompt index}``."""
        taken = {}
        for r, i in enumerate(self.request):
            if i < 0 and self.waiting:
                self.request[r] = taken[r] = self.waiting.popleft()
        return taken


def _share(
    results: list[DecodeResult], requests: Sequence[int], seconds: float, attr: str = "seconds"
) -> None:
    for i in requests:
        setattr(results[i], attr, getattr(results[i], attr) + seconds / len(requests))


def _padded(rows: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Stack ``[n_r, ...]`` tensors into ``[len(rows), width, ...]``, zero-padded."""
    out = rows[0].new_zeros(len(rows), width, *rows[0].shape[1:])
    for i, t in enumerate(rows):
        out[i, : t.shape[0]] = t
    return out


@torch.inference_mode()
def speculative_generate_batch(
    target: RaggedTarget,
    draft,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_ids: set[int],
    generator: torch.Generator | None = None,
    policy: VerifyPolicy | None = None,
    progress: Callable[[DecodeResult], None] | None = None,
) -> BatchRun:
    """Decode ``prompts`` with ``target.rows`` of them in flight (at most one row per prompt);
    lossless per request. ``progress`` is called with each finished request's result."""
    policy = policy or VerifyPolicy()
    _check_limits(max_new_tokens, temperature)
    B, device = target.rows, target.device
    if B > len(prompts):
        raise ValueError(f"{B} rows for {len(prompts)} prompts: use at most one row per prompt")
    clock = time.perf_counter
    start = clock()
    vocab = target.vocab_size
    rows = _Rows(prompts, B)
    results = [DecodeResult(output_ids=[]) for _ in prompts]
    run = BatchRun(results)
    state = draft.new_state(B, device)
    anchors = torch.zeros(B, dtype=torch.long, device=device)
    ids = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    decoding: list[int] = []  # rows whose request has its first token (they draft)

    def finish(r: int) -> None:
        if progress is not None:
            progress(results[rows.request[r]])
        rows.request[r] = -1

    while True:
        t0 = clock()
        active = list(decoding)
        requests = [rows.request[r] for r in active]
        feeds: dict[int, torch.Tensor] = {}
        proposal, n = None, []
        if active:  # rows being admitted still hold a valid old state: drafting first is safe
            proposal = _propose(draft, state, anchors, temperature, generator, vocab)
            confidence = None
            if proposal.confidence is not None:
                confidence = proposal.confidence[active].double().tolist()
                for i, c in zip(requests, proposal.confidence[active].tolist(), strict=True):
                    results[i].confidences.append(c)
            chosen = policy.lengths([proposal.tokens.shape[1]] * len(active), confidence)
            room = [max_new_tokens - len(results[i].output_ids) - 1 for i in requests]
            n = [min(c, left) for c, left in zip(chosen, room, strict=True)]
            for r, k in zip(active, n, strict=True):
                feeds[r] = torch.cat([anchors[r : r + 1], proposal.tokens[r, :k]])
        taken = rows.admit()  # new prompts are prefilled in the same packed forward
        for r, i in taken.items():
            target.reset(r)
            feeds[r] = ids(list(prompts[i]))
        if not feeds:
            break
        t1 = clock()
        out = target.forward(feeds)
        t2 = clock()
        width = max(len(f) for f in feeds.values())
        some = out[next(iter(feeds))][1]
        feats = some.new_zeros(B, width, some.shape[-1])
        kept = torch.zeros(B, width, dtype=torch.long, device=device)
        counts = torch.zeros(B, dtype=torch.long, device=device)
        emitted_total = 0
        if active:
            k = max(n)
            at = torch.tensor(active, device=device)
            block = proposal.tokens[at, :k]
            lengths = torch.tensor(n, device=device)
            logits = _padded([out[r][0] for r in active], k + 1)
            if temperature == 0:
                verdict = verify_greedy(block, logits, lengths)
            else:
                verdict = verify_sampling(
                    block,
                    proposal.probs[at, :k],
                    probs_from_logits(logits, temperature),
                    lengths,
                    generator=generator,
                )
            for j, (r, i, emitted) in enumerate(zip(active, requests, verdict.emitted_lists(), strict=True)):
                m = int(verdict.num_accepted[j])
                res = results[i]
                res.proposed.append(n[j])
                res.accepted.append(m)
                emitted, done = _cut(emitted, eos_ids, max_new_tokens - len(res.output_ids))
                res.output_ids.extend(emitted)
                emitted_total += len(emitted)
                if done:
                    decoding.remove(r)
                    finish(r)
                    continue
                target.crop(r, len(prompts[i]) + len(res.output_ids) - 1)
                feats[r, : m + 1] = out[r][1][: m + 1]
                kept[r, : m + 1] = torch.cat([anchors[r : r + 1], ids(emitted[:-1])])
                counts[r] = m + 1
                anchors[r] = emitted[-1]
        fresh = torch.zeros(B, dtype=torch.bool, device=device)
        for r, i in taken.items():
            first, done = _cut([_sample(out[r][0][-1], temperature, generator)], eos_ids, max_new_tokens)
            results[i].output_ids = first
            emitted_total += 1
            fresh[r] = True
            # the draft reads the prompt even when the request already ended: its row must
            # hold a valid state for the rows that still draft
            n_prompt = len(prompts[i])
            feats[r, :n_prompt], kept[r, :n_prompt], counts[r] = out[r][1], feeds[r], n_prompt
            anchors[r] = first[-1]
            if done:
                finish(r)
            else:
                decoding.append(r)
        t3 = clock()
        if taken:
            draft.reset_rows(state, fresh)
        if int(counts.sum()):
            draft.extend(state, feats, counts, tokens=kept)
        t4 = clock()
        prefill = sum(len(prompts[i]) for i in taken.values())
        step = BatchStep(len(active), sum(n), emitted_total, t4 - t0, (t1 - t0) + (t4 - t3), t2 - t1, prefill)
        run.steps.append(step)
        served = requests + list(taken.values())
        _share(results, served, step.seconds)
        _share(results, served, step.target_seconds, "target_seconds")
        _share(results, served, step.draft_seconds, "draft_seconds")
    run.seconds = clock() - start
    return run


@torch.inference_mode()
def plain_generate_batch(
    target: RaggedTarget,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_ids: set[int],
    generator: torch.Generator | None = None,
    progress: Callable[[DecodeResult], None] | None = None,
) -> BatchRun:
    """Target-only decoding of ``prompts``, ``target.rows`` at a time (the batched baseline)."""
    _check_limits(max_new_tokens, temperature)
    clock = time.perf_counter
    start = clock()
    rows = _Rows(prompts, target.rows)
    results = [DecodeResult(output_ids=[]) for _ in prompts]
    run = BatchRun(results)
    feeds: dict[int, torch.Tensor] = {}
    while True:
        t0 = clock()
        decoding = len(feeds)
        prefill = 0
        for r, i in rows.admit().items():
            target.reset(r)
            feeds[r] = torch.tensor(list(prompts[i]), dtype=torch.long)
            prefill += len(prompts[i])
        if not feeds:
            break
        out = target.forward(feeds, features=False)
        served = [rows.request[r] for r in feeds]
        feeds = {}
        for r, (logits, _) in out.items():
            res = results[rows.request[r]]
            token = _sample(logits[-1], temperature, generator)
            res.output_ids.append(token)
            if token in eos_ids or len(res.output_ids) >= max_new_tokens:
                if progress is not None:
                    progress(res)
                rows.request[r] = -1
            else:
                feeds[r] = torch.tensor([token])
        seconds = clock() - t0
        run.steps.append(BatchStep(decoding, 0, len(served), seconds, 0.0, seconds, prefill))
        _share(results, served, seconds)
        _share(results, served, seconds, "target_seconds")
    run.seconds = clock() - start
    return run
