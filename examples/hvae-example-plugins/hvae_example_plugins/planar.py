"""The ``example-planar`` flow: K planar layers z' = z + u_hat tanh(w.z + b) on the flat latent."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


class PlanarFlow(keras.layers.Layer):
    """Satisfies ``hvae_core.api.PosteriorFlow``: call(z0, context) -> (zK, log|det|).

    Its parameters are global (not amortised), so it asks for no context channels.
    """

    context_width = 0

    def __init__(self, num_flows: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_flows = num_flows

    def build(self, z_shape: Any, context_shape: Any = None) -> None:
        dim = 1
        for size in z_shape[1:]:
            dim *= int(size)
        init = keras.initializers.RandomNormal(stddev=0.01)
        self.u = self.add_weight(shape=(self.num_flows, dim), initializer=init, name="u")
        self.w = self.add_weight(shape=(self.num_flows, dim), initializer=init, name="w")
        self.b = self.add_weight(shape=(self.num_flows,), initializer="zeros", name="b")

    def u_hat(self, k: int) -> Any:
        """u adjusted so that w.u_hat >= -1, which keeps the layer invertible."""
        u, w = self.u[k], self.w[k]
        wu = ops.sum(w * u)
        return u + (ops.softplus(wu) - 1.0 - wu) * w / (ops.sum(w * w) + 1e-8)

    def call(self, z0: Any, context: Any = None, training: bool = False) -> tuple[Any, Any]:
        shape = ops.shape(z0)
        z = ops.reshape(z0, (shape[0], -1))
        log_det = ops.zeros((shape[0],), dtype=z.dtype)
        for k in range(self.num_flows):
            u_hat, w = self.u_hat(k), self.w[k]
            a = ops.matmul(z, w) + self.b[k]
            z = z + ops.tanh(a)[:, None] * u_hat[None, :]
            psi_u = (1.0 - ops.tanh(a) ** 2) * ops.sum(w * u_hat)
            log_det = log_det + ops.log(ops.abs(1.0 + psi_u))
        return ops.reshape(z, shape), log_det


def make_planar_flow(
    options: Any,
    model: Any,
    *,
    scale: int,
    resolution: int,
    z_width: int,
    name: str,
) -> PlanarFlow | None:
    num_flows = options.num_flows[scale]
    return PlanarFlow(num_flows, name=name) if num_flows > 0 else None
