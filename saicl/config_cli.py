"""Command-line flags generated from a config dataclass, so each default, type and help text is defined once.

A tool's settings live in one ``@dataclass`` whose fields carry ``metadata={"help": ..., "choices": ...}``;
:func:`add_config_flags` turns every field into a flag (``eval_k`` -> ``--eval-k``) and :func:`config_overrides`
returns the fields the user set. The dataclass validates itself in ``__post_init__`` and raises
:class:`ConfigError` (a ``ValueError``); a tool's CLI layer prints it as one line naming the flag and exits 2.

Supported field types: ``bool`` (``--x`` / ``--no-x``), ``int``, ``float``, ``str``, ``X | None`` (the flag
value ``none`` gives ``None``) and ``tuple[int, ...]`` / ``tuple[str, ...]`` / ``tuple[float, ...]`` (comma lists).
A field without a default gives a required flag. Optional metadata: ``"flag"`` (the flag's name when it differs
from the field's, e.g. ``--k`` for ``ks``) and ``"metavar"``; :func:`config_from_args` builds the config and
names that flag in any ConfigError.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any


class ConfigError(ValueError):
    """An invalid setting. ``str(err)`` names the field (``eval_k=(0,): ...``); :meth:`for_cli` names the flag."""

    def __init__(self, field: str, value: Any, expected: str):
        self.field, self.value, self.expected = field, value, expected
        self.flag: str | None = None  # set by config_from_args when the field's flag has its own name
        super().__init__(f"{field}={value!r}: {expected}")

    def for_cli(self) -> str:
        value = ",".join(map(str, self.value)) if isinstance(self.value, (tuple, list)) else self.value
        return f"{self.flag or flag_name(self.field)} {value}: {self.expected}"


def flag_name(field: str) -> str:
    """``eval_k`` -> ``--eval-k``."""
    return "--" + field.replace("_", "-")


def field_flag(config_cls: type, name: str) -> str:
    """The flag of field ``name``: its ``metadata["flag"]`` if set, else :func:`flag_name`."""
    for field in dataclasses.fields(config_cls):
        if field.name == name:
            return field.metadata.get("flag") or flag_name(name)
    return flag_name(name)


def cli_message(err: BaseException) -> str:
    """The one-line message a CLI prints for ``err`` (flags rather than field names for a ConfigError)."""
    return err.for_cli() if isinstance(err, ConfigError) else str(err)


def field_kind(config_cls: type, name: str) -> tuple[type, bool, bool]:
    """``(element type, None allowed, is a tuple)`` of a field: ``tuple[int, ...] | None`` -> ``(int, True, True)``."""
    hint = typing.get_type_hints(config_cls)[name]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        optional = type(None) in args
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def _choices(field: dataclasses.Field) -> list[str] | None:
    choices = field.metadata.get("choices")
    return list(choices()) if callable(choices) else (list(choices) if choices is not None else None)


def _shown_default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config_cls: type,
                     skip: Iterable[str] = ()) -> None:
    """One flag per field of ``config_cls`` (except ``skip``); every flag defaults to ``None`` = not given."""
    skipped = set(skip)
    for field in dataclasses.fields(config_cls):
        if field.name in skipped or not field.init:
            continue
        kind, optional, is_tuple = field_kind(config_cls, field.name)
        text = field.metadata.get("help", "")
        choices = _choices(field)
        if choices and not is_tuple:
            text += f"; one of {', '.join(choices)}"
        elif choices:
            text += f"; a comma list of {', '.join(choices)}"
        elif is_tuple:
            text += "; a comma list"
        text += f" (default: {_shown_default(field)})"
        flag = field.metadata.get("flag") or flag_name(field.name)
        required = _shown_default(field) == "required"
        if kind is bool and not is_tuple:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                                required=required, help=text)
        else:
            metavar = field.metadata.get("metavar") or field.name.upper()
            parser.add_argument(flag, dest=field.name, default=None, metavar=metavar, required=required, help=text)


def parse_value(config_cls: type, name: str, text: str) -> Any:
    """A flag's text converted to the field's type (ConfigError naming the field when it does not convert)."""
    kind, optional, is_tuple = field_kind(config_cls, name)
    if optional and text.strip().lower() == "none":
        return None
    if is_tuple:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise ConfigError(name, text, "needs at least one value")
        return tuple(_convert(name, kind, item, text) for item in items)
    return _convert(name, kind, text, text)


def _convert(name: str, kind: type, item: str, whole: str) -> Any:
    if kind is str:
        return item
    try:
        return kind(item)
    except ValueError:
        what = {int: "integers", float: "numbers"}.get(kind, kind.__name__)
        raise ConfigError(name, whole, f"expected {what}") from None


def config_overrides(args: argparse.Namespace, config_cls: type, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The fields the user set on the command line, converted to their types."""
    skipped = set(skip)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(config_cls):
        if field.name in skipped or not field.init:
            continue
        given = getattr(args, field.name, None)
        if given is None:
            continue
        values[field.name] = given if isinstance(given, bool) else parse_value(config_cls, field.name, given)
    return values


def config_from_args(config_cls: type, args: argparse.Namespace, skip: Iterable[str] = (), **given: Any) -> Any:
    """``config_cls(**given, **fields set on the command line)``; a ConfigError names the flag the user typed."""
    try:
        return config_cls(**given, **config_overrides(args, config_cls, skip=tuple(skip) + tuple(given)))
    except ConfigError as err:
        err.flag = field_flag(config_cls, err.field)
        raise


def check_choices(config: Any, names: Iterable[str] | None = None) -> None:
    """Every field with ``metadata["choices"]`` holds allowed values (ConfigError naming the field)."""
    wanted = set(names) if names is not None else None
    for field in dataclasses.fields(config):
        if wanted is not None and field.name not in wanted:
            continue
        choices = _choices(field)
        if choices is None:
            continue
        value = getattr(config, field.name)
        values = value if isinstance(value, tuple) else (value,)
        unknown = [v for v in values if v not in choices]
        if unknown:
            raise ConfigError(field.name, value, f"unknown {', '.join(map(str, unknown))}; expected "
                              f"{'some' if isinstance(value, tuple) else 'one'} of {', '.join(choices)}")
        if isinstance(value, tuple) and not value:
            raise ConfigError(field.name, value, "needs at least one value")


def check_at_least(config: Any, minimum: float, names: Iterable[str]) -> None:
    """Each named numeric field (or every element of a tuple field) is ``>= minimum``; ``None`` passes."""
    for name in names:
        value = getattr(config, name)
        values = value if isinstance(value, tuple) else (value,)
        if any(v is not None and (isinstance(v, bool) or not v >= minimum) for v in values):
            raise ConfigError(name, value, f"expected {'values' if isinstance(value, tuple) else 'a value'} "
                              f">= {minimum}")


def make_parser(prog: str, config_cls: type, description: str, epilog: str = "", skip: Iterable[str] = (),
                extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with ``extra``'s own flags first, then one flag per config field."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra is not None:
        extra(parser)
    add_config_flags(parser, config_cls, skip=skip)
    return parser


__all__ = ["ConfigError", "add_config_flags", "check_at_least", "check_choices", "cli_message", "config_from_args",
           "config_overrides", "field_flag", "field_kind", "flag_name", "make_parser", "parse_value"]
