"""MkDocs hook: README.md as the site's home page, and links to repository files, checked.

MkDocs checks links between pages of ``docs/`` (``validation`` in ``mkdocs.yml``, errors under
``--strict``). Two kinds of link it cannot check on its own:

* the links of ``README.md``, which lives at the repository root. The hook makes the README the
  site's ``index.md``, so its links are resolved from the root (``docs/how-to/export.md``,
  ``examples/gateway.yaml``) as on a forge, and MkDocs checks them like any page's;
* links from a page to a repository file outside ``docs/`` (``../../examples/gateway.yaml``).
  Each such target must exist in the repository, or the build fails naming the page and the
  link; an existing one is copied into the site under ``_repo/`` (as is, never rendered) and
  the link is pointed there, so it works in the built site too.

Every relative link is resolved from the file's real place in the repository, so the same
Markdown works on a forge and in the site. Links inside code (fenced blocks, inline code) are
not links and are left alone. A link that leaves the repository fails the build.

The functions above the MkDocs events import no MkDocs module, so tests can call them directly.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

#: Where copies of repository files go in the site.
REPO_PREFIX = "_repo"
#: The page the README becomes.
HOME = "index.md"

# Inline links and images: [text](target "title") / ![alt](target); reference definitions.
_INLINE = re.compile(r"(!?\[(?:[^\[\]]|\[[^\]]*\])*\]\()(<[^>]*>|[^)\s]+)((?:\s+\"[^\"]*\")?\))")
_REFERENCE = re.compile(r"^( {0,3}\[[^\]]+\]:\s+)(\S+)(.*)$", re.MULTILINE)
# Fenced code blocks (``` or ~~~, to the matching fence) and inline code spans.
_FENCE = re.compile(
    r"^([ \t]*)(`{3,}|~{3,})[^\n]*\n.*?^[ \t]*\2[`~]*[ \t]*$", re.MULTILINE | re.DOTALL
)
_CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.DOTALL)


class LinkError(Exception):
    """A relative link whose target does not exist, is a folder, or leaves the repository."""


@dataclass(frozen=True)
class Target:
    """Where a relative link points.

    Attributes:
        path: the target, relative to the repository root (POSIX).
        anchor: the ``#fragment``, without ``#``; empty when none.
        in_docs: the target is inside the docs folder (a page or an image MkDocs knows).
    """

    path: str
    anchor: str
    in_docs: bool


def _split_fences(markdown: str) -> Iterator[tuple[bool, str]]:
    """``(is_fenced_code, text)`` pieces of ``markdown``, in order; joined they give it back."""
    pos = 0
    for fence in _FENCE.finditer(markdown):
        yield False, markdown[pos : fence.start()]
        yield True, fence.group(0)
        pos = fence.end()
    yield False, markdown[pos:]


def _in_code_span(text: str) -> Any:
    """``f(index) -> bool``: whether ``text[index]`` lies inside an inline code span."""
    spans = [(m.start(), m.end()) for m in _CODE_SPAN.finditer(text)]
    return lambda index: any(start <= index < end for start, end in spans)


def _is_relative(url: str) -> bool:
    parts = urlsplit(url)
    return not (parts.scheme or parts.netloc or url.startswith(("/", "#", "mailto:")))


def rewrite_links(markdown: str, rewrite: Any) -> str:
    """``markdown`` with every relative link target outside code passed through ``rewrite``.

    Args:
        markdown: a page's source.
        rewrite: ``f(url) -> url``, called with each relative target (a path, maybe with a
            ``#fragment``); absolute URLs, pure ``#anchors`` and ``mailto:`` are left alone.
    """

    def rewrite_text(text: str) -> str:
        in_code = _in_code_span(text)

        def inline(match: re.Match[str]) -> str:
            url = match.group(2)
            bare = url[1:-1] if url.startswith("<") else url
            if in_code(match.start()) or not _is_relative(bare):
                return match.group(0)
            return f"{match.group(1)}{rewrite(bare)}{match.group(3)}"

        text = _INLINE.sub(inline, text)
        in_code = _in_code_span(text)  # positions moved with the rewritten links

        def reference(match: re.Match[str]) -> str:
            if in_code(match.start()) or not _is_relative(match.group(2)):
                return match.group(0)
            return f"{match.group(1)}{rewrite(match.group(2))}{match.group(3)}"

        return _REFERENCE.sub(reference, text)

    return "".join(
        text if is_code else rewrite_text(text) for is_code, text in _split_fences(markdown)
    )


def relative_links(markdown: str) -> list[str]:
    """Every relative link target of ``markdown`` outside code, in order."""
    found: list[str] = []

    def keep(url: str) -> str:
        found.append(url)
        return url

    rewrite_links(markdown, keep)
    return found


def resolve(url: str, source: Path, repo_root: Path, docs_dir: Path) -> Target:
    """The target of relative link ``url`` written in file ``source``.

    Args:
        url: the link as written (``../../examples/gateway.yaml#L3``, ``how-to/export.md``).
        source: the real path of the Markdown file that holds the link.
        repo_root: the repository root; no link may leave it.
        docs_dir: the docs folder (MkDocs's ``docs_dir``).

    Raises:
        LinkError: the target leaves the repository, does not exist, or is a folder
            (link a file in it instead); the message names the file and the link.
    """
    parts = urlsplit(url)
    path = unquote(parts.path)
    repo_root, docs_dir = repo_root.resolve(), docs_dir.resolve()
    where = source.resolve().relative_to(repo_root).as_posix()
    target = Path(os.path.normpath(source.resolve().parent / path)) if path else source.resolve()
    try:
        relative = target.relative_to(repo_root).as_posix()
    except ValueError:
        raise LinkError(f"{where}: link '{url}' leaves the repository") from None
    if not target.exists():
        raise LinkError(f"{where}: link '{url}' points to {relative}, which does not exist")
    if target.is_dir():
        raise LinkError(
            f"{where}: link '{url}' points to the folder {relative}/; link a file in it "
            "(a README.md, say), which the docs build can check and copy"
        )
    in_docs = docs_dir == target or docs_dir in target.parents
    return Target(relative, parts.fragment, in_docs)


def site_path(target: Target, repo_root: Path, docs_dir: Path) -> str:
    """The target's path in the site's source tree (what MkDocs's ``src_uri`` is)."""
    docs_rel = docs_dir.resolve().relative_to(repo_root.resolve()).as_posix()
    if target.in_docs:
        return posixpath.relpath(target.path, docs_rel)
    return f"{REPO_PREFIX}/{target.path}"


def page_link(target: Target, page_uri: str, repo_root: Path, docs_dir: Path) -> str:
    """The link, as written in page ``page_uri`` (its ``src_uri``), to ``target`` in the site."""
    uri = site_path(target, repo_root, docs_dir)
    link = posixpath.relpath(uri, posixpath.dirname(page_uri) or ".")
    return f"{link}#{target.anchor}" if target.anchor else link


def check_files(
    sources: dict[str, Path], repo_root: Path, docs_dir: Path
) -> tuple[set[str], list[str]]:
    """Resolve the relative links of every page, and of the repository Markdown they link to.

    Args:
        sources: page ``src_uri`` -> the real Markdown file.

    Returns:
        ``(repository files outside docs that pages link to, errors)``; each error names the
        file and the link. A Markdown file outside docs that a page links to (a folder's
        README) is copied as is, so its own relative links must exist too; they are followed
        in turn.
    """
    outside: set[str] = set()
    errors: list[str] = []
    queue = list(sources.values())
    while queue:
        path = queue.pop(0)
        for url in relative_links(path.read_text(encoding="utf-8")):
            try:
                target = resolve(url, path, repo_root, docs_dir)
            except LinkError as exc:
                errors.append(str(exc))
                continue
            if not target.in_docs and target.path not in outside:
                outside.add(target.path)
                if target.path.endswith(".md"):
                    queue.append(repo_root / target.path)
    return outside, errors


# -- MkDocs events ----------------------------------------------------------------------------

_state: dict[str, Any] = {}


def _roots(config: Any) -> tuple[Path, Path]:
    docs_dir = Path(config["docs_dir"]).resolve()
    repo_root = Path(config["config_file_path"]).resolve().parent
    return repo_root, docs_dir


def on_files(files: Any, config: Any) -> Any:
    """Add the README as the home page and the linked repository files; fail on bad links."""
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File

    class RepoFile(File):
        """A repository file copied into the site as is (a Markdown file is not rendered)."""

        def is_documentation_page(self) -> bool:
            return False

        def is_static_page(self) -> bool:
            return False

    repo_root, docs_dir = _roots(config)
    if files.get_file_from_path(HOME) is not None:
        raise PluginError(f"docs/{HOME} must not exist: README.md is the site's home page")
    files.append(File.generated(config, HOME, abs_src_path=str(repo_root / "README.md")))
    sources = {
        f.src_uri: Path(f.abs_src_path) for f in files.documentation_pages() if f.abs_src_path
    }
    outside, errors = check_files(sources, repo_root, docs_dir)
    if errors:
        raise PluginError("broken links:\n  " + "\n  ".join(errors))
    for path in sorted(outside):
        files.append(
            RepoFile.generated(config, f"{REPO_PREFIX}/{path}", abs_src_path=str(repo_root / path))
        )
    _state["sources"] = sources
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Point the page's relative links at their places in the site."""
    repo_root, docs_dir = _roots(config)
    source = _state["sources"].get(page.file.src_uri)
    if source is None:
        return markdown

    def rewrite(url: str) -> str:
        return page_link(
            resolve(url, source, repo_root, docs_dir), page.file.src_uri, repo_root, docs_dir
        )

    return rewrite_links(markdown, rewrite)
