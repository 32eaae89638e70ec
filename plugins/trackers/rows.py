"""What the first-party trackers take from a metrics row: its numbers, as named scalars.

A row (see :meth:`hvae_core.interfaces.Tracker.log_epoch`) holds numbers, None for a
non-finite number, strings, and lists of numbers such as a value per latent layer. Every
tracker logs the same scalars under the same names: each number under its key (``epoch``
aside: it is the step), and each element of a list of numbers as ``KEY/00``, ``KEY/01``, ...
Light: no import beyond the standard library.
"""

from __future__ import annotations

import math
from typing import Any


def is_number(value: Any) -> bool:
    """A finite int or float (a bool is neither)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_number_list(value: Any) -> bool:
    """A non-empty list of numbers and Nones (a None stands for a non-finite number)."""
    return isinstance(value, list) and bool(value) and all(v is None or is_number(v) for v in value)


def element_key(key: str, index: int, length: int) -> str:
    """``KEY/07``: two digits at least, more where the list is longer, so names sort."""
    width = max(2, len(str(length - 1)))
    return f"{key}/{index:0{width}d}"


def number_lists(row: dict[str, Any]) -> dict[str, list[Any]]:
    """The row's lists of numbers (Nones kept), by key."""
    return {key: value for key, value in row.items() if is_number_list(value)}


def scalars(row: dict[str, Any], *, layer_scalars: bool = True) -> dict[str, float]:
    """Every number of the row but ``epoch`` as a float, by key; with ``layer_scalars``, also
    every number in a list of numbers, by :func:`element_key`. Nones, strings and booleans are
    left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "epoch":
            continue
        if is_number(value):
            out[key] = float(value)
        elif layer_scalars and is_number_list(value):
            for i, element in enumerate(value):
                if element is not None:
                    out[element_key(key, i, len(value))] = float(element)
    return out
