"""Load, override, validate and save configs.

Order of precedence (later wins): schema defaults → ``ALGORITHM_DEFAULTS[algorithm]`` →
config file (Python module or YAML) → ``--opts key.path=value`` overrides. Every problem
found on the way is collected and raised once as a single-line :class:`ConfigError`. Values
are merged, coerced and checked as a flat ``{key.path: value}`` dict; the result is the
frozen, typed :class:`~deepspec.config.schema.Config` built from it (``cfg.model.block_size``).

A Python config file is a module whose top-level names are the schema's top-level keys
(``algorithm``, ``seed`` …) and sections given as dicts (``model = dict(block_size=7)``).
Names starting with ``_``, imported modules, functions and classes are ignored, except the
two the loader reads (Python or YAML): ``_base_ = "base.py"`` (build on that file, a path
relative to this one) and ``_target_ = "qwen3_8b"`` (apply that row of the ``targets.py``
table next to the file or one folder up). So the config file layer is itself layered:
base → target row → the file's own keys (:func:`deepspec.config.sources.read_config_layers`). Other
``_name_``-shaped names are refused as misspelt loader names.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from deepspec.algorithms import ALGORITHMS
from deepspec.config.schema import (
    ALGORITHM_DEFAULTS,
    FIELDS,
    FIELDS_BY_KEY,
    RETIRED_KEYS,
    SECTIONS,
    Config,
    Field,
)
from deepspec.config.sources import (
    Problems,
    describe,
    parse_opts,
    read_config_layers,
)
from deepspec.errors import ConfigError
from deepspec.utils.io import atomic_write_text

_NONE_WORDS = {"none", "null", "~", ""}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


# --------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------


def suggest_keys(key: str, n: int = 3) -> list[str]:
    """Closest valid keys to an unknown ``key`` (by full path and by leaf name)."""
    keys = list(FIELDS_BY_KEY)
    found = difflib.get_close_matches(key, keys, n=n, cutoff=0.8)
    leaf = key.rsplit(".", 1)[-1]
    leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
    for match in difflib.get_close_matches(leaf, list(leaves), n=n, cutoff=0.75):
        if leaves[match] not in found:
            found.append(leaves[match])
    return found[:n]


def _unknown_key_message(key: str) -> str:
    close = suggest_keys(key)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown key{hint}"


def coerce_value(field: Field, value: Any) -> Any:
    """Return ``value`` converted to ``field``'s type or raise ``ValueError`` saying why."""
    if value is None or (
        isinstance(value, str)
        and value.strip().lower() in _NONE_WORDS
        and field.kind not in ("str", "list[str]")
    ):
        if field.optional:
            return None
        raise ValueError("must not be null")
    if isinstance(value, str) and field.optional and value.strip().lower() in {"none", "null"}:
        return None
    kind = field.kind
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"expected an integer, got {describe(value)}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {describe(value)}") from None
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"expected a number, got {describe(value)}")
        try:
            out = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {describe(value)}") from None
        if not math.isfinite(out):
            raise ValueError(f"expected a finite number, got {describe(value)}")
        return out
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise ValueError(f"expected true or false, got {describe(value)}")
    if kind == "str":
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"expected a string, got {describe(value)}")
        return str(value)
    if kind in ("list[int]", "list[str]"):
        if isinstance(value, str):
            value = [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ValueError(f"expected a list, got {describe(value)}")
        item = Field(key=field.key, default=None, kind=kind[5:-1], help="")
        try:
            return [coerce_value(item, v) for v in value]
        except ValueError as exc:
            raise ValueError(f"list item: {exc}") from None
    raise AssertionError(f"unknown field kind {kind}")


def _bound(x: float) -> str:
    """A bound as written: ``4294967295`` rather than ``4.29497e+09``."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**63 else f"{x:g}"


def _check_bounds(field: Field, value: Any) -> str | None:
    """Return why ``value`` is out of ``field``'s allowed range, or None."""
    if value is None:
        return None
    if field.choices is not None and value not in field.choices:
        return f"{describe(value)} is not one of {', '.join(map(str, field.choices))}"
    numbers = value if isinstance(value, list) else [value]
    for v in numbers:
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        if field.minimum is not None and v < field.minimum:
            return f"{describe(value)} is invalid, must be >= {_bound(field.minimum)}"
        if field.exclusive_minimum is not None and v <= field.exclusive_minimum:
            return f"{describe(value)} is invalid, must be > {_bound(field.exclusive_minimum)}"
        if field.maximum is not None and v > field.maximum:
            return f"{describe(value)} is invalid, must be <= {_bound(field.maximum)}"
        if field.exclusive_maximum is not None and v >= field.exclusive_maximum:
            return f"{describe(value)} is invalid, must be < {_bound(field.exclusive_maximum)}"
    return None


def retired_reason(key: str) -> str | None:
    """Why a key the reference's configs carry is not read (``RETIRED_KEYS``), else ``None``."""
    for prefix, why in RETIRED_KEYS.items():
        section = prefix.endswith(".")
        if key == prefix.rstrip(".") or (section and key.startswith(prefix)):
            return why
    return None


def get(cfg: Config, key: str) -> Any:
    """The value of ``key.path`` in ``cfg`` (``get(cfg, "model.block_size")``)."""
    return operator.attrgetter(key)(cfg)


# --------------------------------------------------------------------------------------
# the public API
# --------------------------------------------------------------------------------------


def _algorithm_values(algorithm: str) -> dict[str, Any]:
    """``{key.path: value}`` of ``algorithm`` and the defaults it applies over the schema's."""
    if algorithm not in ALGORITHM_DEFAULTS:
        raise ConfigError(f"algorithm: {algorithm!r} is not one of {', '.join(ALGORITHM_DEFAULTS)}")
    values: dict[str, Any] = {"algorithm": algorithm}
    for key, value in ALGORITHM_DEFAULTS[algorithm].items():
        values[key] = list(value) if isinstance(value, list) else value
    return values


def get_default_config(algorithm: str = "dspark") -> Config:
    """Schema defaults with the algorithm's defaults applied (not finalized: ``exp_name`` and
    the checkpoint / TensorBoard dirs are still empty)."""
    return Config.from_flat(_algorithm_values(algorithm))


def build_config(
    layers: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    finalize: bool = True,
    problems: Problems | None = None,
) -> Config:
    """Merge flat override layers ``[(source name, {key: value})]`` over the defaults.

    Every value is coerced and checked on a flat ``{key.path: value}`` dict; the frozen
    :class:`Config` is built from it once (then finalized, unless ``finalize`` is false).
    ``problems``: ones already found (a config file's), raised together with these."""
    problems = Problems() if problems is None else problems
    algorithm = "dspark"
    for _, layer in layers:
        if "algorithm" in layer and isinstance(layer["algorithm"], str):
            algorithm = layer["algorithm"]
    if algorithm not in ALGORITHM_DEFAULTS:
        problems.add("algorithm", f"{algorithm!r} is not one of {', '.join(ALGORITHM_DEFAULTS)}")
        problems.raise_if_any()
    values = _algorithm_values(algorithm)
    sources: dict[str, str] = {}
    retired: dict[str, list[str]] = {}
    for source, layer in layers:
        for key, value in layer.items():
            field = FIELDS_BY_KEY.get(key)
            why = None if field is not None else retired_reason(key)
            if why is not None:
                retired.setdefault(why, []).append(key)
                continue
            if field is None and key in SECTIONS:
                problems.add(key, f"is a section: give it a mapping of keys, not {describe(value)}", source)
                continue
            if field is None:
                problems.add(key, _unknown_key_message(key), source)
                continue
            try:
                values[key] = coerce_value(field, value)
                sources[key] = source
            except ValueError as exc:
                problems.add(key, str(exc), source)
    cfg = Config.from_flat(values)
    _validate(cfg, problems, sources)
    problems.raise_if_any()
    for why, keys in retired.items():
        print(f"note: ignoring {', '.join(dict.fromkeys(keys))}: {why}", file=sys.stderr)
    return finalize_config(cfg) if finalize else cfg


def load_config(
    path: str | os.PathLike[str] | None = None,
    opts: Iterable[str] | None = None,
    *,
    finalize: bool = True,
) -> Config:
    """Load a config file (or just defaults) and apply ``--opts`` overrides.

    Raises :class:`ConfigError` naming every unknown key, wrong type and invalid value.
    """
    layers: list[tuple[str, Mapping[str, Any]]] = []
    problems = Problems()  # a missing base or unknown target, reported with the keys' problems
    if path is not None:
        layers.extend(read_config_layers(path, problems))
    overrides = parse_opts(opts)
    if overrides:
        layers.append(("--opts", overrides))
    return build_config(layers, finalize=finalize, problems=problems)


def _validate(cfg: Config, problems: Problems, sources: Mapping[str, str]) -> None:
    for field in FIELDS:
        reason = _check_bounds(field, get(cfg, field.key))
        if reason:
            problems.add(field.key, reason, sources.get(field.key))
    layer_ids = list(cfg.model.target_layer_ids)
    if not layer_ids:
        problems.add(
            "model.target_layer_ids", "must list at least one layer", sources.get("model.target_layer_ids")
        )
    elif any(b <= a for a, b in zip(layer_ids, layer_ids[1:])):
        problems.add(
            "model.target_layer_ids",
            f"{layer_ids} must be strictly increasing",
            sources.get("model.target_layer_ids"),
        )
    block = cfg.algorithm in ALGORITHMS and ALGORITHMS[cfg.algorithm].block
    if block and cfg.model.ce_loss_alpha + cfg.model.l1_loss_alpha <= 0:
        problems.add(
            "model.ce_loss_alpha",
            "ce_loss_alpha + l1_loss_alpha must be > 0",
            sources.get("model.ce_loss_alpha"),
        )
    window = cfg.model.context_window
    if block and 0 < window < cfg.model.block_size:
        problems.add(
            "model.context_window",
            f"{window} is smaller than model.block_size {cfg.model.block_size}: a sliding window must "
            "cover the whole block (0 = no window)",
            sources.get("model.context_window"),
        )
    if cfg.train.global_batch_size % cfg.train.local_batch_size:
        problems.add(
            "train.global_batch_size",
            f"{cfg.train.global_batch_size} is not a multiple of train.local_batch_size "
            f"{cfg.train.local_batch_size}",
            sources.get("train.global_batch_size"),
        )
    template = cfg.data.chat_template
    if template != "auto" and not os.path.isfile(os.path.expanduser(template)):
        problems.add(
            "data.chat_template",
            f"{template!r} is neither 'auto' nor an existing file",
            sources.get("data.chat_template"),
        )


def default_exp_name(cfg: Config) -> str:
    target = cfg.model.target_model_name_or_path.rstrip("/")
    base = os.path.basename(target).split(":")[-1]
    base = os.path.splitext(base)[0] if base.endswith(".gguf") else base
    return f"{cfg.algorithm}_{base}".replace(" ", "_")


def finalize_config(cfg: Config) -> Config:
    """``cfg`` with ``exp_name`` and the checkpoint / TensorBoard dirs derived where unset.

    Returns a new :class:`Config` (``cfg`` itself is frozen and stays as it was)."""
    exp_name = cfg.exp_name or default_exp_name(cfg)

    def derived(path: str | None, root: str) -> str:
        if path is not None:  # set in the config
            return path
        return os.path.join(os.path.expanduser(root), cfg.project_name, exp_name)

    log = cfg.logging
    logging = dataclasses.replace(
        log,
        checkpoint_dir=derived(log.checkpoint_dir, log.checkpoint_root),
        tensorboard_dir=derived(log.tensorboard_dir, log.tensorboard_root),
    )
    return dataclasses.replace(cfg, exp_name=exp_name, logging=logging)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A plain nested dict (lists stay lists) of a config: the sections, then the top-level
    keys (the order saved ``config.yaml`` files have always had)."""
    tree = dataclasses.asdict(cfg)
    return {**{name: tree.pop(name) for name in SECTIONS}, **tree}


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML, atomically; ``load_config(path)`` reads it back."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    atomic_write_text(path, text)


def validate_against_target(cfg: Config, spec: Any) -> None:
    """Check the keys that depend on the target (layer ids, mask token) against its spec.

    ``spec`` is a :class:`deepspec.targets.FamilySpec`.
    """
    problems = Problems()
    bad = [i for i in cfg.model.target_layer_ids if i >= spec.num_hidden_layers]
    if bad:
        problems.add(
            "model.target_layer_ids",
            f"{list(cfg.model.target_layer_ids)} out of range for target "
            f"{cfg.model.target_model_name_or_path} with {spec.num_hidden_layers} layers "
            f"(allowed -1..{spec.num_hidden_layers - 1})",
        )
    mask_id = cfg.model.mask_token_id
    if mask_id is not None and mask_id >= spec.vocab_size:
        problems.add(
            "model.mask_token_id", f"{mask_id} is outside the target vocabulary of {spec.vocab_size} tokens"
        )
    if cfg.model.draft_vocab_size > spec.vocab_size:
        problems.add(
            "model.draft_vocab_size",
            f"{cfg.model.draft_vocab_size} is larger than the target vocabulary of {spec.vocab_size} "
            "tokens (use 0 for the full vocabulary)",
        )
    problems.raise_if_any()
