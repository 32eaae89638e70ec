"""The convolution exponential's series length in float32: shorter than in float64, yet exp(M)
and exp(-M) stay inverses to float32 precision at the norm bound (the flows run in float32)."""

from __future__ import annotations

import keras
import numpy as np
from hvae_plugins.flows.conv_exponential import ConvExponential, series_terms


def test_float32_sums_fewer_terms_than_float64() -> None:
    assert ConvExponential(dtype="float32").terms == series_terms(1.0, 2.0**-23) == 11
    assert ConvExponential(dtype="float64").terms == series_terms(1.0) == 13


def test_float32_series_inverts_to_float32_precision_at_the_bound() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    short, full = ConvExponential(dtype="float32"), ConvExponential(dtype="float64")
    for layer in (short, full):
        layer.build(x.shape)
    kernel = rng.normal(scale=1.0, size=short.kernel.shape)  # well past the bound
    short.kernel.assign(kernel.astype("float32"))
    full.kernel.assign(kernel)
    y, _ = short(x)
    y = keras.ops.convert_to_numpy(y)
    exact = keras.ops.convert_to_numpy(full(x.astype("float64"))[0])
    assert np.abs(y - x).max() > 0.1  # a map far from the identity
    # The float32 map is the float64 one to float32 rounding, and its inverse undoes it.
    np.testing.assert_allclose(y, exact, rtol=0, atol=2e-6)
    back = keras.ops.convert_to_numpy(short.inverse(y))
    np.testing.assert_allclose(back, x, rtol=0, atol=2e-6)
