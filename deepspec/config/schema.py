"""The one config schema: every key, its type, default, allowed values and meaning.

The schema is written once, as the frozen dataclasses :class:`Config` (the top-level keys)
and its sections :class:`ModelConfig`, :class:`TrainConfig`, :class:`DataConfig` and
:class:`LoggingConfig`: a key is an annotated field whose type is its kind and whose
:func:`_f` entry holds its default, help, choices and bounds. ``FIELDS`` (one
:class:`Field` record per ``key.path``), ``FIELDS_BY_KEY`` and ``SECTIONS`` are derived from
them for the loader and listings. The loader (:mod:`deepspec.config.loader`) coerces and
checks every value, then builds the :class:`Config` once (:meth:`Config.from_flat`); the code
reads it by attribute (``cfg.model.block_size``).

Defaults are the reference setting (DSpark on Qwen3-4B, docs/DESIGN.md §2). Per-algorithm
defaults (``ALGORITHM_DEFAULTS``) are applied on top before a config file, so a DFlash
config does not have to switch off the DSpark heads by hand.

Key names follow the reference trainer so its documented ``--opts`` lines keep working.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deepspec.algorithms import ALGORITHMS as REGISTERED

ALGORITHMS = tuple(REGISTERED)
# A key's type (its dataclass annotation, optionally ``| None``) is one of these kinds.
KINDS = ("int", "float", "bool", "str", "list[int]", "list[str]")


@dataclass(frozen=True)
class Field:
    """One config key, as the schema's dataclasses declare it.

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


def _f(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] | None = None,
    minimum: float | None = None,
    exclusive_minimum: float | None = None,
    maximum: float | None = None,
    exclusive_maximum: float | None = None,
) -> Any:
    """One key of a schema dataclass: its default, help, and allowed values or bounds.

    The key's kind and whether it may be ``None`` come from the field's annotation
    (``int``, ``int | None``, ``list[int]`` ...). A list default is copied per instance."""
    metadata = dict(
        help=help,
        choices=choices,
        minimum=minimum,
        exclusive_minimum=exclusive_minimum,
        maximum=maximum,
        exclusive_maximum=exclusive_maximum,
    )
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """``model.*``: the target, the draft's shape, its heads and its losses."""

    target_model_name_or_path: str = _f(
        "Qwen/Qwen3-4B",
        "Target: local HF dir, hub id, .gguf file or 'embedded:smollm2-135m-instruct'.",
    )
    block_size: int = _f(7, "DFlash/DSpark block size gamma (drafts per round).", minimum=1)
    num_draft_layers: int = _f(5, "DFlash/DSpark draft decoder layers.", minimum=1)
    draft_num_hidden_layers: int = _f(1, "Eagle3 draft decoder layers.", minimum=1)
    target_layer_ids: list[int] = _f(
        [1, 9, 17, 25, 33],
        "Target layers whose outputs form the context features (0-based; -1 = embeddings).",
        minimum=-1,
    )
    mask_token_id: int | None = _f(
        None,
        "Token id whose embedding fills the block's mask slots; null = a learned vector.",
        minimum=0,
    )
    context_window: int = _f(
        0,
        "DFlash/DSpark: a sliding window over positions, as llama.cpp and vLLM apply it: block slot k "
        "(position a+k) sees context j < a only if a+k-j < W, so slot 0 sees the newest W-1 target "
        "positions; 0 = all of them. Must be 0 or >= model.block_size.",
        minimum=0,
    )
    draft_vocab_size: int = _f(
        0,
        "Pruned draft vocabulary: the draft scores only the N most frequent supervised tokens of the "
        "training data (d2t/t2d in the checkpoint, as vLLM, SGLang and llama.cpp read them); 0 = the "
        "target's whole vocabulary.",
        minimum=0,
    )
    qk_norm: bool | None = _f(
        None,
        "DFlash/DSpark: RMSNorm on per-head queries and keys in the draft layers; null = as the target "
        "family does (Qwen3, Gemma: yes; Llama: no).",
    )
    num_anchors: int = _f(512, "Anchors (blocks) sampled per training sequence.", minimum=1)
    markov_rank: int = _f(256, "Rank r of the DSpark sequential head; 0 disables it.", minimum=0)
    markov_head_type: str = _f("vanilla", "DSpark sequential head.", choices=("vanilla", "gated", "rnn"))
    confidence_head_alpha: float = _f(1.0, "Weight of the confidence BCE loss; 0 = no head.", minimum=0.0)
    confidence_head_with_markov: bool = _f(
        True,
        "Confidence head also sees the Markov embedding of the previous token.",
    )
    loss_decay_gamma: float = _f(4.0, "Position weight w_k = exp(-k / gamma).", exclusive_minimum=0.0)
    ce_loss_alpha: float = _f(0.1, "Weight of the cross-entropy loss.", minimum=0.0)
    l1_loss_alpha: float = _f(0.9, "Weight of the total-variation (L1) loss.", minimum=0.0)
    tv_ramp_ratio: float = _f(
        0.0,
        "DFlash/DSpark curriculum: over this fraction of the steps the TV (L1) weight ramps from 0 to "
        "l1_loss_alpha while the CE weight falls from ce+l1 to ce_loss_alpha; 0 = fixed weights.",
        minimum=0.0,
        maximum=1.0,
    )
    ttt_length: int = _f(7, "Eagle3 training-time-test unroll length.", minimum=1)
    eagle3_num_positions: int | None = _f(
        None,
        "Eagle3: supervise this many sampled positions per sequence (the block drafters' anchors: the same "
        "(position, depth) pairs); null = every position.",
        minimum=1,
    )
    step_loss_decay: float = _f(0.8, "Eagle3 per-step loss weight decay.", exclusive_minimum=0.0, maximum=1.0)
    output_norm_init: str = _f(
        "calibrated",
        "Start of the draft's final norm weight: calibrated = 1/rms(LM-head row norm), so fresh logits have "
        "std ~1 (near-uniform CE); target = the target's own final norm (a draft state equal to the "
        "target's gives its exact logits); ones = weight 1.",
        choices=("calibrated", "target", "ones"),
    )
    output_norm_scale: float = _f(
        1.0,
        "Multiplies the initial final-norm weight (after model.output_norm_init): > 1 starts the draft with "
        "sharper distributions.",
        exclusive_minimum=0.0,
    )
    init_from_draft: str = _f(
        "",
        "Start from this draft's weights: a deepspec or DeepSpec-reference checkpoint directory, or a hub "
        "id (e.g. deepseek-ai/dspark_qwen3_4b_block7); same algorithm and shapes. Empty = random "
        "initialisation. A resumed run continues from its own checkpoint.",
    )
    init_std: float = _f(
        0.02,
        "Std of the normal initialisation of the draft decoder layers' weights.",
        exclusive_minimum=0.0,
    )
    attention_backend: str = _f(
        "auto",
        "Block-sparse training attention: flex (CUDA), sdpa (dense mask) or auto.",
        choices=("auto", "flex", "sdpa"),
    )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """``train.*``: optimizer, schedule, batch sizes, precision and parallelism."""

    lr: float = _f(6e-4, "Peak learning rate (AdamW).", exclusive_minimum=0.0)
    warmup_ratio: float = _f(0.04, "Fraction of steps with linear warmup.", minimum=0.0, maximum=1.0)
    lr_scheduler: str = _f(
        "cosine",
        "After warmup: cosine decay to 0, constant, or wsd (constant, then linear decay to 0 over the last "
        "train.decay_ratio of the steps).",
        choices=("cosine", "constant", "wsd"),
    )
    decay_ratio: float = _f(0.2, "wsd: fraction of all steps spent decaying to 0.", minimum=0.0, maximum=1.0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", minimum=0.0)
    adam_beta1: float = _f(0.9, "AdamW beta1 (in [0, 1)).", minimum=0.0, exclusive_maximum=1.0)
    adam_beta2: float = _f(0.95, "AdamW beta2 (in [0, 1)).", minimum=0.0, exclusive_maximum=1.0)
    precision: str = _f("bf16", "Training precision.", choices=("bf16", "fp32"))
    local_batch_size: int = _f(1, "Sequences per worker per micro-step.", minimum=1)
    global_batch_size: int = _f(512, "Sequences per optimizer step over all workers.", minimum=1)
    num_train_epochs: int = _f(10, "Epochs (ignored when max_train_steps is set).", minimum=1)
    max_train_steps: int | None = _f(None, "Stop after this many optimizer steps.", minimum=1)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.", minimum=0.0)
    sharding_strategy: str = _f(
        "no_shard",
        "no_shard = DDP; full_shard = FSDP.",
        choices=("no_shard", "full_shard", "shard_grad_op"),
    )
    torch_compile: bool = _f(
        False,
        "Compile the LM-head loss's vocabulary kernel with torch.compile (about 3x faster on it; one ~20 s "
        "compile per process, needs a C++ compiler on CPU). The CUDA block attention is compiled on its own "
        "either way.",
    )
    num_cpu_workers: int = _f(1, "gloo worker processes when no GPU is visible.", minimum=1)
    resume: bool = _f(True, "Resume from <checkpoint_dir>/step_latest when it exists.")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """``data.*``: where the training data comes from and how it is tokenized."""

    mode: str = _f(
        "offline",
        "offline = read the target cache; online = run the target inside each worker.",
        choices=("offline", "online"),
    )
    target_cache_path: str | None = _f(None, "Target cache directory (offline mode).")
    train_data_paths: list[str] = _f([], "Regenerated conversation JSONL files (online mode).")
    chat_template: str = _f(
        "auto",
        "'auto' = the target tokenizer's own template, or a path to a Jinja template file.",
    )
    system_prompt: str | None = _f(None, "System prompt added to conversations without one.")
    enable_thinking: bool = _f(False, "Passed to chat templates that support thinking.")
    max_length: int = _f(4096, "Truncate tokenized conversations to this many tokens.", minimum=2)
    min_loss_tokens: int = _f(14, "Drop samples with fewer supervised tokens.", minimum=0)
    shuffle: bool = _f(True, "Shuffle samples each epoch (seeded).")
    heldout_samples: int = _f(
        0,
        "Hold out the last N samples of the cache from training and score them (real and zeroed features) "
        "every logging.heldout_steps steps and at the end; 0 = none.",
        minimum=0,
    )
    max_samples: int | None = _f(
        None,
        "Train on the first N samples of the cache only (overfit checks, quick trials); null = all.",
        minimum=1,
    )


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """``logging.*``: metrics, held-out scoring, checkpoints and their directories."""

    logging_steps: int = _f(10, "Log metrics every N optimizer steps.", minimum=1)
    heldout_steps: int = _f(
        0,
        "Score the held-out samples (data.heldout_samples) every N steps; 0 = at the last step only.",
        minimum=0,
    )
    checkpointing_steps: int = _f(3000, "Save a checkpoint every N optimizer steps.", minimum=1)
    keep_last_checkpoints: int = _f(3, "Keep the newest K step checkpoints; 0 = all.", minimum=0)
    checkpoint_root: str = _f("~/checkpoints", "Root of checkpoint directories.")
    tensorboard_root: str = _f("~/tensorboard", "Root of TensorBoard directories.")
    checkpoint_dir: str | None = _f(None, "Derived: <checkpoint_root>/<project_name>/<exp_name> unless set.")
    tensorboard_dir: str | None = _f(
        None,
        "Derived: <tensorboard_root>/<project_name>/<exp_name> unless set.",
    )


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole config: the top-level keys and the four sections.

    Frozen: the loader (:func:`deepspec.config.load_config`) checks every value, then builds
    it once with :meth:`from_flat`; a changed copy is ``dataclasses.replace(cfg, ...)`` (as
    :func:`deepspec.config.finalize_config` derives the run's names and directories)."""

    project_name: str = _f("deepspec", "Groups experiments under <root>/<project_name>/.")
    exp_name: str = _f("", "Experiment name; empty = '<algorithm>_<target basename>'.")
    seed: int = _f(42, "Seed for anchors, data order and initialisation.", minimum=0)
    algorithm: str = _f("dspark", "Draft algorithm.", choices=ALGORITHMS)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> Config:
        """The config holding ``{key.path: value}`` (a key not given keeps its default).

        Values are taken as given: the loader coerces and checks them first. A key outside
        the schema raises ``TypeError``."""
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in values.items():
            section, _, name = key.rpartition(".")
            if section and section not in sections:
                raise TypeError(f"unknown config section {section!r} in {key!r}")
            (sections[section] if section else top)[name] = value
        return cls(**top, **{name: SECTION_TYPES[name](**kw) for name, kw in sections.items()})


# --------------------------------------------------------------------------------------
# views derived from the dataclasses
# --------------------------------------------------------------------------------------


def _kind(hint: Any, where: str) -> tuple[str, bool]:
    """``(kind, optional)`` of a field's type hint: ``int | None`` -> ``("int", True)``."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else hint
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        kind = f"list[{getattr(item, '__name__', item)}]"
    else:
        kind = getattr(hint, "__name__", str(hint))
    if kind not in KINDS:
        raise TypeError(f"config key {where}: type {hint} is not one of {', '.join(KINDS)} (or | None)")
    return kind, optional


def _records(cls: type, prefix: str) -> list[Field]:
    hints = typing.get_type_hints(cls)
    records = []
    for f in dataclasses.fields(cls):
        if f.name in SECTION_TYPES and cls is Config:
            continue
        kind, optional = _kind(hints[f.name], prefix + f.name)
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        records.append(
            Field(key=prefix + f.name, default=default, kind=kind, optional=optional, **f.metadata)
        )
    return records


# The sections: the fields of Config whose type is a dataclass, in order.
SECTION_TYPES: dict[str, type] = {
    name: hint
    for name, hint in typing.get_type_hints(Config).items()
    if isinstance(hint, type) and dataclasses.is_dataclass(hint)
}
SECTIONS = tuple(SECTION_TYPES)
FIELDS: tuple[Field, ...] = tuple(
    _records(Config, "")
    + [record for name, cls in SECTION_TYPES.items() for record in _records(cls, f"{name}.")]
)
FIELDS_BY_KEY: dict[str, Field] = {f.key: f for f in FIELDS}

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
