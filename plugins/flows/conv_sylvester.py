"""The ``conv-sylvester`` flow: generalized Sylvester flows with the convolution exponential
(Hoogeboom, Garcia Satorras, Tomczak & Welling 2020), conditioned on the posterior's context.

One Sylvester layer is z' = z + W^-1 f(W z) with W = exp(M) (:mod:`.conv_exponential`) and f
autoregressive in W z. Its Jacobian is I + W^-1 J_f W, so det = det(I + J_f): J_f is
triangular and log|det| = sum log(1 + diag J_f), with no term for W. That identity needs W^-1
to be the inverse of the W actually computed; the norm-bounded kernel and the series length of
:class:`ConvExponential` make it so to float precision.

f(u) = s2 * tanh(s1 * u + t1) + t2 with (t1, s1, t2, s2) from a masked network of u at
earlier (position, channel) and of the context; diag J_f = s2 * (1 - tanh^2(.)) * s1 with
|s1| < 1 and |s2| < 1/2, so 1 + diag > 1/2: every layer is invertible.

A flow is stages of ActNorm -> Sylvester (-> flip between steps), with a squeeze-and-split
between stages: the latent is squeezed (2x2 patches to channels, the context with it) and half
its channels are set aside unchanged. At the end the halves are merged and unsqueezed again, so
z_K has z_0's shape, and orientation is restored at every stage end, so that a flow whose
Sylvester layers are zero is exactly the identity.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import ops

from .conv_exponential import ConvExponential
from .layers import (
    ActNorm,
    flip,
    flip_spatial,
    merge,
    split,
    squeeze,
    unsqueeze,
)
from .masked import MaskedConv2D, channel_degrees
from .options import flows_at

SPLIT = "split"


class AutoregressiveNetwork(keras.layers.Layer):
    """(u, context) -> (f(u), diag of df/du), f autoregressive in u as described above."""

    def __init__(
        self,
        channels: int,
        hidden: int,
        context_width: int,
        spectral_norm: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.channels = channels
        z_degrees = np.arange(channels)
        hidden_degrees = channel_degrees(hidden, channels)
        common = {"spectral_norm": spectral_norm, "dtype": self.dtype_policy}
        self.first = MaskedConv2D(hidden, 3, z_degrees, hidden_degrees, name="first", **common)
        self.middle = MaskedConv2D(
            hidden, 1, hidden_degrees, hidden_degrees, name="middle", **common
        )
        self.context_conv = (
            keras.layers.Conv2D(hidden, 3, padding="same", dtype=self.dtype_policy, name="context")
            if context_width > 0
            else None
        )
        # t1, s1 and t2 start at zero and s2 does not: f starts at zero (the layer is the
        # identity) yet every part has a gradient (s2 = 0 instead would stall s1 and t1).
        self.shift_scale = MaskedConv2D(
            3 * channels,
            3,
            hidden_degrees,
            np.tile(z_degrees, 3),
            strict=True,
            kernel_initializer="zeros",
            name="t1_s1_t2",
            **common,
        )
        self.out_scale = MaskedConv2D(
            channels,
            3,
            hidden_degrees,
            z_degrees,
            strict=True,
            kernel_initializer=keras.initializers.VarianceScaling(0.1),
            name="s2",
            **common,
        )

    def build(self, u_shape: Any, context_shape: Any) -> None:
        hidden_shape = (*u_shape[:-1], self.first.filters)
        self.first.build(u_shape)
        self.middle.build(hidden_shape)
        if self.context_conv is not None:
            self.context_conv.build(context_shape)
        self.shift_scale.build(hidden_shape)
        self.out_scale.build(hidden_shape)

    def call(self, u: Any, context: Any, training: bool = False) -> tuple[Any, Any]:
        h = self.first(u, training=training)
        if self.context_conv is not None:
            h = h + self.context_conv(context)
        h = ops.relu(h)
        h = ops.relu(self.middle(h, training=training))
        c = self.channels
        out = self.shift_scale(h, training=training)
        t1, s1, t2 = out[..., :c], ops.tanh(out[..., c : 2 * c]), out[..., 2 * c :]
        s2 = 0.5 * ops.tanh(self.out_scale(h, training=training))
        inner = ops.tanh(s1 * u + t1)
        return s2 * inner + t2, s2 * (1.0 - ops.square(inner)) * s1


class GeneralizedSylvester(keras.layers.Layer):
    """z -> z + exp(-M) f(exp(M) z); log|det| = sum log(1 + diag df/du)."""

    def __init__(
        self,
        channels: int,
        hidden: int,
        context_width: int,
        spectral_norm: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.mix = ConvExponential(dtype=self.dtype_policy, name="conv_exp")
        self.net = AutoregressiveNetwork(
            channels, hidden, context_width, spectral_norm, dtype=self.dtype_policy, name="ar"
        )

    def build(self, z_shape: Any, context_shape: Any) -> None:
        self.mix.build(z_shape)
        self.net.build(z_shape, context_shape)

    def call(self, z: Any, context: Any, training: bool = False) -> tuple[Any, Any]:
        u, _ = self.mix(z)
        f, diag = self.net(u, context, training=training)
        z_new = z + self.mix.inverse(f)
        log_det = ops.sum(ops.reshape(ops.log1p(diag), (ops.shape(z)[0], -1)), axis=1)
        return z_new, log_det


def plan(resolution: int, stage_limit: int, split_first: bool, steps_per_stage: int) -> list:
    """The sequence of one flow: ``steps_per_stage`` for each stage, ``SPLIT`` between stages
    (or also before the first with ``split_first``), at most ``stage_limit`` splits and no more
    than the resolution allows (each halves it)."""
    splits = min(stage_limit, int(math.log2(resolution)))
    stage = [steps_per_stage]
    if split_first and splits > 0:
        return [SPLIT, *stage] + [SPLIT, *stage] * (splits - 1)
    return stage + [SPLIT, *stage] * splits


class ConvSylvesterFlow(keras.layers.Layer):
    """Satisfies ``hvae_core.interfaces.PosteriorFlow`` for one top-down block."""

    def __init__(
        self,
        *,
        z_width: int,
        resolution: int,
        context_width: int,
        num_flows: int = 1,
        hidden: int = 32,
        steps_per_stage: int = 1,
        split_first: bool = False,
        stage_limit: int = 2,
        spectral_norm: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.context_width = context_width
        self.resolution = resolution
        self.sequence = plan(resolution, stage_limit, split_first, steps_per_stage)
        # One list of (ActNorm, GeneralizedSylvester) per stage, per chained flow.
        self.flows: list[list[list[tuple[ActNorm, GeneralizedSylvester]]]] = []
        self.shapes: list[list[tuple[int, int, int]]] = []
        for n in range(num_flows):
            stages, shapes = [], []
            size, channels, ctx = resolution, z_width, context_width
            for item in self.sequence:
                if item == SPLIT:
                    size, channels, ctx = size // 2, 2 * channels, 4 * ctx
                    continue
                steps = []
                for k in range(item):
                    prefix = f"f{n}_s{len(stages)}_k{k}"
                    steps.append(
                        (
                            ActNorm(dtype=self.dtype_policy, name=f"{prefix}_actnorm"),
                            GeneralizedSylvester(
                                channels,
                                hidden,
                                ctx,
                                spectral_norm,
                                dtype=self.dtype_policy,
                                name=f"{prefix}_sylvester",
                            ),
                        )
                    )
                stages.append(steps)
                shapes.append((size, channels, ctx))
            self.flows.append(stages)
            self.shapes.append(shapes)

    def build(self, z0_shape: Any, context_shape: Any) -> None:
        batch = z0_shape[0]
        for stages, shapes in zip(self.flows, self.shapes, strict=True):
            for steps, (size, channels, ctx) in zip(stages, shapes, strict=True):
                z_shape = (batch, size, size, channels)
                for actnorm, sylvester in steps:
                    actnorm.build(z_shape)
                    sylvester.build(z_shape, (batch, size, size, ctx))

    def call(self, z0: Any, context: Any, training: bool = False) -> tuple[Any, Any]:
        z = ops.cast(z0, self.compute_dtype)
        log_det = ops.zeros((ops.shape(z)[0],), dtype=self.compute_dtype)
        for stages in self.flows:
            ctx = ops.cast(context, self.compute_dtype)
            aside: list[Any] = []
            stage_iter = iter(stages)
            for item in self.sequence:
                if item == SPLIT:
                    z, ctx = squeeze(z), squeeze(ctx)
                    z, rest = split(z)
                    aside.append(rest)
                    continue
                steps = next(stage_iter)
                for k, (actnorm, sylvester) in enumerate(steps):
                    z, ld_norm = actnorm(z)
                    z, ld_sylv = sylvester(z, ctx, training=training)
                    log_det = log_det + ld_norm + ld_sylv
                    # Flip between steps; an even number per stage leaves its orientation
                    # (and so the split and the final z_K) where it started.
                    if k < len(steps) - 1 or (len(steps) - 1) % 2 == 1:
                        z, ctx = flip(z), flip_spatial(ctx)
            for rest in reversed(aside):
                z = unsqueeze(merge(z, rest))
        return z, log_det


def make_conv_sylvester_flow(
    options: Any,
    model: Any,
    *,
    scale: int,
    resolution: int,
    z_width: int,
    name: str,
) -> ConvSylvesterFlow | None:
    """The flow of one top-down block at ``scale`` (None where the options turn it off)."""
    num_flows = flows_at(options, scale, resolution)
    if num_flows == 0:
        return None
    return ConvSylvesterFlow(
        z_width=z_width,
        resolution=resolution,
        context_width=options.flow_in_ch[scale],
        num_flows=num_flows,
        hidden=options.convsylv_channels[scale],
        steps_per_stage=options.convsylv_flows_per_stage[scale],
        split_first=options.convsylv_splitfirst[scale],
        stage_limit=options.convsylv_stage_limit[scale],
        spectral_norm=options.spectral_norm,
        # The log-det is part of the KL, which stays in full precision under mixed policies.
        dtype=keras.config.floatx(),
        name=name,
    )
