"""A runtime's description or a build's info as plain JSON data: read by runtimes.base (describe()) and
runtimes.build (check_built), both above it."""

from __future__ import annotations

from typing import Any

import numpy as np

# What `describe()` may return is small and shallow: a plugin's nested description is refused, not sent with every
# listing.
MAX_DESCRIPTION_DEPTH = 8


def json_data(value: Any) -> Any:
    """`value` as plain JSON data (numpy scalars as Python numbers, integer keys as strings); ValueError naming
    where in it a value is not JSON (a NaN, an array, a set), two keys are one JSON string, or it nests too deep."""
    return _json_value(value, "", 0)


def _json_value(value: Any, where: str, depth: int) -> Any:
    """`value` as JSON data (numpy scalars converted); ValueError naming `where` (the key path) otherwise."""
    if value is None or isinstance(value, bool | str):
        return str(value) if isinstance(value, str) else value  # a str subclass (np.str_) as the plain str
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        if not np.isfinite(value):  # JSON has no NaN or infinity: the answer would fail to serialise
            raise ValueError(f"{value!r} at {where or 'the top'}, not a finite number")
        return float(value)
    if depth >= MAX_DESCRIPTION_DEPTH and isinstance(value, dict | list | tuple):
        raise ValueError(f"values nested deeper than {MAX_DESCRIPTION_DEPTH} levels at {where}")
    if isinstance(value, dict):
        # An integer key is written as JSON writes it, a string (torch's compile_seconds are keyed by batch size).
        keys = [_json_key(k, where) for k in value]
        if len(set(keys)) < len(keys):  # 1 and "1": JSON would keep one of them
            raise ValueError(f"keys that are the same string in JSON at {where or 'the top'}")
        return {k: _json_value(v, f"{where}.{k}" if where else k, depth + 1) for k, v in zip(keys, value.values(),
                                                                                              strict=True)}
    if isinstance(value, list | tuple):
        return [_json_value(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    raise ValueError(f"{type(value).__name__} at {where or 'the top'}, not a JSON value (a string, number, bool, "
                     "None, list or dict of them)")


def _json_key(key: Any, where: str) -> str:
    """A description's key as the JSON string it becomes; ValueError for one that is neither a string nor an int."""
    if isinstance(key, str):
        return str(key)
    if isinstance(key, int | np.integer) and not isinstance(key, bool | np.bool_):
        return str(int(key))
    raise ValueError(f"key {key!r:.40} ({type(key).__name__}) at {where or 'the top'}, not a string")
