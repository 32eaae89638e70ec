"""The input pipeline: how batches are drawn, the same on every Keras backend.

*Batch transforms.* A dataset may have a method ``transform_batch(batch, rng) -> batch`` (the
same signature as a regularizer's). The pipeline calls it on every batch it draws, of every
split, with a generator seeded from (run seed, epoch, batch index), so it is reproducible and
resumable. ``num_bits`` then describes the *transformed* images: MNIST with dynamic
binarisation loads grey levels 0..255 and says 1 bit, because ``transform_batch`` samples each
pixel from Bernoulli(level / 255) afresh every time a batch is drawn.

:class:`BatchStream` is numpy plus one background thread: gathering a batch is one
fancy-indexing copy, which numpy does far faster than any backend's step consumes it, so a
thread that keeps ``prefetch`` batches ready is all the parallelism needed, and it never
imports TensorFlow.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from hvae_core.data.arrays import BatchTransform, ImageArray, batch_transform
from hvae_core.errors import HvaeError

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
