"""Masked convolutions for an autoregressive network over (position, channel).

The order: positions in raster order (rows top to bottom, then left to right), and at one
position the channels by a degree. Output channel o at position p may see an input at an
earlier position through any channel, and at p itself only channels of degree <= deg(o)
(``strict``: < deg(o)). Stacked, the network's Jacobian is triangular in that order; with a
strict last layer its diagonal is zero, which is what the Sylvester layer's log-det needs.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops


def channel_degrees(channels: int, num_degrees: int) -> np.ndarray:
    """Degrees 0..num_degrees-1 spread evenly over ``channels`` (in order)."""
    return (np.arange(channels) * num_degrees) // channels


def autoregressive_mask(
    kernel_size: int, in_degrees: np.ndarray, out_degrees: np.ndarray, strict: bool
) -> np.ndarray:
    """The (k, k, in, out) 0/1 mask of a same-padded convolution (a cross-correlation: tap
    (i, j) reads the input at offset (i - k//2, j - k//2))."""
    c = kernel_size // 2
    mask = np.zeros((kernel_size, kernel_size, len(in_degrees), len(out_degrees)), np.float32)
    mask[:c] = 1.0  # the rows above
    mask[c, :c] = 1.0  # to the left in the same row
    inputs, outputs = in_degrees[:, None], out_degrees[None, :]
    mask[c, c] = (inputs < outputs) if strict else (inputs <= outputs)
    return mask


class MaskedConv2D(keras.layers.Layer):
    """A same-padded convolution whose kernel is multiplied by a fixed autoregressive mask.

    ``spectral_norm`` divides the masked kernel by max(1, sigma), sigma its largest singular
    value (as a (k*k*in, out) matrix) estimated by one power iteration per training call, so
    that the layer's Lipschitz constant stays near 1 or below; max(1, .) leaves a zero kernel
    alone.
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int,
        in_degrees: np.ndarray,
        out_degrees: np.ndarray,
        strict: bool = False,
        kernel_initializer: Any = "glorot_uniform",
        spectral_norm: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if len(out_degrees) != filters:
            raise ValueError(f"{filters} filters but {len(out_degrees)} output degrees")
        self.filters, self.kernel_size = filters, kernel_size
        self.ar_mask = autoregressive_mask(kernel_size, in_degrees, out_degrees, strict)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.spectral_norm = spectral_norm

    def build(self, x_shape: Any) -> None:
        k = self.kernel_size
        self.kernel = self.add_weight(
            shape=(k, k, int(x_shape[-1]), self.filters),
            initializer=self.kernel_initializer,
            name="kernel",
        )
        self.bias = self.add_weight(shape=(self.filters,), initializer="zeros", name="bias")
        if self.spectral_norm:
            self.power_u = self.add_weight(
                shape=(self.filters,),
                initializer=keras.initializers.RandomNormal(stddev=1.0),
                trainable=False,
                name="power_u",
            )

    def masked_kernel(self, training: bool = False) -> Any:
        kernel = self.kernel * ops.convert_to_tensor(self.ar_mask, self.kernel.dtype)
        if not self.spectral_norm:
            return kernel
        matrix = ops.reshape(kernel, (-1, self.filters))
        u = ops.stop_gradient(self.power_u)
        v = ops.stop_gradient(_normalize(ops.matmul(matrix, u)))
        u = ops.stop_gradient(_normalize(ops.matmul(ops.transpose(matrix), v)))
        if training:
            self.power_u.assign(u)
        sigma = ops.sum(v * ops.matmul(matrix, u))
        return kernel / ops.maximum(sigma, 1.0)

    def call(self, x: Any, training: bool = False) -> Any:
        return ops.conv(x, self.masked_kernel(training), padding="same") + self.bias


def _normalize(v: Any) -> Any:
    return v / ops.sqrt(ops.sum(ops.square(v)) + 1e-12)
