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


def gaussian_params(
    raw_mean: Any, raw_scale: Any, beta: float, scale_fn: str = "softplus"
) -> tuple[Any, Any, Any]:
    """Mean, scale and log-scale (float32) from a layer's two raw outputs.

    ``softplus``: scale = softplus_beta(raw, beta) + MIN_SCALE (Efficient-VDVAE). ``exp``:
    scale = exp(raw) and log-scale = raw (VDVAE); the KL takes the log-scale as it is, since
    exp(raw) under- or overflows in float32 long before raw does.
    """
    mean = ops.cast(raw_mean, "float32")
    raw = ops.cast(raw_scale, "float32")
    if scale_fn == "exp":
        return mean, ops.exp(raw), raw
    if scale_fn != "softplus":
        raise ValueError(f"unknown scale_fn {scale_fn!r}")
    scale = softplus_beta(raw, beta) + MIN_SCALE
    return mean, scale, ops.log(scale)


def gaussian_kl(
    mean_q: Any,
    scale_q: Any,
    mean_p: Any,
    scale_p: Any,
    log_scale_q: Any = None,
    log_scale_p: Any = None,
) -> Any:
    """Elementwise KL(N(mean_q, scale_q^2) || N(mean_p, scale_p^2)) in nats.

    Computed from the log-scales (``log(scale)`` where not given), so that it stays finite
    wherever they are, even when a scale itself underflows.
    """
    log_q = ops.log(scale_q) if log_scale_q is None else log_scale_q
    log_p = ops.log(scale_p) if log_scale_p is None else log_scale_p
    log_ratio = log_q - log_p
    diff = (mean_q - mean_p) * ops.exp(-log_p)
    return 0.5 * (ops.exp(2.0 * log_ratio) + ops.square(diff) - 1.0) - log_ratio


def gaussian_log_prob(z: Any, mean: Any, scale: Any, log_scale: Any = None) -> Any:
    """Elementwise log N(z; mean, scale^2) in nats (``log_scale``: log(scale), if known)."""
    log_scale = ops.log(scale) if log_scale is None else log_scale
    return -0.5 * (ops.square((z - mean) * ops.exp(-log_scale)) + LOG_2PI) - log_scale


def sum_per_example(x: Any) -> Any:
    """Sum over every axis but the batch axis."""
    return ops.sum(ops.reshape(x, (ops.shape(x)[0], -1)), axis=1)
