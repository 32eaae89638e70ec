"""The top-down decoder: prior and posterior per block, latents sampled, state updated."""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from hvae_core.model.blocks import torch_default_init
from hvae_core.model.distributions import (
    gaussian_kl,
    gaussian_log_prob,
    gaussian_params,
    sum_per_example,
)
from hvae_core.model.layout import Scale
from hvae_core.model.repeat import RepeatedLayers, Untracked
from hvae_core.model.resample import Resample


class TopDownBlock(keras.layers.Layer):
    """One latent layer: p(z|z<) from the state, q(z|z<,x) from the state and the encoder.

    Hooks: a posterior ``flow`` (z_0 -> z_K, KL by a one-sample estimate), an ``attention``
    read added to the prior and posterior inputs. The block draws nothing: its standard normal
    ``eps`` is an input (see :meth:`HVAE.noise_shapes`).
    """

    def __init__(
        self,
        scale: Scale,
        index: int,
        num_blocks: int,
        make_block: Any,
        gradient_smoothing: float,
        flow: Any = None,
        scale_fn: str = "softplus",
        attention: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # Keras would cast every float input to the compute dtype: eps stays float32 (under
        # mixed bfloat16 it would lose all but 8 bits; the state comes in its own dtype).
        self._convert_input_args = False
        self.scale, self.index = scale, index
        self.beta, self.scale_fn = gradient_smoothing, scale_fn
        self.flow, self.attention = flow, attention
        w, mid, zw = scale.width, scale.dec_middle_width, scale.z_width
        depth_scale = math.sqrt(1.0 / num_blocks)
        common = {"middle_width": mid, "kernel_size": scale.kernel_size, "residual": False}
        self.context_width = int(getattr(flow, "context_width", 0)) if flow is not None else 0
        self.posterior = make_block(
            in_width=2 * w,
            out_width=2 * zw + self.context_width,
            last_scale=1.0,
            name="posterior",
            **common,
        )
        # The prior starts as N(0, 1) with no feature output: its last layer is zero.
        self.prior = make_block(
            in_width=w, out_width=2 * zw + w, last_scale=0.0, name="prior", **common
        )
        self.z_proj = keras.layers.Conv2D(
            w,
            1,
            kernel_initializer=torch_default_init(depth_scale),
            dtype=self.dtype_policy,
            name="z_proj",
        )
        self.resnet = make_block(
            in_width=w,
            middle_width=mid,
            out_width=w,
            kernel_size=scale.kernel_size,
            residual=True,
            last_scale=depth_scale,
            name="resnet",
        )

    def _read(self, state: Any, memory: Any, branch: str) -> Any:
        if self.attention is None:
            return state
        return state + self.attention.read(
            state, memory, block=self.index, resolution=self.scale.resolution, branch=branch
        )

    def call(
        self,
        state: Any,
        activation: Any = None,
        memory: Any = None,
        temperature: Any = 1.0,
        eps: Any = None,
        training: bool = False,
        posterior: Any = None,
        z: Any = None,
    ) -> tuple[Any, Any, dict[str, Any]]:
        """``eps``: this layer's standard normal noise, (B, R, R, z_width); z = mean + scale *
        eps for the distribution sampled (the posterior's, where a flow makes it z_0; the
        prior's at ``temperature``). ``posterior`` (with ``activation``): 1 keeps the
        posterior's z, 0 takes the prior's z = p_mean + p_scale * temperature * eps instead
        (the statistics stay the posterior's): what reconstructions conditioned on the first
        layers only use. None: the posterior. ``z`` (without ``activation``): this layer's
        latent, given, in place of the prior's draw (``eps`` and ``temperature`` then do
        nothing): a decoder pass from latents made elsewhere (interpolations)."""
        zw = self.scale.z_width
        state = ops.cast(state, self.compute_dtype)  # Keras' input conversion is off (eps)
        feats = self.prior(self._read(state, memory, "prior"))
        p_mean, p_scale, p_log_scale = gaussian_params(
            feats[..., :zw], feats[..., zw : 2 * zw], self.beta, self.scale_fn
        )
        x = state + feats[..., 2 * zw :]
        if eps is None:  # a shape-only build; every pass of the model hands its eps in
            eps = ops.zeros_like(p_mean)
        if activation is None and z is not None:  # a given latent
            z = ops.cast(z, "float32")
            stats = {
                "kl": ops.zeros((ops.shape(z)[0],), dtype="float32"),
                "p_mean": p_mean,
                "p_scale": p_scale,
            }
        elif activation is None:  # sampling from the prior
            z = p_mean + p_scale * temperature * eps
            stats = {
                "kl": ops.zeros((ops.shape(z)[0],), dtype="float32"),
                "p_mean": p_mean,
                "p_scale": p_scale,
            }
        else:
            post_in = ops.concatenate(
                [self._read(state, memory, "posterior"), ops.cast(activation, state.dtype)], axis=-1
            )
            q = self.posterior(post_in)
            q_mean, q_scale, q_log_scale = gaussian_params(
                q[..., :zw], q[..., zw : 2 * zw], self.beta, self.scale_fn
            )
            z = q_mean + q_scale * eps
            if self.flow is None:
                kl = sum_per_example(
                    gaussian_kl(q_mean, q_scale, p_mean, p_scale, q_log_scale, p_log_scale)
                )
            else:
                # One-sample estimate: log q(z_K|x) - log p(z_K), where
                # log q(z_K|x) = log N(z_0; q) - sum log|det dz_k/dz_(k-1)|.
                z0 = z
                z, log_det = self.flow(z0, q[..., 2 * zw :], training=training)
                z = ops.cast(z, "float32")
                kl = (
                    sum_per_example(gaussian_log_prob(z0, q_mean, q_scale, q_log_scale))
                    - ops.cast(log_det, "float32")
                    - sum_per_example(gaussian_log_prob(z, p_mean, p_scale, p_log_scale))
                )
            stats = {
                "kl": kl,
                "q_mean": q_mean,
                "q_scale": q_scale,
                "p_mean": p_mean,
                "p_scale": p_scale,
            }
            if posterior is not None:
                # One eps per layer serves both: only one of the two z goes on.
                prior_z = p_mean + p_scale * temperature * eps
                z = posterior * ops.cast(z, "float32") + (1.0 - posterior) * prior_z
        x = x + self.z_proj(z)
        return self.resnet(x), z, stats


class Decoder(keras.layers.Layer):
    """Top-down pass from 1x1 to the image size; returns the final state, every block's z and
    every block's statistics (KL per example, posterior and prior parameters).

    With ``stack_blocks`` (and no attention, whose memory passes through every block) the
    blocks of each resolution run as one :class:`RepeatedLayers`; ``blocks`` still lists every
    block (for their structure: scale, flow), but the live weights are the runs'.
    """

    def __init__(
        self,
        model: Any,
        layout: list[Scale],
        make_block: Any,
        make_flow: Any = None,
        attention: Any = None,
        stack_blocks: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._convert_input_args = False  # the noise stays float32 (see TopDownBlock)
        self.order = list(reversed(layout))  # 1x1 first
        self.init_zeros = model.init_zeros
        self.no_bias_above = model.no_bias_above
        self.attention = attention
        num_blocks = sum(s.dec_blocks for s in layout)
        stacking = stack_blocks and attention is None
        # Tracked in the order the weights always had (a checkpoint lists them in that order):
        # a scale's unpooling, then its blocks (or the run of them).
        self.block_list: list[Any] = []
        # Keyed by str(resolution): TensorFlow's SavedModel tracking takes string keys only.
        self.unpools: dict[str, Any] = {}
        self.runs: dict[str, RepeatedLayers] = {}
        blocks: list[TopDownBlock] = []
        previous = None
        for scale in self.order:
            if previous is not None:
                width = scale.width if scale.width != previous.width else None
                self.unpools[str(scale.resolution)] = Resample(
                    "up",
                    width,
                    model.p_act,
                    width_change=model.width_change,
                    dtype=self.dtype_policy,
                    name=f"unpool_{scale.resolution}",
                )
            members = []
            for _ in range(scale.dec_blocks):
                index = len(blocks)
                flow = make_flow(scale, index) if make_flow is not None else None
                block = TopDownBlock(
                    scale,
                    index,
                    num_blocks,
                    make_block,
                    model.gradient_smoothing,
                    flow=flow,
                    scale_fn=model.scale_fn,
                    attention=attention,
                    dtype=self.dtype_policy,
                    name=f"dec_{scale.resolution}_{index}",
                )
                blocks.append(block)
                members.append(block)
            if stacking and len(members) > 1:
                run = RepeatedLayers(
                    members, dtype=self.dtype_policy, name=f"run_{scale.resolution}"
                )
                self.runs[str(scale.resolution)] = run
                self.block_list.append(run)
            else:
                self.block_list.extend(members)
            previous = scale
        self.unpool_list = list(self.unpools.values())  # tracked by Keras
        self._blocks = Untracked(blocks)

    @property
    def blocks(self) -> list[TopDownBlock]:
        """Every top-down block, top first."""
        return list(self._blocks.layers)

    def build(self, input_shape: Any = None) -> None:
        # A learned starting state at every resolution with blocks (VDVAE's bias_xs); with
        # init_zeros the 1x1 state starts from zeros instead.
        self.biases = {}
        for scale in self.order:
            if scale.dec_blocks == 0 or (scale.resolution == 1 and self.init_zeros):
                continue
            if self.no_bias_above is not None and scale.resolution > self.no_bias_above:
                continue
            r = scale.resolution
            self.biases[str(r)] = self.add_weight(
                shape=(1, r, r, scale.width), initializer="zeros", name=f"bias_{r}"
            )
        # Every block is built here, not on first use, so that all weights exist once the model
        # is built (the torch backend registers the parameters it has then). Built for the
        # posterior pass (the encoder's activation has the state's shape), which needs every
        # weight; sampling uses a subset.
        for scale in self.order:
            shape = (None, scale.resolution, scale.resolution, scale.width)
            if str(scale.resolution) in self.runs:
                self.runs[str(scale.resolution)].build((shape, shape))
                continue
            for block in (b for b in self._blocks.layers if b.scale is scale):
                if not block.built and self.attention is None:
                    block(keras.KerasTensor(shape), keras.KerasTensor(shape))

    def num_blocks(self) -> int:
        return len(self.blocks)

    def call(
        self,
        activations: dict[int, Any] | None = None,
        batch_size: Any = 1,
        temperatures: list[Any] | None = None,
        noise: list[Any] | None = None,
        training: bool = False,
        posterior_layers: int | None = None,
        on_scale: Any = None,
        latents: list[Any] | None = None,
    ) -> tuple[Any, list[Any], list[dict[str, Any]]]:
        """``noise``: every layer's standard normal eps, top first (see
        :meth:`HVAE.noise_shapes`). ``posterior_layers`` (with ``activations``): only the
        first that many latent layers take the posterior's z, the rest draw from the prior at
        their ``temperatures``. ``latents`` (without ``activations``; then no ``noise``):
        every layer's z, given, top first, in place of the prior's draws.
        ``on_scale(resolution, state)``, if given, is called as each resolution is done (an
        eager pass's per-scale timing)."""
        if latents is not None:
            if activations is not None:
                raise ValueError("latents are given to a pass from the prior, not a posterior pass")
            if len(latents) != len(self.blocks):
                raise ValueError(
                    f"expected latents for {len(self.blocks)} latent layers, got {len(latents)}"
                )
            noise = [ops.zeros_like(ops.cast(z, "float32")) for z in latents]  # unused
        memory = self.attention.encode(activations) if self.attention is not None else None
        prepare = getattr(self.attention, "prepare", None)
        top = self.order[0]
        state = ops.zeros((batch_size, 1, 1, top.width), dtype=self.compute_dtype)
        zs, stats = [], []
        for scale in self.order:
            r = scale.resolution
            key = str(r)
            if key in self.unpools:
                state = self.unpools[key](state)
            if key in self.biases:
                state = state + ops.cast(self.biases[key], state.dtype)
            activation = activations[r] if activations is not None else None
            if key in self.runs:
                run = self.runs[key]
                first = run.members[0].index
                temps = [
                    1.0 if temperatures is None else temperatures[first + i]
                    for i in range(len(run))
                ]
                inputs = (state,) if activation is None else (state, activation)
                # Stacked, not converted: a temperature may be a tensor (one per image).
                per_layer = {
                    "temperature": ops.stack([ops.cast(t, "float32") for t in temps]),
                    "eps": ops.stack(
                        [ops.cast(noise[first + i], "float32") for i in range(len(run))]
                    ),
                }
                if latents is not None:
                    per_layer["z"] = ops.stack(
                        [ops.cast(latents[first + i], "float32") for i in range(len(run))]
                    )
                if posterior_layers is not None and activation is not None:
                    indices = ops.arange(first, first + len(run), dtype="int32")
                    per_layer["posterior"] = _kept(indices, posterior_layers)
                state, (run_zs, run_stats) = run(inputs, per_layer=per_layer, training=training)
                zs.extend(ops.unstack(run_zs, axis=0) if len(run) > 1 else [run_zs[0]])
                for i in range(len(run)):
                    stats.append({k: v[i] for k, v in run_stats.items()})
                if on_scale is not None:
                    on_scale(r, state)
                continue
            for block in (b for b in self._blocks.layers if b.scale is scale):
                if prepare is not None:
                    memory = prepare(state, memory, block=block.index, resolution=r)
                t = 1.0 if temperatures is None else temperatures[block.index]
                keep = None
                if posterior_layers is not None and activation is not None:
                    keep = _kept(block.index, posterior_layers)
                state, z, block_stats = block(
                    state,
                    activation,
                    # By keyword: Keras takes only tensors positionally, and the memory is
                    # whatever the attention plugin makes it.
                    memory=memory,
                    temperature=t,
                    eps=ops.cast(noise[block.index], "float32"),
                    training=training,
                    posterior=keep,
                    z=None if latents is None else latents[block.index],
                )
                if self.attention is not None:
                    memory = self.attention.update(state, memory, block=block.index, resolution=r)
                zs.append(z)
                stats.append(block_stats)
            if on_scale is not None:
                on_scale(r, state)
        return state, zs, stats


def _kept(index: Any, posterior_layers: Any) -> Any:
    """1.0 where latent layer ``index`` takes the posterior's z (it is among the first
    ``posterior_layers``), else 0.0; ``posterior_layers`` may be a traced scalar."""
    limit = ops.cast(posterior_layers, "int32")
    return ops.cast(ops.less(ops.cast(index, "int32"), limit), "float32")
