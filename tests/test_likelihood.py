"""The discretized mixture of logistics likelihood, checked against independent oracles.

The oracles here are: exhaustive normalisation over every grid value, a float64 NumPy
re-implementation written from the formulas (loops over mixtures and channels, reshape-based
unpacking where the module slices with strides), empirical frequencies of many samples, and the
same computation on the other Keras backends in subprocesses.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

from hvae_core.model.likelihood import (
    dmol_log_prob,
    dmol_num_params,
    dmol_sample,
)
from hvae_core.model.pixels import from_levels, to_levels

ROOT = Path(__file__).resolve().parents[1]
BETA = float(np.log(2.0))  # softplus_beta(0) == 1
BACKENDS = ("tensorflow", "jax", "torch")


def numpy(x) -> np.ndarray:
    return ops.convert_to_numpy(x)


def grid(num_bits: int) -> np.ndarray:
    """All grid values, float32, computed as the brief defines them."""
    top = 2**num_bits - 1
    return (2.0 * np.arange(top + 1) / top - 1.0).astype(np.float32)


def pack(logits, means, scale_logits, coefs) -> np.ndarray:
    """The documented layout, built with reshapes (the module slices with strides instead)."""
    lead = logits.shape[:-1]
    parts = [logits, means, scale_logits, coefs]
    return np.concatenate([p.reshape(lead + (-1,)) for p in parts], axis=-1).astype(np.float32)


def unpack(params, channels: int, mixtures: int):
    m, c = mixtures, channels
    k = c * (c - 1) // 2
    lead = params.shape[:-1]
    logits = params[..., :m]
    means = params[..., m : m + m * c].reshape(lead + (m, c))
    scale_logits = params[..., m + m * c : m + 2 * m * c].reshape(lead + (m, c))
    coefs = params[..., m + 2 * m * c :].reshape(lead + (m, k))
    return logits, means, scale_logits, coefs


def random_params(rng, lead: tuple, channels: int, mixtures: int) -> np.ndarray:
    """Non-trivial parameters: sharp and wide components, means on and beyond the edges."""
    m, c = mixtures, channels
    k = c * (c - 1) // 2
    means = rng.uniform(-1.15, 1.15, lead + (m, c))
    on_edge = rng.random(lead + (m, c)) < 0.3
    means = np.where(on_edge, rng.choice([-1.0, 1.0, -0.99, 0.995], size=lead + (m, c)), means)
    return pack(
        rng.normal(0.0, 1.5, lead + (m,)),
        means,
        rng.uniform(-12.0, 4.0, lead + (m, c)),
        rng.normal(0.0, 1.5, lead + (m, k)),
    )


def pixel_params(rng, channels: int, mixtures: int = 6) -> np.ndarray:
    """One pixel whose scales span clamped-sharp to very wide, in every channel."""
    m, c = mixtures, channels
    k = c * (c - 1) // 2
    spread = np.linspace(-12.0, 4.0, m)
    scale_logits = np.stack([rng.permutation(spread) for _ in range(c)], axis=-1)
    means = rng.uniform(-0.9, 0.9, (m, c))
    means[0, :] = -1.0
    means[1, :] = 0.999
    means[2, 0] = 1.1
    return pack(rng.normal(0.0, 1.0, m), means, scale_logits, rng.normal(0.0, 1.0, (m, k)))


def random_images(rng, lead: tuple, channels: int, num_bits: int) -> np.ndarray:
    top = 2**num_bits - 1
    levels = rng.integers(0, top + 1, lead + (channels,))
    edges = rng.random(levels.shape) < 0.2
    levels = np.where(edges, rng.choice([0, top], size=levels.shape), levels)
    return grid(num_bits)[levels]


def log_prob(params, x, mixtures: int, num_bits: int, scale_fn: str = "softplus") -> np.ndarray:
    out = dmol_log_prob(
        params,
        x,
        num_mixtures=mixtures,
        num_bits=num_bits,
        gradient_smoothing=BETA,
        scale_fn=scale_fn,
    )
    return numpy(out)


def pixel_log_probs(
    params: np.ndarray, values: np.ndarray, mixtures: int, num_bits: int, scale_fn="softplus"
):
    """log p of each row of ``values`` (N, C) under one pixel's ``params``."""
    n = values.shape[0]
    tiled = np.broadcast_to(params, (n, 1, 1, params.shape[-1])).copy()
    return log_prob(tiled, values.reshape(n, 1, 1, -1), mixtures, num_bits, scale_fn)


def logsumexp(a, axis=None):
    a = np.asarray(a, np.float64)
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    out = np.log(np.sum(np.exp(a - top), axis=axis, keepdims=True)) + top
    return np.squeeze(out, axis=axis) if axis is not None else out.item()


def reference_log_prob(
    params, x, *, num_mixtures, num_bits, gradient_smoothing, scale_fn="softplus"
):
    """Float64, straight from the formulas, one mixture and one channel at a time. The
    component scale s is max(softplus(beta v) / beta, e^-7) (softplus, Efficient-VDVAE) or
    exp(max(v, -7)) (exp, VDVAE's ``torch.clamp(log_scales, min=-7.)``)."""
    params = np.asarray(params, np.float64)
    x = np.asarray(x, np.float64)
    channels = x.shape[-1]
    logits, means, scale_logits, coefs = unpack(params, channels, num_mixtures)
    top = 2**num_bits - 1
    h = 1.0 / top
    level = np.rint((x + 1.0) / 2.0 * top)
    beta = gradient_smoothing

    def sigmoid(z):
        return np.exp(-np.logaddexp(0.0, -z))

    log_weights = logits - logsumexp(logits, axis=-1)[..., None]
    per_mixture = []
    with np.errstate(divide="ignore"):
        for m in range(num_mixtures):
            total = log_weights[..., m].copy()
            for c in range(channels):
                mean = means[..., m, c].copy()
                for j in range(c):
                    mean += np.tanh(coefs[..., m, c * (c - 1) // 2 + j]) * x[..., j]
                v = scale_logits[..., m, c]
                if scale_fn == "exp":
                    s = np.exp(np.maximum(v, -7.0))
                else:
                    s = np.maximum(np.logaddexp(0.0, beta * v) / beta, np.exp(-7))
                y = x[..., c] - mean
                cdf_plus = sigmoid((y + h) / s)
                cdf_min = sigmoid((y - h) / s)
                delta = cdf_plus - cdf_min
                z = y / s
                log_pdf_mid = -z - np.log(s) - 2.0 * np.logaddexp(0.0, -z)
                interior = np.where(
                    delta > 1e-5, np.log(np.maximum(delta, 1e-300)), log_pdf_mid + np.log(2 * h)
                )
                # The edge terms in the brief's stable forms: log cdf_plus = y+ - softplus(y+),
                # log(1 - cdf_min) = -softplus(y-) (the plain logs underflow to -inf in float64
                # for the sharpest components far from the edge).
                y_plus, y_min = (y + h) / s, (y - h) / s
                term = np.where(
                    level[..., c] == 0,
                    y_plus - np.logaddexp(0.0, y_plus),
                    np.where(level[..., c] == top, -np.logaddexp(0.0, y_min), interior),
                )
                total = total + term
            per_mixture.append(total)
    per_pixel = logsumexp(np.stack(per_mixture, axis=-1), axis=-1)
    return per_pixel.reshape(per_pixel.shape[0], -1).sum(axis=-1)


def reference_mode(params, *, channels, num_mixtures, num_bits):
    """Temperature-0 sample: argmax component, its means, each channel quantised in turn."""
    params = np.asarray(params, np.float64)
    logits, means, _, coefs = unpack(params, channels, num_mixtures)
    top = 2**num_bits - 1
    choice = np.argmax(logits, axis=-1)[..., None]
    mu = np.take_along_axis(means, choice[..., None], axis=-2)[..., 0, :]
    a = np.tanh(np.take_along_axis(coefs, choice[..., None], axis=-2)[..., 0, :])
    out = np.zeros(mu.shape)
    for c in range(channels):
        mean = mu[..., c] + sum(a[..., c * (c - 1) // 2 + j] * out[..., j] for j in range(c))
        out[..., c] = 2.0 * np.rint((np.clip(mean, -1, 1) + 1.0) / 2.0 * top) / top - 1.0
    return out.astype(np.float32)


# --- layout -----------------------------------------------------------------------------------


def test_num_params_matches_vdvae_layout() -> None:
    assert dmol_num_params(3, 10) == 100  # VDVAE: 10 * num_mixtures
    assert dmol_num_params(1, 7) == 21
    assert dmol_num_params(4, 2) == 2 + 8 + 8 + 12
    with pytest.raises(ValueError, match="needs 30 parameters"):
        dmol_log_prob(
            np.zeros((1, 1, 1, 29), np.float32),
            np.zeros((1, 1, 1, 3), np.float32),
            num_mixtures=3,
            num_bits=8,
            gradient_smoothing=BETA,
        )
    with pytest.raises(ValueError, match="fit no channel count"):
        dmol_sample(
            np.zeros((1, 1, 1, 29), np.float32), num_mixtures=3, num_bits=8, gradient_smoothing=1
        )


# --- 1. normalisation over every grid value ---------------------------------------------------


@pytest.mark.parametrize("scale_fn", ["softplus", "exp"])
@pytest.mark.parametrize("num_bits", [5, 8])
def test_grayscale_sums_to_one_over_all_levels(num_bits: int, scale_fn: str) -> None:
    rng = np.random.default_rng(10 + num_bits)
    for _ in range(5):
        params = pixel_params(rng, channels=1)
        lp = pixel_log_probs(params, grid(num_bits)[:, None], 6, num_bits, scale_fn)
        assert np.exp(lp.astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-4)


def test_rgb_5_bits_sums_to_one_over_all_32768_values() -> None:
    rng = np.random.default_rng(3)
    values = np.stack(np.meshgrid(*[grid(5)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    for _ in range(3):
        lp = pixel_log_probs(pixel_params(rng, channels=3), values, 6, 5)
        assert np.exp(lp.astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-4)


def channel_prefix(params: np.ndarray, channels: int, keep: int, mixtures: int) -> np.ndarray:
    """Parameters of the marginal over the first ``keep`` channels.

    The autoregressive structure makes channels 0..keep-1 a DMoL of their own, whose parameters
    are the corresponding entries of the full layout (the coefficients of (1,0), (2,0), (2,1), ...
    come first precisely so that prefixes are contiguous).
    """
    logits, means, scale_logits, coefs = unpack(params, channels, mixtures)
    k = keep * (keep - 1) // 2
    return pack(logits, means[..., :keep], scale_logits[..., :keep], coefs[..., :k])


def test_rgb_8_bits_chain_of_conditionals_sums_to_one() -> None:
    # The joint sums to one iff sum_r p(r) = 1, sum_g p(r, g) = p(r) and sum_b p(r, g, b) =
    # p(r, g); check the first exhaustively and the others for edge and random values (the full
    # 256**3 enumeration is the slow test below).
    rng = np.random.default_rng(8)
    g8 = grid(8)
    params = pixel_params(rng, channels=3)
    p1, p2 = (channel_prefix(params, 3, keep, 6) for keep in (1, 2))
    lp_r = pixel_log_probs(p1, g8[:, None], 6, 8)
    assert np.exp(lp_r.astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-4)
    for r in [0, 255, 1, 254, *rng.integers(0, 256, 3)]:
        rg = np.stack([np.full(256, g8[r]), g8], axis=-1)
        assert logsumexp(pixel_log_probs(p2, rg, 6, 8)) == pytest.approx(lp_r[r], abs=1e-4)
    for r, g in [(0, 0), (255, 255), (0, 255), (128, 3), *rng.integers(0, 256, (4, 2))]:
        rgb = np.stack([np.full(256, g8[r]), np.full(256, g8[g]), g8], axis=-1)
        lp_rg = pixel_log_probs(p2, np.array([[g8[r], g8[g]]]), 6, 8)[0]
        assert logsumexp(pixel_log_probs(params, rgb, 6, 8)) == pytest.approx(lp_rg, abs=1e-4)


@pytest.mark.slow
def test_rgb_8_bits_sums_to_one_over_all_16_million_values() -> None:
    rng = np.random.default_rng(88)
    g8 = grid(8)
    params = pixel_params(rng, channels=3)
    gb = np.stack(np.meshgrid(g8, g8, indexing="ij"), axis=-1).reshape(-1, 2)
    total = 0.0
    for chunk in np.array_split(np.arange(256), 16):
        values = np.concatenate(
            [np.concatenate([np.full((len(gb), 1), g8[r]), gb], axis=-1) for r in chunk]
        )
        total += np.exp(pixel_log_probs(params, values, 6, 8).astype(np.float64)).sum()
    assert total == pytest.approx(1.0, abs=1e-4)


# --- 2. float64 reference ---------------------------------------------------------------------


@pytest.mark.parametrize("scale_fn", ["softplus", "exp"])
@pytest.mark.parametrize(("channels", "num_bits"), [(1, 5), (1, 8), (3, 5), (3, 8), (4, 3)])
def test_matches_float64_reference(channels: int, num_bits: int, scale_fn: str) -> None:
    rng = np.random.default_rng(100 * channels + num_bits)
    mixtures = 5
    params = random_params(rng, (3, 7, 6), channels, mixtures)
    x = random_images(rng, (3, 7, 6), channels, num_bits)
    kw = dict(num_mixtures=mixtures, num_bits=num_bits, gradient_smoothing=BETA, scale_fn=scale_fn)
    expected = reference_log_prob(params, x, **kw)
    got = log_prob(params, x, mixtures, num_bits, scale_fn)
    assert got.shape == (3,) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Per pixel too (each pixel its own example), where a wrong branch could not hide in a sum.
    flat_p, flat_x = params.reshape(-1, 1, 1, params.shape[-1]), x.reshape(-1, 1, 1, channels)
    expected = reference_log_prob(flat_p, flat_x, **kw)
    np.testing.assert_allclose(
        log_prob(flat_p, flat_x, mixtures, num_bits, scale_fn), expected, 1e-5, 1e-4
    )


def test_gradient_smoothing_is_the_softplus_beta() -> None:
    rng = np.random.default_rng(5)
    params = random_params(rng, (2, 3, 3), 3, 4)
    x = random_images(rng, (2, 3, 3), 3, 8)
    for beta in (0.3, 1.0, 5.0):
        got = dmol_log_prob(params, x, num_mixtures=4, num_bits=8, gradient_smoothing=beta)
        expected = reference_log_prob(
            params, x, num_mixtures=4, num_bits=8, gradient_smoothing=beta
        )
        np.testing.assert_allclose(numpy(got), expected, rtol=1e-5)


def test_edges_are_decided_robustly_to_float_error() -> None:
    rng = np.random.default_rng(6)
    params = random_params(rng, (2, 4, 4), 3, 4)
    x = random_images(rng, (2, 4, 4), 3, 8)
    nudged = x + rng.choice([-1.0, 1.0], x.shape).astype(np.float32) * 3e-7
    # Off-grid by float error, edge pixels must still take the edge branches (a wrong branch
    # would change a pixel's term by O(1) nats).
    np.testing.assert_allclose(log_prob(params, nudged, 4, 8), log_prob(params, x, 4, 8), 1e-4)


# --- 3. sampling ------------------------------------------------------------------------------


def sample(params, mixtures, num_bits, **kwargs) -> np.ndarray:
    out = dmol_sample(
        params, num_mixtures=mixtures, num_bits=num_bits, gradient_smoothing=BETA, **kwargs
    )
    return numpy(out)


@pytest.mark.parametrize(("channels", "num_bits"), [(1, 3), (3, 5), (3, 8)])
def test_samples_lie_on_the_grid(channels: int, num_bits: int) -> None:
    rng = np.random.default_rng(channels + num_bits)
    params = random_params(rng, (2, 5, 4), channels, 4)
    s = sample(params, 4, num_bits, seed=1)
    assert s.shape == (2, 5, 4, channels) and s.dtype == np.float32
    assert s.min() >= -1.0 and s.max() <= 1.0
    levels = numpy(to_levels(s, num_bits))
    np.testing.assert_array_equal(s, grid(num_bits)[levels])  # bit-identical grid values
    assert np.isfinite(log_prob(params, s, 4, num_bits)).all()
    # Seeds matter at temperature 1; a SeedGenerator works as well as an int.
    assert not np.array_equal(s, sample(params, 4, num_bits, seed=2))
    s2 = sample(params, 4, num_bits, seed=keras.random.SeedGenerator(3))
    assert s2.shape == s.shape


@pytest.mark.parametrize("channels", [1, 3])
def test_temperature_zero_is_the_argmax_components_quantised_means(channels: int) -> None:
    rng = np.random.default_rng(20 + channels)
    params = random_params(rng, (3, 6, 5), channels, 5)
    a = sample(params, 5, 5, seed=1, temperature=0.0)
    b = sample(params, 5, 5, seed=99, temperature=0.0)
    np.testing.assert_array_equal(a, b)
    expected = reference_mode(params, channels=channels, num_mixtures=5, num_bits=5)
    np.testing.assert_array_equal(a, expected)
    if channels == 1:  # directly: the argmax component's mean, clipped and rounded
        logits, means, _, _ = unpack(params, 1, 5)
        mu = np.take_along_axis(means[..., 0], np.argmax(logits, -1)[..., None], -1)
        levels = np.rint((np.clip(mu.astype(np.float64), -1, 1) + 1) * 31 / 2)
        np.testing.assert_array_equal(a, grid(5)[levels.astype(int)])


def test_sharp_dominant_component_samples_its_quantised_mean() -> None:
    rng = np.random.default_rng(7)
    num_bits, top, m, c = 5, 31, 3, 3
    lead = (4, 6, 6)
    levels = rng.integers(0, top + 1, lead + (m, c))
    # Within 0.3 half-bins of a level: the clamped scale e^-7 moves a sample < 0.35 half-bins.
    means = grid(num_bits)[levels] + rng.uniform(-0.3, 0.3, levels.shape) / top
    logits = np.full(lead + (m,), -30.0)
    logits[..., 1] = 30.0
    coefs = np.zeros(lead + (m, 3))  # no conditioning: the means are the quantised targets
    params = pack(logits, means, np.full(lead + (m, c), -40.0), coefs)
    expected = grid(num_bits)[np.clip(levels[..., 1, :], 0, top)]
    for seed in (0, 1, 2):
        np.testing.assert_array_equal(sample(params, m, num_bits, seed=seed), expected)


def empirical_vs_model(
    params, channels, mixtures, num_bits, n, seed, temperature=1.0, model=None, scale_fn="softplus"
):
    """Sample frequencies of every grid value, and the probabilities ``model`` gives them."""
    top = 2**num_bits - 1
    values = np.stack(np.meshgrid(*[grid(num_bits)] * channels, indexing="ij"), -1)
    values = values.reshape(-1, channels)
    model = params if model is None else model
    probs = np.exp(pixel_log_probs(model, values, mixtures, num_bits, scale_fn).astype(np.float64))
    tiled = np.broadcast_to(params, (n, 1, 1, params.shape[-1])).copy()
    s = sample(tiled, mixtures, num_bits, seed=seed, temperature=temperature, scale_fn=scale_fn)
    s = s.reshape(n, channels)
    levels = np.rint((s + 1) * top / 2).astype(int)
    index = np.ravel_multi_index(tuple(levels.T), (top + 1,) * channels)
    freqs = np.bincount(index, minlength=(top + 1) ** channels) / n
    return freqs, probs


@pytest.mark.parametrize("scale_fn", ["softplus", "exp"])
@pytest.mark.parametrize(("channels", "num_bits", "n"), [(1, 3, 100_000), (3, 2, 200_000)])
def test_sample_frequencies_match_the_likelihood(
    channels: int, num_bits: int, n: int, scale_fn: str
) -> None:
    # RGB at 2 bits (64 joint values) exercises the autoregressive means on sampled values.
    rng = np.random.default_rng(30 + channels)
    m = 3
    k = channels * (channels - 1) // 2
    params = pack(
        rng.normal(0.0, 1.0, m),
        rng.uniform(-0.8, 0.8, (m, channels)),
        rng.uniform(-3.0, 0.5, (m, channels)),
        rng.normal(0.0, 1.5, (m, k)),
    )
    freqs, probs = empirical_vs_model(params, channels, m, num_bits, n, seed=4, scale_fn=scale_fn)
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.abs(freqs - probs).max() < 0.01
    # Chi-square over cells expecting >= 5 counts, against ~5 sigma above its mean (df).
    keep = probs * n >= 5
    chi2 = (((freqs - probs) * n) ** 2 / (probs * n))[keep].sum()
    df = keep.sum() - 1
    assert chi2 < df + 5 * np.sqrt(2 * df)


def test_temperature_scales_the_logistic_scales() -> None:
    # Sampling at temperature T is sampling the model whose scales are T s: scale logits
    # v' = softplus^-1(beta T s) / beta, with every scale kept above the e^-7 clamp.
    rng = np.random.default_rng(40)
    m, temperature = 3, 0.5
    scale_logits = rng.uniform(-1.5, 1.0, (m, 1))
    scales = np.logaddexp(0.0, BETA * scale_logits) / BETA
    cooled = np.log(np.expm1(BETA * temperature * scales)) / BETA
    logits, means = rng.normal(0.0, 1.0, m), rng.uniform(-0.6, 0.6, (m, 1))
    params = pack(logits, means, scale_logits, np.zeros((m, 0)))
    model = pack(logits, means, cooled, np.zeros((m, 0)))
    freqs, probs = empirical_vs_model(
        params, 1, m, 3, 100_000, seed=5, temperature=0.5, model=model
    )
    assert np.abs(freqs - probs).max() < 0.01
    hotter, _ = empirical_vs_model(params, 1, m, 3, 100_000, seed=5)
    assert np.abs(hotter - probs).max() > 0.03  # and it differs from temperature 1


# --- 4. levels --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_bits", range(1, 9))
def test_levels_round_trip(num_bits: int) -> None:
    top = 2**num_bits - 1
    levels = np.arange(top + 1, dtype=np.int32)
    values = from_levels(levels, num_bits)
    assert numpy(values).dtype == np.float32
    # Exactly the correctly rounded float32 of 2 k / top - 1.
    np.testing.assert_array_equal(numpy(values), grid(num_bits))
    assert numpy(values)[0] == -1.0 and numpy(values)[-1] == 1.0
    back = to_levels(values, num_bits)
    assert numpy(back).dtype == np.int32
    np.testing.assert_array_equal(numpy(back), levels)
    np.testing.assert_array_equal(numpy(to_levels(grid(num_bits), num_bits)), levels)
    np.testing.assert_array_equal(numpy(from_levels(back, num_bits)), numpy(values))
    # A quarter bin off the grid still maps to the nearest level.
    jitter = np.where(levels % 2 == 0, 0.25, -0.25) / top
    np.testing.assert_array_equal(numpy(to_levels(grid(num_bits) + jitter, num_bits)), levels)


# --- 5. mixed precision -----------------------------------------------------------------------


def test_bfloat16_params_give_a_float32_likelihood() -> None:
    rng = np.random.default_rng(50)
    params = random_params(rng, (2, 6, 6), 3, 5)
    x = random_images(rng, (2, 6, 6), 3, 8)
    half = ops.cast(params, "bfloat16")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        got = dmol_log_prob(half, x, num_mixtures=5, num_bits=8, gradient_smoothing=BETA)
    finally:
        keras.config.set_dtype_policy(previous)
    assert keras.backend.standardize_dtype(got.dtype) == "float32"
    rounded = numpy(ops.cast(half, "float32"))
    # Computed in float32 from the bfloat16 values, not in bfloat16 ...
    np.testing.assert_allclose(
        numpy(got),
        reference_log_prob(rounded, x, num_mixtures=5, num_bits=8, gradient_smoothing=BETA),
        rtol=1e-5,
    )
    # ... hence close to the float32-parameter likelihood (only the parameter rounding differs).
    np.testing.assert_allclose(numpy(got), log_prob(params, x, 5, 8), rtol=2e-2)


# --- 6. gradients -----------------------------------------------------------------------------


def value_and_grad(fn, params: np.ndarray):
    """``fn(params)`` and the gradient of its sum, on whichever backend Keras runs."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        p = tf.convert_to_tensor(params)
        with tf.GradientTape() as tape:
            tape.watch(p)
            value = fn(p)
            total = tf.reduce_sum(value)
        return numpy(value), numpy(tape.gradient(total, p))
    if backend == "jax":
        import jax

        def both(q):
            value, vjp = jax.vjp(fn, q)
            return value, vjp(jax.numpy.ones_like(value))[0]

        value, grad = jax.jit(both)(jax.numpy.asarray(params))  # eager would compile per op
        return numpy(value), numpy(grad)
    if backend == "torch":
        import torch

        p = torch.tensor(params, requires_grad=True)
        value = fn(p)
        value.sum().backward()
        return numpy(value.detach()), p.grad.numpy()
    pytest.skip(f"no gradient helper for the {backend} backend")


def extreme_case(channels: int = 3, mixtures: int = 4, num_bits: int = 8):
    """Edge and interior pixels under extreme scales and far-away means."""
    rng = np.random.default_rng(60)
    lead = (6, 4, 4)
    m, c = mixtures, channels
    scale_logits = rng.choice([-1e4, -200.0, -30.0, 0.0, 30.0, 200.0, 1e4], lead + (m, c))
    means = rng.choice([-1.0, 1.0, -5.0, 5.0, 0.0, 300.0, -300.0], lead + (m, c))
    logits = rng.choice([-50.0, 0.0, 50.0], lead + (m,))
    coefs = rng.choice([-30.0, 0.0, 30.0], lead + (m, c * (c - 1) // 2))
    params = pack(logits, means, scale_logits, coefs)
    x = random_images(rng, lead, channels, num_bits)
    x[0] = -1.0
    x[1] = 1.0
    return params, x


@pytest.mark.parametrize("scale_fn", ["softplus", "exp"])
@pytest.mark.parametrize(("channels", "num_bits"), [(3, 8), (1, 1), (1, 5)])
def test_gradients_are_finite_at_edges_and_extreme_scales(
    channels: int, num_bits: int, scale_fn: str
) -> None:
    params, x = extreme_case(channels=channels, num_bits=num_bits)
    kw = dict(num_mixtures=4, num_bits=num_bits, gradient_smoothing=BETA, scale_fn=scale_fn)

    def fn(p):
        return dmol_log_prob(p, x, **kw)

    value, grad = value_and_grad(fn, params)
    assert np.isfinite(value).all()
    assert np.isfinite(grad).all()
    assert np.abs(grad).max() > 0


def test_gradients_match_finite_differences_of_the_reference() -> None:
    # Moderate parameters (no bin near the fallback threshold), so the reference is smooth.
    rng = np.random.default_rng(61)
    m, c, lead = 3, 3, (2, 1, 2)
    params = pack(
        rng.normal(0.0, 1.0, lead + (m,)),
        rng.uniform(-0.8, 0.8, lead + (m, c)),
        rng.uniform(-3.0, 0.5, lead + (m, c)),
        rng.normal(0.0, 1.0, lead + (m, c * (c - 1) // 2)),
    )
    x = random_images(rng, lead, c, 5)
    kw = dict(num_mixtures=m, num_bits=5, gradient_smoothing=BETA)
    _, grad = value_and_grad(lambda p: dmol_log_prob(p, x, **kw), params)
    eps = 1e-5
    numeric = np.zeros(params.shape)
    flat = params.astype(np.float64).reshape(-1)
    for i in range(flat.size):
        up, down = flat.copy(), flat.copy()
        up[i] += eps
        down[i] -= eps
        diff = reference_log_prob(up.reshape(params.shape), x, **kw) - reference_log_prob(
            down.reshape(params.shape), x, **kw
        )
        numeric.reshape(-1)[i] = diff.sum() / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


# --- 7. backend parity ------------------------------------------------------------------------

PARITY_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras
    from hvae_core.model.likelihood import dmol_log_prob, dmol_sample
    from hvae_core.model.pixels import to_levels

    sys.path.insert(0, sys.argv[3])  # this test module's helpers, for the gradients
    from test_likelihood import extreme_case, value_and_grad

    data = np.load(sys.argv[1])
    kw = dict(num_mixtures=int(data["mixtures"]), num_bits=int(data["bits"]),
              gradient_smoothing=float(data["beta"]))
    lp, grad = value_and_grad(lambda p: dmol_log_prob(p, data["x"], **kw), data["params"])
    ex_params, ex_x = extreme_case()
    ex_kw = dict(kw, num_mixtures=4)
    ex_lp, ex_grad = value_and_grad(lambda p: dmol_log_prob(p, ex_x, **ex_kw), ex_params)
    mode = dmol_sample(data["params"], seed=0, temperature=0.0, **kw)
    drawn = dmol_sample(data["params"], seed=0, **kw)
    np.savez(
        sys.argv[2],
        backend=keras.backend.backend(),
        log_prob=lp,
        grad=grad,
        extreme_finite=np.isfinite(ex_lp).all() and np.isfinite(ex_grad).all(),
        mode=keras.ops.convert_to_numpy(mode),
        drawn=keras.ops.convert_to_numpy(drawn),
        levels=keras.ops.convert_to_numpy(to_levels(data["x"], int(data["bits"]))),
    )
    """
)


@pytest.fixture(scope="module")
def parity_case(tmp_path_factory) -> dict:
    rng = np.random.default_rng(70)
    case = dict(
        params=random_params(rng, (3, 8, 8), 3, 5),
        x=random_images(rng, (3, 8, 8), 3, 8),
        mixtures=5,
        bits=8,
        beta=BETA,
    )
    path = tmp_path_factory.mktemp("parity") / "case.npz"
    np.savez(path, **case)
    return dict(case, path=path)


@pytest.fixture(scope="module", autouse=True)
def other_backends(request, parity_case) -> dict:
    """Start every other importable backend at once, as the module starts.

    Each needs its own process, and most of their time is importing Keras and the backend, so
    they run while the module's other tests do. Not started if no parity test was selected.
    """
    runs = {}
    selected = any(item.originalname == "test_backends_agree" for item in request.session.items)
    current = keras.backend.backend()
    for name in BACKENDS if selected else ():
        if name == current or importlib.util.find_spec(name) is None:
            continue
        out = parity_case["path"].with_name(f"{name}.npz")
        env = dict(os.environ, KERAS_BACKEND=name, TF_CPP_MIN_LOG_LEVEL="3")
        args = [str(parity_case["path"]), str(out), str(Path(__file__).parent)]
        cmd = [sys.executable, "-c", PARITY_SCRIPT, *args]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        runs[name] = (proc, out)
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:  # its test did not run (or failed before reading it)
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree(backend: str, parity_case: dict, other_backends: dict) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    kw = dict(num_mixtures=5, num_bits=8, gradient_smoothing=BETA)
    params, x = parity_case["params"], parity_case["x"]
    lp, grad = value_and_grad(lambda p: dmol_log_prob(p, x, **kw), params)
    here = dict(
        log_prob=lp,
        grad=grad,
        mode=numpy(dmol_sample(params, seed=0, temperature=0.0, **kw)),
        levels=numpy(to_levels(x, 8)),
    )
    if backend == keras.backend.backend():
        got = here
    else:
        proc, out = other_backends[backend]
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log
        got = dict(np.load(out))
        assert str(got["backend"]) == backend
        drawn = got["drawn"]  # random streams differ by backend; the grid and range do not
        assert drawn.shape == x.shape and drawn.dtype == np.float32
        np.testing.assert_array_equal(drawn, grid(8)[np.rint((drawn + 1) * 127.5).astype(int)])
        assert got["extreme_finite"]  # the gradient check of test 6, on this backend
    expected = reference_log_prob(params, x, **kw)
    assert got["log_prob"].dtype == np.float32
    np.testing.assert_allclose(got["log_prob"], expected, rtol=1e-5)
    np.testing.assert_allclose(got["log_prob"], here["log_prob"], rtol=1e-5)
    # Sharp components (1/s up to e^7) amplify float32 rounding in the gradient a little.
    np.testing.assert_allclose(got["grad"], here["grad"], rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(got["mode"], here["mode"])
    np.testing.assert_array_equal(got["levels"], here["levels"])
    assert got["levels"].dtype == np.int32
