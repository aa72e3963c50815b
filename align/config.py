"""One way in for every YAML file align reads: training recipes (:mod:`align.train`), evaluation
configs (:mod:`align.sweep.run`), merge configs (:mod:`align.merging.config`) and meta-training
recipes (``lab.meta_training``, the repository's research code).

Each reads its file with :func:`read_config` (missing file, broken YAML, not a mapping: one
message naming the file), applies ``key.sub=value`` overrides the same way, reads ``1e-4`` as
the number it means, and turns mappings into dataclasses with :func:`build_dataclass`, so an
unknown field, a missing one or a value of the wrong simple type is the same
:class:`ConfigError` everywhere. TRL / transformers config dataclasses (a recipe's ``args``) are
built with transformers' own ``HfArgumentParser.parse_dict``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from align.errors import BadFileError, yaml_problem
from align.files import read_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot run; the message says which file or field and why."""


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_numbers(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string, not a float; configs mean the number."""
    if isinstance(value, dict):
        return {key: parse_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [parse_numbers(item) for item in value]
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    return value


def parse_value(text: str) -> Any:
    """A command-line override value, read as YAML (``[a, b]``, ``true``, ``1e-4``)."""
    try:
        return parse_numbers(yaml.safe_load(text))
    except yaml.YAMLError as error:
        raise ConfigError(
            f"override value {text!r} is not valid YAML: {yaml_problem(error)}"
        ) from error


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``key.sub=value`` assignments (values parsed as YAML) applied to a config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        dotted, value = item.split("=", 1)
        node = data
        keys = dotted.strip().split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = parse_value(value)
    return data


def read_config(
    path: str | os.PathLike, what: str, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """The mapping in a YAML file (numbers read as numbers, overrides applied); ``what`` names
    the kind of file in errors ("recipe", "evaluation config", "merge config")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        text = read_text(path)
    except BadFileError as error:
        raise ConfigError(f"{what} {str(path)!r} is {error.problem}") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"{what} {str(path)!r} is not valid YAML: {yaml_problem(error)}"
        ) from error
    if data is None and not overrides:  # empty (or only comments): not "a config with no fields"
        raise ConfigError(f"{what} {str(path)!r} is empty")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(
            f"{what} {str(path)!r} must be a mapping of fields, got {type(data).__name__}"
        )
    return apply_overrides(parse_numbers(data), overrides)


def check_fields(
    data: Mapping[str, Any], known: Iterable[str], what: str, required: Iterable[str] = ()
) -> None:
    """Unknown and missing fields, named in one error."""
    known, required = sorted(set(known)), sorted(set(required))
    unknown = sorted(set(data) - set(known))
    if unknown:
        if len(known) <= 30:
            hint = f"; known: {known}"
        else:  # a TRL config has ~200 fields: name the close ones, not all of them
            close = sorted({m for u in unknown for m in difflib.get_close_matches(u, known, 3)})
            hint = f"; did you mean {close}?" if close else ""
        raise ConfigError(f"unknown {what} fields {unknown}{hint}")
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"{what} misses required fields {missing}")


_SIMPLE = {bool: "true or false", int: "an integer", float: "a number"}


def check_simple_types(cls: type, data: Mapping[str, Any], field: str) -> None:
    """A value of the wrong simple type (``learning_rate: fast``, ``grid: 2.5``) would fail deep
    inside the optimizer or the sweep; name the field instead. Fields typed str, enums, lists
    and mappings are left to the dataclass's own checks. ``field`` formats a field's name for
    the error (``"recipe field 'args.{}'"``)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: leave the check to the class
        return
    for name, value in data.items():
        hint = hints.get(name)
        if hint is None or value is None:
            continue
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        allowed = set(typing.get_args(hint)) if union else {hint}
        simple = [kind for kind in (bool, int, float) if kind in allowed]
        if not simple or allowed - {bool, int, float, type(None)}:
            continue
        ok = (
            isinstance(value, bool)
            if simple == [bool]
            else (isinstance(value, int | float) and not isinstance(value, bool))
        )
        if float not in simple and int in simple and isinstance(value, float):
            ok = value.is_integer()
        if not ok:
            raise ConfigError(f"{field.format(name)} must be {_SIMPLE[simple[-1]]}, got {value!r}")


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def build_dataclass(cls: type[T], data: Mapping[str, Any], what: str) -> T:
    """``cls(**data)`` for a config dataclass, with unknown, missing and mistyped fields named
    (the dataclass's own ``__post_init__`` checks raise as they are)."""
    fields = _init_fields(cls)
    required = [
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    check_fields(data, [f.name for f in fields], what, required)
    check_simple_types(cls, data, f"{what} field '{{}}'")
    try:
        return cls(**data)
    except TypeError as error:
        raise ConfigError(f"{what}: {error}") from error


def build_training_args(cls: type[T], data: Mapping[str, Any], what: str, field: str) -> T:
    """A TRL / transformers config dataclass (``PARMConfig`` ...) from a recipe's ``args``,
    through ``HfArgumentParser.parse_dict`` as TRL's own scripts build theirs; ``what`` names
    the block in errors, ``field`` formats one of its fields."""
    from transformers import HfArgumentParser

    check_fields(data, [f.name for f in _init_fields(cls)], f"{what} ({cls.__name__})")
    check_simple_types(cls, data, field)
    try:
        (args,) = HfArgumentParser(cls).parse_dict(dict(data), allow_extra_keys=False)
    except TypeError as error:
        raise ConfigError(f"{what} do not fit {cls.__name__}: {error}") from error
    return args
