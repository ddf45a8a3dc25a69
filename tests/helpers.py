"""Helpers several test modules share (test modules never import each other)."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from deepspec.config import load_config
from deepspec.drafts import build_draft
from deepspec.targets.family import family_spec_from_config, load_family_spec
from deepspec.targets.tiny import build_tiny_target, tiny_config

HAVE_LLAMACPP = importlib.util.find_spec("llama_cpp") is not None
needs_llamacpp = pytest.mark.skipif(
    not HAVE_LLAMACPP,
    reason="llama-cpp-python is not importable (install it with: bash scripts/setup.sh --llamacpp)",
)

# Decoder layer counts of the shipped targets (from their public HF configs).
TARGET_LAYERS = {"qwen3_4b": 36, "qwen3_8b": 36, "qwen3_14b": 40, "gemma4_12b": 48, "smollm2_135m": 30}


def block_attention_inputs(seed: int, B=2, N=6, H=4, G=3, hd=16, KVH=2, S=24) -> tuple[torch.Tensor, ...]:
    """Random ``q`` [B, N, H, G, hd], block keys/values ``kb, vb`` [B, N, KVH, G, hd], context
    keys/values ``kc, vc`` [B, KVH, S, hd] and sorted ``anchors`` [B, N] for
    :func:`deepspec.drafts.blocks.block_attention`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, G, hd, generator=g)
    kb, vb = torch.randn(2, B, N, KVH, G, hd, generator=g)
    kc, vc = torch.randn(2, B, KVH, S, hd, generator=g)
    anchors = torch.sort(torch.randint(0, S, (B, N), generator=g), 1).values
    return q, kb, vb, kc, vc, anchors


# ---- drafts on a tiny family spec (test_drafts, test_draft_vocab) -------------------------

V, D = 128, 64
LAYER_IDS = [0, 2]


def make_cfg(algo: str, **overrides):
    opts = [
        f"algorithm={algo}",
        f"model.target_layer_ids={LAYER_IDS}",
        "model.block_size=5",
        "model.num_draft_layers=2",
        "model.markov_rank=16",
        "model.ttt_length=4",
    ]
    opts += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(opts=opts)


def make_draft(
    algo: str,
    family: str = "qwen3",
    dtype=torch.float32,
    seed: int = 0,
    target: dict | None = None,
    **overrides,
):
    """A draft on a tiny ``family`` spec; ``target``: more fields of the target's config."""
    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size=V, hidden_size=D, num_hidden_layers=4, **(target or {}))
    spec = family_spec_from_config(config)
    cfg = make_cfg(algo, **overrides)
    model = build_draft(cfg, spec=spec).to(dtype)
    with torch.no_grad():  # stand-in for the target's embedding (rows of norm ~0.8)
        model.embed_tokens.weight.normal_(std=0.1)
    if model.pruned:  # a scattered vocabulary, so draft index and target id differ
        ids = torch.randperm(V, generator=torch.Generator().manual_seed(seed + 7))[
            : cfg.model.draft_vocab_size
        ]
        model.set_draft_vocab(ids.sort().values)
    return cfg, model


def random_batch(B: int, S: int, dtype=torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S), generator=g)
    loss_mask = torch.ones(B, S, dtype=torch.long)
    feats = torch.randn(B, S, len(LAYER_IDS) * D, generator=g, dtype=dtype)
    last = torch.randn(B, S, D, generator=g, dtype=dtype)
    return ids, loss_mask, feats, last


def infer(model, ids, feats, anchor_pos, n_tokens=None):
    """Extend with positions < anchor_pos, then propose greedily after the anchor."""
    B = ids.shape[0]
    state = model.new_state(B)
    counts = torch.as_tensor(anchor_pos).expand(B).clone()
    T = int(counts.max())
    model.extend(state, feats[:, :T], counts, tokens=ids[:, :T])
    anchor = ids[torch.arange(B), counts]
    kwargs = {"num_tokens": n_tokens} if model.algorithm == "eagle3" else {}
    return model.propose(state, anchor, temperature=0.0, **kwargs)


def hand_block_loss(cfg, out, ce, l1):
    """DSpark's block loss written out from per-position ``ce`` and ``l1`` [B, N, G]:
    ``(α_ce Σ w·CE + α_tv Σ w·L1 + α_conf Σ w·BCE(c, 1 − L1/2)) / Σ w`` with the position
    weights ``w`` on the eval mask (which already drops dummy blocks). Returns (loss, w)."""
    m = cfg.model
    c = torch.sigmoid(out.confidence_logits)
    c_star = (1 - 0.5 * l1).detach()  # the confidence target carries no gradient
    bce = -(c_star * torch.log(c) + (1 - c_star) * torch.log(1 - c))
    G = out.eval_mask.shape[-1]
    w = torch.exp(-torch.arange(float(G), dtype=torch.float64) / m.loss_decay_gamma) * out.eval_mask
    terms = m.ce_loss_alpha * (w * ce).sum() + m.l1_loss_alpha * (w * l1).sum()
    return (terms + m.confidence_head_alpha * (w * bce).sum()) / w.sum(), w


# ---- tiny targets and drafts for decoding (test_decode, test_batch_decode, test_sliding_window)

DRAFTS = [
    ("dflash", []),
    ("dspark", ["model.markov_head_type=rnn"]),
    ("dspark", ["model.context_window=7", "model.qk_norm=true"]),
    ("dspark", ["model.draft_vocab_size=40"]),
    ("eagle3", []),
    ("eagle3", ["model.draft_vocab_size=40"]),
]
DRAFT_IDS = ["dflash", "dspark-rnn", "dspark-window-qknorm", "dspark-pruned", "eagle3", "eagle3-pruned"]


def tiny_model(tmp_path_factory, family: str, vocab: int, layers: int = 2):
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp(f"{family}{vocab}")
    build_tiny_target(
        family,
        out,
        vocab_size=vocab,
        num_hidden_layers=layers,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        seed=3,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )  # varied, non-repeating outputs
    return str(out), AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def draft_for(target_dir: str, algo: str, extra: list[str], layer_ids=(0, 1), block: int = 4, seed: int = 0):
    cfg = load_config(
        opts=[
            f"algorithm={algo}",
            f"model.target_layer_ids={list(layer_ids)}",
            f"model.block_size={block}",
            "model.num_draft_layers=1",
            "model.markov_rank=8",
            f"model.ttt_length={block}",
            *extra,
        ]
    )
    torch.manual_seed(seed)
    draft_ids = None
    if cfg.model.draft_vocab_size:  # a scattered draft vocabulary: index != target id
        vocab = load_family_spec(target_dir).vocab_size
        pick = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed + 5))
        draft_ids = pick[: cfg.model.draft_vocab_size].sort().values
    return build_draft(cfg, target_dir, draft_ids=draft_ids).eval()


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    return model.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()


V_SMALL = 6
PROMPT = [1, 2, 3]


def exact_joint(model) -> np.ndarray:
    """P(first three generated tokens) of the target, by enumeration: [V, V, V]."""
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([PROMPT])).logits[0, -1].double(), -1)
        two = torch.tensor([PROMPT + [a] for a in range(V_SMALL)])
        p2 = torch.softmax(model(two).logits[:, -1].double(), -1)  # [V, V]
        three = torch.tensor([PROMPT + [a, b] for a, b in itertools.product(range(V_SMALL), repeat=2)])
        p3 = torch.softmax(model(three).logits[:, -1].double(), -1).view(V_SMALL, V_SMALL, V_SMALL)
    return (p1[:, None, None] * p2[:, :, None] * p3).numpy()


def law_check(counts: np.ndarray, exact: np.ndarray) -> tuple[float, float, float]:
    """(chi-square p-value, TV, TV bound for this sample size)."""
    n = counts.sum()
    p, c = exact.ravel(), counts.ravel()
    big = p * n >= 5  # pool rare cells into one bucket
    obs = np.append(c[big], c[~big].sum())
    exp = np.append(p[big] * n, p[~big].sum() * n)
    keep = exp > 0
    pvalue = stats.chisquare(obs[keep], exp[keep]).pvalue
    tv = 0.5 * np.abs(c / n - p).sum()
    bound = 3 * 0.5 * np.sqrt(p * (1 - p) / n).sum()  # 3x the expected TV of an exact sampler
    return float(pvalue), float(tv), float(bound)


# ---- train.py options on a tiny cache (test_train, test_bad_inputs_train) ----------------------


def opts_for(setup, root, algo="dspark", **extra):
    opts = {
        "algorithm": algo,
        "model.target_model_name_or_path": setup["target"],
        "model.target_layer_ids": "[0,2]",
        "model.block_size": 4,
        "model.num_draft_layers": 1,
        "model.markov_rank": 8,
        "model.num_anchors": 16,
        "model.ttt_length": 3,
        "data.target_cache_path": setup["cache"],
        "data.max_length": 256,
        "data.min_loss_tokens": 4,
        "train.precision": "fp32",
        "train.global_batch_size": 4,
        "train.local_batch_size": 2,
        "train.max_train_steps": 4,
        "train.lr": 1e-3,
        "logging.logging_steps": 1,
        "logging.checkpointing_steps": 2,
        "logging.keep_last_checkpoints": 0,
        "logging.checkpoint_root": str(root / "ck"),
        "logging.tensorboard_root": str(root / "tb"),
        "exp_name": "run",
    }
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]
