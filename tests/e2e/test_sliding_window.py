"""Sliding-window targets (Gemma 3, Gemma 4) past their window: both targets crop rejected
drafts at any length and still attend like the model's own forward; speculative decoding,
at batch 1 and batched, equals transformers' greedy ``generate`` and is lossless at
temperature 1."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from deepspec.drafts import Proposal
from deepspec.eval.batch_decode import plain_generate_batch, speculative_generate_batch
from deepspec.eval.decode import plain_generate, speculative_generate
from deepspec.eval.ragged_target import RaggedTarget
from deepspec.eval.target import HFTarget
from tests.conftest import tiny_dspark
from tests.helpers import (
    V_SMALL,
    draft_for,
    greedy_reference,
    law_check,
    tiny_model,
)

FAMILIES = ["gemma3_text", "gemma4_text"]
WINDOW = 64  # tiny_config's sliding_window for both families
NEW = 64  # new tokens: prompt plus output run well past the window
VOCAB = 96


def random_prompt(length: int, seed: int, vocab: int = VOCAB, low: int = 1) -> list[int]:
    """Token ids in ``[low, vocab)`` (no 0: ``generate`` takes 0 for padding here)."""
    return torch.randint(low, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPT = random_prompt(100, 0)
PROMPTS = [PROMPT, random_prompt(40, 1), random_prompt(75, 2), random_prompt(130, 3), random_prompt(63, 4)]


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """``windowed(family)`` → (directory, model, the same weights with a window no prompt
    reaches): tiny targets of 3 layers, two of them sliding-window ones."""
    from transformers import AutoModelForCausalLM

    built: dict[str, tuple] = {}

    def make(family: str) -> tuple:
        if family not in built:
            target_dir, model = tiny_model(tmp_path_factory, family, vocab=VOCAB, layers=3)
            assert model.config.sliding_window == WINDOW
            assert model.config.layer_types.count("sliding_attention") == 2
            wide = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32, sliding_window=4096)
            built[family] = (target_dir, model, wide.eval())
        return built[family]

    return make


class ReferenceDraft:
    """A batched draft that knows each request's greedy continuation and proposes it with
    the token at a position that varies from round to round changed: acceptance lengths vary
    0..k, so the targets crop anything from 0 to k rejected drafts."""

    algorithm = "oracle"

    def __init__(self, prompts: list[list[int]], refs: list[list[int]], k: int) -> None:
        self.sequences = [p + r for p, r in zip(prompts, refs, strict=True)]
        self.k = k

    def new_state(self, batch: int, device="cpu") -> list[list[int]]:
        return [[] for _ in range(batch)]

    def reset_rows(self, state, rows) -> None:
        for r in torch.nonzero(rows).flatten().tolist():
            state[r] = []

    def extend(self, state, features, counts, tokens=None) -> None:
        for r, n in enumerate(counts.tolist()):
            state[r] += tokens[r, :n].tolist()

    def _block(self, seen: list[int]) -> list[int]:
        match = [s for s in self.sequences if s[: len(seen)] == seen]
        block = (match[0][len(seen) : len(seen) + self.k] if match else []) + [0] * self.k
        block = block[: self.k]
        wrong = random.Random(len(seen)).randrange(self.k + 2)  # >= k: every token right
        if wrong < self.k:
            block[wrong] = block[wrong] % (VOCAB - 1) + 1
        return block

    def propose(self, state, anchor, temperature=0.0, generator=None) -> Proposal:
        tokens = torch.tensor([self._block(history + [int(a)]) for history, a in zip(state, anchor.tolist())])
        probs = torch.nn.functional.one_hot(tokens, VOCAB).float()
        return Proposal(tokens, probs, probs.log())


@pytest.mark.parametrize("family", FAMILIES)
def test_targets_crop_past_the_window_and_attend_like_a_full_forward(windowed, single_thread, family):  # noqa: F811
    """Feeds of 5 tokens, each followed by a crop of 0..5 of them, from a 100-token prompt on:
    every fed position gets the logits of the model's own forward over its history (which
    differ from those of attention without the window)."""
    _, model, wide = windowed(family)
    single, ragged = HFTarget(model, [0, 1]), RaggedTarget(model, [0, 1], rows=2)
    histories = {0: list(PROMPT), 1: list(PROMPTS[1])}
    single.reset()
    single.forward(torch.tensor(histories[0]))
    ragged.forward({r: torch.tensor(h) for r, h in histories.items()})
    moved = 0.0
    for step in range(12):
        feeds = {r: random_prompt(5, 100 * r + step) for r in histories}
        single_logits = single.forward(torch.tensor(feeds[0]))[0]  # row 0's history
        out = ragged.forward({r: torch.tensor(t) for r, t in feeds.items()})
        for r, tokens in feeds.items():
            sequence = torch.tensor([histories[r] + tokens])
            with torch.no_grad():
                expect = model(sequence).logits[0, -5:]
                moved = max(moved, float((wide(sequence).logits[0, -5:] - expect).abs().max()))
            torch.testing.assert_close(out[r][0], expect, atol=2e-4, rtol=1e-4)
            if r == 0:
                torch.testing.assert_close(single_logits, expect, atol=2e-4, rtol=1e-4)
            keep = len(histories[r]) + (step + r) % 6  # keep 0..5 of the fed tokens
            histories[r] = (histories[r] + tokens)[:keep]
            ragged.crop(r, keep)
        single.crop(len(histories[0]))
    assert len(histories[1]) > WINDOW + 5  # row 1 crossed the window on the way
    assert moved > 0.1, "the window does not change these logits: the test checks nothing"


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_past_the_window_equals_transformers_generate(windowed, single_thread, family):  # noqa: F811
    target_dir, model, wide = windowed(family)
    ref = greedy_reference(model, PROMPT, NEW)
    assert ref != greedy_reference(wide, PROMPT, NEW), "the window does not change the output"
    target = HFTarget(model, [0, 1])
    assert plain_generate(target, PROMPT, max_new_tokens=NEW, temperature=0, eos_ids=set()).output_ids == ref
    for draft in (tiny_dspark(target_dir), ReferenceDraft([PROMPT], [ref], k=5)):
        out = speculative_generate(target, draft, PROMPT, max_new_tokens=NEW, temperature=0, eos_ids=set())
        assert out.output_ids == ref
        assert any(m < k for m, k in zip(out.accepted, out.proposed))  # drafts were rolled back
    assert len(set(out.accepted)) >= 4  # the reference draft: crops of many sizes


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_past_the_window_equals_transformers_generate(windowed, single_thread, family):  # noqa: F811
    """Five requests of 40..130 prompt tokens, three rows: some start past the window, some
    cross it while decoding, rows are reused."""
    target_dir, model, _ = windowed(family)
    refs = [greedy_reference(model, p, NEW) for p in PROMPTS]
    for draft in (tiny_dspark(target_dir), ReferenceDraft(PROMPTS, refs, k=5)):
        run = speculative_generate_batch(
            RaggedTarget(model, [0, 1], 3), draft, PROMPTS, max_new_tokens=NEW, temperature=0, eos_ids=set()
        )
        assert [r.output_ids for r in run.results] == refs
    assert len({m for r in run.results for m in r.accepted}) >= 4
    plain = plain_generate_batch(
        RaggedTarget(model, [0, 1], 3), PROMPTS, max_new_tokens=NEW, temperature=0, eos_ids=set()
    )
    assert [r.output_ids for r in plain.results] == refs


# ---- losslessness at temperature 1 ----------------------------------------------------------

LONG_PROMPT = random_prompt(WINDOW + 6, 5, vocab=V_SMALL, low=0)


def exact_joint_after(model, prompt: list[int]) -> np.ndarray:
    """P(first three generated tokens after ``prompt``), by enumeration: [V, V, V]."""
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
        two = torch.tensor([prompt + [a] for a in range(V_SMALL)])
        p2 = torch.softmax(model(two).logits[:, -1].double(), -1)  # [V, V]
        three = torch.tensor([prompt + [a, b] for a, b in itertools.product(range(V_SMALL), repeat=2)])
        p3 = torch.softmax(model(three).logits[:, -1].double(), -1).view(V_SMALL, V_SMALL, V_SMALL)
    return (p1[:, None, None] * p2[:, :, None] * p3).numpy()


def tally(outputs: list[list[int]]) -> np.ndarray:
    counts = np.zeros((V_SMALL,) * 3)
    for tokens in outputs:
        counts[tuple(tokens)] += 1
    return counts


def batched_outputs(model, draft, n: int, generator: torch.Generator) -> list[list[int]]:
    run = speculative_generate_batch(
        RaggedTarget(model, [0, 1], 16),
        draft,
        [LONG_PROMPT] * n,
        max_new_tokens=3,
        temperature=1.0,
        eos_ids=set(),
        generator=generator,
    )
    return [r.output_ids for r in run.results]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_sampling_past_the_window_is_lossless(
    tmp_path_factory,
    single_thread,  # noqa: F811
    family,
    monkeypatch,
):
    """The first three tokens after a prompt longer than the window follow the target's law,
    one request at a time and sixteen in flight: the first round's rejected draft is cropped
    with the window full. The same check fails when the target keeps the rejected draft."""
    target_dir, model = tiny_model(tmp_path_factory, family, vocab=V_SMALL)
    with torch.no_grad():  # sharper distributions: a cache holding a rejected draft shows
        model.get_output_embeddings().weight.mul_(4)
    exact = exact_joint_after(model, LONG_PROMPT)
    draft = draft_for(target_dir, "dspark", [], layer_ids=(0, 1), block=2)
    target, generator = HFTarget(model, [0, 1]), torch.Generator().manual_seed(0)
    runs = [
        speculative_generate(
            target, draft, LONG_PROMPT, max_new_tokens=3, temperature=1.0, eos_ids=set(), generator=generator
        )
        for _ in range(3000)
    ]
    assert {m for r in runs for m in r.accepted} == {0, 1}
    pvalue, tv, bound = law_check(tally([r.output_ids for r in runs]), exact)
    assert pvalue > 1e-4 and tv < bound, (pvalue, tv, bound)
    pvalue, tv, bound = law_check(tally(batched_outputs(model, draft, 6000, generator)), exact)
    assert pvalue > 1e-4 and tv < bound, (pvalue, tv, bound)
    monkeypatch.setattr(RaggedTarget, "crop", lambda self, row, length: None)
    pvalue, tv, bound = law_check(tally(batched_outputs(model, draft, 2000, generator)), exact)
    assert pvalue < 1e-4 or tv > bound, (pvalue, tv, bound)
