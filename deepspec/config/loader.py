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
base → target row → the file's own keys (see :func:`read_config_layers`). Other
``_name_``-shaped names are refused as misspelt loader names.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import os
import runpy
import sys
import traceback
import types
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
from deepspec.errors import ConfigError
from deepspec.utils.io import atomic_write_text

_NONE_WORDS = {"none", "null", "~", ""}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


class _Problems:
    """Collects config problems so that all of them are reported in one error."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, message: str, source: str | None = None) -> None:
        where = f" (from {source})" if source else ""
        self.items.append(f"{key}: {message}{where}")

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError("invalid config: " + "; ".join(self.items))


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


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
            raise ValueError(f"expected an integer, got {_describe(value)}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {_describe(value)}") from None
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"expected a number, got {_describe(value)}")
        try:
            out = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {_describe(value)}") from None
        if not math.isfinite(out):
            raise ValueError(f"expected a finite number, got {_describe(value)}")
        return out
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise ValueError(f"expected true or false, got {_describe(value)}")
    if kind == "str":
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"expected a string, got {_describe(value)}")
        return str(value)
    if kind in ("list[int]", "list[str]"):
        if isinstance(value, str):
            value = [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ValueError(f"expected a list, got {_describe(value)}")
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
        return f"{_describe(value)} is not one of {', '.join(map(str, field.choices))}"
    numbers = value if isinstance(value, list) else [value]
    for v in numbers:
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        if field.minimum is not None and v < field.minimum:
            return f"{_describe(value)} is invalid, must be >= {_bound(field.minimum)}"
        if field.exclusive_minimum is not None and v <= field.exclusive_minimum:
            return f"{_describe(value)} is invalid, must be > {_bound(field.exclusive_minimum)}"
        if field.maximum is not None and v > field.maximum:
            return f"{_describe(value)} is invalid, must be <= {_bound(field.maximum)}"
        if field.exclusive_maximum is not None and v >= field.exclusive_maximum:
            return f"{_describe(value)} is invalid, must be < {_bound(field.exclusive_maximum)}"
    return None


def retired_reason(key: str) -> str | None:
    """Why a key the reference's configs carry is not read (``RETIRED_KEYS``), else ``None``."""
    for prefix, why in RETIRED_KEYS.items():
        section = prefix.endswith(".")
        if key == prefix.rstrip(".") or (section and key.startswith(prefix)):
            return why
    return None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"block_size": 7}}`` → ``{"model.block_size": 7}``."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and key not in FIELDS_BY_KEY:
            flat.update(flatten(value, prefix=f"{key}."))
        else:
            flat[key] = value
    return flat


def get(cfg: Config, key: str) -> Any:
    """The value of ``key.path`` in ``cfg`` (``get(cfg, "model.block_size")``)."""
    return operator.attrgetter(key)(cfg)


# --------------------------------------------------------------------------------------
# reading sources
# --------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` merges may repeat keys by design
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first given on line {first.line + 1}); keep one of them",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _yaml_error(path: str, exc: yaml.YAMLError) -> ConfigError:
    """``file:line:column: reason`` for a YAML syntax or construction error."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["unreadable"])[0]
    if problem.startswith("duplicate key"):
        return ConfigError(f"{where}: {problem}")
    context = getattr(exc, "context", None)
    start = getattr(exc, "context_mark", None)
    if context and start is not None and mark is not None and start.line != mark.line:
        context = f"{context} started at line {start.line + 1} column {start.column + 1}"
    reason = f"{context}: {problem}" if context else problem
    return ConfigError(f"{where}: invalid YAML ({reason}); fix the syntax there")


def _python_error(path: str, exc: BaseException) -> ConfigError:
    """``file:line: reason`` for a Python config that does not compile or raises."""
    if isinstance(exc, SyntaxError):
        where = f"{path}:{exc.lineno}" + (f":{exc.offset}" if exc.offset else "")
        return ConfigError(f"{where}: invalid Python: {exc.msg}; fix the syntax there")
    real = os.path.realpath(path)
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename and os.path.realpath(frame.filename) == real:
            line = frame.lineno
    where = f"{path}:{line}" if line else path
    text = " ".join(str(exc).split()) or "no message"
    return ConfigError(f"{where}: the config file raised {type(exc).__name__}: {text}; fix the file")


# Names a config file may set for the loader itself (``_name_``: one underscore each side).
BASE_NAME = "_base_"
TARGET_NAME = "_target_"
LOADER_NAMES = (BASE_NAME, TARGET_NAME)
# The table ``_target_`` reads: ``targets.py`` next to a config file or one folder up.
TARGETS_FILE = "targets.py"


def _is_loader_name(name: str) -> bool:
    """``_base_``-shaped: one leading and one trailing underscore (not a dunder, not ``_x``)."""
    return len(name) > 2 and name[0] == name[-1] == "_" and name[1] != "_" and name[-2] != "_"


def _read_tree(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One file's ``(sections and top-level keys, loader names)``, both still nested."""
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a directory; give --config a .py or .yaml file")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path} (give --config a .py or .yaml file)")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".py":
        try:
            namespace = runpy.run_path(path)
        except (Exception, SystemExit) as exc:  # a config file that does not run
            raise _python_error(path, exc) from None
        special = {name: value for name, value in namespace.items() if _is_loader_name(name)}
        tree = {
            name: value
            for name, value in namespace.items()
            if not name.startswith("_")
            and not isinstance(value, types.ModuleType | types.FunctionType | type)
        }
    elif ext in (".yaml", ".yml"):
        try:
            with open(path, encoding="utf-8") as fh:
                tree = yaml.load(fh, Loader=_StrictLoader) or {}  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise _yaml_error(path, exc) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
            ) from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(tree).__name__}")
        special = {name: tree.pop(name) for name in LOADER_NAMES if name in tree}
    else:
        raise ConfigError(f"config file {path}: unsupported extension {ext!r} (use .py, .yaml or .yml)")
    return tree, special


def _read_chain(
    path: str, chain: list[tuple[str, dict[str, Any], Any]], problems: _Problems, seen: list[str]
) -> None:
    """Append ``(source, flat keys, target name or None)`` for ``path``'s bases, then for ``path``."""
    tree, special = _read_tree(path)
    for name in special:
        if name not in LOADER_NAMES:
            problems.add(
                name,
                f"not a loader name (those are {', '.join(LOADER_NAMES)}); name a helper without "
                "the trailing underscore",
                path,
            )
    base = special.get(BASE_NAME)
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            problems.add(BASE_NAME, f"must be the path of a config file, not {_describe(base)}", path)
        else:
            base_path = os.path.expanduser(base)
            if not os.path.isabs(base_path):  # relative to the file that names it
                base_path = os.path.join(os.path.dirname(path), base_path)
            base_path = os.path.normpath(base_path)
            real = os.path.realpath(base_path)
            if not os.path.isfile(base_path):
                problems.add(BASE_NAME, f"{base!r} not found (looked for {base_path})", path)
            elif real in seen:
                problems.add(BASE_NAME, f"{base!r} builds on itself ({base_path} is already read)", path)
            else:
                _read_chain(base_path, chain, problems, [*seen, real])
    target = special.get(TARGET_NAME)
    if target is not None and (not isinstance(target, str) or not target.strip()):
        problems.add(TARGET_NAME, f"must be a target name, not {_describe(target)}", path)
        target = None
    chain.append((path, flatten(tree), target))


def _find_targets_file(files: Sequence[str]) -> str | None:
    """The ``targets.py`` next to the first of ``files`` that has one, or one folder up."""
    for path in files:
        folder = os.path.dirname(path)
        for candidate in (os.path.join(folder, TARGETS_FILE), os.path.join(folder, os.pardir, TARGETS_FILE)):
            if os.path.isfile(candidate):
                return os.path.normpath(candidate)
    return None


def _target_layer(
    name: str, files: Sequence[str], algorithm: str, problems: _Problems
) -> tuple[str, dict[str, Any]] | None:
    """The keys row ``name`` of the targets table sets for ``algorithm``, as a source layer.

    ``files``: the file naming the target first, then the files it builds on (where the
    table is looked for, in that order)."""
    source = files[0]
    table = _find_targets_file(files)
    if table is None:
        problems.add(
            TARGET_NAME,
            f"{name!r} needs a {TARGETS_FILE} table next to the config file or one folder up; none found",
            source,
        )
        return None
    try:
        namespace = runpy.run_path(table)
    except (Exception, SystemExit) as exc:
        raise _python_error(table, exc) from None
    targets, columns = namespace.get("TARGETS"), namespace.get("COLUMNS")
    if not isinstance(targets, Mapping) or not isinstance(columns, Mapping):
        problems.add(TARGET_NAME, f"{table} must define the dicts TARGETS and COLUMNS", source)
        return None
    if name not in targets:
        problems.add(
            TARGET_NAME, f"{name!r} is not a target of {table}; known targets: {', '.join(targets)}", source
        )
        return None
    if algorithm not in columns:
        if algorithm in ALGORITHM_DEFAULTS:  # an unknown algorithm is reported by build_config
            problems.add(TARGET_NAME, f"{table} COLUMNS has no entry for algorithm {algorithm!r}", source)
        return None
    row, mapping = targets[name], columns[algorithm]
    missing = [column for column in mapping if column not in row]
    if missing:
        problems.add(TARGET_NAME, f"row {name!r} of {table} lacks {', '.join(missing)}", source)
        return None
    values = {key: list(row[col]) if isinstance(row[col], list) else row[col] for col, key in mapping.items()}
    return f"{table}, target {name}", values


def read_config_layers(
    path: str | os.PathLike[str], problems: _Problems | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Read a config file into source layers ``[(source, flat {key.path: value})]``, earliest first.

    A file may build on another: ``_base_ = "base.py"`` (a path relative to the file) reads
    that file first, recursively. ``_target_ = "qwen3_8b"`` applies that row of the nearest
    ``targets.py`` table (next to the file or one folder up; else next to its bases): its
    ``COLUMNS[algorithm]`` map row columns to keys, for the algorithm the files name. Per
    file the order is: its base, its target row, its own keys (later wins).

    Problems are one :class:`ConfigError`: ``file:line[:column]`` for a file that cannot be
    read (YAML syntax, a key given twice in one YAML mapping, Python that does not compile
    or raises); otherwise every missing base, unknown target and misspelt loader name, or,
    given ``problems``, added to those instead (:func:`load_config` reports them together
    with the keys' problems)."""
    own = problems is None
    problems = _Problems() if problems is None else problems
    chain: list[tuple[str, dict[str, Any], Any]] = []
    _read_chain(os.fspath(path), chain, problems, [os.path.realpath(path)])
    algorithm = FIELDS_BY_KEY["algorithm"].default
    for _, flat, _ in chain:
        if isinstance(flat.get("algorithm"), str):
            algorithm = flat["algorithm"]
    layers: list[tuple[str, dict[str, Any]]] = []
    for i, (source, flat, target) in enumerate(chain):
        if target is not None:
            files = [source] + [earlier for earlier, _, _ in reversed(chain[:i])]
            layer = _target_layer(target, files, algorithm, problems)
            if layer is not None:
                layers.append(layer)
        layers.append((source, flat))
    if own:
        problems.raise_if_any()
    return layers


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a Python or YAML config file (with its ``_base_`` and ``_target_``) into one flat
    ``{key.path: value}`` dict; :func:`read_config_layers` keeps the sources apart."""
    flat: dict[str, Any] = {}
    for _, layer in read_config_layers(path):
        flat.update(layer)
    return flat


def parse_opts(opts: Iterable[str] | None) -> dict[str, Any]:
    """Parse ``["a.b=1", "c.d=[1, 2]"]`` (or yacs-style ``["a.b", "1"]``) into a flat dict.

    Values are parsed as YAML scalars or lists; the schema's type check runs later.
    """
    items = list(opts or [])
    parsed: dict[str, Any] = {}
    i = 0
    while i < len(items):
        item = items[i]
        if "=" in item:
            key, raw = item.split("=", 1)
            i += 1
        elif i + 1 < len(items):
            key, raw = item, items[i + 1]
            i += 2
        else:
            raise ConfigError(f"--opts {item!r}: expected key.path=value")
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed[key] = value
    return parsed


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
    problems: _Problems | None = None,
) -> Config:
    """Merge flat override layers ``[(source name, {key: value})]`` over the defaults.

    Every value is coerced and checked on a flat ``{key.path: value}`` dict; the frozen
    :class:`Config` is built from it once (then finalized, unless ``finalize`` is false).
    ``problems``: ones already found (a config file's), raised together with these."""
    problems = _Problems() if problems is None else problems
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
                problems.add(key, f"is a section: give it a mapping of keys, not {_describe(value)}", source)
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
    problems = _Problems()  # a missing base or unknown target, reported with the keys' problems
    if path is not None:
        layers.extend(read_config_layers(path, problems))
    overrides = parse_opts(opts)
    if overrides:
        layers.append(("--opts", overrides))
    return build_config(layers, finalize=finalize, problems=problems)


def _validate(cfg: Config, problems: _Problems, sources: Mapping[str, str]) -> None:
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
            f"{window} is smaller than model.block_size {cfg.model.block_size}: a sliding window must cover the "
            "whole block (0 = no window)",
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
    problems = _Problems()
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
