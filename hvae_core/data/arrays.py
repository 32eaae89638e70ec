"""Image arrays and in-memory datasets: what every dataset plugin may build on.

``Dataset.load(split)`` (the contract is ``hvae_core.interfaces.Dataset``) returns an **image
array**: a uint8 (N, H, W, C) numpy array (possibly a read-only ``np.memmap``) or any object that
reads like one for batching: ``len(x)``, ``x.shape``, ``x.dtype``, ``x.ndim``, and
``x[index_array]`` returning a fresh uint8 (k, H, W, C) numpy array (also ``x[i]`` and
``x[a:b]``). :class:`LazyImages` is the one hvae ships: a split defined as an index array into a
base array (typically a memory map far larger than memory, such as ImageNet64's 16 GB training
set) that gathers only the images a batch asks for. ``np.asarray(x)`` still works but
materialises the whole split.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hvae_core.errors import HvaeError
from hvae_core.interfaces import Dataset

DATA_DIR_ENV = "HVAE_DATA_DIR"

BatchTransform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


class ImageArray(Protocol):
    """What ``Dataset.load`` returns and :class:`BatchStream` reads (see the module doc)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def ndim(self) -> int: ...

    def __len__(self) -> int: ...

    def __getitem__(self, key: Any) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------
# Image arrays and datasets


class LazyImages:
    """A split of a base image array, gathered on demand: ``self[k] == base[indices[k]]``.

    Splits defined by a permutation of a memory-mapped array (ImageNet's held-out validation
    images) must not copy the array; this keeps only the index array and reads the rows a batch
    needs. ``shift`` right-shifts every gathered pixel (bit-depth reduction, applied per batch
    for the same reason). Gathers from a memory map read the rows in file order, which keeps
    disk reads sequential where the indices allow it.
    """

    def __init__(
        self, base: ImageArray, indices: np.ndarray | None = None, *, shift: int = 0
    ) -> None:
        if base.dtype != np.uint8 or base.ndim != 4:
            raise ValueError(f"expected uint8 (N, H, W, C) images, got {base.dtype} {base.shape}")
        if indices is not None:
            indices = np.asarray(indices)
            if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
                raise ValueError("indices must be a 1-D integer array")
            if len(indices) and (indices.min() < 0 or indices.max() >= len(base)):
                raise IndexError(f"indices out of range for {len(base)} images")
            indices = indices.astype(np.intp, copy=True)
            indices.setflags(write=False)
        if not 0 <= shift < 8:
            raise ValueError(f"shift must be 0..7, got {shift}")
        self._base = base
        self._indices = indices
        self._shift = int(shift)

    @property
    def base(self) -> ImageArray:
        """The array the images are gathered from (an ``np.memmap`` for file-backed splits)."""
        return self._base

    @property
    def indices(self) -> np.ndarray | None:
        """Rows of :attr:`base` in split order (None: all rows in order); read-only."""
        return self._indices

    @property
    def shift(self) -> int:
        return self._shift

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self._base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self._base) if self._indices is None else len(self._indices)

    def __getitem__(self, key: Any) -> np.ndarray:
        n = len(self)
        if isinstance(key, int | np.integer):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"image {key} out of range for {n} images")
            return self._gather(np.array([i], dtype=np.intp))[0]
        if isinstance(key, slice):
            rows = range(n)[key]  # no arange(n): the split may hold a million images
            return self._gather(np.arange(rows.start, rows.stop, rows.step, dtype=np.intp))
        rows = np.asarray(key)
        if rows.dtype == np.bool_:
            if rows.shape != (n,):
                raise IndexError(f"boolean index of shape {rows.shape} for {n} images")
            rows = np.flatnonzero(rows)
        if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
            raise IndexError(
                "LazyImages supports an int, a slice or a 1-D integer/boolean index array"
            )
        rows = rows.astype(np.intp, copy=False)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"index out of range for {n} images")
        return self._gather(np.where(rows < 0, rows + n, rows))

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        src = rows if self._indices is None else self._indices[rows]
        base = self._base
        if isinstance(base, np.memmap) and len(src) > 1:
            order = np.argsort(src, kind="stable")
            out = np.empty((len(src), *base.shape[1:]), dtype=np.uint8)
            out[order] = base[src[order]]
        elif isinstance(base, np.ndarray):
            out = np.take(base, src, axis=0)
        else:
            out = np.array(base[src], dtype=np.uint8)
        if self._shift:
            np.right_shift(out, self._shift, out=out)
        return out

    def with_shift(self, bits: int) -> LazyImages:
        """The same images with ``bits`` more low bits dropped."""
        return LazyImages(self._base, self._indices, shift=self._shift + bits)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        kind = type(self._base).__name__
        return f"LazyImages({self.shape}, base={kind}{tuple(self._base.shape)}, shift={self.shift})"


class InMemoryDataset:
    """A dataset whose splits are image arrays (in memory, memory-mapped or :class:`LazyImages`)."""

    def __init__(self, splits: Mapping[str, ImageArray], num_bits: int) -> None:
        shapes = {tuple(arr.shape[1:]) for arr in splits.values()}
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

    def load(self, split: str) -> ImageArray:
        try:
            return self._splits[split]
        except KeyError:
            raise HvaeError(
                f"this dataset has no split '{split}'", hint=f"splits: {', '.join(self._splits)}"
            ) from None


def batch_transform(dataset: Any) -> BatchTransform | None:
    """The dataset's ``transform_batch`` (pass it to :class:`BatchStream`), or None."""
    transform = getattr(dataset, "transform_batch", None)
    return transform if callable(transform) else None


class BitDepthReduced:
    """A dataset at a lower bit depth: every pixel level ``v`` becomes ``v >> (bits - num_bits)``.

    In-memory splits are reduced once, eagerly; file-backed or lazy splits per batch (a memory
    map is never copied). A dataset with ``transform_batch`` is reduced after its transform,
    since ``num_bits`` describes the transformed images.
    """

    def __init__(self, inner: Dataset, num_bits: int) -> None:
        if not 1 <= num_bits <= inner.num_bits:
            raise ValueError(f"num_bits must be 1..{inner.num_bits}, got {num_bits}")
        self._inner = inner
        self._num_bits = num_bits
        self._shift = inner.num_bits - num_bits
        self._reduced: dict[str, ImageArray] = {}
        inner_transform = batch_transform(inner)
        if inner_transform is not None:
            shift = self._shift

            def transform_batch(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
                return np.right_shift(inner_transform(batch, rng), shift).astype(np.uint8)

            self.transform_batch = transform_batch

    @property
    def inner(self) -> Dataset:
        return self._inner

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._inner.image_shape

    @property
    def num_bits(self) -> int:
        return self._num_bits

    @property
    def splits(self) -> tuple[str, ...]:
        return self._inner.splits

    def load(self, split: str) -> ImageArray:
        if split not in self._reduced:
            images = self._inner.load(split)
            if hasattr(self, "transform_batch"):
                reduced: ImageArray = images
            elif isinstance(images, LazyImages):
                reduced = images.with_shift(self._shift)
            elif isinstance(images, np.ndarray) and not isinstance(images, np.memmap):
                reduced = np.right_shift(images, self._shift).astype(np.uint8)
            else:
                reduced = LazyImages(images, shift=self._shift)
            self._reduced[split] = reduced
        return self._reduced[split]


def resolve_data_dir(
    configured: str | os.PathLike[str] | None,
    dataset: str,
    *,
    path: str | os.PathLike[str] | None = None,
    obtain: str | None = None,
) -> Path:
    """The folder a dataset reads from.

    In order: ``path`` (the dataset's own ``dataset.path`` option), ``configured``
    (``data.data_dir``, the ``--data-dir`` flag), then ``$HVAE_DATA_DIR``. ``obtain`` says where
    the files come from; it ends the hint of the error raised when no folder is found.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if path:
        chosen, source = path, "dataset.path"
    elif configured:
        chosen, source = configured, "data.data_dir"
    elif env:
        chosen, source = env, f"${DATA_DIR_ENV}"
    else:
        hint = f"pass --data-dir DIR, set dataset.path, or set {DATA_DIR_ENV}"
        raise HvaeError(
            f"dataset '{dataset}' needs its files and no data directory is set",
            hint=f"{hint}; {obtain}" if obtain else hint,
        )
    folder = Path(chosen).expanduser()
    if not folder.is_dir():
        hint = "give the folder holding the dataset files"
        raise HvaeError(
            f"data directory {folder} (from {source}) does not exist or is not a folder",
            hint=f"{hint}; {obtain}" if obtain else hint,
        )
    return folder
