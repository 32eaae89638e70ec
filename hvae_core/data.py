"""Datasets and the input pipeline: what every dataset plugin shares, and how batches are drawn.

The contract is ``hvae_core.interfaces.Dataset``. This module extends it in two compatible ways,
both needed by real datasets:

*Image arrays.* ``load(split)`` returns an **image array**: a uint8 (N, H, W, C) numpy array
(possibly a read-only ``np.memmap``) or any object that reads like one for batching: ``len(x)``,
``x.shape``, ``x.dtype``, ``x.ndim``, and ``x[index_array]`` returning a fresh uint8
(k, H, W, C) numpy array (also ``x[i]`` and ``x[a:b]``). :class:`LazyImages` is the one hvae
ships: a split defined as an index array into a base array (typically a memory map far larger
than memory, such as ImageNet64's 16 GB training set) that gathers only the images a batch asks
for. ``np.asarray(x)`` still works but materialises the whole split.

*Batch transforms.* A dataset may have a method ``transform_batch(batch, rng) -> batch`` (the
same signature as a regularizer's). The pipeline calls it on every batch it draws, of every
split, with a generator seeded from (run seed, epoch, batch index), so it is reproducible and
resumable. ``num_bits`` then describes the *transformed* images: MNIST with dynamic
binarisation loads grey levels 0..255 and says 1 bit, because ``transform_batch`` samples each
pixel from Bernoulli(level / 255) afresh every time a batch is drawn.

The input pipeline (:class:`BatchStream`) is numpy plus one background thread, the same on
every Keras backend: gathering a batch is one fancy-indexing copy, which numpy does far faster
than any backend's step consumes it, so a thread that keeps ``prefetch`` batches ready is all
the parallelism needed, and it never imports TensorFlow.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from hvae_core.errors import ConfigError, HvaeError, PluginError
from hvae_core.interfaces import Dataset

if TYPE_CHECKING:
    from hvae_core.config import Config
    from hvae_core.plugins import PluginRegistry

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


def batch_transform(dataset: Any) -> BatchTransform | None:
    """The dataset's ``transform_batch`` (pass it to :class:`BatchStream`), or None."""
    transform = getattr(dataset, "transform_batch", None)
    return transform if callable(transform) else None


EVAL_SEED = 0  # of the dataset's batch transform (e.g. binarisation) where images are scored


def evaluation_batches(images: Any, batch_size: int, dataset: Any) -> Iterator[np.ndarray]:
    """``images`` in order, in batches, through the dataset's transform with a fixed seed:
    every evaluation of a split scores the same data."""
    return BatchStream(
        images,
        batch_size,
        shuffle=False,
        seed=EVAL_SEED,
        drop_remainder=False,
        transform=batch_transform(dataset),
    ).epoch(0)


def open_dataset(config: Config, registry: PluginRegistry | None = None) -> Dataset:
    """The configured dataset: its plugin's factory called with its options and ``config.data``.

    A dataset the config had to open to learn its image size (see
    :func:`hvae_core.config.build_config`) is not opened again. Applies ``data.num_bits``
    (fewer bits than the dataset's; more is an error), so the result's ``num_bits`` is the
    effective bit depth.
    """
    from hvae_core.plugins import get_registry

    registry = registry or get_registry()
    name = config.data.dataset
    spec = registry.get("dataset", name)
    dataset = config.opened_dataset
    if dataset is None:
        dataset = create_dataset(spec, config.options("dataset"), config.data)
    _check_image_size(dataset, spec, config)
    wanted = config.data.num_bits
    if wanted is None or wanted == dataset.num_bits:
        return dataset
    if wanted > dataset.num_bits:
        raise ConfigError(
            f"data.num_bits: {wanted} is more than the {dataset.num_bits} bits of dataset '{name}'",
            hint=f"use data.num_bits <= {dataset.num_bits}, or leave it unset",
        )
    return BitDepthReduced(dataset, wanted)


def create_dataset(spec: Any, options: Any, data: Any) -> Dataset:
    """A dataset plugin's factory called with ``options`` and ``data``; the result checked
    against the :class:`Dataset` contract (not yet against a configured image size)."""
    dataset = spec.create(options, data)
    _check_dataset(dataset, _described(spec))
    return dataset


def _described(spec: Any) -> str:
    return f"dataset '{spec.name}' from package {spec.package}"


def _check_dataset(dataset: Any, what: str) -> None:
    hint = "the factory must return an object satisfying hvae_core.interfaces.Dataset"
    if not isinstance(dataset, Dataset):
        raise PluginError(f"{what} returned {type(dataset).__name__}, not a Dataset", hint=hint)
    shape = tuple(dataset.image_shape)
    if len(shape) != 3 or shape[2] < 1:
        raise PluginError(f"{what} has images of shape {shape}; expected (H, W, C)", hint=hint)
    if not 1 <= dataset.num_bits <= 8:
        raise PluginError(f"{what} says num_bits {dataset.num_bits}; expected 1..8", hint=hint)
    missing = [s for s in ("train", "val") if s not in dataset.splits]
    if missing:
        raise PluginError(f"{what} has no split {', '.join(missing)}", hint=hint)


def _check_image_size(dataset: Dataset, spec: Any, config: Config) -> None:
    """The dataset's images against the config's image size: a user's ``dataset.image_size``
    that its files contradict is a config error; a registered size that does not hold, the
    plugin's."""
    size = config.image_size
    height, width, _ = tuple(dataset.image_shape)
    if (height, width) == (size, size):
        return
    what = _described(spec)
    if getattr(config.options("dataset"), "image_size", None) == size:
        raise ConfigError(
            f"{what} has {height}x{width} images but dataset.image_size is {size}",
            hint=f"set dataset.image_size: {height}, or null to take the size from the data",
        )
    raise PluginError(
        f"{what} has {height}x{width} images; its registered image_size says {size}x{size}",
        hint="the factory must return images of the size the plugin registers",
    )


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


# --------------------------------------------------------------------------------------------
# The input pipeline


def _seed_words(seed: int, *more: int) -> list[int]:
    # SeedSequence wants non-negative integers; a negative run seed maps onto its 64-bit image.
    return [seed % 2**64, *more]


_ORDER, _FLIPS, _TRANSFORM = 0, 1, 2  # independent random streams per (seed, epoch)


class BatchStream:
    """Batches of one split, epoch by epoch: shuffled, optionally flipped, prefetched.

    The order, the flips and the transform's random numbers of an epoch are functions of
    ``(seed, epoch)`` alone (and of the batch index, for the transform), so
    ``epoch(e, start_batch=k)`` yields exactly the batches ``k, k+1, ...`` that an uninterrupted
    ``epoch(e)`` would: resuming a run mid-epoch replays nothing and skips nothing.

    Batches are fresh writable uint8 NHWC arrays. Flips are horizontal and per image, each with
    probability 1/2. ``transform`` is a dataset's ``transform_batch`` (see :func:`batch_transform`).
    """

    def __init__(
        self,
        images: ImageArray,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        flip: bool = False,
        drop_remainder: bool = True,
        transform: BatchTransform | None = None,
        prefetch: int = 2,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 (N, H, W, C) images, got {images.dtype}")
        n = len(images)
        if n == 0 or (drop_remainder and n < batch_size):
            raise HvaeError(
                f"a split of {n} images gives no batch of {batch_size}",
                hint="use a smaller training.batch_size",
            )
        self.images = images
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.flip = flip
        self.drop_remainder = drop_remainder
        self.transform = transform
        self.prefetch = int(prefetch)

    @property
    def num_images(self) -> int:
        return len(self.images)

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = self.num_images, self.batch_size
        return n // b if self.drop_remainder else -(-n // b)

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Image order of ``epoch`` and, with flips on, whether each position is flipped."""
        n = self.num_images
        if self.shuffle:
            order = np.random.default_rng(_seed_words(self.seed, epoch, _ORDER)).permutation(n)
        else:
            order = np.arange(n)
        flips = None
        if self.flip:
            rng = np.random.default_rng(_seed_words(self.seed, epoch, _FLIPS))
            flips = rng.random(n) < 0.5
        return order, flips

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[np.ndarray]:
        """The batches of ``epoch`` from ``start_batch`` on.

        With ``prefetch > 0`` a background thread prepares that many batches ahead. Close the
        iterator (``close()``, a ``with`` block, or just dropping it) to stop the thread early.
        """
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be 0..{len(self)}, got {start_batch}")
        make = _BatchMaker(self, epoch)
        batches = range(start_batch, len(self))
        if self.prefetch == 0:
            return _SyncBatches(make, batches)
        return _PrefetchedBatches(make, batches, self.prefetch)


class _BatchMaker:
    """Builds batch ``b`` of one epoch; holds no reference to any iterator (see _Prefetched)."""

    def __init__(self, stream: BatchStream, epoch: int) -> None:
        self.images = stream.images
        self.batch_size = stream.batch_size
        self.transform = stream.transform
        self.seed = stream.seed
        self.epoch = epoch
        self.order, self.flips = stream.epoch_plan(epoch)

    def __call__(self, b: int) -> np.ndarray:
        lo, hi = b * self.batch_size, (b + 1) * self.batch_size
        batch = self.images[self.order[lo:hi]]
        if not isinstance(batch, np.ndarray) or not batch.flags.writeable:
            batch = np.array(batch, dtype=np.uint8)
        if self.flips is not None:
            flipped = self.flips[lo:hi]
            if flipped.any():
                batch[flipped] = batch[flipped, :, ::-1]
        if self.transform is not None:
            rng = np.random.default_rng(_seed_words(self.seed, self.epoch, _TRANSFORM, b))
            batch = self.transform(batch, rng)
        return batch


class _SyncBatches(Iterator[np.ndarray]):
    """Batches made on demand in the caller's thread (``prefetch=0``)."""

    def __init__(self, make: _BatchMaker, batches: range) -> None:
        self._make = make
        self._todo = iter(batches)

    def __next__(self) -> np.ndarray:
        return self._make(next(self._todo))

    def close(self) -> None:
        self._todo = iter(())

    def __enter__(self) -> _SyncBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _produce(make: _BatchMaker, batches: range, out: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread: fill ``out`` until done or ``stop`` is set.

    It never blocks for long (puts time out and re-check ``stop``), so closing the iterator, or
    its garbage collection, ends the thread within one batch.
    """

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        for b in batches:
            if stop.is_set() or not put(make(b)):
                return
    except BaseException as exc:  # handed to the consumer, re-raised there
        put(_Failure(exc))
        return
    put(_END)


class _PrefetchedBatches(Iterator[np.ndarray]):
    """Batches made ahead by a daemon thread.

    The thread holds the queue, the stop event and the batch maker, never this object, so
    dropping the iterator early lets it be collected; its finaliser then stops the thread. It
    is a daemon thread as well, so it can never keep the interpreter from exiting.
    """

    def __init__(self, make: _BatchMaker, batches: range, depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce,
            args=(make, batches, self._queue, self._stop),
            name="hvae-prefetch",
            daemon=True,
        )
        self._done = False
        self._finalizer = weakref.finalize(self, self._stop.set)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def __next__(self) -> np.ndarray:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise StopIteration from None
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        return item

    def close(self) -> None:
        """Stop the thread and wait for it (it finishes at most the batch it is making)."""
        self._done = True
        self._stop.set()
        while True:  # free a producer blocked on a full queue at once
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10.0)

    def __enter__(self) -> _PrefetchedBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
