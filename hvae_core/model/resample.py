"""Moving between scales: average pooling down, nearest-neighbour upsampling up."""

from __future__ import annotations

from typing import Any

import keras

from hvae_core.model.blocks import torch_default_init


@keras.saving.register_keras_serializable(package="hvae")
class Resample(keras.layers.Layer):
    """Halve (``down``: average pooling) or double (``up``: nearest neighbour) the resolution;
    a 1x1 convolution and ``activation`` follow when the width changes (``out_width``)."""

    def __init__(
        self, direction: str, out_width: int | None, activation: str, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if direction not in ("down", "up"):
            raise ValueError(f"direction must be 'down' or 'up', got {direction!r}")
        self.direction, self.out_width, self.activation_name = direction, out_width, activation
        self.resize = (
            keras.layers.AveragePooling2D(2, dtype=self.dtype_policy)
            if direction == "down"
            else keras.layers.UpSampling2D(2, dtype=self.dtype_policy)
        )
        self.conv = (
            keras.layers.Conv2D(
                out_width,
                1,
                kernel_initializer=torch_default_init(),
                dtype=self.dtype_policy,
                name="conv",
            )
            if out_width is not None
            else None
        )
        self.activation = keras.activations.get(activation)

    def call(self, x: Any) -> Any:
        x = self.resize(x)
        return self.activation(self.conv(x)) if self.conv is not None else x

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "direction": self.direction,
            "out_width": self.out_width,
            "activation": self.activation_name,
        }
