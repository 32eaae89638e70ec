"""Moving between scales: average pooling down, nearest-neighbour upsampling up."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from hvae_core.model.blocks import torch_default_init


@keras.saving.register_keras_serializable(package="hvae")
class NearestUpsampling(keras.layers.Layer):
    """``keras.layers.UpSampling2D(factor)`` (nearest neighbour, NHWC), by tiling: Keras'
    ``ops.repeat``, which UpSampling2D uses, fails on the torch backend's "meta" device, and
    Keras then infers a model's shapes by computing its whole pass (at batch 83 and again at
    89), which for a full-size model takes minutes and gigabytes each time it is built."""

    def __init__(self, factor: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = int(factor)

    def call(self, x: Any) -> Any:
        f = self.factor
        _, h, w, c = x.shape
        x = ops.tile(ops.reshape(x, (-1, h, 1, w, 1, c)), (1, 1, f, 1, f, 1))  # N H f W f C
        return ops.reshape(x, (-1, h * f, w * f, c))

    def compute_output_shape(self, input_shape: Any) -> Any:
        n, h, w, c = input_shape
        f = self.factor
        return (n, None if h is None else h * f, None if w is None else w * f, c)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package="hvae")
class Resample(keras.layers.Layer):
    """Halve (``down``: average pooling) or double (``up``: nearest neighbour) the resolution.
    When the width changes (``out_width``), ``width_change`` says how: ``conv``, a 1x1
    convolution and ``activation`` follow; ``pad`` (VDVAE), zero channels are appended going
    down and the first ``out_width`` channels kept going up, with no weights."""

    def __init__(
        self,
        direction: str,
        out_width: int | None,
        activation: str,
        width_change: str = "conv",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if direction not in ("down", "up"):
            raise ValueError(f"direction must be 'down' or 'up', got {direction!r}")
        if width_change not in ("conv", "pad"):
            raise ValueError(f"width_change must be 'conv' or 'pad', got {width_change!r}")
        self.direction, self.out_width, self.activation_name = direction, out_width, activation
        self.width_change = width_change
        self.resize = (
            keras.layers.AveragePooling2D(2, dtype=self.dtype_policy)
            if direction == "down"
            else NearestUpsampling(2, dtype=self.dtype_policy)
        )
        self.conv = (
            keras.layers.Conv2D(
                out_width,
                1,
                kernel_initializer=torch_default_init(),
                dtype=self.dtype_policy,
                name="conv",
            )
            if out_width is not None and width_change == "conv"
            else None
        )
        self.activation = keras.activations.get(activation)

    def build(self, input_shape: Any) -> None:
        width = input_shape[-1]
        if self.conv is not None:
            self.conv.build(self.resize.compute_output_shape(input_shape))
        elif self.out_width is not None and width is not None:
            grows = self.out_width > width
            if grows != (self.direction == "down"):
                # Padding can only widen and slicing only narrow.
                raise ValueError(
                    f"width_change 'pad' goes {self.direction} from {width} to "
                    f"{self.out_width} channels: widths must not shrink towards lower "
                    "resolutions"
                )

    def call(self, x: Any) -> Any:
        x = self.resize(x)
        if self.conv is not None:
            return self.activation(self.conv(x))
        if self.out_width is None:
            return x
        if self.direction == "up":
            return x[..., : self.out_width]
        extra = self.out_width - ops.shape(x)[-1]
        return ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, extra]])

    def compute_output_shape(self, input_shape: Any) -> Any:
        shape = self.resize.compute_output_shape(input_shape)
        return shape if self.out_width is None else (*shape[:-1], self.out_width)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "direction": self.direction,
            "out_width": self.out_width,
            "activation": self.activation_name,
            "width_change": self.width_change,
        }
