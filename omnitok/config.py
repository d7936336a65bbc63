"""Config files (YAML or JSON) onto nested dataclasses, with ``key.sub=value`` overrides from the command line.

Unknown keys are refused with their full dotted name; values are checked by each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from omnitok.errors import OmnitokError

T = TypeVar("T")


def load_config_file(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise OmnitokError(f"config file {path} not found")
    try:
        data = _yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except UnicodeDecodeError as e:
        raise OmnitokError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise OmnitokError(f"{path} must hold a mapping of settings")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["model.base_channels=64", "steps=500"]`` -> a copy of ``data`` with those values (parsed as YAML)."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise OmnitokError(f"override {item!r} must look like key=value")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise OmnitokError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = _yaml(raw, f"override {item[:60]!r}")
    return out


def _yaml(text: str, what: str) -> Any:
    """YAML from a user (a config file, an override, a server request's setting): bad YAML, or nesting too deep for
    the parser (a RecursionError), is one line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise OmnitokError(f"{what} is not valid YAML: {' '.join(str(e).split())[:200]}") from None
    except RecursionError:
        raise OmnitokError(f"{what} is not valid YAML: nested too deeply") from None


def build(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Instantiate dataclass ``cls`` from ``data``, recursing into dataclass-typed fields."""
    if not isinstance(data, dict):
        raise OmnitokError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        name = sorted(unknown)[0]
        raise OmnitokError(f"unknown setting {where + name!r}; known here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kind = _dataclass_in(hints[name])
        if kind is not None and isinstance(value, dict):
            kwargs[name] = build(kind, value, f"{where}{name}.")
        elif not _fits(value, hints[name]):
            raise OmnitokError(f"setting {where + name!r} must be {_describe(hints[name])}, got {value!r}")
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise OmnitokError(f"{where or 'config'}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain JSON-able data (tuples become lists)."""
    return _plain(dataclasses.asdict(obj))


def _fits(value: Any, hint: Any) -> bool:
    """Whether a config value has the type its field declares (ints pass for floats; bools are not numbers)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return all(_fits(v, args[0]) for v in value) if args else True
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
             type(None): "null"}
    if hint in names:
        return names[hint]
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list, each item {_describe(args[0])}" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
    return None


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _deep_copy(x: Any) -> Any:
    return {k: _deep_copy(v) for k, v in x.items()} if isinstance(x, dict) else x


def check_seed(seed: int) -> int:
    """A seed (a sample's, a run's), 0 .. 2**64 - 1: torch's generators fold a negative one into that range (two
    seeds, one stream) and fail on a larger one; numpy's refuse negative ones."""
    if not 0 <= seed < 1 << 64:
        raise OmnitokError(f"a seed must be from 0 to 2**64 - 1, got {seed}")
    return seed
