"""The input pipeline: seeded shuffling, exact resume, per-image flips, transforms, prefetching."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from hvae_core.data import (
    BatchStream,
    BitDepthReduced,
    InMemoryDataset,
    LazyImages,
    batch_transform,
)
from hvae_core.errors import HvaeError

N = 103


def id_images(n: int = N) -> np.ndarray:
    """Image i is constant i (flip-invariant), so a batch says which images it holds."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 2)).copy()


def ids(batch: np.ndarray) -> list[int]:
    return batch[:, 0, 0, 0].tolist()


def asymmetric_images(n: int = N) -> np.ndarray:
    """Image i: column 0 holds i, other columns 255, so a flipped image is recognisable."""
    images = np.full((n, 3, 5, 1), 255, np.uint8)
    images[:, :, 0, 0] = np.arange(n, dtype=np.uint8)[:, None]
    return images


def run(stream: BatchStream, epoch: int, start: int = 0) -> list[np.ndarray]:
    return list(stream.epoch(epoch, start))


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "hvae-prefetch"]


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_every_image_exactly_once_per_epoch(prefetch: int) -> None:
    stream = BatchStream(
        id_images(), 10, shuffle=True, seed=0, drop_remainder=False, prefetch=prefetch
    )
    assert len(stream) == 11
    batches = run(stream, 0)
    assert [len(b) for b in batches] == [10] * 10 + [3]
    seen = [i for b in batches for i in ids(b)]
    assert sorted(seen) == list(range(N)) and seen != list(range(N))
    for b in batches:
        assert b.dtype == np.uint8 and b.shape[1:] == (4, 4, 2) and b.flags.writeable


def test_drop_remainder_gives_full_batches_without_repeats() -> None:
    stream = BatchStream(id_images(), 10, shuffle=True, seed=0)
    batches = run(stream, 0)
    assert len(stream) == len(batches) == 10 and all(len(b) == 10 for b in batches)
    seen = [i for b in batches for i in ids(b)]
    assert len(set(seen)) == 100


def test_shuffling_is_seeded_per_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        stream = BatchStream(id_images(), 8, shuffle=True, seed=seed, drop_remainder=False)
        return [i for b in run(stream, epoch) for i in ids(b)]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert order(-5, 3) == order(-5, 3)  # negative run seeds are fine


def test_without_shuffle_batches_follow_the_split_order() -> None:
    stream = BatchStream(id_images(), 10, shuffle=False, seed=0, drop_remainder=False)
    assert [i for b in run(stream, 4) for i in ids(b)] == list(range(N))


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_yields_exactly_the_remaining_batches(prefetch: int) -> None:
    stream = BatchStream(asymmetric_images(), 8, shuffle=True, seed=7, flip=True, prefetch=prefetch)
    full = run(stream, 2)
    for start in (0, 1, 5, len(stream) - 1, len(stream)):
        rest = run(stream, 2, start)
        assert len(rest) == len(full) - start
        for a, b in zip(rest, full[start:], strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        stream.epoch(2, len(stream) + 1)


def test_flips_are_per_image_seeded_and_exact() -> None:
    images = asymmetric_images()
    stream = BatchStream(images, N, shuffle=False, seed=3, flip=True, drop_remainder=False)
    [batch] = run(stream, 0)
    flipped = batch[:, 0, 0, 0] == 255  # column 0 moved to the last column
    assert 30 < flipped.sum() < 73  # about half, image by image
    np.testing.assert_array_equal(batch[flipped], images[flipped][:, :, ::-1])
    np.testing.assert_array_equal(batch[~flipped], images[~flipped])
    [again] = run(stream, 0)
    np.testing.assert_array_equal(batch, again)
    [other_epoch] = run(stream, 1)
    assert not np.array_equal(batch, other_epoch)
    [plain] = run(BatchStream(images, N, shuffle=False, seed=3, drop_remainder=False), 0)
    np.testing.assert_array_equal(plain, images)
    # The shuffle order does not depend on whether flips are on.
    a = BatchStream(id_images(), 10, shuffle=True, seed=9, flip=True)
    b = BatchStream(id_images(), 10, shuffle=True, seed=9, flip=False)
    assert [ids(x) for x in run(a, 0)] == [ids(x) for x in run(b, 0)]


def test_batches_are_fresh_copies() -> None:
    images = id_images()
    stream = BatchStream(images, 10, shuffle=False, seed=0)
    for batch in stream.epoch(0):
        batch[...] = 0
    np.testing.assert_array_equal(images, id_images())


def test_transform_gets_a_generator_seeded_by_seed_epoch_and_batch() -> None:
    seen: list[tuple[int, float]] = []

    def transform(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        seen.append((len(batch), rng.random()))
        return batch + 1

    stream = BatchStream(id_images(), 10, shuffle=True, seed=1, transform=transform)
    full = run(stream, 0)
    draws = [d for _, d in seen]
    assert len(set(draws)) == len(stream)  # one generator per batch, each different
    seen.clear()
    rest = run(stream, 0, 4)
    assert [d for _, d in seen] == draws[4:]
    for a, b in zip(rest, full[4:], strict=True):
        np.testing.assert_array_equal(a, b)
    raw = [i for b in full for i in ids(b - 1)]
    assert len(set(raw)) == 100


def test_binarize_transform_through_the_stream_is_reproducible() -> None:
    from hvae_plugins.datasets.mnist import BinarizedMnist

    grey = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1), np.uint8)
    ds = BinarizedMnist({"train": grey, "val": grey[:4]}, num_bits=1)
    transform = batch_transform(ds)
    assert transform is not None

    def epoch(seed: int, e: int) -> np.ndarray:
        stream = BatchStream(ds.load("train"), 8, shuffle=True, seed=seed, transform=transform)
        return np.concatenate(run(stream, e))

    first = epoch(0, 0)
    assert set(np.unique(first)) == {0, 1}
    np.testing.assert_array_equal(first, epoch(0, 0))
    assert not np.array_equal(first, epoch(0, 1))


def test_reduced_bit_depth_applies_after_the_transform() -> None:
    class Doubling(InMemoryDataset):
        def transform_batch(self, batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            return batch * 2

    images = np.arange(64, dtype=np.uint8).reshape(4, 4, 4, 1)
    reduced = BitDepthReduced(Doubling({"train": images, "val": images}, num_bits=8), 3)
    assert reduced.num_bits == 3
    assert reduced.load("train") is images  # untouched: reduction follows the transform
    out = batch_transform(reduced)(images.copy(), np.random.default_rng(0))
    np.testing.assert_array_equal(out, (images * 2) >> 5)


def test_lazy_images_stream_like_the_materialised_array(tmp_path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (50, 4, 4, 3), np.uint8)
    np.save(tmp_path / "x.npy", images)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    idx = np.random.RandomState(0).permutation(50)[:37]
    lazy = LazyImages(mapped, idx)
    assert lazy.shape == (37, 4, 4, 3) and len(lazy) == 37
    np.testing.assert_array_equal(lazy[5], images[idx[5]])
    np.testing.assert_array_equal(lazy[-1], images[idx[-1]])
    np.testing.assert_array_equal(lazy[3:9], images[idx[3:9]])
    np.testing.assert_array_equal(lazy[30:2:-4], images[idx[30:2:-4]])
    np.testing.assert_array_equal(lazy[::-1], images[idx[::-1]])
    np.testing.assert_array_equal(lazy[36:100], images[idx[36:]])
    np.testing.assert_array_equal(lazy[np.array([4, 0, 4])], images[idx[[4, 0, 4]]])
    with pytest.raises(IndexError):
        lazy[np.array([37])]
    a = BatchStream(lazy, 8, shuffle=True, seed=2, flip=True)
    b = BatchStream(images[idx], 8, shuffle=True, seed=2, flip=True)
    for x, y in zip(run(a, 1), run(b, 1), strict=True):
        np.testing.assert_array_equal(x, y)
    shifted = lazy.with_shift(3)
    np.testing.assert_array_equal(np.asarray(shifted), images[idx] >> 3)


def test_closing_early_stops_the_prefetch_thread() -> None:
    before = len(prefetch_threads())
    stream = BatchStream(id_images(), 2, shuffle=True, seed=0, prefetch=2)
    batches = stream.epoch(0)
    next(batches)
    assert len(prefetch_threads()) == before + 1
    thread = batches.thread
    batches.close()
    assert not thread.is_alive()
    with pytest.raises(StopIteration):
        next(batches)
    with stream.epoch(1) as more:
        next(more)
        thread = more.thread
    assert not thread.is_alive()


def test_dropping_the_iterator_stops_the_prefetch_thread() -> None:
    stream = BatchStream(id_images(), 2, shuffle=True, seed=0, prefetch=2)
    batches = stream.epoch(0)
    next(batches)
    thread = batches.thread
    del batches
    gc.collect()
    assert wait_until(lambda: not thread.is_alive())


def test_errors_in_the_prefetch_thread_reach_the_consumer() -> None:
    class Failing:
        shape, dtype, ndim = (20, 2, 2, 1), np.dtype(np.uint8), 4

        def __len__(self) -> int:
            return 20

        def __getitem__(self, key: object) -> np.ndarray:
            raise OSError("disk gone")

    batches = BatchStream(Failing(), 4, shuffle=False, seed=0).epoch(0)
    with pytest.raises(OSError, match="disk gone"):
        next(batches)
    assert not batches.thread.is_alive()


def test_interpreter_exits_with_an_unfinished_prefetcher() -> None:
    code = (
        "import numpy as np\n"
        "from hvae_core.data import BatchStream\n"
        "s = BatchStream(np.zeros((1000, 8, 8, 3), np.uint8), 4, shuffle=True, seed=0)\n"
        "it = s.epoch(0)\n"
        "next(it)\n"
        "print('done')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr


def test_too_few_images_for_one_batch_is_a_clear_error() -> None:
    with pytest.raises(HvaeError, match="no batch of 8"):
        BatchStream(id_images(5), 8, shuffle=True, seed=0)
    assert len(BatchStream(id_images(5), 8, shuffle=True, seed=0, drop_remainder=False)) == 1
