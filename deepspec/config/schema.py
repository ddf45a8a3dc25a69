"""The one config schema: every key, its default, type, allowed values and meaning.

Defaults are the reference setting (DSpark on Qwen3-4B, docs/DESIGN.md §2). Per-algorithm
defaults (``ALGORITHM_DEFAULTS``) are applied on top before a config file, so a DFlash
config does not have to switch off the DSpark heads by hand.

Key names follow the reference trainer so its documented ``--opts`` lines keep working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deepspec.algorithms import ALGORITHMS as REGISTERED

ALGORITHMS = tuple(REGISTERED)


@dataclass(frozen=True)
class Field:
    """One config key.

    ``kind`` is one of ``int``, ``float``, ``bool``, ``str``, ``list[int]``, ``list[str]``.
    ``optional`` allows ``None``. ``minimum``/``exclusive_minimum``/``maximum``/
    ``exclusive_maximum`` bound numbers (and list items for ``list[int]``). Floats are always
    finite (NaN and inf are refused).
    """

    key: str
    default: Any
    kind: str
    help: str
    optional: bool = False
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    exclusive_maximum: float | None = None


def _f(key: str, default: Any, kind: str, help: str, **kw: Any) -> Field:
    return Field(key=key, default=default, kind=kind, help=help, **kw)


FIELDS: tuple[Field, ...] = (
    # ---- top level -------------------------------------------------------------------
    _f("project_name", "deepspec", "str", "Groups experiments under <root>/<project_name>/."),
    _f("exp_name", "", "str", "Experiment name; empty = '<algorithm>_<target basename>'."),
    _f("seed", 42, "int", "Seed for anchors, data order and initialisation.", minimum=0),
    _f("algorithm", "dspark", "str", "Draft algorithm.", choices=ALGORITHMS),
    # ---- model -----------------------------------------------------------------------
    _f(
        "model.target_model_name_or_path",
        "Qwen/Qwen3-4B",
        "str",
        "Target: local HF dir, hub id, .gguf file or 'embedded:smollm2-135m-instruct'.",
    ),
    _f("model.block_size", 7, "int", "DFlash/DSpark block size gamma (drafts per round).", minimum=1),
    _f("model.num_draft_layers", 5, "int", "DFlash/DSpark draft decoder layers.", minimum=1),
    _f("model.draft_num_hidden_layers", 1, "int", "Eagle3 draft decoder layers.", minimum=1),
    _f(
        "model.target_layer_ids",
        [1, 9, 17, 25, 33],
        "list[int]",
        "Target layers whose outputs form the context features (0-based; -1 = embeddings).",
        minimum=-1,
    ),
    _f(
        "model.mask_token_id",
        None,
        "int",
        "Token id whose embedding fills the block's mask slots; null = a learned vector.",
        optional=True,
        minimum=0,
    ),
    _f(
        "model.context_window",
        0,
        "int",
        "DFlash/DSpark: a sliding window over positions, as llama.cpp and vLLM apply it: block slot k "
        "(position a+k) sees context j < a only if a+k-j < W, so slot 0 sees the newest W-1 target "
        "positions; 0 = all of them. Must be 0 or >= model.block_size.",
        minimum=0,
    ),
    _f(
        "model.draft_vocab_size",
        0,
        "int",
        "Pruned draft vocabulary: the draft scores only the N most frequent supervised tokens of "
        "the training data (d2t/t2d in the checkpoint, as vLLM, SGLang and llama.cpp read them); "
        "0 = the target's whole vocabulary.",
        minimum=0,
    ),
    _f(
        "model.qk_norm",
        None,
        "bool",
        "DFlash/DSpark: RMSNorm on per-head queries and keys in the draft layers; null = as the "
        "target family does (Qwen3, Gemma: yes; Llama: no).",
        optional=True,
    ),
    _f("model.num_anchors", 512, "int", "Anchors (blocks) sampled per training sequence.", minimum=1),
    _f("model.markov_rank", 256, "int", "Rank r of the DSpark sequential head; 0 disables it.", minimum=0),
    _f(
        "model.markov_head_type",
        "vanilla",
        "str",
        "DSpark sequential head.",
        choices=("vanilla", "gated", "rnn"),
    ),
    _f(
        "model.confidence_head_alpha",
        1.0,
        "float",
        "Weight of the confidence BCE loss; 0 = no head.",
        minimum=0.0,
    ),
    _f(
        "model.confidence_head_with_markov",
        True,
        "bool",
        "Confidence head also sees the Markov embedding of the previous token.",
    ),
    _f(
        "model.loss_decay_gamma",
        4.0,
        "float",
        "Position weight w_k = exp(-k / gamma).",
        exclusive_minimum=0.0,
    ),
    _f("model.ce_loss_alpha", 0.1, "float", "Weight of the cross-entropy loss.", minimum=0.0),
    _f("model.l1_loss_alpha", 0.9, "float", "Weight of the total-variation (L1) loss.", minimum=0.0),
    _f(
        "model.tv_ramp_ratio",
        0.0,
        "float",
        "DFlash/DSpark curriculum: over this fraction of the steps the TV (L1) weight ramps from 0 "
        "to l1_loss_alpha while the CE weight falls from ce+l1 to ce_loss_alpha; 0 = fixed weights.",
        minimum=0.0,
        maximum=1.0,
    ),
    _f("model.ttt_length", 7, "int", "Eagle3 training-time-test unroll length.", minimum=1),
    _f(
        "model.eagle3_num_positions",
        None,
        "int",
        "Eagle3: supervise this many sampled positions per sequence (the block drafters' anchors: "
        "the same (position, depth) pairs); null = every position.",
        optional=True,
        minimum=1,
    ),
    _f(
        "model.step_loss_decay",
        0.8,
        "float",
        "Eagle3 per-step loss weight decay.",
        exclusive_minimum=0.0,
        maximum=1.0,
    ),
    _f(
        "model.output_norm_init",
        "calibrated",
        "str",
        "Start of the draft's final norm weight: calibrated = 1/rms(LM-head row norm), so fresh "
        "logits have std ~1 (near-uniform CE); target = the target's own final norm (a draft state "
        "equal to the target's gives its exact logits); ones = weight 1.",
        choices=("calibrated", "target", "ones"),
    ),
    _f(
        "model.output_norm_scale",
        1.0,
        "float",
        "Multiplies the initial final-norm weight (after model.output_norm_init): > 1 starts the "
        "draft with sharper distributions.",
        exclusive_minimum=0.0,
    ),
    _f(
        "model.init_from_draft",
        "",
        "str",
        "Start from this draft's weights: a deepspec or DeepSpec-reference checkpoint directory, "
        "or a hub id (e.g. deepseek-ai/dspark_qwen3_4b_block7); same algorithm and shapes. "
        "Empty = random initialisation. A resumed run continues from its own checkpoint.",
    ),
    _f(
        "model.init_std",
        0.02,
        "float",
        "Std of the normal initialisation of the draft decoder layers' weights.",
        exclusive_minimum=0.0,
    ),
    _f(
        "model.attention_backend",
        "auto",
        "str",
        "Block-sparse training attention: flex (CUDA), sdpa (dense mask) or auto.",
        choices=("auto", "flex", "sdpa"),
    ),
    # ---- train -----------------------------------------------------------------------
    _f("train.lr", 6e-4, "float", "Peak learning rate (AdamW).", exclusive_minimum=0.0),
    _f(
        "train.warmup_ratio", 0.04, "float", "Fraction of steps with linear warmup.", minimum=0.0, maximum=1.0
    ),
    _f(
        "train.lr_scheduler",
        "cosine",
        "str",
        "After warmup: cosine decay to 0, constant, or wsd (constant, then linear decay to 0 over "
        "the last train.decay_ratio of the steps).",
        choices=("cosine", "constant", "wsd"),
    ),
    _f(
        "train.decay_ratio",
        0.2,
        "float",
        "wsd: fraction of all steps spent decaying to 0.",
        minimum=0.0,
        maximum=1.0,
    ),
    _f("train.weight_decay", 0.0, "float", "AdamW weight decay.", minimum=0.0),
    _f("train.adam_beta1", 0.9, "float", "AdamW beta1 (in [0, 1)).", minimum=0.0, exclusive_maximum=1.0),
    _f("train.adam_beta2", 0.95, "float", "AdamW beta2 (in [0, 1)).", minimum=0.0, exclusive_maximum=1.0),
    _f("train.precision", "bf16", "str", "Training precision.", choices=("bf16", "fp32")),
    _f("train.local_batch_size", 1, "int", "Sequences per worker per micro-step.", minimum=1),
    _f("train.global_batch_size", 512, "int", "Sequences per optimizer step over all workers.", minimum=1),
    _f("train.num_train_epochs", 10, "int", "Epochs (ignored when max_train_steps is set).", minimum=1),
    _f(
        "train.max_train_steps",
        None,
        "int",
        "Stop after this many optimizer steps.",
        optional=True,
        minimum=1,
    ),
    _f("train.max_grad_norm", 1.0, "float", "Gradient clipping norm; 0 disables clipping.", minimum=0.0),
    _f(
        "train.sharding_strategy",
        "no_shard",
        "str",
        "no_shard = DDP; full_shard = FSDP.",
        choices=("no_shard", "full_shard", "shard_grad_op"),
    ),
    _f(
        "train.torch_compile",
        False,
        "bool",
        "Compile the LM-head loss's vocabulary kernel with torch.compile (about 3x faster on it; "
        "one ~20 s compile per process, needs a C++ compiler on CPU). The CUDA block attention "
        "is compiled on its own either way.",
    ),
    _f("train.num_cpu_workers", 1, "int", "gloo worker processes when no GPU is visible.", minimum=1),
    _f("train.resume", True, "bool", "Resume from <checkpoint_dir>/step_latest when it exists."),
    # ---- data ------------------------------------------------------------------------
    _f(
        "data.mode",
        "offline",
        "str",
        "offline = read the target cache; online = run the target inside each worker.",
        choices=("offline", "online"),
    ),
    _f("data.target_cache_path", None, "str", "Target cache directory (offline mode).", optional=True),
    _f("data.train_data_paths", [], "list[str]", "Regenerated conversation JSONL files (online mode)."),
    _f(
        "data.chat_template",
        "auto",
        "str",
        "'auto' = the target tokenizer's own template, or a path to a Jinja template file.",
    ),
    _f("data.system_prompt", None, "str", "System prompt added to conversations without one.", optional=True),
    _f("data.enable_thinking", False, "bool", "Passed to chat templates that support thinking."),
    _f("data.max_length", 4096, "int", "Truncate tokenized conversations to this many tokens.", minimum=2),
    _f("data.min_loss_tokens", 14, "int", "Drop samples with fewer supervised tokens.", minimum=0),
    _f("data.shuffle", True, "bool", "Shuffle samples each epoch (seeded)."),
    _f(
        "data.heldout_samples",
        0,
        "int",
        "Hold out the last N samples of the cache from training and score them (real and zeroed "
        "features) every logging.heldout_steps steps and at the end; 0 = none.",
        minimum=0,
    ),
    _f(
        "data.max_samples",
        None,
        "int",
        "Train on the first N samples of the cache only (overfit checks, quick trials); null = all.",
        optional=True,
        minimum=1,
    ),
    # ---- logging ---------------------------------------------------------------------
    _f("logging.logging_steps", 10, "int", "Log metrics every N optimizer steps.", minimum=1),
    _f(
        "logging.heldout_steps",
        0,
        "int",
        "Score the held-out samples (data.heldout_samples) every N steps; 0 = at the last step only.",
        minimum=0,
    ),
    _f("logging.checkpointing_steps", 3000, "int", "Save a checkpoint every N optimizer steps.", minimum=1),
    _f("logging.keep_last_checkpoints", 3, "int", "Keep the newest K step checkpoints; 0 = all.", minimum=0),
    _f("logging.checkpoint_root", "~/checkpoints", "str", "Root of checkpoint directories."),
    _f("logging.tensorboard_root", "~/tensorboard", "str", "Root of TensorBoard directories."),
    _f(
        "logging.checkpoint_dir",
        None,
        "str",
        "Derived: <checkpoint_root>/<project_name>/<exp_name> unless set.",
        optional=True,
    ),
    _f(
        "logging.tensorboard_dir",
        None,
        "str",
        "Derived: <tensorboard_root>/<project_name>/<exp_name> unless set.",
        optional=True,
    ),
)

FIELDS_BY_KEY: dict[str, Field] = {f.key: f for f in FIELDS}
SECTIONS = ("model", "train", "data", "logging")

# Keys the reference's configs carry that training does not read: accepted, reported in one
# note and dropped, so those configs load unchanged (a prefix ending in "." covers a section).
RETIRED_KEYS = {
    "eval.": "train.py does not evaluate; pass these to eval.py as flags (eval.py --help)",
    "data.num_workers": "batches are read in the training process",
}

# Applied over the schema defaults, before the config file, by `algorithm` (each
# algorithm's registry entry holds its own: deepspec/algorithms.py).
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    name: dict(entry.config_defaults) for name, entry in REGISTERED.items()
}
