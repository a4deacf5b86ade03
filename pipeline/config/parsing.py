"""From YAML text to typed dataclasses, with one-line errors that name the dotted key.

Nothing here knows what a run config contains (that is pipeline/config/schema.py): it reads a YAML mapping, applies
`key=value` overrides, and builds any dataclass from a nested dict by its type hints (dataclasses, unions,
Literal, lists, scalars), suggesting the close key when one is misspelled.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem, reported to the user as one line naming the key."""


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (empty for an empty file)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`3`, `true`, `[a, b]`, `null`)."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.split(".")
    node = raw
    for depth, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parents[: depth + 1])} is not a section")
        node = child
    node[leaf] = value


def dataclass_from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a dict, naming the dotted key of the first unknown or mistyped field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    # `source` records where a config came from; it is not a key a file may set.
    known = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    for key in raw:
        if key not in known:
            raise ConfigError(unknown_key_message(f"{prefix}{key}", str(key), known))
    values = {key: coerce(hints[key], value, f"{prefix}{key}") for key, value in raw.items()}
    return cls(**values)


def unknown_key_message(dotted: str, key: str, known: list[str]) -> str:
    """`dotted: unknown key`, with the closest known key or else the list of known keys."""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
    return f"{dotted}: unknown key{hint}"


def coerce(hint: Any, value: Any, dotted: str) -> Any:
    """Check `value` against a type hint (dataclasses, unions, Literal, list, scalars); return it typed."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if value is None:
            raise ConfigError(f"{dotted}: must be a mapping, got null")
        return dataclass_from_dict(hint, value, f"{dotted}.")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return coerce(option, value, dotted)
            except ConfigError as error:
                errors.append(error)
        raise errors[-1] if len(errors) == 1 else ConfigError(f"{dotted}: expected {describe(hint)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{dotted}: must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{dotted}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [coerce(item, v, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads `3e-4` as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(hint, type) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{dotted}: expected {describe(hint)}, got {type(value).__name__} {value!r}")
    return value


def describe(hint: Any) -> str:
    """A type hint as an error message names it: `int`, `float or null`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
