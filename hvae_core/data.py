"""Datasets: the pieces every dataset plugin shares (the contract is in ``interfaces.Dataset``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from hvae_core.errors import HvaeError

DATA_DIR_ENV = "HVAE_DATA_DIR"


class InMemoryDataset:
    """A dataset whose splits are uint8 NHWC arrays (in memory or memory-mapped)."""

    def __init__(self, splits: Mapping[str, np.ndarray], num_bits: int) -> None:
        shapes = {arr.shape[1:] for arr in splits.values()}
        if len(shapes) != 1:
            raise ValueError(f"splits disagree on the image shape: {sorted(shapes)}")
        for name, arr in splits.items():
            if arr.dtype != np.uint8 or arr.ndim != 4:
                raise ValueError(
                    f"split {name}: expected uint8 (N, H, W, C), got {arr.dtype} {arr.shape}"
                )
        self._splits = dict(splits)
        self._num_bits = num_bits
        self._shape: tuple[int, int, int] = tuple(shapes.pop())  # type: ignore[assignment]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._shape

    @property
    def num_bits(self) -> int:
        return self._num_bits

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self._splits)

    def load(self, split: str) -> np.ndarray:
        try:
            return self._splits[split]
        except KeyError:
            raise HvaeError(
                f"this dataset has no split '{split}'", hint=f"splits: {', '.join(self._splits)}"
            ) from None


def resolve_data_dir(configured: str | os.PathLike[str] | None, dataset: str) -> Path:
    """The directory a dataset reads: the configured one, else ``$HVAE_DATA_DIR``."""
    chosen = configured or os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise HvaeError(
            f"dataset '{dataset}' needs its files and no data directory is set",
            hint=f"pass --data-dir DIR or set {DATA_DIR_ENV}",
        )
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise HvaeError(
            f"data directory {path} does not exist",
            hint="pass --data-dir with the folder holding the dataset files",
        )
    return path
