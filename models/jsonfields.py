"""Typed field access on parsed JSON for the contracts (bundle manifest): every error is one line naming the field.

`Fields(raw, where)` wraps one JSON object; `get` checks a value's type (an integer is never a bool, a number is
finite) and an optional range, `obj`/`items` descend with the dotted path ("artifacts[1].files[0].sha256").
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable
from typing import Any

from models.oneline import first_line


class FieldError(ValueError):
    """A missing or ill-typed field; the message names the file and the field."""


class Fields:
    """Typed field access on one JSON object; errors name the dotted field path."""

    def __init__(self, raw: Any, where: str, path: str = "") -> None:
        self.where, self.path = where, path
        if not isinstance(raw, dict):
            raise FieldError(f"{where}: {self._name('')} must be an object, got {_kind(raw)}")
        self.raw = raw

    def _name(self, key: str) -> str:
        full = f"{self.path}.{key}" if self.path and key else (self.path or key)
        return f"field {full!r}" if full else "the document"

    def fail(self, key: str, problem: str) -> FieldError:
        return FieldError(f"{self.where}: {self._name(key)} {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, check: Callable | None = None,
            what: str = "") -> Any:
        """raw[key] checked against `kind` (int never accepts bool; float accepts int); `...` = required."""
        if key not in self.raw or (self.raw[key] is None and default is None):
            if default is ...:
                raise self.fail(key, "is missing")
            return default
        value = self.raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = any(_is(value, k) for k in kinds)
        if not ok:
            raise self.fail(key, f"must be {' or '.join(_KIND_NAMES.get(k, k.__name__) for k in kinds)}, "
                                 f"got {_kind(value)}")
        if float in kinds and isinstance(value, int):
            value = float(value)
        if check is not None and not check(value):
            raise self.fail(key, f"must be {what}, got {value!r}"[:300])
        return value

    def obj(self, key: str, default: Any = ...) -> Fields | None:
        if key not in self.raw and default is not ...:
            return default
        self.get(key, dict)
        return Fields(self.raw[key], self.where, f"{self.path}.{key}" if self.path else key)

    def items(self, key: str, default: Any = ...) -> list[Fields]:
        """The objects of a list field, each with its indexed path."""
        values = self.get(key, list, default)
        base = f"{self.path}.{key}" if self.path else key
        return [Fields(v, self.where, f"{base}[{i}]") for i, v in enumerate(values or [])]

    def strings(self, key: str, default: Any = ...) -> tuple[str, ...]:
        values = self.get(key, list, default)
        for i, v in enumerate(values or []):
            if not isinstance(v, str):
                raise self.fail(f"{key}[{i}]", f"must be a string, got {_kind(v)}")
        return tuple(values or ())

    def contract(self, key: str, build: Callable[[dict[str, Any]], Any]) -> Any:
        """A nested contract (config, preprocessing) built by its own validating constructor; errors name the key."""
        value = self.get(key, dict)
        try:
            return build(value)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise self.fail(key, f"is invalid: {first_line(exc)}") from None

    def ints(self, key: str) -> tuple[int, ...]:
        values = self.get(key, list)
        for i, v in enumerate(values):
            if not _is(v, int):
                raise self.fail(f"{key}[{i}]", f"must be an integer, got {_kind(v)}")
        return tuple(values)


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
               dict: "an object"}


def is_int(value: Any, *, numpy: bool = False) -> bool:
    """An int that is not a bool (JSON true would otherwise pass as 1); with `numpy`, numpy integers count too."""
    return isinstance(value, numbers.Integral if numpy else int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool (NaN and the infinities included)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A number (`is_number`) that is neither NaN nor infinite, and converts to a float: an int of 1,024 bits or more
    does not (math.isfinite and float() raise OverflowError for it), so it is no finite number to a reader either."""
    if not is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def finite_or_none(x: float) -> float | None:
    """`x`, or None when it is NaN or infinite: JSON has no NaN/inf, so a non-finite number is recorded as null."""
    return x if math.isfinite(x) else None


def _is(value: Any, kind: type) -> bool:
    if kind is int:
        return is_int(value)
    if kind is float:
        return is_finite(value)
    return isinstance(value, kind)


def _kind(value: Any) -> str:
    text = json.dumps(value)[:40] if isinstance(value, str | int | float | bool) or value is None else ""
    return f"{type(value).__name__} {text}".strip() if value is not None else "null"


def between(low: int, high: int) -> Callable[[int], bool]:
    return lambda v: low <= v <= high
