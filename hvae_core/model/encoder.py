"""The bottom-up encoder: residual blocks per scale, pooling between scales."""

from __future__ import annotations

import math
from typing import Any

import keras

from hvae_core.model.blocks import torch_default_init
from hvae_core.model.layout import Scale
from hvae_core.model.resample import Resample


class Encoder(keras.layers.Layer):
    """x (B, S, S, C) -> the activation kept at every scale, {resolution: (B, R, R, width)}."""

    def __init__(self, model: Any, layout: list[Scale], make_block: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        policy = self.dtype_policy
        self.layout = layout
        self.pool_block = model.pool_block
        self.in_conv = keras.layers.Conv2D(
            layout[0].width,
            3,
            padding="same",
            kernel_initializer=torch_default_init(),
            dtype=policy,
            name="in_conv",
        )
        last_scale = math.sqrt(1.0 / max(1, sum(s.enc_blocks for s in layout)))
        self.stages: list[list[Any]] = []
        self.pools: list[Any] = []
        for scale, below in zip(layout, [*layout[1:], None], strict=True):
            self.stages.append(
                [
                    make_block(
                        in_width=scale.width,
                        middle_width=scale.enc_middle_width,
                        out_width=scale.width,
                        kernel_size=scale.kernel_size,
                        residual=True,
                        last_scale=last_scale,
                        name=f"enc_{scale.resolution}_{i}",
                    )
                    for i in range(scale.enc_blocks)
                ]
            )
            if below is not None:
                width = below.width if below.width != scale.width else None
                self.pools.append(
                    Resample(
                        "down", width, model.p_act, dtype=policy, name=f"pool_{scale.resolution}"
                    )
                )

    def call(self, x: Any) -> dict[int, Any]:
        h = self.in_conv(x)
        activations: dict[int, Any] = {}
        for i, (scale, blocks) in enumerate(zip(self.layout, self.stages, strict=True)):
            pools_after = i < len(self.pools)
            # VDVAE: a scale's last block pools, and the activation is kept before it.
            split = len(blocks) - 1 if self.pool_block and pools_after and blocks else len(blocks)
            for block in blocks[:split]:
                h = block(h)
            activations[scale.resolution] = h
            for block in blocks[split:]:
                h = block(h)
            if pools_after:
                h = self.pools[i](h)
        return activations
