"""Every picture hvae draws: image grids and metric plots, as PNG bytes (whoever owns the
file writes them: a run directory, ``hvae sample``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def grid_pixels(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """uint8 NHWC images tiled into one uint8 (H, W, C) picture: the pixels of a PNG grid."""
    n, h, w, c = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    pad = 1
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + col * (w + pad) : pad + col * (w + pad) + w,
        ] = image
    scale = max(1, 512 // max(grid.shape[:2]))  # small images are enlarged to be seen
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def grid_png(images: np.ndarray, columns: int | None = None) -> tuple[bytes, np.ndarray]:
    """uint8 NHWC images as one PNG grid (grayscale stays grayscale): (the PNG file's bytes,
    the grid's pixels; see :func:`grid_pixels`)."""
    import io

    from PIL import Image

    grid = grid_pixels(images, columns)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue(), grid


def metric_plots(rows: list[dict[str, Any]]) -> dict[str, bytes]:
    """loss.png (train and val bpd) and grad_norm.png from metrics rows: file name -> PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return {}
    epochs = [r["epoch"] for r in rows]
    unit = rows[-1].get("grad_norm_unit")  # absent from rows written before it existed
    plots = {
        "loss.png": (("train_bpd", "val_bpd", "kl_bpd", "recon_bpd"), "bits per dimension"),
        "grad_norm.png": (
            ("grad_norm_max", "grad_norm_mean"),
            f"gradient norm ({unit})" if unit else "gradient norm",
        ),
    }
    pngs = {}
    for name, (keys, label) in plots.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            values = [r.get(key) for r in rows]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], marker=".", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        pngs[name] = buffer.getvalue()
    return pngs
