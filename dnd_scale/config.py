"""Typed configuration: dataclasses ⇄ YAML, `--section.field=value` overrides, resolved copies per run.

Every stage reads one `RunConfig` (`dnd_scale/recipe.py`); each section is the component's own
dataclass (one docstring per field, next to the code that uses it). A recipe in `configs/*.yaml`
sets what differs from the defaults; the command line overrides single fields; the resolved config
is written into the run folder so that a run can always be reproduced.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from dnd_scale.io import ArtifactError, atomic_path, read_text


class ConfigError(ValueError):
    """A recipe or override does not fit the typed config; the message names the field."""


def to_dict(obj: Any) -> Any:
    """Dataclass → plain dict/list/scalars (tuples become lists) for YAML and JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type (nested dataclasses, tuples, optionals)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except (ConfigError, TypeError, ValueError) as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} fits none of {hint}")
    if dataclasses.is_dataclass(hint):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {hint.__name__}, got {value!r}")
        return from_dict(hint, value, f"{where}.")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        item = args[0] if args else Any
        return [_coerce(v, item, where) for v in value]
    if origin is dict:
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(hint)}")
        return value
    if hint is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return bool(value)
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
        try:
            number = float(value)  # YAML reads 1e-4 as a string; "3" and 3.0 are fine ints
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}") from None
        if hint is int:
            if not number.is_integer():
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
            return int(number)
        return number
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are an error naming the known ones."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown config field(s) {[f'{where}{k}' for k in unknown]}; "
            f"{cls.__name__} has {sorted(fields)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: {err}") from None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as {"section.field": value} (what overrides and messages name)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_override(text: str) -> tuple[list[str], Any]:
    """``--train.lr=3e-5`` → (["train", "lr"], 3e-05) with the value parsed as YAML."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r} must look like --section.field=value")
    path, _, raw = body.partition("=")
    try:
        return path.split("."), yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(err)}); quote it, "
                          "e.g. --section.field='\"text\"'") from None


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``--a.b=value`` overrides to a nested dict (validated when the dataclass is built)."""
    for text in overrides:
        set_field(data, *parse_override(text), what=f"override {text!r}")
    return data


def set_field(data: dict[str, Any], path: Sequence[str], value: Any, what: str = "") -> None:
    """Set ``data[path[0]][path[1]]... = value`` in a nested dict, making the sections on the way."""
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what or '.'.join(path)}: {key} is not a section")
    node[path[-1]] = value


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config (every field, defaults included) as YAML, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or err}{where}"


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """A YAML file's content; text that is not UTF-8 or not YAML is a ConfigError naming the file."""
    try:
        return yaml.safe_load(read_text(path, what))
    except ArtifactError as err:
        raise ConfigError(str(err)) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {_yaml_problem(err)}; fix the file") from None


def read_recipe(recipe: str | os.PathLike | None) -> dict[str, Any]:
    """A YAML recipe as a dict of sections ({} for None); a missing or malformed file is a ConfigError."""
    if recipe is None:
        return {}
    path = Path(recipe)
    if not path.is_file():
        raise ConfigError(f"config recipe {str(path)!r} not found (see configs/ for the shipped ones)")
    loaded = read_yaml(path, "config recipe") or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(loaded).__name__}")
    return loaded
