"""MkDocs hook: the config key tables, generated from the config dataclasses.

A page asks for a table with a marker on a line of its own::

    <!-- config-keys: medssl.training.detection.config:DetectionExperiment -->

and the hook replaces it with one row per key, in dotted form as ``--set`` and YAML files take
it (``data.patch``; ``routes[].model`` for a list of sections): its type, its default and the
description from the ``Attributes:`` section of the dataclass's docstring (and its bases'). The
tables are built from the classes that :func:`medssl.config.load_config` validates against, so
a key added, renamed or removed in the code changes the docs at the next build.

The functions here import no MkDocs module, so tests can call them directly.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

#: ``<!-- config-keys: package.module:ClassName -->`` on a line of its own.
MARKER = re.compile(r"^<!--\s*config-keys:\s*([\w.]+):(\w+)\s*-->\s*$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One row of a config table.

    Attributes:
        key: dotted key (``data.patch``; ``routes[].model`` inside a list of sections).
        type: the annotation, written for a reader (``int``, ``"fixed" | "flexmatch"``).
        default: the default as YAML would write it, or ``required``.
        doc: the description from the class docstring; empty when it has none.
    """

    key: str
    type: str
    default: str
    doc: str


def attribute_docs(cls: type) -> dict[str, str]:
    """Field descriptions from the Google-style ``Attributes:`` sections of ``cls`` and its bases.

    An entry may name several fields (``hu_min, hu_max: ...`` or ``a / b / c: ...``); its
    continuation lines are joined into one line. A subclass's description wins over its base's.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docstring = inspect.getdoc(klass) if klass.__doc__ else None
        if docstring:
            docs.update(_parse_attributes(docstring))
    return docs


def _parse_attributes(docstring: str) -> dict[str, str]:
    out: dict[str, str] = {}
    lines = docstring.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return out
    entry_indent: int | None = None
    names: list[str] = []
    text: list[str] = []

    def flush() -> None:
        for name in names:
            out[name] = " ".join(text).strip()

    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if entry_indent is None:
            entry_indent = indent
        if indent < entry_indent:
            break
        match = (
            re.match(r"([\w ,/]+?):(?:\s+(.*))?$", line.strip()) if indent == entry_indent else None
        )
        if match:
            flush()
            names = [n.strip() for n in re.split(r"[,/]", match.group(1)) if n.strip()]
            text = [match.group(2) or ""]
        elif indent == entry_indent:
            break  # a paragraph after the section
        else:
            text.append(line.strip())
    flush()
    return out


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _section_type(tp: Any) -> tuple[type | None, bool]:
    """``(dataclass, is_list)`` when ``tp`` is a section, a list of sections or an optional one."""
    if _is_dataclass_type(tp):
        return tp, False
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and _is_dataclass_type(args[0]):
        return args[0], True
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1 and _is_dataclass_type(arms[0]):
            return arms[0], False
    return None, False


def type_name(tp: Any) -> str:
    """An annotation as a reader would write it: ``int``, ``list of int``, ``"a" | "b"``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(f'"{m.value}"' for m in tp)
    if tp is Path:
        return "path"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def yaml_value(value: Any) -> str:
    """A default as YAML would write it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return yaml_value(value.value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def config_keys(cls: type, prefix: str = "", instance: Any = None) -> Iterator[ConfigKey]:
    """Every key of config dataclass ``cls``, depth first, in declaration order.

    Args:
        cls: a (frozen) config dataclass, as :func:`medssl.config.load_config` takes.
        prefix: dotted key of ``cls`` inside the whole config (``""`` at the top).
        instance: the value ``cls`` has there by default, when it is not the class default
            (a ``default_factory`` that sets fields); its fields give the defaults shown.

    Raises:
        TypeError: ``cls`` is not a dataclass.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"config_keys needs a dataclass type, got {cls!r}")
    hints = typing.get_type_hints(cls)
    docs = attribute_docs(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        tp = hints[field.name]
        key = f"{prefix}{field.name}"
        default = getattr(instance, field.name) if instance is not None else _default_of(field)
        section, is_list = _section_type(tp)
        if section is not None and not is_list:
            nested = default if dataclasses.is_dataclass(default) else None
            yield from config_keys(section, f"{key}.", nested)
            continue
        if section is not None:
            yield ConfigKey(
                key, f"list of `{section.__name__}`", yaml_value(default), docs.get(field.name, "")
            )
            yield from config_keys(section, f"{key}[].")
            continue
        shown = "required" if default is dataclasses.MISSING else yaml_value(default)
        yield ConfigKey(key, type_name(tp), shown, docs.get(field.name, ""))


def resolve(spec: str) -> type:
    """``"package.module:ClassName"`` → the class."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _cell(text: str) -> str:
    """Table-cell text: reST literals and roles as Markdown code, pipes escaped."""
    text = re.sub(r"``(.+?)``", r"`\1`", text)
    text = re.sub(r":(?:class|func|meth|mod|data|attr|exc):`~[\w.]*?(\w+)`", r"`\1`", text)
    text = re.sub(r":(?:class|func|meth|mod|data|attr|exc):`([\w.]+)`", r"`\1`", text)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(cls: type) -> str:
    """The Markdown table of every key of ``cls``: key, type, default, meaning."""
    rows = [
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for item in config_keys(cls):
        rows.append(
            f"| `{item.key}` | {_cell(item.type)} | `{_cell(item.default)}` "
            f"| {_cell(item.doc) or '—'} |"
        )
    return "\n".join(rows) + "\n"


def expand(markdown: str) -> str:
    """``markdown`` with every config-keys marker replaced by its table."""
    return MARKER.sub(lambda m: markdown_table(resolve(f"{m.group(1)}:{m.group(2)}")), markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: expand the markers of one page."""
    return expand(markdown)
