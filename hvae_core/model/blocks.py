"""Residual bottleneck blocks (the core's ``block`` plugins)."""

from __future__ import annotations

from typing import Any

import keras


def torch_default_init(scale: float = 1.0) -> keras.initializers.Initializer:
    """PyTorch's default convolution init (uniform, bound 1/sqrt(fan_in)), times ``scale``.

    VDVAE is initialised this way, and scales the last layer of each block by 1/sqrt(depth).
    """
    return keras.initializers.VarianceScaling(
        scale=scale * scale / 3.0, mode="fan_in", distribution="uniform"
    )


@keras.saving.register_keras_serializable(package="hvae")
class ResidualBlock(keras.layers.Layer):
    """Pre-activation bottleneck: act -> 1x1 -> act -> kxk -> act -> kxk -> act -> 1x1.

    ``residual`` adds the input (``in_width`` must equal ``out_width``). The last convolution is
    initialised scaled by ``last_scale`` (VDVAE: 1/sqrt(number of blocks)); 0 makes it zero, so
    the block starts as the identity (or as zero without the residual).
    """

    def __init__(
        self,
        in_width: int,
        middle_width: int,
        out_width: int,
        kernel_size: int = 3,
        residual: bool = True,
        activation: str = "gelu",
        group_norm: bool = False,
        last_scale: float = 1.0,
        depthwise: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if residual and in_width != out_width:
            raise ValueError(
                f"a residual block needs in_width == out_width ({in_width} vs {out_width})"
            )
        self.in_width, self.middle_width, self.out_width = in_width, middle_width, out_width
        self.kernel_size, self.residual = kernel_size, residual
        self.activation_name, self.group_norm, self.last_scale = activation, group_norm, last_scale
        self.depthwise = depthwise
        self.activation = keras.activations.get(activation)
        policy = self.dtype_policy
        widths = (middle_width, middle_width, middle_width, out_width)
        kernels = (1, kernel_size, kernel_size, 1)
        self.convs = []
        for i, (width, k) in enumerate(zip(widths, kernels, strict=True)):
            last = i == len(widths) - 1
            init = (
                keras.initializers.Zeros()
                if last and last_scale == 0
                else torch_default_init(last_scale if last else 1.0)
            )
            if depthwise and 0 < i < len(widths) - 1 and k > 1:
                # NVAE-style: the spatial convolutions act per channel.
                layer = keras.layers.DepthwiseConv2D(
                    k,
                    padding="same",
                    depthwise_initializer=init,
                    dtype=policy,
                    name=f"conv{i + 1}",
                )
            else:
                layer = keras.layers.Conv2D(
                    width,
                    k,
                    padding="same",
                    kernel_initializer=init,
                    dtype=policy,
                    name=f"conv{i + 1}",
                )
            self.convs.append(layer)
        in_widths = (in_width, middle_width, middle_width, middle_width)
        self.norms = (
            [
                keras.layers.GroupNormalization(groups=_groups(w), dtype=policy, name=f"gn{i + 1}")
                for i, w in enumerate(in_widths)
            ]
            if group_norm
            else []
        )

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        shape = tuple(input_shape)
        for i, conv in enumerate(self.convs):
            if self.norms:
                self.norms[i].build(shape)
            conv.build(shape)
            shape = conv.compute_output_shape(shape)

    def call(self, x: Any) -> Any:
        h = x
        for i, conv in enumerate(self.convs):
            if self.norms:
                h = self.norms[i](h)
            h = conv(self.activation(h))
        return x + h if self.residual else h

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (*tuple(input_shape)[:-1], self.out_width)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "in_width": self.in_width,
            "middle_width": self.middle_width,
            "out_width": self.out_width,
            "kernel_size": self.kernel_size,
            "residual": self.residual,
            "activation": self.activation_name,
            "group_norm": self.group_norm,
            "last_scale": self.last_scale,
            "depthwise": self.depthwise,
        }


def _groups(width: int) -> int:
    """8 groups (VDVAE/EfficientVDVAE's choice) where the width allows, else the largest divisor."""
    return next(g for g in (8, 4, 2, 1) if width % g == 0)


def vdvae_block(options: Any, model: Any, **kwargs: Any) -> ResidualBlock:
    """Factory of the ``vdvae`` block plugin (see :data:`hvae_core.interfaces.BlockFactory`):
    keyword arguments ``in_width, middle_width, out_width, kernel_size, residual, last_scale,
    name, dtype``."""
    return _block(model, depthwise=False, **kwargs)


def depthwise_block(options: Any, model: Any, **kwargs: Any) -> ResidualBlock:
    """Factory of the ``depthwise`` block: 5x5 depthwise convolutions (NVAE) in the middle,
    where the ``vdvae`` block has its 3x3 ones."""
    kernel_size = kwargs.pop("kernel_size", 3)
    return _block(
        model, depthwise=True, kernel_size=kernel_size + 2 if kernel_size > 1 else 1, **kwargs
    )


def _block(
    model: Any,
    *,
    depthwise: bool,
    in_width: int,
    middle_width: int,
    out_width: int,
    kernel_size: int = 3,
    residual: bool = True,
    last_scale: float = 1.0,
    name: str | None = None,
    dtype: Any = None,
) -> ResidualBlock:
    return ResidualBlock(
        in_width,
        middle_width,
        out_width,
        kernel_size=kernel_size,
        residual=residual,
        activation=model.b_act,
        group_norm=model.block_gn,
        last_scale=last_scale,
        depthwise=depthwise,
        name=name,
        dtype=dtype,
    )
