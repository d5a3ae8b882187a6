"""Presets and `--set` overrides: one grammar for every trainer's configuration.

A configuration is a dataclass whose fields are values, per-key tables (`dict[str, int]`) or sections
(other dataclasses). A preset is a TOML file that sets some of those fields, sections as tables; the
dataclasses' defaults give the rest. Each trainer has a directory of presets (training/configs/ for
the PGGAN, training/configs/classifier/ for classifiers) and takes a preset's name or a TOML file's
path.

Inheritance: `extends = "NAME"` starts a preset from another one: a preset of the same directory, or
a TOML file by its path relative to the extending file. Tables merge key by key into the inherited
ones, at any depth; every other value (number, string, array) replaces the inherited one. `name` is
never inherited: it is the file's stem unless the file sets it.

Overrides: `KEY=VALUE` with a dotted KEY (`optim.lr=2e-3`, `schedule.batch_size.64=32`,
`data.root=/data/nih`). VALUE is read as the type of the field it sets: an integer (`1e6` too, when
whole), a number (`nan` and `inf` too), `true` or `false`, a string bare or TOML-quoted, a list as a
TOML array or comma-separated (`model.channels=8,16,32`; nothing for an empty one), a table as a TOML
inline table (`schedule.batch_size={64 = 32}`). A key the configuration lacks, or a value of the wrong
type, is a ConfigError that names the key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import sys
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from training.runtime.validation import ConfigError, is_int, show

_NOT_TOML = object()


# ------------------------------------------------------------------------------------ preset files


def preset_names(directory: Path) -> list[str]:
    """The presets of `directory`: the stems of its TOML files, sorted."""
    return sorted(path.stem for path in directory.glob("*.toml"))


def preset_path(directory: Path, name_or_path: str) -> Path:
    """The file of a preset of `directory`, or `name_or_path` itself when it is a TOML file.

    Raises ConfigError naming the presets there when it is neither.
    """
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" and candidate.is_file():
        return candidate
    preset = directory / f"{name_or_path}.toml"
    if preset.is_file():
        return preset
    raise ConfigError(f"no preset or TOML file {name_or_path!r}; presets: {preset_names(directory)}")


def read_preset(directory: Path, name_or_path: str) -> dict[str, Any]:
    """The table of a preset (see `preset_path`), its `extends` chain merged in and `name` set.

    Raises ConfigError for a file that is not TOML, an `extends` that names no preset, or a cycle.
    """
    path = preset_path(directory, name_or_path)
    table = _read_extended(directory, path, ())
    return {**table, "name": table.get("name", path.stem)}


def _read_extended(directory: Path, path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if path.resolve() in chain:
        names = " -> ".join(p.stem for p in (*chain, path.resolve()))
        raise ConfigError(f"{path}: presets extend each other in a cycle ({names})")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: {error}") from error
    parent = table.pop("extends", None)
    if parent is None:
        return table
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends={show(parent)} must name a preset or a TOML file")
    beside = path.parent / parent
    parent_path = beside if beside.suffix == ".toml" and beside.is_file() else preset_path(directory, parent)
    inherited = _read_extended(directory, parent_path, (*chain, path.resolve()))
    inherited.pop("name", None)  # a name belongs to its own file
    return merge(inherited, table)


def merge(base: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `child` on top: tables merge key by key, any other value of `child` replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# ------------------------------------------------------------------------------------ typed building


@functools.cache
def _fields(schema: type) -> dict[str, Any]:
    """A configuration dataclass's fields and their resolved types."""
    hints = typing.get_type_hints(schema)
    return {field.name: hints[field.name] for field in dataclasses.fields(schema)}


def build(schema: type, table: Any, prefix: str = "") -> Any:
    """An instance of the dataclass `schema` from `table` (a preset's or a `to_dict()` table).

    Fields missing from `table` keep their defaults; each value is checked against its field's type
    (`coerce`). Raises ConfigError naming the dotted key of an unknown field or a mistyped value.
    """
    if isinstance(table, schema):
        return table
    if not isinstance(table, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'the configuration'} must be a table, got {show(table)}")
    fields = _fields(schema)
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[prefix + k for k in unknown]}; known: {sorted(prefix + k for k in fields)}"
        )
    return schema(**{name: coerce(value, fields[name], prefix + name) for name, value in table.items()})


def coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as the type `hint` says, or ConfigError naming `key`.

    Integers stand for floats; lists stand for tuples; no other conversion is made (true is not 1).
    """
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a table, got {show(value)}")
        return {str(k): coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        return _coerce_sequence(value, origin, args, key)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and is_int(value):
        return value
    if hint is float and (is_int(value) or isinstance(value, float)):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key} must be {_describe(hint)}, got {show(value)}")


def _coerce_sequence(value: Any, origin: type, args: tuple[Any, ...], key: str) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be a list, got {show(value)}")
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):  # fixed length, as (rows, columns)
        if len(value) != len(args):
            raise ConfigError(f"{key} must hold {len(args)} values, got {show(value)}")
        return tuple(coerce(item, hint, f"{key}[{i}]") for i, (item, hint) in enumerate(zip(value, args)))
    items = [coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _describe(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


# ------------------------------------------------------------------------------------ overrides


def parse_override(text: str, schema: type) -> tuple[list[str], Any]:
    """`KEY=VALUE` -> (KEY's parts, VALUE read as the type of `schema`'s field at KEY).

    'schedule.batch_size.64=32' -> (['schedule', 'batch_size', '64'], 32). Raises ConfigError for text
    without '=', a key `schema` does not have, a section as the target, or a value of the wrong type.
    """
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like key=value, e.g. section.key=value")
    dotted, raw_value = text.split("=", 1)
    keys = [key.strip() for key in dotted.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"--set {text!r} has an empty key")
    hint = _target(schema, keys, text)
    return keys, _parse_value(raw_value.strip(), hint, ".".join(keys), text)


def apply_overrides(table: Mapping[str, Any], overrides: Iterable[str], schema: type) -> dict[str, Any]:
    """A copy of `table` (a preset's or a `to_dict()` table of `schema`) with each `KEY=VALUE` set."""
    table = copy.deepcopy(dict(table))
    for text in overrides:
        keys, value = parse_override(text, schema)
        node = table
        for depth, key in enumerate(keys[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {'.'.join(keys[: depth + 1])} is not a table here")
        node[keys[-1]] = value
    return table


def _target(schema: type, keys: list[str], text: str) -> Any:
    """The type of the field that `keys` name in `schema`; ConfigError for an unknown key."""
    hint: Any = schema
    for depth, key in enumerate(keys):
        where = ".".join(keys[:depth])
        if dataclasses.is_dataclass(hint):
            fields = _fields(hint)
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
                guess = f"; did you mean {'.'.join([*keys[:depth], close[0]])!r}?" if close else ""
                known = ", ".join(sorted(fields))
                raise ConfigError(
                    f"unknown config field {'.'.join(keys[: depth + 1])!r} in --set {text}{guess} "
                    f"(fields {f'of {where}' if where else 'at the top'}: {known})"
                )
            hint = fields[key]
        elif typing.get_origin(hint) is dict:
            hint = typing.get_args(hint)[1]
        else:
            raise ConfigError(f"--set {text}: {where} is a value, not a table")
    if dataclasses.is_dataclass(hint):
        first = dataclasses.fields(hint)[0].name
        dotted = ".".join(keys)
        raise ConfigError(f"--set {text}: {dotted} is a section; set its fields, e.g. {dotted}.{first}=…")
    return hint


def _parse_value(text: str, hint: Any, key: str, whole: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (bool, int, float, str):
        value = _parse_scalar(text, hint)
        if value is _NOT_TOML:
            raise ConfigError(f"--set {whole}: {key} takes {_EXAMPLES[hint]}")
        return value
    if origin in (list, tuple) and args[0] in (int, float) and not text.startswith("["):
        items = [_parse_scalar(part.strip(), args[0]) for part in text.split(",") if part.strip()]
        if _NOT_TOML in items:
            kind = "integers" if args[0] is int else "numbers"
            raise ConfigError(f"--set {whole}: {key} takes {kind}, comma-separated (8,16,32) or as [8, 16]")
        return coerce(items, hint, key)
    value = _toml(text)
    if value is _NOT_TOML:
        if hint is Any:
            return text
        raise ConfigError(f"--set {whole}: {key} takes a TOML value, an array [a, b] or a table {{k = v}}")
    return coerce(value, hint, key)


_EXAMPLES = {
    bool: "true or false",
    int: "an integer, such as 512 or 1e6",
    float: "a number, such as 0.001, 1e-3, nan or inf",
    str: "a string",
}


def _parse_scalar(text: str, hint: type) -> Any:
    """`text` as a bool, int, float or str; _NOT_TOML when it cannot be one."""
    if hint is bool:
        return {"true": True, "1": True, "false": False, "0": False}.get(text.lower(), _NOT_TOML)
    if hint is str:
        quoted = _toml(text)
        return quoted if isinstance(quoted, str) else text  # bare words are strings: train.device=cpu
    try:
        number = float(text)
    except ValueError:
        return _NOT_TOML
    if hint is float:
        return number
    try:
        return int(text)
    except ValueError:  # 1e6 for an integer
        return int(number) if number.is_integer() else _NOT_TOML


def _toml(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return _NOT_TOML
