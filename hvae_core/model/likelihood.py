"""Discretized mixture of logistics (DMoL), the image likelihood of PixelCNN++ and VDVAE.

Pure functions on ``keras.ops`` so that one implementation serves the TensorFlow, JAX and torch
backends. Generalised from PixelCNN++'s RGB / 8-bit form to any number of channels ``C`` and any
bit depth. Parameters along the last axis, in this order::

    logits (M) | means (M*C) | scale logits (M*C) | coefficients (M*C*(C-1)/2)

means and scale logits laid out as ``[M, C]`` row-major, coefficients as ``[M, C*(C-1)/2]`` with,
for channel ``c``, the coefficients of channels ``0..c-1`` (pairs (1,0), (2,0), (2,1), ...).
The tensors are sliced with strides rather than reshaped, so ``dmol_log_prob`` also traces with
unknown batch and spatial sizes (symbolic Keras inputs, ``tf.function``, ``jax.jit``).
``dmol_sample`` takes its uniforms as an argument (:func:`dmol_noise_shape`), so a compiled or
exported sampler holds no random op; without them it draws with ``keras.random``, which needs
real tensors (eager, ``tf.function`` or ``jax.jit`` with a seed passed in).
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from hvae_core.model.pixels import from_levels, to_levels, top_level

# Smallest component scale (PixelCNN++ clamps log s at -7).
MIN_LOG_SCALE = -7.0
# Below this bin probability PixelCNN++ replaces the CDF difference by the density at the centre.
MIN_BIN_PROB = 1e-5
# Bounds of the uniform draws behind the Gumbel and logistic noise (as in VDVAE): keeps the
# noise finite.
_UNIFORM_EPS = 1e-5


def dmol_num_params(channels: int, num_mixtures: int) -> int:
    """Width of the parameter tensor: what the decoder's output layer must produce.

    RGB gives ``10 * M``, VDVAE's layout size; grayscale gives ``3 * M``.
    """
    c, m = channels, num_mixtures
    return m + 2 * m * c + m * c * (c - 1) // 2


def _quantise(x: Any, num_bits: int) -> Any:
    """Nearest grid value: what ``log_prob`` scores, so conditioning and output agree exactly."""
    return from_levels(to_levels(x, num_bits), num_bits)


class _Layout:
    """Strided views of the parameter tensor, each shaped ``(..., M)``."""

    def __init__(self, params: Any, channels: int, num_mixtures: int) -> None:
        expected = dmol_num_params(channels, num_mixtures)
        width = params.shape[-1]
        if width is not None and width != expected:
            raise ValueError(
                f"DMoL with {channels} channels and {num_mixtures} mixtures needs {expected} "
                f"parameters per pixel, got {width}"
            )
        self.params = ops.cast(params, "float32")  # float32 maths under mixed precision
        self.c, self.m = channels, num_mixtures
        self.k = channels * (channels - 1) // 2

    def logits(self) -> Any:
        return self.params[..., : self.m]

    def _per_channel(self, block: int, channel: int) -> Any:
        start = self.m + block * self.m * self.c
        return self.params[..., start + channel : start + self.m * self.c : self.c]

    def mean(self, channel: int) -> Any:
        return self._per_channel(0, channel)

    def scale_logit(self, channel: int) -> Any:
        return self._per_channel(1, channel)

    def coef(self, channel: int, cond: int) -> Any:
        """tanh of the weight of (already known) channel ``cond`` in channel ``channel``'s mean."""
        start = self.m + 2 * self.m * self.c
        index = channel * (channel - 1) // 2 + cond
        return ops.tanh(self.params[..., start + index : start + self.m * self.k : self.k])


def _log_scale(scale_logit: Any, gradient_smoothing: float, scale_fn: str = "softplus") -> Any:
    """log s of a component.

    ``softplus``: s = max(softplus(beta v) / beta, e^-7); clamping s (not log s) keeps the
    gradient finite where softplus underflows to 0. ``exp`` (VDVAE): log s = max(v, -7).
    """
    if scale_fn == "exp":
        return ops.maximum(scale_logit, MIN_LOG_SCALE)
    if scale_fn != "softplus":
        raise ValueError(f"unknown scale_fn {scale_fn!r}")
    beta = float(gradient_smoothing)
    if beta <= 0:
        raise ValueError(f"gradient_smoothing must be positive, got {gradient_smoothing}")
    scale = ops.softplus(beta * scale_logit) / beta
    return ops.log(ops.maximum(scale, math.exp(MIN_LOG_SCALE)))


def _discretized_logistic_log_prob(x: Any, mean: Any, log_scale: Any, num_bits: int) -> Any:
    """log P(bin of x) under one logistic, with PixelCNN++'s edge bins and small-bin fallback.

    Every branch is finite (with a finite gradient) wherever it is evaluated, so ``where`` never
    lets a NaN or inf from an unused branch reach the gradient.
    """
    half = 1.0 / top_level(num_bits)
    inv_scale = ops.exp(-log_scale)
    centred = x - mean
    plus_in = (centred + half) * inv_scale
    min_in = (centred - half) * inv_scale
    # Lowest bin: log sigmoid(plus_in); highest bin: log(1 - sigmoid(min_in)).
    log_cdf_plus = ops.log_sigmoid(plus_in)
    log_one_minus_cdf_min = ops.log_sigmoid(-min_in)
    # sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - e^(b - a)): exact, and free of the
    # cancellation of the plain difference when both CDFs are near 0 or near 1.
    width = 2.0 * half * inv_scale  # a - b
    log_delta = (
        log_cdf_plus
        + log_one_minus_cdf_min
        + ops.log(ops.maximum(-ops.expm1(-width), 1e-30))  # below 1e-30 the fallback is used
    )
    mid_in = centred * inv_scale
    log_pdf_mid = mid_in - log_scale - 2.0 * ops.softplus(mid_in)
    interior = ops.where(
        log_delta > math.log(MIN_BIN_PROB), log_delta, log_pdf_mid + math.log(2.0 * half)
    )
    # Edges decided halfway to the neighbouring level: robust to float error in x.
    lowest = x < -1.0 + half
    highest = x > 1.0 - half
    return ops.where(lowest, log_cdf_plus, ops.where(highest, log_one_minus_cdf_min, interior))


def _channels_from_width(width: int | None, num_mixtures: int) -> int:
    """The channel count whose layout has ``width`` parameters (sampling is given no ``x``)."""
    if width is not None:
        channels = 1
        while dmol_num_params(channels, num_mixtures) < width:
            channels += 1
        if dmol_num_params(channels, num_mixtures) == width:
            return channels
    raise ValueError(
        f"{width} parameters per pixel fit no channel count with {num_mixtures} mixtures"
    )


def dmol_noise_shape(pixel_shape: tuple[Any, ...], num_mixtures: int) -> tuple[Any, ...]:
    """The uniforms one :func:`dmol_sample` call uses for images of ``pixel_shape`` (B, H, W,
    C): (B, H, W, M + C), per pixel first the M that choose the component (Gumbel-max), then
    one per channel for its logistic noise."""
    *lead, channels = pixel_shape
    return (*lead, num_mixtures + channels)


def dmol_log_prob(
    params: Any,
    x: Any,
    *,
    num_mixtures: int,
    num_bits: int,
    gradient_smoothing: float,
    scale_fn: str = "softplus",
) -> Any:
    """Log-likelihood in nats per example, shape ``(B,)``, float32.

    ``params`` is ``(B, H, W, P)`` of any float dtype (computed in float32, so mixed bfloat16
    training keeps a float32 likelihood); ``x`` is ``(B, H, W, C)`` on the ``2**num_bits`` grid
    of [-1, 1]. ``scale_fn`` turns the scale logits into log-scales (see ``_log_scale``).
    """
    x = ops.cast(x, "float32")
    channels = x.shape[-1]
    if channels is None:
        raise ValueError("the channel axis of x must have a known size")
    layout = _Layout(params, channels, num_mixtures)
    log_prob = ops.log_softmax(layout.logits(), axis=-1)  # (..., M)
    for c in range(channels):
        mean = layout.mean(c)
        for j in range(c):
            mean = mean + layout.coef(c, j) * x[..., j : j + 1]
        log_scale = _log_scale(layout.scale_logit(c), gradient_smoothing, scale_fn)
        log_prob = log_prob + _discretized_logistic_log_prob(
            x[..., c : c + 1], mean, log_scale, num_bits
        )
    per_pixel = ops.logsumexp(log_prob, axis=-1)
    return ops.sum(per_pixel, axis=tuple(range(1, len(per_pixel.shape))))


def _first_max(logits: Any) -> Any:
    """One-hot of the first largest entry on the last axis (argmax's choice), by comparisons:
    TensorFlow's float argmax tests the sign bit with a bitcast, which ONNX cannot express."""
    top = ops.cast(ops.equal(logits, ops.max(logits, axis=-1, keepdims=True)), "float32")
    return top * ops.cast(ops.equal(ops.cumsum(top, axis=-1), 1.0), "float32")


def dmol_sample(
    params: Any,
    *,
    num_mixtures: int,
    num_bits: int,
    gradient_smoothing: float,
    scale_fn: str = "softplus",
    seed: Any = None,
    temperature: float = 1.0,
    noise: Any = None,
) -> Any:
    """Samples ``(B, H, W, C)`` float32 on the ``2**num_bits`` grid of [-1, 1].

    The component is drawn per pixel by Gumbel-max (argmax of the logits at temperature 0);
    ``temperature`` scales the logistic scales only, so 0 gives the chosen component's means.
    Each channel is quantised before later channels condition on it, so a sample is exactly a
    value ``dmol_log_prob`` scores. ``noise``: the uniforms in [0, 1], shaped as
    :func:`dmol_noise_shape` says (clipped to [1e-5, 1 - 1e-5], as VDVAE bounds its draws, so
    the Gumbel and logistic noise stay finite); without it they are drawn with ``seed``
    (anything ``keras.random`` accepts; one draw per call, so an int seed gives independent
    Gumbel and logistic noise).
    """
    m = num_mixtures
    channels = _channels_from_width(params.shape[-1], m)
    layout = _Layout(params, channels, m)
    logits = layout.logits()
    temperature = float(temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be non-negative, got {temperature}")
    if temperature > 0:
        if noise is None:
            shape = tuple(ops.shape(logits)[:-1]) + (m + channels,)
            noise = keras.random.uniform(shape, seed=seed)
        noise = ops.clip(ops.cast(noise, "float32"), _UNIFORM_EPS, 1.0 - _UNIFORM_EPS)
        logits = logits - ops.log(-ops.log(noise[..., :m]))  # Gumbel-max
    choice = _first_max(logits)

    def select(per_component: Any) -> Any:
        return ops.sum(per_component * choice, axis=-1)

    sampled = []
    for c in range(channels):
        mean = select(layout.mean(c))
        for j in range(c):
            mean = mean + select(layout.coef(c, j)) * sampled[j]
        value = mean
        if temperature > 0:
            log_scale = select(_log_scale(layout.scale_logit(c), gradient_smoothing, scale_fn))
            u = noise[..., m + c]
            logistic = ops.log(u) - ops.log(1.0 - u)  # ONNX has no log1p; u <= 1 - 1e-5
            value = value + ops.exp(log_scale) * temperature * logistic
        sampled.append(_quantise(ops.clip(value, -1.0, 1.0), num_bits))
    return ops.stack(sampled, axis=-1)
