"""The layout's import rules (docs/explanation/architecture.md, "Layout"), checked on the source
of every module.

Each folder's ``.py`` files are parsed and every ``import``/``from ... import`` in them, at
module level or inside a function, is held to its folder's rule. What each may not import:

- ``medssl/`` (the core): torch, ``medssl.training``, ``medssl.export``, ``medssl.serving``,
  ``medssl.cli``;
- ``serving/``: torch, ``medssl.training``, ``medssl.export``, ``medssl.cli``;
- ``training/``: ``medssl.export``, ``medssl.serving``, ``medssl.cli``;
- ``export/``: ``medssl.serving``, ``medssl.cli``.

``tests/test_no_torch.py`` checks the torch rule at run time too (what a scoring or gateway
process really loads). And no two modules import each other, directly or round a loop (every
import counts: a lazy one inside a function, or one under ``TYPE_CHECKING``, is an edge too).
The last tests plant a violation, or a cycle, to show that the checks can fail.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.paths import ROOT

#: folder -> the import name of its package (pyproject's package-dir).
PACKAGES = {
    "medssl": "medssl",
    "training": "medssl.training",
    "export": "medssl.export",
    "serving": "medssl.serving",
    "cli": "medssl.cli",
}
#: folder -> forbidden module prefixes.
CONTRACTS: dict[str, tuple[str, ...]] = {
    "medssl": ("torch", "medssl.training", "medssl.export", "medssl.serving", "medssl.cli"),
    "serving": ("torch", "medssl.training", "medssl.export", "medssl.cli"),
    "training": ("medssl.export", "medssl.serving", "medssl.cli"),
    "export": ("medssl.serving", "medssl.cli"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every absolute import in the file (``from a import b`` gives ``a``
    and ``a.b``: ``from medssl import serving`` imports the subpackage)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def violations(folder: Path, forbidden: tuple[str, ...]) -> list[str]:
    """``"file:line imports module"`` for each import in ``folder`` that a rule forbids."""
    out = []
    for path in sorted(folder.rglob("*.py")):
        for line, module in imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                out.append(f"{path.relative_to(folder.parent)}:{line} imports {module}")
    return sorted(set(out))


@pytest.mark.parametrize("folder", sorted(CONTRACTS))
def test_each_layer_imports_only_what_the_layout_allows(folder):
    assert violations(ROOT / folder, CONTRACTS[folder]) == []


def test_the_check_catches_the_serving_layer_imported_by_the_core(tmp_path):
    core = tmp_path / "medssl"
    core.mkdir()
    (core / "ok.py").write_text("import numpy\nfrom medssl.io import read_volume\n")
    (core / "bad.py").write_text(
        "def f():\n    from medssl import serving\n    import medssl.serving.gateway\n"
    )
    assert violations(core, CONTRACTS["medssl"]) == [
        "medssl/bad.py:2 imports medssl.serving",
        "medssl/bad.py:3 imports medssl.serving.gateway",
    ]


def test_the_check_catches_torch_imported_by_serving(tmp_path):
    serving = tmp_path / "serving"
    serving.mkdir()
    (serving / "bad.py").write_text("import numpy as np\nimport torch.nn as nn\n")
    assert violations(serving, CONTRACTS["serving"]) == ["serving/bad.py:2 imports torch.nn"]


def module_graph(folders: dict[Path, str]) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the ``.py`` files of ``folders`` (folder -> package
    name); an imported name resolves to the longest module it names."""
    modules: dict[str, Path] = {}
    for folder, package in folders.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        graph[module] = set()
        for _, name in imported_modules(path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                graph[module].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def test_no_module_imports_itself_round_a_loop():
    graph = module_graph({ROOT / folder: package for folder, package in PACKAGES.items()})
    assert len(graph) > 100  # the whole project was read
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_lazy_import_loop(tmp_path):
    pkg = tmp_path / "medssl"
    (pkg / "scoring").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "scoring" / "__init__.py").write_text("")
    (pkg / "scoring" / "run.py").write_text(
        "def engine():\n    from medssl.scoring.local import run\n"
    )
    (pkg / "scoring" / "local.py").write_text("from medssl.scoring.run import Options\n")
    (pkg / "scoring" / "store.py").write_text("import medssl.scoring\n")
    assert cycles(module_graph({pkg: "medssl"})) == [["medssl.scoring.local", "medssl.scoring.run"]]
