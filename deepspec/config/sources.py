"""Reading the config sources: files (Python modules or YAML, layered through ``_base_`` and
``_target_``) and ``--opts`` overrides, each as a flat ``{key.path: value}`` layer named by
where it came from. :mod:`deepspec.config.loader` merges, checks and builds the typed config
from these layers; problems found here are collected in the same :class:`Problems`.
"""

from __future__ import annotations

import os
import runpy
import traceback
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from deepspec.config.schema import ALGORITHM_DEFAULTS, FIELDS_BY_KEY
from deepspec.errors import ConfigError


class Problems:
    """Collects config problems so that all of them are reported in one error."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, message: str, source: str | None = None) -> None:
        where = f" (from {source})" if source else ""
        self.items.append(f"{key}: {message}{where}")

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError("invalid config: " + "; ".join(self.items))


def describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
    path: str, chain: list[tuple[str, dict[str, Any], Any]], problems: Problems, seen: list[str]
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
            problems.add(BASE_NAME, f"must be the path of a config file, not {describe(base)}", path)
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
        problems.add(TARGET_NAME, f"must be a target name, not {describe(target)}", path)
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
    name: str, files: Sequence[str], algorithm: str, problems: Problems
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
    path: str | os.PathLike[str], problems: Problems | None = None
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
    problems = Problems() if problems is None else problems
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
