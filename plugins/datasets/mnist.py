"""MNIST from its IDX files: grayscale, padded (or resized) to a power of two, optionally binarised.

Files (http://yann.lecun.com/exdb/mnist/): ``train-images-idx3-ubyte`` and
``t10k-images-idx3-ubyte``, each optionally gzipped (``.gz``, as downloaded). Labels are not
needed. An IDX image file is a big-endian header (magic 0x00000803: unsigned bytes, 3
dimensions; then N, 28, 28 as 32-bit integers) followed by the N*28*28 pixels.

Images: (N, S, S, 1) uint8 with S = ``dataset.image_size`` (default 32): the 28x28 digits are
zero-padded equally on every side, or, with ``dataset.resize``, resized with Pillow (bilinear,
antialiased when shrinking).

Splits: ``train`` is the first 55,000 training images, ``val`` the last 5,000, ``test`` the
10,000 t10k images.

``dataset.binarize`` is dynamic binarisation: the dataset is 1-bit and every pixel of every
batch the pipeline draws (all splits) is sampled from Bernoulli(level / 255), afresh each time,
through the dataset's ``transform_batch`` hook; the pipeline seeds it from (run seed, epoch,
batch), so runs and evaluations are reproducible.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from hvae_core.api import ConfigError, HvaeError, InMemoryDataset, resolve_data_dir

from ._files import bad_file, missing_files

VAL_SIZE = 5000
TRAIN_FILE = "train-images-idx3-ubyte"
TEST_FILE = "t10k-images-idx3-ubyte"
IDX_UBYTE_3D = 0x00000803
SIDE = 28
OBTAIN = (
    "download train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz from "
    "http://yann.lecun.com/exdb/mnist/ and put them (gzipped or not) in the data folder"
)


class BinarizedMnist(InMemoryDataset):
    """MNIST whose grey levels are turned into 0/1 pixels per batch (dynamic binarisation)."""

    def transform_batch(self, batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # u uniform on {0, ..., 254}: P(u < v) = v / 255 exactly, for every level v in 0..255.
        u = rng.integers(0, 255, size=batch.shape, dtype=np.uint8)
        return (u < batch).astype(np.uint8)


def load_mnist(options: Any, data: Any) -> InMemoryDataset:
    size = options.image_size
    if size < SIDE and not options.resize:
        raise ConfigError(
            f"dataset.image_size: {size} is smaller than the {SIDE}x{SIDE} digits",
            hint="set dataset.resize: true to shrink them, or use image_size 32",
        )
    folder = resolve_data_dir(data.data_dir, "mnist", path=options.path, obtain=OBTAIN)
    train = fit(read_idx_images(find(folder, TRAIN_FILE)), size, options.resize)
    test = fit(read_idx_images(find(folder, TEST_FILE)), size, options.resize)
    if len(train) <= VAL_SIZE:
        raise HvaeError(
            f"MNIST has {len(train)} training images, too few to hold out {VAL_SIZE}",
            hint=OBTAIN,
        )
    splits = {"train": train[:-VAL_SIZE], "val": train[-VAL_SIZE:], "test": test}
    if options.binarize:
        return BinarizedMnist(splits, num_bits=1)
    return InMemoryDataset(splits, num_bits=8)


def find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise missing_files(
        "MNIST", folder, [f"{TRAIN_FILE}[.gz] and {TEST_FILE}[.gz]"], OBTAIN, f"no {name}[.gz]"
    )


def read_idx_images(path: Path) -> np.ndarray:
    """The uint8 (N, 28, 28) images of an IDX file (gzipped or not), checked."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise bad_file(path, f"{type(exc).__name__}: {exc}", OBTAIN) from None
    if len(raw) < 16:
        raise bad_file(path, f"{len(raw)} bytes is too short for an IDX header", OBTAIN)
    magic, n, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
    if magic != IDX_UBYTE_3D:
        raise bad_file(
            path, f"magic number {int(magic):#010x}, expected {IDX_UBYTE_3D:#010x} (images)", OBTAIN
        )
    if (rows, cols) != (SIDE, SIDE):
        raise bad_file(path, f"images of {rows}x{cols}, expected {SIDE}x{SIDE}", OBTAIN)
    want = 16 + int(n) * SIDE * SIDE
    if len(raw) != want:
        raise bad_file(
            path, f"{len(raw)} bytes, expected {want} for {int(n)} images (truncated?)", OBTAIN
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(int(n), SIDE, SIDE)


def fit(images: np.ndarray, size: int, resize: bool) -> np.ndarray:
    """(N, 28, 28) digits as (N, size, size, 1): resized with Pillow, or zero-padded."""
    if resize:
        from PIL import Image

        out = np.empty((len(images), size, size), dtype=np.uint8)
        for i, image in enumerate(images):
            resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
            out[i] = np.asarray(resized)
        return out[..., None]
    before = (size - SIDE) // 2
    after = size - SIDE - before
    return np.pad(images, ((0, 0), (before, after), (before, after)))[..., None]
