"""Output heads: the likelihood parameters from the top-down pass."""

from __future__ import annotations

import math
from typing import Any

import keras

from hvae_core.model.blocks import torch_default_init
from hvae_core.model.layout import Scale
from hvae_core.model.resample import NearestUpsampling


class DecoderHead(keras.layers.Layer):
    """VDVAE's head: the final top-down state, through a per-channel affine map (gain, bias)
    and a 1x1 convolution, gives the likelihood parameters."""

    def __init__(self, width: int, num_params: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.width = width
        self.out_conv = keras.layers.Conv2D(
            num_params,
            1,
            kernel_initializer=torch_default_init(),
            dtype=self.dtype_policy,
            name="out_conv",
        )

    def build(self, input_shape: Any = None) -> None:
        self.gain = self.add_weight(shape=(self.width,), initializer="ones", name="gain")
        self.bias = self.add_weight(shape=(self.width,), initializer="zeros", name="bias")

    def call(self, state: Any, zs: list[Any]) -> Any:
        return self.out_conv(state * self.gain + self.bias)


class LatentAggregationHead(keras.layers.Layer):
    """DVP-VAE's latent aggregation: every block's z is projected, upsampled to the image size
    and summed; residual output blocks on the sum give the likelihood parameters."""

    def __init__(
        self,
        model: Any,
        block_scales: list[Scale],
        image_size: int,
        num_params: int,
        make_block: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        policy = self.dtype_policy
        width = model.z_out_width
        self.projections = [
            keras.layers.Conv2D(
                width, 1, kernel_initializer=torch_default_init(), dtype=policy, name=f"proj_{i}"
            )
            for i in range(len(block_scales))
        ]
        self.upsamples = [
            NearestUpsampling(image_size // s.resolution, dtype=policy)
            if s.resolution < image_size
            else None
            for s in block_scales
        ]
        depth_scale = math.sqrt(1.0 / max(1, model.output_blocks))
        kernel = 1 if image_size <= 2 else 3
        self.out_blocks = [
            make_block(
                in_width=width,
                middle_width=model.z_out_middle_width,
                out_width=width,
                kernel_size=kernel,
                residual=True,
                last_scale=depth_scale,
                name=f"out_block_{i}",
            )
            for i in range(model.output_blocks)
        ]
        self.activation = keras.activations.get(model.b_act)
        self.out_conv = keras.layers.Conv2D(
            num_params, 1, kernel_initializer=torch_default_init(), dtype=policy, name="out_conv"
        )

    def call(self, state: Any, zs: list[Any]) -> Any:
        total = None
        for z, project, upsample in zip(zs, self.projections, self.upsamples, strict=True):
            h = project(z)
            h = upsample(h) if upsample is not None else h
            total = h if total is None else total + h
        for block in self.out_blocks:
            total = block(total)
        return self.out_conv(self.activation(total))
