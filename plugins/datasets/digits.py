"""The embedded default dataset: scikit-learn's 8x8 handwritten digits, read from its install.

The 1,797 images have 17 grey levels (0..16); they are stored as 8-bit pixels (v * 255 / 16,
rounded), which keeps the levels distinct. Splits come from one fixed permutation: 150 images
for validation, 150 for test, the remaining 1,497 for training.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hvae_core.data import InMemoryDataset

VAL_SIZE = 150
TEST_SIZE = 150
SPLIT_SEED = 0


def digits_images() -> np.ndarray:
    """All digits as uint8 (1797, 8, 8, 1) in scikit-learn's order."""
    from sklearn.datasets import load_digits

    levels = load_digits().images  # float64, values 0..16
    return np.rint(levels * (255.0 / 16.0)).astype(np.uint8)[..., None]


def load_digits_dataset(options: Any, data: Any) -> InMemoryDataset:
    images = digits_images()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    val, test, train = np.split(order, [VAL_SIZE, VAL_SIZE + TEST_SIZE])
    return InMemoryDataset(
        {
            "train": images[np.sort(train)],
            "val": images[np.sort(val)],
            "test": images[np.sort(test)],
        },
        num_bits=8,
    )
