"""Declare a setting once; derive its command-line option, config schema, rule flag and docs row from it.

A setting is a dataclass field made with :func:`setting`: its type (from the annotation), default, bounds,
choices and help text live there and nowhere else. From a dataclass of settings this module derives

* :func:`add_arguments`: the ``argparse`` options of a verb (``warmup_ratio`` -> ``--warmup-ratio``),
  each value checked by :func:`problem` as it is parsed;
* :func:`json_schema`: the JSON-schema fragment of a config block (Snakemake-style validation with defaults);
* :func:`cli_flags`: the flags a workflow rule passes for the values of a config block;
* :func:`docs_rows`: the rows of the docs table (key, default, allowed values, meaning).

:func:`problem` (the command line) and the JSON schema (the config) express the same bounds; a test checks
that both accept and reject the same values for every field. Only the standard library is imported here, so
the Snakemake process can read these declarations without numpy or torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spec:
    """What a setting allows, besides its type and default."""

    help: str
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    pattern: str | None = None
    min_items: int | None = None
    section: str | None = None  # the config block that holds it; None: not a config key
    flag: str | None = None  # command-line name when it is not --<name with dashes>
    cli: bool = True  # False: config only


def setting(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field declaring one setting (see :class:`Spec` for the keyword arguments)."""
    meta = {"setting": Spec(help=help, **spec)}
    if isinstance(default, list | dict):
        raise TypeError("use a tuple for a list default (settings are immutable)")
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Field:
    """A declared setting as the derivations see it."""

    name: str
    kind: type  # int, float, str or bool (of the items, for a list)
    optional: bool  # None allowed
    is_list: bool
    default: Any
    spec: Spec

    @property
    def flag(self) -> str:
        return self.spec.flag or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _unpack(annotation: Any) -> tuple[type, bool, bool]:
    """``int | None`` -> (int, optional, not list); ``tuple[int, ...]`` -> (int, False, list)."""
    optional, is_list = False, False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        (annotation,) = args
        origin = typing.get_origin(annotation)
    if origin is tuple:
        is_list = True
        annotation = typing.get_args(annotation)[0]
    if annotation not in (int, float, str, bool):
        raise TypeError(f"unsupported setting type {annotation!r}")
    return annotation, optional, is_list


def fields(cls: type, section: str | None | object = ..., cli: bool | None = None) -> list[Field]:
    """The declared settings of ``cls`` (optionally only those of one config ``section``, or of the CLI)."""
    hints = typing.get_type_hints(cls)
    found = []
    for item in dataclasses.fields(cls):
        spec = item.metadata.get("setting")
        if spec is None:
            continue
        kind, optional, is_list = _unpack(hints[item.name])
        declared = Field(item.name, kind, optional, is_list, item.default, spec)
        if section is not ... and spec.section != section:
            continue
        if cli is not None and spec.cli != cli:
            continue
        found.append(declared)
    return found


def field_of(cls: type, name: str) -> Field:
    for declared in fields(cls):
        if declared.name == name:
            return declared
    raise KeyError(name)


# ------------------------------------------------------------------------------------------------ checking


def _type_name(declared: Field) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[declared.kind]


def _bounds_text(spec: Spec) -> str:
    low = (f"> {spec.exclusive_minimum:g}" if spec.exclusive_minimum is not None
           else f">= {spec.minimum:g}" if spec.minimum is not None else "")
    high = f"<= {spec.maximum:g}" if spec.maximum is not None else ""
    return " and ".join(part for part in (low, high) if part)


def _item_problem(declared: Field, value: Any) -> str | None:
    spec = declared.spec
    kind = declared.kind
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        return f"must be {_type_name(declared)}, got {value!r}"
    if spec.choices is not None and value not in spec.choices:
        return f"must be one of {', '.join(map(str, spec.choices))}; got {value!r}"
    if spec.pattern is not None and not re.fullmatch(spec.pattern, value):
        return f"must match {spec.pattern}; got {value!r}"
    too_low = ((spec.minimum is not None and value < spec.minimum)
               or (spec.exclusive_minimum is not None and value <= spec.exclusive_minimum))
    too_high = spec.maximum is not None and value > spec.maximum
    if too_low or too_high:
        return f"must be {_bounds_text(spec)}, got {value!r}"
    return None


def problem(declared: Field, value: Any) -> str | None:
    """Why ``value`` is not allowed for ``declared`` (None when it is): the check of the command line and
    of :meth:`Settings.check`. The config's JSON schema (:func:`json_schema`) says the same."""
    if value is None:
        return None if declared.optional else f"must be {_type_name(declared)}, got null"
    if not declared.is_list:
        return _item_problem(declared, value)
    if not isinstance(value, list | tuple):
        return f"must be a list of {_type_name(declared)}s, got {value!r}"
    if declared.spec.min_items is not None and len(value) < declared.spec.min_items:
        return f"must have at least {declared.spec.min_items} item(s), got {len(value)}"
    for index, item in enumerate(value):
        found = _item_problem(declared, item)
        if found:
            return f"item {index} {found}"
    return None


class Settings:
    """Base of the dataclasses of settings: every declared field is checked on construction."""

    def __post_init__(self) -> None:
        from negmargin.errors import UserError

        problems = self.problems()
        if problems:
            raise UserError("; ".join(problems))

    def problems(self, prefix: str = "") -> list[str]:
        found = []
        for declared in fields(type(self)):
            message = problem(declared, getattr(self, declared.name))
            if message:
                found.append(f"{prefix}{declared.name} {message}")
        return found

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **extra: Any) -> Any:
        """Build from a config block (lists become tuples); ``extra`` fills the fields the block lacks."""
        known = {item.name for item in dataclasses.fields(cls)}
        kwargs = {key: tuple(v) if isinstance(v, list) else v for key, v in {**values, **extra}.items()
                  if key in known}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


# ----------------------------------------------------------------------------------------------- argparse


def _converter(declared: Field):
    kind = declared.kind

    def convert(text: str) -> Any:
        if declared.optional and text.lower() in ("none", "null"):
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {_type_name(declared)}, got {text!r}") from None
        message = _item_problem(declared, value)
        if message:
            raise argparse.ArgumentTypeError(message)
        return value

    convert.__name__ = kind.__name__
    return convert


def _help(declared: Field) -> str:
    default = declared.default
    if isinstance(default, tuple):
        default = " ".join(map(str, default))
    text = declared.spec.help.replace("%", "%%")
    return f"{text} (default: {default})"


def add_arguments(parser: argparse.ArgumentParser, cls: type, names: Iterable[str] | None = None,
                  exclude: Iterable[str] = (), required: Iterable[str] = ()) -> None:
    """Add one option per declared setting of ``cls`` (all, or ``names``), defaults and checks included."""
    wanted = None if names is None else set(names)
    skip, must = set(exclude), set(required)
    for declared in fields(cls, cli=True):
        if (wanted is not None and declared.name not in wanted) or declared.name in skip:
            continue
        kwargs: dict[str, Any] = {"dest": declared.dest, "help": _help(declared)}
        if declared.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = declared.default
        else:
            kwargs["type"] = _converter(declared)
            if declared.is_list:
                kwargs["nargs"] = "+" if declared.spec.min_items else "*"
                kwargs["default"] = list(declared.default) if declared.default is not None else None
            else:
                kwargs["default"] = declared.default
            if declared.spec.choices is not None:
                kwargs["metavar"] = "{" + ",".join(map(str, declared.spec.choices)) + "}"
        if declared.name in must:
            kwargs.pop("default", None)
            kwargs["required"] = True
        parser.add_argument(declared.flag, **kwargs)


def from_namespace(cls: type, namespace: argparse.Namespace, **extra: Any) -> Any:
    """The dataclass from parsed options (every declared CLI setting of ``cls`` present in ``namespace``)."""
    values = {}
    for declared in fields(cls):
        if hasattr(namespace, declared.dest):
            value = getattr(namespace, declared.dest)
            values[declared.name] = tuple(value) if isinstance(value, list) else value
    values.update(extra)
    return cls(**values)


def cli_flags(cls: type, values: Mapping[str, Any], section: str | None | object = ...) -> str:
    """The command-line words for the given values of declared settings of ``cls`` (a null or an empty list is
    left out, so the verb's default applies; a bool becomes --x or --no-x), shell-quoted, in declaration
    order. With ``section``, only the settings of that config block are read from ``values``."""
    words: list[str] = []
    for declared in fields(cls, section, cli=True):
        if declared.name not in values:
            continue
        value = values[declared.name]
        if value is None or (declared.is_list and not value):
            continue
        if declared.kind is bool:
            words.append(declared.flag if value else "--no-" + declared.flag[2:])
        elif declared.is_list:
            words += [declared.flag, *map(str, value)]
        else:
            words += [declared.flag, str(value)]
    return " ".join(shlex.quote(word) for word in words)


# ------------------------------------------------------------------------------------------------- schema

_JSON_TYPE = {int: "integer", float: "number", str: "string", bool: "boolean"}


def _item_schema(declared: Field) -> dict[str, Any]:
    spec = declared.spec
    schema: dict[str, Any] = {"type": _JSON_TYPE[declared.kind]}
    if spec.choices is not None:
        schema = {"enum": list(spec.choices)}
    for key, value in (("minimum", spec.minimum), ("exclusiveMinimum", spec.exclusive_minimum),
                       ("maximum", spec.maximum), ("pattern", spec.pattern)):
        if value is not None:
            schema[key] = f"^(?:{value})$" if key == "pattern" else value
    return schema


def field_schema(declared: Field) -> dict[str, Any]:
    """The JSON schema of one setting, with its description and default."""
    schema = _item_schema(declared)
    if declared.is_list:
        schema = {"type": "array", "items": schema}
        if declared.spec.min_items is not None:
            schema["minItems"] = declared.spec.min_items
    if declared.optional:
        schema = {"anyOf": [schema, {"type": "null"}]}
    default = list(declared.default) if isinstance(declared.default, tuple) else declared.default
    return {"description": declared.spec.help, **schema, "default": default}


def json_schema(cls: type, section: str | None | object = ...) -> dict[str, Any]:
    """A closed JSON-schema object of the declared settings of ``cls`` (of one config ``section``)."""
    return {
        "type": "object",
        "additionalProperties": False,
        "default": {},
        "properties": {declared.name: field_schema(declared) for declared in fields(cls, section)},
    }


# --------------------------------------------------------------------------------------------------- docs


def _allowed(declared: Field) -> str:
    spec = declared.spec
    if spec.choices is not None:
        text = " \\| ".join(f"`{choice}`" for choice in spec.choices)
    else:
        text = {int: "integer", float: "number", str: "text", bool: "`true` \\| `false`"}[declared.kind]
        bounds = _bounds_text(spec)
        if bounds:
            text += f" {bounds}"
        if spec.pattern:
            text += " (`" + spec.pattern.replace("|", "\\|") + "`)"
    if declared.is_list:
        text = f"list of {text}" + (f", at least {spec.min_items}" if spec.min_items else "")
    if declared.optional:
        text += " or `null`"
    return text


def _default_text(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return "`[" + ", ".join(map(str, value)) + "]`"
    return f"`{value}`"


def docs_rows(cls: type, section: str | None | object = ..., prefix: str = "") -> Iterator[str]:
    """Markdown table rows: | key | default | allowed | meaning (CLI flag) |."""
    for declared in fields(cls, section):
        flag = f" (`{declared.flag}`)" if declared.spec.cli else ""
        meaning = declared.spec.help.replace("|", "\\|")
        yield f"| `{prefix}{declared.name}` | {_default_text(declared.default)} | {_allowed(declared)} | {meaning}{flag} |"


DOCS_HEADER = ("| key | default | allowed | meaning (command-line flag) |", "|---|---|---|---|")
