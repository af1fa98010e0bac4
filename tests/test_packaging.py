"""pyproject's package list: a wheel (the Dockerfile's ``pip install /src``) ships only the
packages listed there, while an editable install finds any folder, so a subpackage missing
from the list works in every test and breaks in the image."""

from __future__ import annotations

import tomllib

from tests.paths import ROOT


def _declared() -> tuple[set[str], dict[str, str]]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(setuptools["packages"]), setuptools["package-dir"]


def test_every_package_folder_is_in_the_wheel() -> None:
    packages, package_dir = _declared()
    found = set()
    for name, folder in package_dir.items():
        root = ROOT / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            found.add(".".join([name, *rel.parts]))
    missing = sorted(found - packages)
    assert not missing, f"folders with __init__.py not in [tool.setuptools] packages: {missing}"
    assert "medssl.training.networks" in found  # the walk sees subpackages


def test_every_declared_package_exists() -> None:
    packages, package_dir = _declared()
    for package in packages:
        parts = package.split(".")
        for i in range(len(parts), 0, -1):  # the longest mapped prefix
            prefix = ".".join(parts[:i])
            if prefix in package_dir:
                folder = ROOT / package_dir[prefix] / "/".join(parts[i:])
                break
        else:
            folder = ROOT / "/".join(parts)
        assert (folder / "__init__.py").is_file(), f"{package}: no {folder}/__init__.py"
