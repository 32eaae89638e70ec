"""The ``orthogonal-sylvester`` flow (van den Berg, Hasenclever, Tomczak & Welling 2018).

On the flattened latent z (D = H*W*C values), each layer is

    z' = z + Q R tanh(R~ Q^T z + b)

with Q a D x M matrix of orthonormal columns and R, R~ upper-triangular M x M. By Sylvester's
determinant identity det(I_D + Q R H' R~ Q^T) = det(I_M + H' R~ Q^T Q R), and with Q^T Q = I
that is the determinant of a triangular matrix: log|det| = sum_i log(1 + h'_i R~_ii R_ii),
h' = 1 - tanh^2. The identity needs Q^T Q = I to hold for the Q actually used, so Q is built
as a product of M Householder reflections applied to the first M columns of the identity:
orthonormal by construction, not by an iteration that may stop short of convergence. The
diagonals are tanh of free values, so |R~_ii R_ii| < 1 and every layer is invertible.

Everything is amortised from the posterior's context: the Householder vectors by a 1x1
convolution (so their number of parameters grows with the latent's channels, not its size),
R, R~ and b by a dense layer on the flattened context. R starts at zero: the flow starts as the
identity, and R~, b and Q already give R a gradient.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from .options import flows_at

TINY = 1e-30  # keeps a Householder vector's squared norm above zero


def strict_upper_placement(m: int) -> np.ndarray:
    """(m(m-1)/2, m*m) 0/1 matrix that places a packed vector above the diagonal of an m x m
    matrix (row-major)."""
    rows, cols = np.triu_indices(m, k=1)
    placement = np.zeros((len(rows), m * m), np.float32)
    placement[np.arange(len(rows)), rows * m + cols] = 1.0
    return placement


def orthonormal_frame(vectors: Any, num_rows: int) -> Any:
    """Q = H_1 ... H_M E with H_m the reflection along ``vectors[:, m]`` (shape (B, M, D)) and E
    the first M columns of the D x D identity: (B, D, M) with orthonormal columns."""
    m = vectors.shape[1]
    frame = ops.convert_to_tensor(np.eye(num_rows, m), dtype=vectors.dtype)
    q = ops.broadcast_to(frame[None], (ops.shape(vectors)[0], num_rows, m))

    def reflect(i: Any, q: Any) -> Any:
        v = ops.take(vectors, m - 1 - i, axis=1)
        norm2 = ops.maximum(ops.sum(ops.square(v), axis=1), TINY)
        proj = ops.einsum("bd,bdm->bm", v, q)
        return q - 2.0 * v[:, :, None] * (proj / norm2[:, None])[:, None, :]

    # Unrolled: a flow runs inside the compiled loops over repeated blocks and micro-batches,
    # and TensorFlow's XLA cannot differentiate a loop of unknown length nested in those.
    for i in range(m):
        q = reflect(i, q)
    return q


class OrthogonalSylvesterFlow(keras.layers.Layer):
    """Satisfies ``hvae_core.interfaces.PosteriorFlow``: ``num_flows`` orthogonal Sylvester
    layers on the flattened latent of one top-down block."""

    def __init__(
        self,
        *,
        z_width: int,
        resolution: int,
        context_width: int,
        num_flows: int = 4,
        num_ortho_vecs: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.context_width = context_width
        self.z_width, self.num_flows = z_width, num_flows
        self.dim = resolution * resolution * z_width
        self.m = min(num_ortho_vecs, self.dim)
        m, policy = self.m, self.dtype_policy
        self.num_upper = m * (m - 1) // 2
        self.householder = keras.layers.Conv2D(
            num_flows * m * z_width, 1, dtype=policy, name="householder"
        )
        self.r_params = keras.layers.Dense(
            num_flows * (self.num_upper + m),
            kernel_initializer="zeros",
            dtype=policy,
            name="r",
        )
        self.r_tilde_params = keras.layers.Dense(
            num_flows * (self.num_upper + 2 * m), dtype=policy, name="r_tilde_b"
        )
        self.placement = strict_upper_placement(m)

    def build(self, z0_shape: Any, context_shape: Any) -> None:
        self.householder.build(context_shape)
        flat = int(np.prod(context_shape[1:]))
        self.r_params.build((context_shape[0], flat))
        self.r_tilde_params.build((context_shape[0], flat))

    def upper_triangular(self, packed: Any) -> Any:
        """(B, m(m-1)/2 + m) -> (B, m, m): the strict upper part as given, the diagonal tanh of
        the last m values (so that |R~_ii R_ii| < 1)."""
        m = self.m
        placement = ops.convert_to_tensor(self.placement, packed.dtype)
        upper = ops.reshape(ops.matmul(packed[:, : self.num_upper], placement), (-1, m, m))
        eye = ops.convert_to_tensor(np.eye(m), packed.dtype)
        return upper + ops.tanh(packed[:, self.num_upper :])[:, :, None] * eye[None]

    def call(self, z0: Any, context: Any, training: bool = False) -> tuple[Any, Any]:
        dtype, m, flows = self.compute_dtype, self.m, self.num_flows
        batch = ops.shape(z0)[0]
        z = ops.reshape(ops.cast(z0, dtype), (batch, self.dim))
        context = ops.cast(context, dtype)
        # (B, H, W, F*M*C) -> (B, F, M, H*W*C): vector m of flow f, laid out like z.
        v = self.householder(context)
        height, width = ops.shape(context)[1], ops.shape(context)[2]
        v = ops.reshape(v, (batch, height, width, flows, m, self.z_width))
        v = ops.reshape(ops.transpose(v, (0, 3, 4, 1, 2, 5)), (batch, flows, m, self.dim))
        flat = ops.reshape(context, (batch, -1))
        r = ops.reshape(self.r_params(flat), (batch, flows, -1))
        r_tilde_b = ops.reshape(self.r_tilde_params(flat), (batch, flows, -1))

        def layer(k: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
            z, log_det = carry
            q = orthonormal_frame(ops.take(v, k, axis=1), self.dim)
            r_k = self.upper_triangular(ops.take(r, k, axis=1))
            params = ops.take(r_tilde_b, k, axis=1)
            r_tilde = self.upper_triangular(params[:, : self.num_upper + m])
            b = params[:, self.num_upper + m :]
            qz = ops.einsum("bdm,bd->bm", q, z)
            h = ops.tanh(ops.einsum("bij,bj->bi", r_tilde, qz) + b)
            z = z + ops.einsum("bdm,bm->bd", q, ops.einsum("bij,bj->bi", r_k, h))
            diag = (1.0 - ops.square(h)) * _diagonal(r_k) * _diagonal(r_tilde)
            return z, log_det + ops.sum(ops.log1p(diag), axis=1)

        carry = (z, ops.zeros((batch,), dtype=dtype))
        for k in range(flows):  # unrolled, as in orthonormal_frame
            carry = layer(k, carry)
        z, log_det = carry
        return ops.reshape(z, ops.shape(z0)), log_det


def _diagonal(x: Any) -> Any:
    return ops.diagonal(x, axis1=1, axis2=2)


def make_orthogonal_sylvester_flow(
    options: Any,
    model: Any,
    *,
    scale: int,
    resolution: int,
    z_width: int,
    name: str,
) -> OrthogonalSylvesterFlow | None:
    """The flow of one top-down block at ``scale`` (None where the options turn it off)."""
    num_flows = flows_at(options, scale, resolution)
    if num_flows == 0:
        return None
    return OrthogonalSylvesterFlow(
        z_width=z_width,
        resolution=resolution,
        context_width=options.flow_in_ch[scale],
        num_flows=num_flows,
        num_ortho_vecs=options.num_ortho_vecs[scale],
        # The log-det is part of the KL, which stays in full precision under mixed policies.
        dtype=keras.config.floatx(),
        name=name,
    )
