"""The bottom-up encoder: residual blocks per scale, pooling between scales."""

from __future__ import annotations

import math
from typing import Any

import keras

from hvae_core.model.blocks import torch_default_init
from hvae_core.model.layout import Scale
from hvae_core.model.repeat import RepeatedLayers, Untracked
from hvae_core.model.resample import Resample


class Encoder(keras.layers.Layer):
    """x (B, S, S, C) -> the activation kept at every scale, {resolution: (B, R, R, width)}.

    With ``stack_blocks`` the blocks of a scale up to the kept activation run as one
    :class:`RepeatedLayers`; ``stages`` still lists every block (for their structure).
    """

    def __init__(
        self,
        model: Any,
        layout: list[Scale],
        make_block: Any,
        stack_blocks: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        policy = self.dtype_policy
        self.layout = layout
        self.pool_block = model.pool_block
        # VDVAE's per-dataset normalisation of what the encoder sees (identity by default).
        self.input_shift, self.input_scale = model.input_shift, model.input_scale
        self.in_conv = keras.layers.Conv2D(
            layout[0].width,
            3,
            padding="same",
            kernel_initializer=torch_default_init(),
            dtype=policy,
            name="in_conv",
        )
        last_scale = math.sqrt(1.0 / max(1, sum(s.enc_blocks for s in layout)))
        # Tracked scale by scale, in the order the weights always had (a checkpoint lists them
        # in that order): a scale's layers, then its pooling.
        self.stage_list: list[list[Any]] = []
        self.pools: list[Any] = []
        stages: list[list[Any]] = []
        # Per scale: the layers before the kept activation (a run of two or more identical
        # blocks, or single blocks) and after it (VDVAE: a scale's last block pools, and the
        # activation is kept before it).
        before: list[list[Any]] = []
        after: list[list[Any]] = []
        for scale, below in zip(layout, [*layout[1:], None], strict=True):
            blocks = [
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
            split = (
                len(blocks) - 1 if self.pool_block and below is not None and blocks else len(blocks)
            )
            if stack_blocks and split > 1:
                run = RepeatedLayers(blocks[:split], dtype=policy, name=f"run_{scale.resolution}")
                before.append([run])
            else:
                before.append(blocks[:split])
            after.append(blocks[split:])
            stages.append(blocks)
            self.stage_list.append([*before[-1], *after[-1]])
            if below is not None:
                width = below.width if below.width != scale.width else None
                self.pools.append(
                    Resample(
                        "down",
                        width,
                        model.p_act,
                        width_change=model.width_change,
                        dtype=policy,
                        name=f"pool_{scale.resolution}",
                    )
                )
        self._stages = Untracked(stages)
        self.before, self.after = before, after  # already tracked through stage_list

    @property
    def stages(self) -> list[list[Any]]:
        """Every encoder block, per scale."""
        return [list(blocks) for blocks in self._stages.layers]

    def build(self, input_shape: Any) -> None:
        shape = tuple(input_shape)
        self.in_conv.build(shape)
        shape = self.in_conv.compute_output_shape(shape)
        for i, scale in enumerate(self.layout):
            for layer in [*self.before[i], *self.after[i]]:
                layer.build((shape,) if isinstance(layer, RepeatedLayers) else shape)
            if i < len(self.pools):
                self.pools[i].build(shape)
                r = scale.resolution // 2
                width = self.layout[i + 1].width
                shape = (shape[0], r, r, width)

    def call(self, x: Any, on_scale: Any = None) -> dict[int, Any]:
        """Every resolution's activation. ``on_scale(resolution, h)``, if given, is called as
        each resolution is done (an eager pass's per-scale timing)."""
        if self.input_shift != 0.0 or self.input_scale != 1.0:
            x = (x + self.input_shift) * self.input_scale
        h = self.in_conv(x)
        activations: dict[int, Any] = {}
        for i, scale in enumerate(self.layout):
            for layer in self.before[i]:
                h = layer((h,))[0] if isinstance(layer, RepeatedLayers) else layer(h)
            activations[scale.resolution] = h
            for block in self.after[i]:
                h = block(h)
            if i < len(self.pools):
                h = self.pools[i](h)
            if on_scale is not None:
                on_scale(scale.resolution, h)
        return activations
