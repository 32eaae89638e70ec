"""The ``example-npy`` dataset: images from one uint8 NHWC ``.npy`` file."""

from __future__ import annotations

from typing import Any

import numpy as np

from hvae_core.api import HvaeError, InMemoryDataset, resolve_data_dir


def NpyDataset(options: Any, data: Any) -> InMemoryDataset:  # noqa: N802 - a factory
    path = resolve_data_dir(data.data_dir, "example-npy") / options.file
    if not path.is_file():
        raise HvaeError(f"{path} does not exist", hint="save your images with numpy.save there")
    images = np.load(path, mmap_mode="r", allow_pickle=False)
    # The image size is the file's: hvae checks it against dataset.image_size where one is set.
    if images.dtype != np.uint8 or images.ndim != 4:
        raise HvaeError(
            f"{path}: expected uint8 (N, H, W, C), got {images.dtype} {images.shape}",
            hint="save the images as one uint8 NHWC array",
        )
    n_val = int(len(images) * options.val_fraction)
    n_test = int(len(images) * options.test_fraction)
    n_train = len(images) - n_val - n_test
    return InMemoryDataset(
        {
            "train": images[:n_train],
            "val": images[n_train : n_train + n_val],
            "test": images[n_train + n_val :],
        },
        num_bits=options.num_bits,
    )
