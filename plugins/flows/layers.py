"""Invertible building blocks of the convolutional flows: ActNorm, flip, squeeze and split.

Every transform maps an NHWC tensor to one of the same size; the ones with a log-determinant
return it per example, shape (B,).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


class ActNorm(keras.layers.Layer):
    """y = x * exp(log_scale) + bias, per channel; log|det| = H * W * sum(log_scale).

    Starts as the identity (log-det 0). Glow initialises it from the first batch's statistics;
    in a posterior flow that makes the first steps unstable, so it is left to learn from here.
    """

    def build(self, x_shape: Any) -> None:
        channels = int(x_shape[-1])
        self.log_scale = self.add_weight(shape=(channels,), initializer="zeros", name="log_scale")
        self.bias = self.add_weight(shape=(channels,), initializer="zeros", name="bias")

    def call(self, x: Any) -> tuple[Any, Any]:
        y = x * ops.exp(self.log_scale) + self.bias
        height, width = ops.shape(x)[1], ops.shape(x)[2]
        log_det = ops.cast(height * width, x.dtype) * ops.sum(self.log_scale)
        return y, ops.broadcast_to(log_det, (ops.shape(x)[0],))

    def inverse(self, y: Any) -> Any:
        return (y - self.bias) * ops.exp(-self.log_scale)


def flip(x: Any) -> Any:
    """Reverse height, width and channels: a permutation (log-det 0) that is its own inverse,
    so consecutive autoregressive layers see opposite orderings."""
    return ops.flip(ops.flip(ops.flip(x, axis=1), axis=2), axis=3)


def flip_spatial(context: Any) -> Any:
    """The spatial part of :func:`flip`, for a context that must stay aligned with z."""
    return ops.flip(ops.flip(context, axis=1), axis=2)


def squeeze(x: Any) -> Any:
    """(B, H, W, C) -> (B, H/2, W/2, 4C): each 2x2 patch becomes one position (a permutation)."""
    b, h, w, c = (ops.shape(x)[i] for i in range(4))
    x = ops.reshape(x, (b, h // 2, 2, w // 2, 2, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (b, h // 2, w // 2, 4 * c))


def unsqueeze(x: Any) -> Any:
    """The inverse of :func:`squeeze`."""
    b, h, w, c = (ops.shape(x)[i] for i in range(4))
    x = ops.reshape(x, (b, h, w, 2, 2, c // 4))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (b, 2 * h, 2 * w, c // 4))


def split(x: Any) -> tuple[Any, Any]:
    """The channels in two halves: the first goes on through the flow, the second is set aside
    unchanged (an identity on it, log-det 0)."""
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def merge(kept: Any, aside: Any) -> Any:
    """The inverse of :func:`split`."""
    return ops.concatenate([kept, aside], axis=-1)
