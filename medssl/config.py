"""Typed experiment configurations read from YAML.

An experiment is described by a tree of (frozen) dataclasses; a YAML file fills it in::

    @dataclass(frozen=True)
    class FocalMixConfig:
        sharpen_t: float = 0.5
        mix: Literal["mixup", "none"] = "mixup"

    @dataclass(frozen=True)
    class TrainConfig:
        seed: int = 0
        patch_size: tuple[int, ...] = (96, 96, 96)
        focalmix: FocalMixConfig = field(default_factory=FocalMixConfig)

    cfg = load_config(TrainConfig, "exp.yaml", overrides={"focalmix.sharpen_t": 0.25})

Rules (highdicom style: validate up front, name the bad value):

* a key the dataclass does not declare is a :class:`~medssl.errors.ConfigError` naming the
  full dotted key, with a "did you mean" suggestion;
* a value of the wrong type is a ConfigError naming the key, the expected type and the value;
  ``int`` is accepted where ``float`` is expected, ``bool`` only where ``bool`` is;
* a key missing from the file keeps the dataclass default;
* a ``ValueError`` raised by a dataclass's ``__post_init__`` (range checks) becomes a
  ConfigError naming that dataclass's dotted key.

Supported annotations: ``int``, ``float``, ``bool``, ``str``, ``pathlib.Path`` (from str),
``Enum`` subclasses (by value or name), ``tuple[X, ...]`` and ``tuple[X, Y]`` (from YAML
lists), ``X | None``, other unions (first arm that accepts the value), ``Literal[...]``,
``typing.Any`` (anything) and nested dataclasses (from mappings).

This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from medssl.atomic import atomic_write
from medssl.errors import ConfigError

__all__ = [
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_overrides",
]

T = TypeVar("T")

_MISSING = object()


# -- YAML -----------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (YAML 1.1 PyYAML reads it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from exc
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


# -- building ----------------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _bad(path: str, expected: Any, value: Any) -> ConfigError:
    return ConfigError(
        f"config key {path!r}: expected {_type_name(expected)}, got {value!r} "
        f"({type(value).__name__})",
        key=path,
    )


def _convert(tp: Any, value: Any, path: str) -> Any:
    """``value`` checked (and converted) against annotation ``tp``; ConfigError names ``path``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        return config_from_dict(tp, value, path)
    if origin is Literal:
        if value in args and any(type(value) is type(a) for a in args if a == value):
            return value
        choices = ", ".join(repr(a) for a in args)
        raise ConfigError(f"config key {path!r}: must be one of {choices}, got {value!r}", key=path)
    if origin is typing.Union or origin is types.UnionType:
        if value is None:
            if type(None) in args:
                return None
            raise _bad(path, tp, value)
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:
            return _convert(arms[0], value, path)
        for arm in arms:
            try:
                return _convert(arm, value, path)
            except ConfigError:
                continue
        raise _bad(path, tp, value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _bad(path, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        elif len(args) == 0:
            item_types = [Any] * len(value)
        else:
            if len(args) != len(value):
                raise ConfigError(
                    f"config key {path!r}: expected {len(args)} values "
                    f"({_type_name(tp)}), got {len(value)}: {value!r}",
                    key=path,
                )
            item_types = list(args)
        return tuple(
            _convert(t, v, f"{path}[{i}]") for i, (t, v) in enumerate(zip(item_types, value))
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(path, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _bad(path, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _bad(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(path, tp, value)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _bad(path, tp, value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if value == member.value or value == member.name:
                return member
        choices = ", ".join(repr(m.value) for m in tp)
        raise ConfigError(f"config key {path!r}: must be one of {choices}, got {value!r}", key=path)
    raise TypeError(f"config field {path!r}: unsupported annotation {tp!r}")


def config_from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` (possibly nested) from a mapping, validating every key.

    Args:
        cls: a dataclass type; nested dataclass fields are built from nested mappings.
        data: keys are field names; missing keys keep the dataclass defaults.
        path: dotted key of ``data`` inside the whole config, used in error messages.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: unknown key, wrong type, missing required key, or a range check
            (``ValueError`` from ``__post_init__``) failed; the message names the dotted key.
        TypeError: ``cls`` is not a dataclass or declares an unsupported annotation
            (a programming error, not a user error).
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"config_from_dict needs a dataclass type, got {cls!r}")
    where = repr(path) if path else "the top level"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config section {where}: expected a mapping of keys to values, got {data!r}",
            key=path,
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            full = _join(path, str(key))
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {_join(path, close[0])!r}?" if close else ""
            valid = ", ".join(sorted(fields))
            raise ConfigError(
                f"unknown config key {full!r}{hint} (keys in {where}: {valid})", key=full
            )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        full = _join(path, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], full)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key {full!r} is required and has no default", key=full)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"config section {where} ({cls.__name__}): {exc}", key=path) from exc


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not dotted or any(not p for p in parts):
        raise ConfigError(f"override key {dotted!r} is not a dotted key like 'a.b.c'", key=dotted)
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part, _MISSING)
        if child is _MISSING or child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise ConfigError(
                f"override {dotted!r}: {prefix!r} holds the value {child!r}, not a section",
                key=dotted,
            )
        node = child
    node[parts[-1]] = value


def load_config(cls: type[T], path: str | Path, overrides: Mapping[str, Any] | None = None) -> T:
    """Read a YAML file into dataclass ``cls``, applying dotted-key ``overrides`` first.

    Args:
        cls: the config dataclass.
        path: a YAML file holding a mapping (an empty file means all defaults).
        overrides: flat ``{"focalmix.sharpen_t": 0.25}``; validated like the file.

    Raises:
        ConfigError: unreadable file, invalid YAML, or any validation error.
    """
    path = Path(path)
    raw = _read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {raw!r}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, str(dotted), value)
    try:
        return config_from_dict(cls, raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}", key=exc.key) from exc


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=0.5", "c=[1, 2]"]`` (command-line ``--set``) → ``{"a.b": 0.5, "c": [1, 2]}``.

    Values are parsed as YAML scalars/lists, so ``true``, ``1e-3`` and ``null`` work.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.sub=value", key=item)
        try:
            out[key.strip()] = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
    return out


# -- writing ----------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, Path):
        return str(value)
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON/YAML data (tuples → lists, Paths → str, Enums → value).

    ``config_from_dict(type(cfg), config_to_dict(cfg)) == cfg``.
    """
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {cfg!r}")
    out = _plain(cfg)
    json.dumps(out)  # fail here, not halfway through writing a file
    return out


def dump_config(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` as YAML to ``path`` atomically (:func:`medssl.atomic.atomic_write`); returns
    the path."""
    path = Path(path)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    atomic_write(path, lambda fh: fh.write(text), "w")
    return path
