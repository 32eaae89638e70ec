"""The HVAE: encoder, top-down decoder, output head and discretized-logistic likelihood."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from hvae_core.errors import ConfigError, PluginError
from hvae_core.interfaces import CORE_METRICS, LayerStats, ModelOutputs
from hvae_core.model.decoder import Decoder
from hvae_core.model.distributions import gaussian_log_prob, sum_per_example
from hvae_core.model.encoder import Encoder
from hvae_core.model.evaluation import MEAN_SUM, SQUARE_SUM
from hvae_core.model.heads import DecoderHead, LatentAggregationHead
from hvae_core.model.layout import scales
from hvae_core.model.likelihood import (
    dmol_log_prob,
    dmol_noise_shape,
    dmol_num_params,
    dmol_sample,
)
from hvae_core.model.repeat import loop_with, shape_scan
from hvae_core.noise import NoiseShapes
from hvae_core.plugins import PluginRegistry, get_registry


class HVAE(keras.Model):
    """A VDVAE-style hierarchical VAE assembled from a resolved config and the plugins it names.

    Images go in as floats in [-1, 1] on the grid of ``2**num_bits`` levels, NHWC.

    Every pass is a deterministic function of the weights, its inputs and its noise: the
    ``noise`` argument is one standard normal array per latent layer, top first, shaped as
    :meth:`noise_shapes` says (``pixel_noise``: the likelihood's uniforms, where pixels are
    sampled). The engines and :class:`~hvae_core.trained.TrainedModel` draw it; without it, a
    pass draws it here from Keras' global random state (``keras.utils.set_random_seed``),
    which only an eager pass may do (a compiled or exported pass holds no random op).
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
        # The noise stays float32 under mixed precision (Keras would cast every float input
        # to the compute dtype); the encoder casts the images as its layers take them.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True  # the images are cast in call()
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
    def num_latent_dims(self) -> int:
        """Dimensions of all latent layers together (a layer at resolution R: R * R * z_width)."""
        return sum(b.scale.resolution**2 * b.scale.z_width for b in self.decoder.blocks)

    def noise_shapes(self, batch: Any) -> NoiseShapes:
        """The noise every pass over ``batch`` images takes: per latent layer, top first, a
        standard normal (batch, R, R, z_width) array (for a layer with a posterior flow it
        makes the flow's z_0), and the likelihood's uniforms for sampling pixels."""
        return NoiseShapes(
            latents=tuple(
                (batch, b.scale.resolution, b.scale.resolution, b.scale.z_width)
                for b in self.decoder.blocks
            ),
            pixels=dmol_noise_shape((batch, *self.image_shape), self.num_mixtures),
        )

    def latent_noise(self, noise: Any, batch: Any, groups: int = 1) -> list[Any]:
        """``noise`` (one array per latent layer) checked against the layers; None: drawn by
        :meth:`draw_latent_noise`, ``groups`` > 1 making the batch that many copies of one
        draw (e.g. images followed by their augmentations share their noise)."""
        if noise is None:
            drawn = self.draw_latent_noise(batch // groups if groups > 1 else batch)
            return [ops.concatenate([e] * groups, axis=0) if groups > 1 else e for e in drawn]
        noise = list(noise)
        if len(noise) != self.num_latent_layers:
            raise ValueError(
                f"expected noise for {self.num_latent_layers} latent layers, got {len(noise)}"
            )
        return noise

    def draw_latent_noise(self, batch: Any) -> list[Any]:
        """Standard normal noise for every latent layer from Keras' global random state: what
        an eager pass given no noise uses (a compiled pass must be handed its noise)."""
        return [keras.random.normal(s, dtype="float32") for s in self.noise_shapes(batch).latents]

    def count_params(self) -> int:
        """Weights of the model."""
        return int(sum(math.prod(w.shape) for w in self.weights))

    def num_flow_params(self) -> int:
        """Parameters of the posterior flows (0 without flows); the model must be built."""
        total = 0
        for block in self.decoder.blocks:
            if block.flow is not None:
                total += sum(math.prod(w.shape) for w in getattr(block.flow, "weights", []))
        return int(total)

    def call(
        self,
        x: Any,
        training: bool = False,
        noise_groups: int = 1,
        noise: Any = None,
    ) -> dict[str, Any]:
        """Keras's entry point: the posterior pass as nested dicts and lists, the form Keras
        traces and builds with. Everything else takes it typed, from :meth:`posterior_pass`."""
        x = ops.cast(x, self.compute_dtype)  # what Keras' input conversion would have done
        activations = self.encoder(x)
        batch = ops.shape(x)[0]
        state, zs, stats = self.decoder(
            activations=activations,
            batch_size=batch,
            noise=self.latent_noise(noise, batch, noise_groups),
            training=training,
        )
        return {"params": self.head(state, zs), "latents": zs, "stats": stats}

    def posterior_pass(
        self, x: Any, training: bool = False, noise_groups: int = 1, noise: Any = None
    ) -> ModelOutputs:
        """The posterior pass over ``x`` with latent ``noise`` (see :meth:`noise_shapes`;
        ``noise_groups`` shares a draw between parts of the batch where it is drawn here):
        the likelihood's parameters, every layer's z and every layer's posterior and prior
        (what a regularizer receives)."""
        out = self(x, training=training, noise_groups=noise_groups, noise=noise)
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
        # The noise is symbolic too: a traced pass may not draw. A known batch size: with an
        # unknown one, JAX and torch trace twice (and torch, where its shape-only "meta"
        # tensors fail, computes the pass at batch 83 and 89).
        batch = tuple(input_shape)[0] or 1
        noise = [keras.KerasTensor(s) for s in self.noise_shapes(batch).latents]
        with loop_with(shape_scan):  # a run's blocks are built: trace one of each run
            self.compute_output_spec(
                keras.KerasTensor((batch, *tuple(input_shape)[1:])), noise=noise
            )

    def build_weights(self) -> None:
        """Create every weight. By shape only: an eager forward pass would cost seconds (on
        JAX, every operation compiles on its first use)."""
        if not self.built:
            self.build((1, *self.image_shape))

    def losses_for(
        self,
        x: Any,
        beta: Any = 1.0,
        training: bool = False,
        regularizer: Any = None,
        noise_groups: int = 1,
        noise: Any = None,
    ) -> dict[str, Any]:
        """Loss and its parts, in bits per dimension averaged over the batch, for the latent
        ``noise`` (see :meth:`posterior_pass`).

        ``loss`` = (recon + beta * KL + regularizer terms) / (H W C ln 2); ``elbo_bpd`` is the
        negative ELBO (beta = 1). A regularizer's terms are also reported under their names.
        """
        out = self.posterior_pass(x, training=training, noise_groups=noise_groups, noise=noise)
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

    def evaluation_terms(self, x: Any, noise: Any = None) -> dict[str, Any]:
        """One batch's evaluation, as sums over its images (they add up over batches; see
        :mod:`hvae_core.model.evaluation`): the negative ELBO's parts in bits per dimension
        (``elbo_bpd``, ``recon_bpd``, ``kl_bpd``, ``kl_layers_bpd``, ``kl_flow_bpd`` with
        flows), ``count``, and per latent layer the sums of the posterior means and of their
        squares (for the variance over images that defines active units). ``noise``: the
        posterior's latent noise (see :meth:`noise_shapes`)."""
        result = self.losses_for(x, noise=noise)
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

    def prior_params(self, n: Any, temperature: Any = 1.0, noise: Any = None) -> Any:
        """The pixel likelihood's parameters (n, H, W, P) for ``n`` draws from the prior, layer
        by layer z = mean + scale * temperature * eps (``temperature`` and ``noise`` as for
        :meth:`generate`)."""
        state, zs, _ = self.decoder(
            activations=None,
            batch_size=n,
            temperatures=self._temperatures(temperature),
            noise=self.latent_noise(noise, n),
        )
        return self.head(state, zs)

    def generate(
        self,
        n: Any,
        temperature: Any = 1.0,
        output_temperature: float = 1.0,
        noise: Any = None,
        pixel_noise: Any = None,
    ) -> Any:
        """``n`` images from the prior, in [-1, 1] on the pixel grid: layer by layer z = mean +
        scale * temperature * eps. ``temperature`` scales the prior's noise: one value, one
        per latent layer, or a tensor that broadcasts against a layer's latents (e.g. (n, 1,
        1, 1): one per image); ``output_temperature`` the likelihood's (0: the mode of the
        chosen mixture component). ``noise``/``pixel_noise``: see :meth:`noise_shapes`."""
        params = self.prior_params(n, temperature, noise)
        return self.sample_pixels(params, output_temperature, pixel_noise)

    def reconstruct(
        self,
        x: Any,
        output_temperature: float = 0.0,
        noise: Any = None,
        pixel_noise: Any = None,
    ) -> Any:
        """Images decoded from latents drawn from the posterior of ``x`` with ``noise``."""
        params = self.posterior_pass(x, noise=noise).params
        return self.sample_pixels(params, output_temperature, pixel_noise)

    def reconstruct_from_top(
        self,
        x: Any,
        layers: Any,
        temperature: Any = 1.0,
        output_temperature: float = 0.0,
        noise: Any = None,
        pixel_noise: Any = None,
    ) -> Any:
        """Images decoded with the posterior's z in the first (top) ``layers`` latent layers
        and draws from the prior at ``temperature`` below: what the top of the hierarchy
        encodes (0 layers: a sample; all: a reconstruction). ``layers`` and ``temperature``
        may be scalar tensors, so one compiled pass serves every depth and temperature. A
        layer's eps in ``noise`` makes its posterior z where it is kept, its prior z below."""
        activations = self.encoder(x)
        batch = ops.shape(x)[0]
        state, zs, _ = self.decoder(
            activations=activations,
            batch_size=batch,
            temperatures=[temperature] * self.num_latent_layers,
            noise=self.latent_noise(noise, batch),
            posterior_layers=layers,
        )
        return self.sample_pixels(self.head(state, zs), output_temperature, pixel_noise)

    def decode(
        self, latents: Sequence[Any], output_temperature: float = 0.0, pixel_noise: Any = None
    ) -> Any:
        """Images decoded from given latents, in [-1, 1] on the pixel grid: ``latents`` holds
        every layer's z, top (1x1) first, (n, R, R, z_width) as :meth:`noise_shapes` says (with
        a flow, the flow's output, as :meth:`encode`'s ``sample``). The top-down pass takes
        them in place of the prior's draws; the prior still makes the state each z is added
        to, so the latents of an image's posterior decode to its reconstruction."""
        latents = list(latents)
        state, zs, _ = self.decoder(
            activations=None, batch_size=ops.shape(latents[0])[0], latents=latents
        )
        return self.sample_pixels(self.head(state, zs), output_temperature, pixel_noise)

    def latents(self, x: Any, noise: Any = None) -> list[Any]:
        """Every layer's posterior sample z for ``x``, top (1x1) first."""
        return list(self.posterior_pass(x, noise=noise).latents)

    def encode(self, x: Any, noise: Any = None) -> list[dict[str, Any]]:
        """Every layer's posterior for ``x``, top (1x1) first: ``mean`` and ``scale`` (of the
        Gaussian the layer's posterior draws from; with a flow, the flow's input) and
        ``sample`` (z for ``noise``, after the flow where there is one)."""
        out = self.posterior_pass(x, noise=noise)
        return [
            {"mean": layer.q_mean, "scale": layer.q_scale, "sample": z}
            for layer, z in zip(out.layers, out.latents, strict=True)
        ]

    def log_importance_weights(self, x: Any, noise: Any = None) -> Any:
        """log p(x, z) - log q(z|x) in nats, shape (B,), for the posterior draw z of every
        image that ``noise`` makes: the terms of the importance-weighted bound (Burda et al.
        2016), whose mean is the ELBO. Where a layer has a flow, log q(z_K|x) = log N(z_0; q) -
        log|det dz_K/dz_0|, the single-draw KL the layer already reports."""
        out = self.posterior_pass(x, noise=noise)
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

    def sample_pixels(self, params: Any, temperature: float, noise: Any = None) -> Any:
        """Pixels in [-1, 1] drawn from the likelihood's ``params`` at ``temperature`` with the
        uniforms ``noise`` (see :meth:`noise_shapes`; 0: each pixel's mode needs none)."""
        return dmol_sample(
            params,
            num_mixtures=self.num_mixtures,
            num_bits=self.num_bits,
            gradient_smoothing=self.gradient_smoothing,
            scale_fn=self.scale_fn,
            temperature=temperature,
            noise=noise,
        )
