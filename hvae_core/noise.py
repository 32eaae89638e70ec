"""The noise a model's passes take, as data: its shapes, a host-side draw, and checks.

Every pass of an :class:`~hvae_core.model.hvae.HVAE` is a deterministic function of the weights,
its inputs and its noise: one standard normal array per latent layer (top layer first, NHWC,
the layer's z shape; for a layer with a posterior flow it makes the flow's z_0) and, where
pixels are sampled, the likelihood's uniforms. :func:`draw_noise` draws them with NumPy from a
seed, so the same seed gives the same images on every backend and runtime (ONNX, OpenVINO).

NumPy only: importing this module imports no Keras and no backend.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from hvae_core.errors import InputError


@dataclasses.dataclass(frozen=True)
class NoiseShapes:
    """What a pass of the model takes as noise for a batch (see :meth:`HVAE.noise_shapes`)."""

    latents: tuple[tuple[Any, ...], ...]
    """One standard normal array per latent layer, top (1x1) first: (batch, R, R, z_width)."""

    pixels: tuple[Any, ...]
    """The pixel likelihood's uniforms in [0, 1] for sampling pixels: (batch, H, W, M + C)
    (per pixel, M that choose the mixture component, then one per channel)."""


@dataclasses.dataclass(frozen=True)
class Noise:
    """One draw of a pass's noise for a batch: ``latents`` per layer, top first, and the
    likelihood's uniforms ``pixels`` (None where no pixels are sampled)."""

    latents: tuple[np.ndarray, ...]
    pixels: np.ndarray | None = None


def draw_noise(shapes: NoiseShapes, rng: np.random.Generator, pixels: bool = True) -> Noise:
    """A draw of ``shapes`` from ``rng``, float32: the latent layers' standard normals in
    order, then (with ``pixels``) the likelihood's uniforms in [0, 1)."""
    latents = tuple(rng.standard_normal(tuple(s), dtype=np.float32) for s in shapes.latents)
    uniforms = rng.random(tuple(shapes.pixels), dtype=np.float32) if pixels else None
    return Noise(latents, uniforms)


def checked_latent_noise(
    noise: Any, shapes: NoiseShapes, rows: Sequence[int] | None = None
) -> tuple[np.ndarray, ...]:
    """``noise`` (one array per latent layer, or a :class:`Noise`) as float32 arrays of the
    layers' shapes, or one :class:`InputError` naming the layer and both shapes. ``rows``:
    the leading axes the arrays must have in place of the batch (e.g. (images, samples))."""
    if isinstance(noise, Noise):
        noise = noise.latents
    if isinstance(noise, np.ndarray) or not isinstance(noise, Sequence):
        raise InputError(
            f"noise must be a list of {len(shapes.latents)} arrays, one per latent layer "
            f"(top first), got {type(noise).__name__}",
            hint="see noise_shapes(n) for their shapes",
        )
    if len(noise) != len(shapes.latents):
        raise InputError(
            f"noise holds {len(noise)} arrays; the model has {len(shapes.latents)} latent "
            "layers (one array each, top first)",
            hint="see noise_shapes(n) for their shapes",
        )
    out = []
    for i, (array, shape) in enumerate(zip(noise, shapes.latents, strict=True)):
        wanted = (*(rows if rows is not None else shape[:1]), *shape[1:])
        out.append(_checked(array, wanted, f"latent layer {i} ({shape[1]}x{shape[2]})"))
    return tuple(out)


def checked_pixel_noise(noise: Any, shapes: NoiseShapes) -> np.ndarray:
    """The likelihood's uniforms as float32 of ``shapes.pixels``, in [0, 1], or one
    :class:`InputError`."""
    if isinstance(noise, Noise):
        noise = noise.pixels
    if noise is None:
        raise InputError(
            "pixels are sampled (output_temperature > 0) but no pixel_noise was given",
            hint=f"pass pixel_noise, uniforms in [0, 1] of shape {tuple(shapes.pixels)}, or "
            "output_temperature=0",
        )
    array = _checked(noise, tuple(shapes.pixels), "pixel_noise")
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise InputError(
            f"pixel_noise must be uniforms in [0, 1], found {array.min():g}..{array.max():g}"
        )
    return array


def _checked(array: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    dtype = getattr(array, "dtype", None)
    if dtype is None or not np.issubdtype(np.dtype(dtype), np.floating):
        raise InputError(
            f"noise for {what} must be a float array, got "
            f"{np.dtype(dtype) if dtype is not None else type(array).__name__}"
        )
    got = tuple(int(d) for d in np.shape(array))
    if got != tuple(int(d) for d in shape):
        raise InputError(f"noise for {what} has shape {got}, expected {tuple(shape)}")
    array = np.asarray(array, dtype=np.float32)
    if not np.all(np.isfinite(array)):
        raise InputError(f"noise for {what} holds non-finite values")
    return array


def num_values(shapes: NoiseShapes) -> int:
    """Latent noise values per image."""
    return sum(math.prod(s[1:]) for s in shapes.latents)
