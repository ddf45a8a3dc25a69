"""The package's own imports form no cycle (the dependency direction, docs/DESIGN.md §1).

Every module under ``deepspec/`` is parsed with :mod:`ast` (nothing is imported); each
``import deepspec.x`` / ``from deepspec.x import y`` anywhere in a module, at module level or
inside a function, is an edge from that module to ``deepspec.x`` (to ``deepspec.x.y`` when
``y`` is a submodule; ``deepspec.x`` itself is the package's ``__init__`` when it is a
package). The implicit import of a parent package is not an edge, and neither is a package
``__init__`` importing its own submodules (that is what an ``__init__`` is for). What is left
must be acyclic: a lazy import inside a function dodges an import-time cycle but still ties
the two modules together, so it counts too.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "deepspec")


def package_modules(root: str = ROOT) -> dict[str, str]:
    """Dotted module name → file, for every ``.py`` under ``root``."""
    modules: dict[str, str] = {}
    base = os.path.dirname(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            parts = os.path.relpath(path, base)[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def is_package(module: str, modules: dict[str, str]) -> bool:
    return os.path.basename(modules[module]) == "__init__.py"


def _type_checking_only(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:``: imports for annotations only, never executed."""
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def _in_function(tree: ast.AST) -> Iterator[tuple[ast.stmt, bool]]:
    """Every import statement of ``tree`` that runs (not under ``if TYPE_CHECKING:``) and
    whether it sits inside a function."""

    def walk(node: ast.AST, nested: bool) -> Iterator[tuple[ast.stmt, bool]]:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, nested
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from walk(child, inner)

    yield from walk(tree, False)


def _resolve(module: str, node: ast.ImportFrom, modules: dict[str, str]) -> str | None:
    if not node.level:
        return node.module
    anchor = module.split(".")
    if not is_package(module, modules):
        anchor = anchor[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def module_imports(module: str, modules: dict[str, str]) -> Iterator[tuple[str, bool, int]]:
    """(imported package module, inside a function, line) for each own import of ``module``."""
    package = module.split(".")[0]
    with open(modules[module], encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), modules[module])
    for node, nested in _in_function(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            source = _resolve(module, node, modules)
            if source is None:
                continue
            targets = []
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                targets.append(sub if sub in modules else source)
        for target in targets:
            if target != package and not target.startswith(package + "."):
                continue
            while target not in modules:  # import a.b.c where c is an attribute: a.b
                target = target.rpartition(".")[0]
            yield target, nested, node.lineno


def import_graph(modules: dict[str, str] | None = None) -> dict[str, set[str]]:
    """module → the package modules it imports (module or function level)."""
    modules = modules or package_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module in modules:
        for target, _nested, _line in module_imports(module, modules):
            if target == module:
                continue
            if is_package(module, modules) and target.startswith(module + "."):
                continue  # a package __init__ importing its own submodules
            graph[module].add(target)
    return graph


def function_level_imports(modules: dict[str, str] | None = None) -> list[tuple[str, int, str]]:
    """(module, line, imported module) for every own import statement nested in a function
    (one entry per statement and imported module)."""
    modules = modules or package_modules()
    found = {
        (module, line, target)
        for module in modules
        for target, nested, line in module_imports(module, modules)
        if nested
    }
    return sorted(found)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def shortest_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest cycle through the first module of ``component`` (for the message)."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return component


def test_no_import_cycles() -> None:
    graph = import_graph()
    found = cycles(graph)
    message = "\n".join(
        " -> ".join(shortest_cycle(graph, c)) + f"   (component: {', '.join(c)})" for c in found
    )
    assert not found, f"import cycles between deepspec modules:\n{message}"


def test_the_checker_on_a_small_package(tmp_path) -> None:
    """What counts as an edge: a lazy import, ``from pkg import submodule``, a relative
    import, ``import pkg.sub.attr``; an ``__init__`` importing its own submodules does not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.a import f\nfrom pkg import sub\n",
        "a.py": "import os\n\ndef f():\n    from pkg.sub import b  # lazy\n    return b\n",
        "sub/__init__.py": "",
        "sub/b.py": "from ..c import g\n",
        "c.py": "import pkg.a\nfrom pkg import d\n",
        "d.py": "from pkg.sub.b import nothing_here\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    modules = package_modules(str(pkg))
    graph = import_graph(modules)
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.c"},
        "pkg.c": {"pkg.a", "pkg.d"},
        "pkg.d": {"pkg.sub.b"},
    }
    assert function_level_imports(modules) == [("pkg.a", 4, "pkg.sub.b")]
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.d", "pkg.sub.b"]]
    assert shortest_cycle(graph, cycles(graph)[0]) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]


def test_drafts_do_not_import_train() -> None:
    """Layers: drafts (the models) sit below train and eval and never reach up into them."""
    graph = import_graph()
    upward = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        if m.startswith("deepspec.drafts")
        for t in targets
        if t.startswith(("deepspec.train", "deepspec.eval", "deepspec.export"))
    )
    assert not upward, "drafts import from the layers above them:\n" + "\n".join(upward)


def test_no_cycles_between_subpackages() -> None:
    """Coarser: ``deepspec.<sub>`` packages (drafts, data, train, eval, ...) form no cycle either."""
    package_graph: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        top = ".".join(module.split(".")[:2])
        package_graph.setdefault(top, set()).update(
            t for t in (".".join(x.split(".")[:2]) for x in targets) if t != top
        )
    found = cycles(package_graph)
    assert not found, f"import cycles between deepspec subpackages: {found}"


def test_remaining_lazy_imports_say_why() -> None:
    """A function-level import of a deepspec module is kept only where importing it at the
    top would cost start-up time (torch, transformers, matplotlib, numpy for torch-free CLI
    modules); each says so in a comment on its line."""
    modules = package_modules()
    silent = []
    for module, line, target in function_level_imports(modules):
        path = modules[module]
        with open(path, encoding="utf-8") as fh:
            text = fh.read().splitlines()[line - 1]
        if "#" not in text:
            silent.append(f"{os.path.relpath(path, os.path.dirname(ROOT))}:{line} imports {target}")
    assert not silent, "function-level imports without a reason:\n" + "\n".join(sorted(set(silent)))


LIGHT_CLIS = (
    ["eval.py", "--help"],
    ["train.py", "--help"],
    ["-m", "deepspec.targets", "--help"],
    ["-m", "deepspec.eval.report", "--help"],
)


@pytest.mark.parametrize("cli", LIGHT_CLIS, ids=lambda c: " ".join(c[:-1]))
def test_cli_help_imports_no_torch(cli: list[str]) -> None:
    """These entry points print ``--help`` (and check their arguments) without torch,
    transformers or numpy: a module they import must not import those at the top."""
    repo = os.path.dirname(ROOT)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *cli],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": repo},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "import time:" in line
    }
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "transformers", "numpy", "matplotlib"))
    assert not heavy, f"{' '.join(cli)} imports {heavy[:5]}"


if __name__ == "__main__":
    g = import_graph()
    for component in cycles(g):
        print("cycle:", " -> ".join(shortest_cycle(g, component)), "| component:", ", ".join(component))
    lazy = function_level_imports()
    print(f"{len({(m, line) for m, line, _ in lazy})} function-level import statements of deepspec modules")
    for module, line, target in lazy:
        print(f"  {module}:{line} -> {target}")
