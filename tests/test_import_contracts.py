"""The layout's import rules (design.md, "Layout"), checked on the source of every module.

Each folder's ``.py`` files are parsed and every ``import``/``from ... import`` in them, at
module level or inside a function, is held to its folder's rule:

| folder | may not import |
|---|---|
| ``medssl/`` (the core) | torch, ``medssl.training``, ``medssl.export``, ``medssl.serving``, ``medssl.cli`` |
| ``serving/`` | torch, ``medssl.training``, ``medssl.export``, ``medssl.cli`` |
| ``training/`` | ``medssl.export``, ``medssl.serving``, ``medssl.cli`` |
| ``export/`` | ``medssl.serving``, ``medssl.cli`` |

``tests/test_no_torch.py`` checks the torch rule at run time too (what a scoring or gateway
process really loads). The last tests plant a violation to show that the check can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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
    (core / "bad.py").write_text("def f():\n    from medssl import serving\n    import medssl.serving.gateway\n")
    assert violations(core, CONTRACTS["medssl"]) == ["medssl/bad.py:2 imports medssl.serving",
                                                     "medssl/bad.py:3 imports medssl.serving.gateway"]


def test_the_check_catches_torch_imported_by_serving(tmp_path):
    serving = tmp_path / "serving"
    serving.mkdir()
    (serving / "bad.py").write_text("import numpy as np\nimport torch.nn as nn\n")
    assert violations(serving, CONTRACTS["serving"]) == ["serving/bad.py:2 imports torch.nn"]
