"""The HVAE: encoder, top-down decoder, output head and discretized-logistic likelihood."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from hvae_core.errors import ConfigError, PluginError
from hvae_core.interfaces import CORE_METRICS, LayerStats, ModelOutputs
from hvae_core.model.decoder import Decoder
from hvae_core.model.distributions import gaussian_log_prob, sum_per_example
from hvae_core.model.encoder import Encoder
from hvae_core.model.evaluation import MEAN_SUM, SQUARE_SUM
from hvae_core.model.heads import DecoderHead, LatentAggregationHead
from hvae_core.model.layout import scales
from hvae_core.model.likelihood import dmol_log_prob, dmol_num_params, dmol_sample
from hvae_core.plugins import PluginRegistry, get_registry


def is_noise_seed(variable: Any) -> bool:
    """Whether ``variable`` is the state of a noise stream (a Keras ``SeedGenerator``'s; a run
    of stacked blocks keeps its blocks' states stacked), not a weight."""
    return "seed_generator_state" in variable.path


class HVAE(keras.Model):
    """A VDVAE-style hierarchical VAE assembled from a resolved config and the plugins it names.

    Images go in as floats in [-1, 1] on the grid of ``2**num_bits`` levels, NHWC.
    """

    def __init__(
        self,
        config: Any,
        image_shape: Sequence[int],
        num_bits: int,
        registry: PluginRegistry | None = None,
        seed: int | None = None,
        stack_blocks: bool = True,
        **kwargs: Any,
    ) -> None:
        """``stack_blocks``: run each resolution's identical blocks as one loop over stacked
        weights (:class:`~hvae_core.model.repeat.RepeatedLayers`); False gives the layout of
        one set of weights per block (checkpoints written before hvae stacked them)."""
        super().__init__(dtype=config.model.precision, **kwargs)
        self.config, self.seed, self.stack_blocks = config, seed, stack_blocks
        registry = registry or get_registry()
        model = config.model
        self.image_shape = tuple(int(d) for d in image_shape)
        height, width, channels = self.image_shape
        if height != width or height != config.image_size:
            raise ConfigError(
                f"the dataset's images are {height}x{width} but the config expects "
                f"{config.image_size}x{config.image_size}"
            )
        self.num_bits = num_bits
        self.num_mixtures = model.num_output_mixtures
        self.gradient_smoothing = model.gradient_smoothing
        self.scale_fn = model.scale_fn
        self.num_dims = height * width * channels
        policy = self.dtype_policy
        layout = scales(model, config.resolutions)
        block_spec = registry.get("block", model.block)
        make_block = functools.partial(
            block_spec.create, config.options("block"), model, dtype=policy
        )

        make_flow = None
        if model.flow is not None:
            flow_spec = registry.get("flow", model.flow)

            def make_flow(scale: Any, index: int) -> Any:
                return flow_spec.create(
                    config.options("flow"),
                    model,
                    scale=scale.index,
                    resolution=scale.resolution,
                    z_width=scale.z_width,
                    name=f"flow_{index}",
                )

        self.attention = None
        if model.attention is not None:
            self.attention = registry.get("attention", model.attention).create(
                config.options("attention"),
                model,
                widths={s.resolution: s.width for s in layout},
                make_block=make_block,
            )

        self.encoder = Encoder(
            model, layout, make_block, stack_blocks=stack_blocks, dtype=policy, name="encoder"
        )
        self.decoder = Decoder(
            model,
            layout,
            make_block,
            make_flow,
            self.attention,
            seed=seed,
            stack_blocks=stack_blocks,
            dtype=policy,
            name="decoder",
        )
        num_params = dmol_num_params(channels, self.num_mixtures)
        if model.output_head == "decoder":
            self.head = DecoderHead(layout[0].width, num_params, dtype=policy, name="head")
        else:
            block_scales = [b.scale for b in self.decoder.blocks]
            self.head = LatentAggregationHead(
                model, block_scales, height, num_params, make_block, dtype=policy, name="head"
            )
        self.sample_seed = keras.random.SeedGenerator(seed, name="sample_seed")
        # How an error about the regularizer handed to losses_for names it.
        name = config.training.regularizer
        self.regularizer_label = (
            registry.get("regularizer", name).label()
            if name is not None
            and registry.has("regularizer", name)
            and not registry.clash("regularizer", name)
            else None
        )

    @property
    def num_latent_layers(self) -> int:
        return len(self.decoder.blocks)

    @property
    def latent_resolutions(self) -> list[int]:
        """The resolution of every latent layer, top first."""
        return [b.scale.resolution for b in self.decoder.blocks]

    @property
    def noise_seed_variables(self) -> list[Any]:
        """The states of every noise stream (latent layers, pixel sampling)."""
        return [v for v in self.non_trainable_variables if is_noise_seed(v)]

    @property
    def num_latent_dims(self) -> int:
        """Dimensions of all latent layers together (a layer at resolution R: R * R * z_width)."""
        return sum(b.scale.resolution**2 * b.scale.z_width for b in self.decoder.blocks)

    def count_params(self) -> int:
        """Weights of the model, not counting the latent noise's seed states (stacked runs keep
        theirs as weights; a single block keeps its own in a seed generator)."""
        return int(sum(math.prod(w.shape) for w in self.weights if not is_noise_seed(w)))

    def reseed(self, seed: int) -> None:
        """Set every noise stream (each latent layer's, the pixel sampler's) from ``seed``:
        the same seed, the same draws."""
        rng = np.random.default_rng(int(seed))
        for v in self.noise_seed_variables:
            state = np.zeros(tuple(v.shape), dtype=np.dtype(v.dtype))
            state[..., 0] = rng.integers(1, 2**30, size=state.shape[:-1])
            v.assign(state)

    def num_flow_params(self) -> int:
        """Parameters of the posterior flows (0 without flows); the model must be built."""
        total = 0
        for block in self.decoder.blocks:
            if block.flow is not None:
                total += sum(math.prod(w.shape) for w in getattr(block.flow, "weights", []))
        return int(total)

    def call(self, x: Any, training: bool = False, noise_groups: int = 1) -> dict[str, Any]:
        """Keras's entry point: the posterior pass as nested dicts and lists, the form Keras
        traces and builds with. Everything else takes it typed, from :meth:`posterior_pass`."""
        activations = self.encoder(x)
        state, zs, stats = self.decoder(
            activations=activations,
            batch_size=ops.shape(x)[0],
            noise_groups=noise_groups,
            training=training,
        )
        return {"params": self.head(state, zs), "latents": zs, "stats": stats}

    def posterior_pass(self, x: Any, training: bool = False, noise_groups: int = 1) -> ModelOutputs:
        """The posterior pass over ``x``: the likelihood's parameters, every layer's z and
        every layer's posterior and prior (what a regularizer receives)."""
        out = self(x, training=training, noise_groups=noise_groups)
        return ModelOutputs(
            params=out["params"],
            latents=tuple(out["latents"]),
            layers=tuple(
                LayerStats(
                    kl=s["kl"],
                    q_mean=s["q_mean"],
                    q_scale=s["q_scale"],
                    p_mean=s["p_mean"],
                    p_scale=s["p_scale"],
                )
                for s in out["stats"]
            ),
        )

    def build(self, input_shape: Any) -> None:
        # Eagerly and by shape: runs of repeated blocks stack their blocks' initial weights,
        # which needs their values (a symbolic build would not have them).
        self.encoder.build(tuple(input_shape))
        self.decoder.build()
        # Then the rest (head, attention, single blocks) on a symbolic pass: every weight
        # exists once the model is built, which the torch backend needs to register them all.
        self.compute_output_spec(keras.KerasTensor((None, *tuple(input_shape)[1:])))

    def build_weights(self) -> None:
        """Create every weight. By shape only: an eager forward pass would cost seconds (on
        JAX, every operation compiles on its first use) and advance the noise seeds."""
        if not self.built:
            self.build((1, *self.image_shape))

    def losses_for(
        self,
        x: Any,
        beta: Any = 1.0,
        training: bool = False,
        regularizer: Any = None,
        noise_groups: int = 1,
    ) -> dict[str, Any]:
        """Loss and its parts, in bits per dimension averaged over the batch.

        ``loss`` = (recon + beta * KL + regularizer terms) / (H W C ln 2); ``elbo_bpd`` is the
        negative ELBO (beta = 1). A regularizer's terms are also reported under their names.
        """
        out = self.posterior_pass(x, training=training, noise_groups=noise_groups)
        recon = -self._pixel_log_prob(out.params, x)
        kl_layers = ops.stack([layer.kl for layer in out.layers], axis=1)
        kl = ops.sum(kl_layers, axis=1)
        to_bpd = 1.0 / (self.num_dims * math.log(2.0))
        loss_nats = recon + beta * kl
        result = {
            "recon_bpd": ops.mean(recon) * to_bpd,
            "kl_bpd": ops.mean(kl) * to_bpd,
            "elbo_bpd": ops.mean(recon + kl) * to_bpd,
            "kl_layers_bpd": ops.mean(kl_layers, axis=0) * to_bpd,
            "outputs": out,
        }
        flow_layers = [i for i, b in enumerate(self.decoder.blocks) if b.flow is not None]
        if flow_layers:
            # The part of kl_bpd estimated through posterior flows: a systematic negative
            # value here is a wrong log-determinant.
            kl_flow = ops.sum(ops.take(kl_layers, flow_layers, axis=1), axis=1)
            result["kl_flow_bpd"] = ops.mean(kl_flow) * to_bpd
        loss = ops.mean(loss_nats) * to_bpd
        if regularizer is not None:
            terms = regularizer.loss_terms(out, x)
            clashes = sorted(CORE_METRICS.intersection(terms))
            if clashes:
                who = self.regularizer_label or f"regularizer {type(regularizer).__name__}"
                raise PluginError(
                    f"{who} returns the loss term '{clashes[0]}', which is the name of a core "
                    "metric",
                    hint="give the term another name; core metrics: "
                    + ", ".join(sorted(CORE_METRICS)),
                )
            for name, term in terms.items():
                term_bpd = ops.cast(term, "float32") * to_bpd
                result[name] = term_bpd
                loss = loss + term_bpd
        result["loss"] = loss
        return result

    def evaluation_terms(self, x: Any) -> dict[str, Any]:
        """One batch's evaluation, as sums over its images (they add up over batches; see
        :mod:`hvae_core.model.evaluation`): the negative ELBO's parts in bits per dimension
        (``elbo_bpd``, ``recon_bpd``, ``kl_bpd``, ``kl_layers_bpd``, ``kl_flow_bpd`` with
        flows), ``count``, and per latent layer the sums of the posterior means and of their
        squares (for the variance over images that defines active units)."""
        result = self.losses_for(x)
        n = ops.cast(ops.shape(x)[0], "float32")
        terms = {
            key: result[key] * n
            for key in ("elbo_bpd", "recon_bpd", "kl_bpd", "kl_flow_bpd", "kl_layers_bpd")
            if key in result
        }
        means = [layer.q_mean for layer in result["outputs"].layers]
        terms[MEAN_SUM] = [ops.sum(m, axis=0) for m in means]
        terms[SQUARE_SUM] = [ops.sum(ops.square(m), axis=0) for m in means]
        terms["count"] = n
        return terms

    def _temperatures(self, temperature: Any) -> list[Any]:
        if isinstance(temperature, int | float):
            return [float(temperature)] * self.num_latent_layers
        if not isinstance(temperature, Sequence):  # a tensor, e.g. one value per image
            return [temperature] * self.num_latent_layers
        # A list may hold tensors: a compiled sampler takes its temperatures as inputs.
        temps = [t if ops.is_tensor(t) else float(t) for t in temperature]
        if len(temps) != self.num_latent_layers:
            raise ConfigError(
                f"expected one temperature or {self.num_latent_layers} (one per latent layer), "
                f"got {len(temps)}"
            )
        return temps

    def generate(
        self,
        n: Any,
        temperature: Any = 1.0,
        output_temperature: float = 1.0,
    ) -> Any:
        """``n`` images from the prior, in [-1, 1] on the pixel grid. ``temperature`` scales
        the prior's noise: one value, one per latent layer, or a tensor that broadcasts
        against a layer's latents (e.g. (n, 1, 1, 1): one per image); ``output_temperature``
        the likelihood's (0: the mode of the chosen mixture component)."""
        state, zs, _ = self.decoder(
            activations=None, batch_size=n, temperatures=self._temperatures(temperature)
        )
        return self._sample_pixels(self.head(state, zs), output_temperature)

    def reconstruct(self, x: Any, output_temperature: float = 0.0) -> Any:
        """Images decoded from latents drawn from the posterior of ``x``."""
        return self._sample_pixels(self.posterior_pass(x).params, output_temperature)

    def reconstruct_from_top(
        self,
        x: Any,
        layers: Any,
        temperature: Any = 1.0,
        output_temperature: float = 0.0,
    ) -> Any:
        """Images decoded with the posterior's z in the first (top) ``layers`` latent layers
        and draws from the prior at ``temperature`` below: what the top of the hierarchy
        encodes (0 layers: a sample; all: a reconstruction). ``layers`` and ``temperature``
        may be scalar tensors, so one compiled pass serves every depth and temperature."""
        activations = self.encoder(x)
        state, zs, _ = self.decoder(
            activations=activations,
            batch_size=ops.shape(x)[0],
            temperatures=[temperature] * self.num_latent_layers,
            posterior_layers=layers,
        )
        return self._sample_pixels(self.head(state, zs), output_temperature)

    def latents(self, x: Any) -> list[Any]:
        """Every layer's posterior sample z for ``x``, top (1x1) first."""
        return list(self.posterior_pass(x).latents)

    def encode(self, x: Any) -> list[dict[str, Any]]:
        """Every layer's posterior for ``x``, top (1x1) first: ``mean`` (of the Gaussian the
        layer's posterior draws from; with a flow, the flow's input) and ``sample`` (z, after
        the flow where there is one)."""
        out = self.posterior_pass(x)
        return [
            {"mean": layer.q_mean, "sample": z}
            for layer, z in zip(out.layers, out.latents, strict=True)
        ]

    def log_importance_weights(self, x: Any) -> Any:
        """log p(x, z) - log q(z|x) in nats, shape (B,), for one posterior draw z of every
        image: the terms of the importance-weighted bound (Burda et al. 2016), whose mean is
        the ELBO. Where a layer has a flow, log q(z_K|x) = log N(z_0; q) - log|det dz_K/dz_0|,
        the single-draw KL the layer already reports."""
        out = self.posterior_pass(x)
        log_w = self._pixel_log_prob(out.params, x)
        for block, layer, z in zip(self.decoder.blocks, out.layers, out.latents, strict=True):
            if block.flow is not None:
                log_w = log_w - layer.kl
                continue
            log_q = gaussian_log_prob(z, layer.q_mean, layer.q_scale)
            log_p = gaussian_log_prob(z, layer.p_mean, layer.p_scale)
            log_w = log_w - sum_per_example(log_q - log_p)
        return log_w

    def _pixel_log_prob(self, params: Any, x: Any) -> Any:
        """log p(x | the likelihood's parameters) in nats per image (the DMoL's)."""
        return dmol_log_prob(
            params,
            x,
            num_mixtures=self.num_mixtures,
            num_bits=self.num_bits,
            gradient_smoothing=self.gradient_smoothing,
            scale_fn=self.scale_fn,
        )

    def _sample_pixels(self, params: Any, temperature: float) -> Any:
        return dmol_sample(
            params,
            num_mixtures=self.num_mixtures,
            num_bits=self.num_bits,
            gradient_smoothing=self.gradient_smoothing,
            scale_fn=self.scale_fn,
            seed=self.sample_seed,
            temperature=temperature,
        )
