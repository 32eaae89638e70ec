"""Typed option classes: the dataclasses that config sections and plugin options are made of.

A section is a dataclass whose fields all have defaults. Field metadata carries the help text
(``help``) and whether a list holds one value per scale (``per_scale``). :func:`build_section`
turns a raw mapping (from YAML or flags) into an instance, checking every key and type and naming
the offending key in its error.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from hvae_core.errors import ConfigError


def option(default: Any, help: str, *, allow_nonfinite: bool = False) -> Any:
    """A plain option with a default and its help text.

    A number option refuses NaN and infinity unless ``allow_nonfinite`` (where one means
    something, e.g. "no limit").
    """
    metadata = {"help": help, "allow_nonfinite": allow_nonfinite}
    if isinstance(default, list | dict | set):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def per_scale(default: list[Any] | Any, help: str, *, allow_nonfinite: bool = False) -> Any:
    """An option holding one value per scale; one value alone is repeated for every scale."""
    values = list(default) if isinstance(default, list | tuple) else [default]
    metadata = {"help": help, "per_scale": True, "allow_nonfinite": allow_nonfinite}
    return field(default_factory=lambda: list(values), metadata=metadata)


@dataclass
class NoOptions:
    """Options of a plugin that has none."""


@dataclass(frozen=True)
class OptionInfo:
    name: str
    type: str
    default: Any
    help: str
    per_scale: bool


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_per_scale(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("per_scale", False))


def check_options_class(cls: Any) -> None:
    """Raise TypeError unless ``cls`` is a dataclass whose fields all have defaults."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"options must be a dataclass, got {cls!r}")
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"option {f.name!r} of {cls.__name__} has no default")
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if is_per_scale(f) and typing.get_origin(hints[f.name]) is not list:
            raise TypeError(f"per-scale option {f.name!r} of {cls.__name__} must be a list type")


def default_value(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def describe_options(cls: type) -> list[OptionInfo]:
    """Name, type, default, help and per-scale flag of every option, for ``plugins show``."""
    hints = _hints(cls)
    return [
        OptionInfo(
            name=f.name,
            type=type_name(hints[f.name]),
            default=default_value(f),
            help=f.metadata.get("help", ""),
            per_scale=is_per_scale(f),
        )
        for f in dataclasses.fields(cls)
    ]


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _expected(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _expected(a) for a in args)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", bool: "booleans (true/false)", str: "strings"}.get(
        tp, _expected(tp)
    )


# Integers go on to NumPy and the backends, whose integers have 64 bits.
INT_LIMIT = 2**63


class _Mismatch(Exception):
    """``value`` is not of the type; ``reason`` says why when the type alone does not."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


def _reason(exc: _Mismatch) -> str:
    return f" ({exc.reason})" if exc.reason else ""


def _finite(number: float, finite: bool) -> float:
    if finite and not math.isfinite(number):
        raise _Mismatch("NaN and infinity are not allowed here")
    return number


def _coerce(value: Any, tp: Any, finite: bool = True) -> Any:
    """Return ``value`` as type ``tp`` or raise _Mismatch; never changes a value's meaning.

    With ``finite``, a float must be finite.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        reasons = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, finite)
            except _Mismatch as exc:
                reasons.append(exc.reason)
        raise _Mismatch(next((r for r in reasons if r), ""))
    if origin is Literal:
        # Compare types too, so that ``True`` never matches a literal ``1``.
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _Mismatch
    if origin is list:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        return [_coerce(v, args[0], finite) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INT_LIMIT <= value < INT_LIMIT:
                raise _Mismatch("too large: integers take 64 bits")
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                return _finite(float(value), finite)
            except OverflowError:
                raise _Mismatch("too large for a 64-bit float") from None
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept what is plainly a number.
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise _Mismatch from None
            return _finite(number, finite)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported option type {tp!r}")


def clipped(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters, so that an error stays one readable line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_value(value: Any) -> str:
    # Clipped: a value can be a megabyte-long string or a list of thousands.
    if isinstance(value, list | tuple):
        return f"a list of {len(value)}: {clipped(repr(list(value)))}"
    return clipped(repr(value))


def _example(key: str, value: Any) -> str:
    """A hint showing the option's form by its default value."""
    if isinstance(value, list):
        value = "[" + ", ".join(json.dumps(v, default=str) for v in value) + "]"
    else:
        value = json.dumps(value, default=str)
    return f"e.g. {key}: {clipped(value, 60)} (its default)"


def expand_per_scale(
    value: Any, key: str, elem_tp: Any, num_scales: int, finite: bool = True
) -> list[Any]:
    """One value, or a list of exactly one value per scale, as a list of ``num_scales`` values."""
    want = f"{_expected(elem_tp)} or a list of {num_scales} {_plural(elem_tp)} (one per scale)"
    if not isinstance(value, list | tuple):
        value = [value]
    if len(value) == 1:
        value = list(value) * num_scales
    if len(value) != num_scales:
        raise ConfigError(
            f"{key}: expected {want}, got {_describe_value(value)}",
            hint=f"the images have {num_scales} scales (log2(image size) + 1)",
        )
    try:
        return [_coerce(v, elem_tp, finite) for v in value]
    except _Mismatch as exc:
        raise ConfigError(
            f"{key}: expected {want}, got {_describe_value(value)}{_reason(exc)}",
            hint=f"one value for every scale, or {num_scales} values, largest scale first",
        ) from None


def unknown_key_error(section: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = (
        f"did you mean {section}.{close[0]}?"
        if close
        else (f"known keys: {', '.join(known)}" if known else f"{section} takes no options")
    )
    return ConfigError(f"unknown key {section}.{key}", hint=hint)


def build_section(
    cls: type, raw: Mapping[str, Any] | None, section: str, num_scales: int | None
) -> Any:
    """Instantiate option class ``cls`` from ``raw``, checking keys, types and per-scale lists.

    With ``num_scales`` None, per-scale lists are checked for type only and left unexpanded.
    """
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(
            f"{section}: expected a mapping of options, got {_describe_value(raw)}",
            hint=f"write {section} as 'key: value' lines, or leave it out",
        )
    raw = dict(raw or {})
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise unknown_key_error(section, str(key), list(fields))
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{section}.{name}"
        value = raw[name] if name in raw else default_value(f)
        tp = hints[name]
        finite = not f.metadata.get("allow_nonfinite", False)
        if is_per_scale(f):
            elem = typing.get_args(tp)[0]
            if num_scales is None:
                seq = value if isinstance(value, list | tuple) else [value]
                try:
                    values[name] = [_coerce(v, elem, finite) for v in seq]
                except _Mismatch as exc:
                    raise ConfigError(
                        f"{key}: expected {_expected(elem)} or a list of {_plural(elem)} "
                        f"(one per scale), got {_describe_value(value)}{_reason(exc)}",
                        hint=_example(key, default_value(f)),
                    ) from None
            else:
                values[name] = expand_per_scale(value, key, elem, num_scales, finite)
            continue
        try:
            values[name] = _coerce(value, tp, finite)
        except _Mismatch as exc:
            raise ConfigError(
                f"{key}: expected {_expected(tp)}, got {_describe_value(value)}{_reason(exc)}",
                hint=_example(key, default_value(f)),
            ) from None
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        validate(section)
    return instance


def section_to_dict(instance: Any) -> dict[str, Any]:
    """Plain YAML-safe dict of a section instance (lists stay lists)."""
    return {f.name: _plain(getattr(instance, f.name)) for f in dataclasses.fields(instance)}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value
