"""Shared fixtures: the embedded SmolLM2 target and tiny random targets of every family."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests need a CUDA device: skipped, with the reason, where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (the gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """HF directory of the embedded SmolLM2-135M-Instruct (converted once, then cached)."""
    from deepspec.targets import resolve_target

    return resolve_target("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory, smollm2_dir):
    """``tiny_target(family)`` → directory of a tiny random target with the SmolLM2 tokenizer."""
    from deepspec.targets.tiny import build_tiny_target

    built: dict[str, str] = {}

    def make(family: str) -> str:
        if family not in built:
            out = tmp_path_factory.mktemp(f"tiny_{family}")
            built[family] = build_tiny_target(family, out, tokenizer_dir=smollm2_dir)
        return built[family]

    return make


@pytest.fixture(scope="module")
def single_thread():
    """Torch on one thread for the module (tiny models)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: thread start-up costs more than the maths
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_target(tmp_path_factory):
    """A one-layer tiny llama with a 6-token vocabulary and its exact joint law of the first
    three tokens after ``PROMPT`` (helpers.exact_joint)."""
    from tests.helpers import V_SMALL, exact_joint, tiny_model

    target_dir, model = tiny_model(tmp_path_factory, "llama", vocab=V_SMALL, layers=1)
    return target_dir, model, exact_joint(model)


def tiny_dspark(target_dir: str, seed: int = 0, opts: tuple[str, ...] = ()):
    """A DSpark draft (block 3, one layer, Markov rank 8, confidence head) for a tiny
    target whose layers 0 and 1 it reads; random weights from ``seed``; ``opts`` are more
    config overrides."""
    import torch

    from deepspec.config import load_config
    from deepspec.drafts import build_draft

    cfg = load_config(
        opts=[
            "algorithm=dspark",
            "model.target_layer_ids=[0, 1]",
            "model.block_size=3",
            "model.num_draft_layers=1",
            "model.markov_rank=8",
            *opts,
        ]
    )
    torch.manual_seed(seed)
    return build_draft(cfg, target_dir)
