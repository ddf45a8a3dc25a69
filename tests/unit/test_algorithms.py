"""The algorithm registry is the one home of what differs per algorithm."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from deepspec.algorithms import ALGORITHMS, ARCHITECTURES, Algorithm, get_algorithm, register
from deepspec.config.schema import ALGORITHM_DEFAULTS
from deepspec.config.schema import ALGORITHMS as CONFIG_CHOICES
from tests.conftest import ROOT

# the algorithms' own modules and the registry may name algorithms; nothing else may branch on one
ALGORITHM_HOMES = {
    os.path.join("deepspec", "algorithms.py"),
    os.path.join("deepspec", "drafts", "dflash.py"),
    os.path.join("deepspec", "drafts", "dspark.py"),
    os.path.join("deepspec", "drafts", "eagle3.py"),
}


def _algorithm_name_branches(path: str) -> list[int]:
    """Lines of ``path`` comparing an ``.algorithm`` attribute or name with a string literal
    (``x.algorithm == "dspark"``, ``algorithm in ("dspark", "dflash")``)."""

    def names_algorithm(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "algorithm") or (
            isinstance(node, ast.Name) and node.id == "algorithm"
        )

    def literal(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str)
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(literal(e) for e in node.elts)

    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(names_algorithm(s) for s in sides) and any(literal(s) for s in sides):
                lines.append(node.lineno)
    return lines


def test_no_algorithm_branch_outside_the_algorithm_modules():
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, "deepspec")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ROOT)
            if rel in ALGORITHM_HOMES:
                continue
            found += [f"{rel}:{line}" for line in _algorithm_name_branches(path)]
    assert not found, f"branches on an algorithm's name outside its module and the registry: {found}"


def test_the_scan_sees_a_branch(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('def f(cfg):\n    return cfg.algorithm == "dspark" or cfg.algorithm in ("a", "b")\n')
    assert _algorithm_name_branches(str(path)) == [2, 2]


def test_config_choices_and_defaults_come_from_the_registry():
    assert CONFIG_CHOICES == tuple(ALGORITHMS)
    assert ALGORITHM_DEFAULTS == {name: dict(a.config_defaults) for name, a in ALGORITHMS.items()}
    assert ALGORITHM_DEFAULTS["dspark"] == {}  # the schema's defaults are DSpark's


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_entries_resolve_to_their_classes_and_functions(name):
    algorithm = get_algorithm(name)
    assert algorithm.model_cls.__name__ == algorithm.architecture
    assert ARCHITECTURES[algorithm.architecture] is algorithm
    assert callable(algorithm.loss) and callable(algorithm.prepare_batch)
    assert algorithm.block == (name in ("dspark", "dflash"))
    assert algorithm.markov == (name == "dspark")


def test_registering_twice_or_an_unknown_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register(ALGORITHMS["dspark"])
    with pytest.raises(ValueError, match="unknown algorithm 'medusa'; registered: dspark, dflash, eagle3"):
        get_algorithm("medusa")
    assert isinstance(ALGORITHMS["eagle3"], Algorithm)


def test_the_registry_and_the_config_load_without_torch():
    code = "import sys, deepspec.algorithms, deepspec.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
