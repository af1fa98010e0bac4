"""The documentation: the README's opening, the docs tree, and the checks the docs build runs.

The docs build (``make docs``: ``mkdocs build --strict``) fails on a broken link between pages,
to an anchor, from README.md, or to a repository file; its two hooks live in ``docs/hooks/``
and are tested here without MkDocs (``repo_links``: link resolution; ``config_keys``: the config
tables generated from the dataclasses). The last test runs the real build.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from medssl.config import config_to_dict

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hook(name: str) -> ModuleType:
    path = DOCS / "hooks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while being built
    spec.loader.exec_module(module)
    return module


repo_links = _hook("repo_links")
config_keys = _hook("config_keys")


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts)


# -- the README -------------------------------------------------------------------------------


def test_readme_starts_with_the_two_commands_and_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; the details belong in docs/"
    body = [line for line in lines[1:] if line.strip()]  # after the title
    assert lines[0].startswith("# ")
    assert body[0] == "```bash"
    assert body[1].split("#")[0].strip() == "make demo"
    assert body[2].split("#")[0].strip() == "make test"
    assert body[3] == "```"


def test_readme_and_docs_cite_no_issue_numbers_and_no_file_outside_the_repository():
    texts = {p: p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *_pages()]}
    texts.update({p: p.read_text(encoding="utf-8") for p in (DOCS / "hooks").glob("*.py")})
    for path, text in texts.items():
        where = path.relative_to(ROOT)
        assert not re.search(r"\bissues? \d+", text, re.IGNORECASE), where
        assert "design.md" not in text, where


# -- the tree ---------------------------------------------------------------------------------


def test_docs_have_the_four_kinds_of_page_and_the_nav_lists_every_page():
    for kind in ("tutorials", "how-to", "reference", "explanation"):
        assert list((DOCS / kind).glob("*.md")), kind
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def walk(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from walk(value)

    listed = set(walk(config["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in _pages()}
    assert "index.md" in listed and "index.md" not in pages  # README.md is the home page
    assert listed - {"index.md"} == pages


def test_how_to_guides_cover_the_tasks():
    titles = {
        p.stem: p.read_text(encoding="utf-8").splitlines()[0]
        for p in (DOCS / "how-to").glob("*.md")
    }
    for stem in (
        "train-focalmix",
        "train-segmentation",
        "export",
        "deploy-gateway",
        "score-archive",
    ):
        assert stem in titles
    assert "LUNA16" in titles["train-focalmix"] and "NLST" in titles["train-focalmix"]


def test_benchmark_verdicts_keep_their_section_titles():
    """The coordinator finds and updates these sections by title when new results land."""
    evidence = (DOCS / "explanation" / "evidence.md").read_text(encoding="utf-8")
    headings = [line.lstrip("#").strip() for line in evidence.splitlines() if line.startswith("#")]
    for title in (
        "Does FocalMix help here? (`benchmarks/focalmix_ssl.py`)",
        "How the shipped detector does on scans it has not seen (`benchmarks/detector_quality.py`)",
        "How A&D compares here (`benchmarks/ad_settings.py`)",
        "Which method to pick (`benchmarks/seg_methods.py`)",
        "The shipped model",
        "Scoring NLST",
    ):
        assert title in headings, title


def test_model_card_reference_names_every_key_of_the_shipped_card():
    table = (DOCS / "reference" / "model-card.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)?", table, re.MULTILINE))
    documented = {key for pair in documented for key in pair if key}
    for card in (ROOT / "model_repository").glob("*/medssl.json"):
        keys = set(json.loads(card.read_text(encoding="utf-8")))
        assert keys <= documented, f"{card}: {sorted(keys - documented)} not in model-card.md"


def test_console_screenshots_the_docs_show_exist():
    """tests/serving/test_serving_console.py writes them to docs/images/
    (MEDSSL_CONSOLE_FIGURES=1)."""
    page = (DOCS / "how-to" / "operate-gateway.md").read_text(encoding="utf-8")
    images = re.findall(r"\(\.\./images/(console-[\w-]+\.png)\)", page)
    assert "console-overview.png" in images
    for name in images:
        assert (DOCS / "images" / name).is_file(), name


# -- link checks ------------------------------------------------------------------------------


def test_every_relative_link_of_the_readme_and_the_docs_resolves():
    sources = {p.relative_to(DOCS).as_posix(): p for p in _pages()}
    sources["index.md"] = ROOT / "README.md"
    outside, errors = repo_links.check_files(sources, ROOT, DOCS)
    assert errors == []
    assert "examples/gateway.yaml" in outside  # repository files are checked, then copied


@pytest.fixture
def tree(tmp_path):
    """A small repository: README, docs/ with two pages, a repository file outside docs."""
    (tmp_path / "docs" / "how-to").mkdir(parents=True)
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "gateway.yaml").write_text("scp: {}\n")
    (tmp_path / "docs" / "how-to" / "export.md").write_text("# Export\n")
    return tmp_path


def _errors(tree: Path, page: str) -> list[str]:
    path = tree / "docs" / "how-to" / "page.md"
    path.write_text(page)
    return repo_links.check_files({"how-to/page.md": path}, tree, tree / "docs")[1]


def test_a_planted_broken_link_is_reported_with_its_file(tree):
    assert _errors(tree, "[ok](export.md) [ok](../../examples/gateway.yaml#L1)") == []
    (error,) = _errors(tree, "see [the export](exprot.md)")
    assert "docs/how-to/page.md" in error and "exprot.md" in error and "does not exist" in error
    (error,) = _errors(tree, "[config](../../examples/gateway.yml)")
    assert "examples/gateway.yml" in error
    (error,) = _errors(tree, "[up](../../../elsewhere.md)")
    assert "leaves the repository" in error
    (error,) = _errors(tree, "[folder](../../examples/)")
    assert "folder" in error


def test_links_inside_code_are_not_links(tree):
    page = "`[x](missing.md)`\n\n```markdown\n[y](missing.md)\n```\n\n[`ok`](export.md)\n"
    assert _errors(tree, page) == []
    assert repo_links.relative_links(page) == ["export.md"]


def test_links_point_to_their_place_in_the_site(tree):
    docs = tree / "docs"
    readme = tree / "README.md"
    readme.write_text("x")
    to_page = repo_links.resolve("docs/how-to/export.md#top", readme, tree, docs)
    assert repo_links.page_link(to_page, "index.md", tree, docs) == "how-to/export.md#top"
    page = docs / "how-to" / "export.md"
    to_file = repo_links.resolve("../../examples/gateway.yaml", page, tree, docs)
    assert not to_file.in_docs
    assert (
        repo_links.page_link(to_file, "how-to/export.md", tree, docs)
        == "../_repo/examples/gateway.yaml"
    )
    text = "[a](export.md) and [b](../../examples/gateway.yaml) and [c](https://example.org/x.md)"
    rewritten = repo_links.rewrite_links(
        text,
        lambda url: repo_links.page_link(
            repo_links.resolve(url, page, tree, docs), "how-to/export.md", tree, docs
        ),
    )
    assert rewritten == (
        "[a](export.md) and [b](../_repo/examples/gateway.yaml) and [c](https://example.org/x.md)"
    )


# -- the config tables ------------------------------------------------------------------------


def _leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in tree.items():
        if isinstance(value, dict):
            keys |= _leaf_keys(value, f"{prefix}{name}.")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            keys.add(f"{prefix}{name}")
            for item in value:
                keys |= _leaf_keys(item, f"{prefix}{name}[].")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _experiments():
    from medssl.serving.config import GatewayConfig, RouteConfig
    from medssl.training.detection.config import DetectionExperiment
    from medssl.training.segmentation.config import SegmentationExperiment

    gateway = GatewayConfig(routes=(RouteConfig(model="m"),))
    return [DetectionExperiment(), SegmentationExperiment(), gateway]


@pytest.mark.parametrize("index", range(3), ids=["detection", "segmentation", "gateway"])
def test_config_tables_list_every_key_the_config_has(index):
    cfg = _experiments()[index]
    rows = list(config_keys.config_keys(type(cfg)))
    documented = {row.key for row in rows}
    assert len(documented) == len(rows)  # each key once
    assert _leaf_keys(config_to_dict(cfg)) <= documented


def test_config_tables_show_defaults_types_and_descriptions():
    from medssl.training.detection.config import DetectionExperiment

    rows = {row.key: row for row in config_keys.config_keys(DetectionExperiment)}
    assert rows["data.patch"].default == "160" and rows["data.patch"].type == "int"
    assert rows["data.test_subsets"].default == "[8, 9]"
    assert rows["data.cache_dir"].type == "str | null"
    assert rows["focalmix.object_policy"].type == '"fixed" | "flexmatch"'
    # "hu_min, hu_max: intensity window, ..." documents both keys
    assert rows["data.hu_min"].doc == rows["data.hu_max"].doc != ""
    assert "largest stride" in rows["data.patch"].doc


def test_config_markers_expand_to_tables():
    page = (DOCS / "reference" / "config.md").read_text(encoding="utf-8")
    assert len(config_keys.MARKER.findall(page)) == 3
    expanded = config_keys.expand(page)
    assert "config-keys:" not in expanded
    assert "| `scp.port` | int | `11112` |" in expanded
    assert "| `optim.steps` |" in expanded


def test_attribute_docs_read_google_style_sections():
    @dataclasses.dataclass
    class Base:
        """Base.

        Attributes:
            a: first,
                continued.
            b / c: shared.
        """

        a: int = 0
        b: int = 0
        c: int = 0

    @dataclasses.dataclass
    class Child(Base):
        """Child.

        Attributes:
            a: overridden.
            d: new.

        A paragraph after the section, not an attribute: ignored.
        """

        d: int = 0

    assert config_keys.attribute_docs(Child) == {
        "a": "overridden.",
        "b": "shared.",
        "c": "shared.",
        "d": "new.",
    }


# -- the real build ---------------------------------------------------------------------------


@pytest.mark.slow
def test_docs_build_strictly(tmp_path):
    if (
        importlib.util.find_spec("mkdocs") is None
        or importlib.util.find_spec("mkdocs_click") is None
    ):
        if os.environ.get("CI"):
            pytest.fail("mkdocs is not installed; .ci/run's make docs installs the [docs] extra")
        pytest.skip("mkdocs not installed (pip install -e '.[docs]', or make docs)")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "make demo" in home and 'href="how-to/export/"' in home
    assert (site / "_repo" / "examples" / "gateway.yaml").is_file()
    cli = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    assert "medssl-serve" in cli and "--print-config" in cli
