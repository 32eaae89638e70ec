"""The embedded default dataset: scikit-learn's 8x8 handwritten digits, read from its install.

The 1,797 images have 17 grey levels (0..16). They are served as 4-bit pixels, with the top
level 16 merged into 15: spread over an 8-bit grid, 17 levels would leave 15 of every 16 values
empty, and a discretized-logistic likelihood would pay about 4 bits per pixel for mass it can
never concentrate on them. Splits come from one fixed permutation: 150 images for validation,
150 for test, the remaining 1,497 for training.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hvae_core.api import InMemoryDataset

VAL_SIZE = 150
TEST_SIZE = 150
SPLIT_SEED = 0


NUM_BITS = 4


def digits_images() -> np.ndarray:
    """All digits as 4-bit levels, uint8 (1797, 8, 8, 1), in scikit-learn's order."""
    from sklearn.datasets import load_digits

    levels = load_digits().images  # float64, values 0..16
    return np.minimum(levels, 2**NUM_BITS - 1).astype(np.uint8)[..., None]


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
        num_bits=NUM_BITS,
    )
