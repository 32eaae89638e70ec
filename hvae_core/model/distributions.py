"""Diagonal Gaussians of the latent hierarchy, always evaluated in float32."""

from __future__ import annotations

import math
from typing import Any

from keras import ops

LOG_2PI = math.log(2.0 * math.pi)
MIN_SCALE = 1e-5  # keeps log(scale) and 1/scale finite when a softplus underflows


def softplus_beta(x: Any, beta: float) -> Any:
    """softplus(beta * x) / beta: a scale that is smooth in x (EfficientVDVAE's gradient
    smoothing); beta = ln 2 gives softplus_beta(0) = 1, so zero-initialised outputs start at a
    unit Gaussian."""
    return ops.softplus(beta * x) / beta


def gaussian_params(raw_mean: Any, raw_scale: Any, beta: float) -> tuple[Any, Any]:
    """Mean and scale (float32) from a layer's two raw outputs."""
    mean = ops.cast(raw_mean, "float32")
    scale = softplus_beta(ops.cast(raw_scale, "float32"), beta) + MIN_SCALE
    return mean, scale


def gaussian_kl(mean_q: Any, scale_q: Any, mean_p: Any, scale_p: Any) -> Any:
    """Elementwise KL(N(mean_q, scale_q^2) || N(mean_p, scale_p^2)) in nats."""
    ratio = ops.square(scale_q / scale_p)
    diff = ops.square((mean_q - mean_p) / scale_p)
    return 0.5 * (ratio + diff - 1.0) - 0.5 * ops.log(ratio)


def gaussian_log_prob(z: Any, mean: Any, scale: Any) -> Any:
    """Elementwise log N(z; mean, scale^2) in nats."""
    return -0.5 * (ops.square((z - mean) / scale) + LOG_2PI) - ops.log(scale)


def sum_per_example(x: Any) -> Any:
    """Sum over every axis but the batch axis."""
    return ops.sum(ops.reshape(x, (ops.shape(x)[0], -1)), axis=1)
