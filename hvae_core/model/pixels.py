"""The pixel grid, one map for every room: integer levels <-> [-1, 1] <-> 8-bit pixels.

An image of ``num_bits`` bits holds levels ``0 .. 2**num_bits - 1``; the model sees level ``k`` as
``2 k / (2**num_bits - 1) - 1`` (the grid the likelihood scores), and a person sees it as
``round(k * 255 / (2**num_bits - 1))``. Training, inference, export and the figures all map
through these functions, so an image means the same everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops


def top_level(num_bits: int) -> int:
    """Highest level; the grid table below keeps bit depths to what images use."""
    if not 1 <= num_bits <= 16:
        raise ValueError(f"num_bits must be between 1 and 16, got {num_bits}")
    return 2**num_bits - 1


def to_levels(x: Any, num_bits: int) -> Any:
    """Grid values in [-1, 1] -> integer levels ``0 .. 2**num_bits - 1`` (int32).

    Rounds to the nearest level and clips, so values a float error off the grid map safely.
    """
    top = top_level(num_bits)
    x = ops.cast(x, "float32")
    levels = ops.clip(ops.round((x + 1.0) * (top / 2.0)), 0.0, float(top))
    return ops.cast(levels, "int32")


def level_table(num_bits: int) -> np.ndarray:
    """The grid values ``2 k / (2**num_bits - 1) - 1`` of every level ``k``, as the correctly
    rounded float32 numbers: the table :func:`from_levels` looks levels up in."""
    top = top_level(num_bits)
    return (2.0 * np.arange(top + 1, dtype=np.float64) / top - 1.0).astype(np.float32)


def from_levels(levels: Any, num_bits: int, table: Any = None) -> Any:
    """Integer levels -> grid values ``2 k / (2**num_bits - 1) - 1`` (float32).

    Looked up in a table of the correctly rounded float32 values: arithmetic would differ by an
    ulp between backends (XLA turns the division into a multiplication by the reciprocal), and
    sampling quantises through this function, so samples are bit-identical on every backend.
    ``table``: :func:`level_table` already a backend tensor (None: made here). A traced torch
    step passes one: Dynamo cannot hand a NumPy array made inside the traced code to
    ``keras.ops`` without breaking the graph.
    """
    top = top_level(num_bits)
    table = ops.convert_to_tensor(level_table(num_bits) if table is None else table)
    levels = ops.clip(ops.cast(levels, "int32"), 0, top)
    return ops.take(table, levels)


def to_unit_range(images: Any, num_bits: int, table: Any = None) -> Any:
    """Integer levels (uint8 images) -> float32 in [-1, 1] on the grid the likelihood scores:
    the model's input, through the same exact table as :func:`from_levels` (``table``: as
    there)."""
    return from_levels(images, num_bits, table)


def to_uint8(levels: np.ndarray, bits: int) -> np.ndarray:
    """Levels of a ``bits``-bit image as 8-bit pixels, for viewing."""
    levels = np.asarray(levels).astype(np.float64)
    return np.rint(levels * 255.0 / (2**bits - 1)).astype(np.uint8)
