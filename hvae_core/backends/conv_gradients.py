"""Convolution gradients in the one layout XLA's CPU kernels are fast for, inside loop bodies.

XLA's CPU compiler rewrites convolutions into the form its Eigen kernels take (NHWC input, HWIO
kernel) only in a program's top level. The gradient of a convolution is two more convolutions
in other layouts; inside a loop body (``lax.scan``, ``tf.while_loop``: the runs of repeated
blocks) they stay in that layout and run on a naive kernel, and a step whose blocks loop became
ten times slower. While a step is traced, :func:`canonical_conv_gradients` gives Keras' plain 2D
convolutions (channels last, stride 1, no dilation, no groups) a gradient written as NHWC/HWIO
convolutions. Same values; only the layout of the maths changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
from keras import ops


def _pads(kernel_size: tuple[int, ...], padding: str) -> list[tuple[int, int]]:
    if padding == "same":
        return [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_size]
    return [(0, 0) for _ in kernel_size]


def _pad(x: Any, pads: list[tuple[int, int]]) -> Any:
    if not any(lo or hi for lo, hi in pads):
        return x
    return ops.pad(x, [(0, 0), *pads, (0, 0)])


def _canonical(conv: Any, padding: str) -> Any:
    """A stride-1 NHWC/HWIO ``conv`` (Keras' backend function) with an NHWC/HWIO gradient."""

    @ops.custom_gradient
    def forward(x: Any, kernel: Any) -> Any:
        size = tuple(kernel.shape[:2])
        pads = _pads(size, padding)

        def grad(*args: Any, upstream: Any = None) -> tuple[Any, Any]:
            g = args[0] if upstream is None else upstream
            # The input's gradient: the output gradient, padded, through the flipped kernel.
            flipped = ops.transpose(ops.flip(ops.flip(kernel, 0), 1), (0, 1, 3, 2))
            back = [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(size, pads, strict=True)]
            dx = conv(_pad(g, back), flipped, 1, "valid")
            # The kernel's: the input with channels as batch, through the output gradient.
            dk = conv(
                _pad(ops.transpose(x, (3, 1, 2, 0)), pads),
                ops.transpose(g, (1, 2, 0, 3)),
                1,
                "valid",
            )
            dk = ops.transpose(dk, (1, 2, 0, 3))
            return ops.cast(dx, x.dtype), ops.cast(dk, kernel.dtype)

        return conv(x, kernel, 1, padding), grad

    return forward


@contextlib.contextmanager
def canonical_conv_gradients() -> Iterator[None]:
    """Inside this block, Keras' plain 2D convolutions have NHWC/HWIO gradients."""
    try:
        from keras.src.backend import nn as backend_nn  # not public: guarded below
    except ImportError:  # another Keras layout: run without (slower on a CPU, still right)
        yield
        return
    original = getattr(backend_nn, "conv", None)
    if original is None:
        yield
        return
    variants = {p: _canonical(original, p) for p in ("same", "valid")}

    def conv(
        inputs: Any,
        kernel: Any,
        strides: Any = 1,
        padding: str = "valid",
        data_format: Any = None,
        dilation_rate: Any = 1,
    ) -> Any:
        plain = (
            (data_format or keras.config.image_data_format()) == "channels_last"
            and len(inputs.shape) == 4
            and padding in variants
            and all(s == 1 for s in np.ravel(strides))
            and all(d == 1 for d in np.ravel(dilation_rate))
            and kernel.shape[-2] == inputs.shape[-1]
        )
        if not plain:
            return original(inputs, kernel, strides, padding, data_format, dilation_rate)
        kernel = ops.convert_to_tensor(kernel)
        return variants[padding](ops.cast(inputs, kernel.dtype), kernel)

    backend_nn.conv = conv
    try:
        yield
    finally:
        backend_nn.conv = original
