"""The convolution exponential (Hoogeboom et al. 2020): exp(M) x = sum_k M^k x / k!.

M is a same-padded k x k convolution from C channels to C. exp(M) is invertible with inverse
exp(-M) and log|det exp(M)| = trace(M) = H * W * trace(centre tap): a position maps to itself
only through the kernel's centre.

Both facts hold for the exact exponential, but a program sums a finite series. Here the series
is exact to float precision by construction: the kernel is rescaled so that a guaranteed bound
on the operator norm of M, the sum over taps of each tap's Frobenius norm (M is a sum of one
shift, of norm <= 1, times one C x C matrix per tap), is at most ``NORM_BOUND``; the number of
terms is then chosen from that bound and the layer's precision (see :func:`series_terms`): in
float32 a term below float32's resolution (2^-23 of the sum) changes nothing that rounding does
not already change, so the series stops there (11 terms at the bound 1, against 13 for the
1e-9 kept in float64). Without such a bound the
truncated exp(M) and exp(-M) stop being inverses of each other during training, and every
log-determinant that relies on it silently goes wrong.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

NORM_BOUND = 1.0
SERIES_TOLERANCE = 1e-9
# Per compute dtype: the product's error need not go below the dtype's resolution.
TOLERANCES = {"float32": 2.0**-23, "float64": SERIES_TOLERANCE}


def series_terms(bound: float, tolerance: float = SERIES_TOLERANCE) -> int:
    """Fewest terms K so that, for ||M|| <= bound, truncating both exp(M) and exp(-M) after K
    terms leaves ||T_K(-M) T_K(M) - I|| <= 2 e^(2 bound) bound^(K+1) / (K+1)! <= tolerance
    (the product's error is at most twice the remainder times e^bound, plus its square)."""
    k = 1
    while 2.0 * math.exp(2.0 * bound) * bound ** (k + 1) / math.factorial(k + 1) > tolerance:
        k += 1
    return k


class ConvExponential(keras.layers.Layer):
    """x -> exp(M) x with M a norm-bounded k x k convolution; :meth:`inverse` gives exp(-M)."""

    def __init__(self, kernel_size: int = 3, bound: float = NORM_BOUND, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kernel_size = kernel_size
        self.bound = bound
        tolerance = TOLERANCES.get(self.dtype_policy.compute_dtype, SERIES_TOLERANCE)
        self.terms = series_terms(bound, tolerance)

    def build(self, x_shape: Any) -> None:
        channels = int(x_shape[-1])
        k = self.kernel_size
        self.kernel = self.add_weight(
            shape=(k, k, channels, channels),
            initializer=keras.initializers.RandomNormal(stddev=1.0 / (k * k * channels)),
            name="kernel",
        )

    def effective_kernel(self) -> Any:
        """The kernel scaled down, where needed, so that the operator norm bound holds."""
        tap_norms = ops.sqrt(ops.sum(ops.square(self.kernel), axis=(2, 3)) + 1e-12)
        total = ops.sum(tap_norms)
        return self.kernel * (self.bound / ops.maximum(total, self.bound))

    def _series(self, x: Any, kernel: Any) -> Any:
        def add_term(k: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
            result, term = carry
            term = ops.conv(term, kernel, padding="same") / ops.cast(k, x.dtype)
            return result + term, term

        # Unrolled: a flow runs inside the compiled loops over repeated blocks and micro-batches,
        # and TensorFlow's XLA cannot differentiate a loop of unknown length nested in those.
        carry = (x, x)
        for k in range(1, self.terms + 1):
            carry = add_term(k, carry)
        return carry[0]

    def call(self, x: Any) -> tuple[Any, Any]:
        kernel = self.effective_kernel()
        return self._series(x, kernel), self.log_det(x, kernel)

    def inverse(self, y: Any) -> Any:
        return self._series(y, -self.effective_kernel())

    def log_det(self, x: Any, kernel: Any | None = None) -> Any:
        """H * W * trace of the centre tap, per example."""
        kernel = self.effective_kernel() if kernel is None else kernel
        c = self.kernel_size // 2
        height, width = ops.shape(x)[1], ops.shape(x)[2]
        trace = ops.trace(kernel[c, c])
        return ops.broadcast_to(ops.cast(height * width, x.dtype) * trace, (ops.shape(x)[0],))
