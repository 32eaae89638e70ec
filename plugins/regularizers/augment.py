"""Label-preserving augmentations on uint8 NHWC batches, in NumPy (no backend needed).

Only integer translations and mirror images: both move pixels without blending them, so every
output value is a value of the input (or level 0 with constant padding) and the images stay on
the dataset's grid of ``2**num_bits`` levels, where the discretized likelihood scores them.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Padding = Literal["edge", "reflect", "constant"]


def translate_and_flip(
    images: np.ndarray,
    rng: np.random.Generator,
    *,
    max_shift: int,
    padding: Padding = "edge",
    flip: bool = True,
) -> np.ndarray:
    """A fresh array of ``images`` (N, H, W, C), each shifted by its own (dy, dx) drawn
    uniformly from ``[-max_shift, max_shift]`` and, with ``flip``, mirrored left-right with
    probability 1/2; pixels shifted in at the border are filled as ``padding`` says."""
    if images.ndim != 4:
        raise ValueError(f"expected an NHWC batch, got shape {images.shape}")
    n, height, width, _ = images.shape
    out = images
    if max_shift > 0:
        shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
        pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
        padded = np.pad(images, pad, mode=padding)
        # Output pixel (i, j) of an image shifted by (dy, dx) is input pixel (i - dy, j - dx),
        # which sits at (i - dy + max_shift, j - dx + max_shift) in the padded image.
        rows = np.arange(height)[None, :] + (max_shift - shifts[:, :1])
        cols = np.arange(width)[None, :] + (max_shift - shifts[:, 1:])
        index = np.arange(n)[:, None, None]
        out = padded[index, rows[:, :, None], cols[:, None, :]]
    if flip:
        mirrored = rng.random(n) < 0.5
        out = np.where(mirrored[:, None, None, None], out[:, :, ::-1], out)
    return np.array(out, dtype=images.dtype, copy=True)
