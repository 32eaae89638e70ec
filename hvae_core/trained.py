"""A trained run as a model you can use: ``hvae_core.load(run_dir)``, then sample, reconstruct,
encode and score images with the EMA weights, on one device, without the training data.

Images go in and come out as the datasets give them: uint8 (N, H, W, C) levels of the run's bit
depth (0 .. 2**num_bits - 1). Every computation is a method of the model
(:class:`~hvae_core.model.hvae.HVAE`) that the backend's runner compiles once per shape.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from hvae_core.errors import HvaeError, InputError, RunWarning
from hvae_core.noise import (
    Noise,
    NoiseShapes,
    checked_latent_noise,
    checked_pixel_noise,
    draw_noise,
)
from hvae_core.run import RunDirectory, check_plugins

Progress = Callable[[int, int], None]
"""``progress(done, total)``, called as long work advances."""

# Work one call does, beyond which it is refused before it starts: a sample's images and
# their noise are drawn and held at once (100,000 covers the 50,000 of an FID), and every
# importance sample is a forward pass per image (papers report K = 1,000 to 5,000). Both ran
# on for minutes or hours, or ran out of memory, without a word.
MAX_SAMPLES = 100_000
MAX_IW_SAMPLES = 10_000


class TrainedModel:
    """A run's model with its trained (EMA) weights. Build one with :func:`load`."""

    def __init__(
        self,
        model: Any,
        config: Any,
        run: RunDirectory | None,
        meta: dict[str, Any],
        runner: Any,
    ) -> None:
        """``run`` None: a model in training (the trainer's figures), not a run's checkpoint."""
        self.model, self.config, self.run = model, config, run
        self.meta, self.runner = meta, runner
        # The noise stream the methods draw from when given no seed (see draw_noise).
        self._rng = np.random.default_rng(int(config.training.seed))

    # -- what it is ---------------------------------------------------------------------------

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.model.image_shape

    @property
    def num_bits(self) -> int:
        return int(self.model.num_bits)

    @property
    def num_latent_layers(self) -> int:
        return int(self.model.num_latent_layers)

    @property
    def latent_resolutions(self) -> list[int]:
        """The resolution R of every latent layer (its z is R x R x z_width), top first: keeping
        the top K layers (``reconstruct(..., latent_layers=K)``) keeps those of the first K
        entries (see :func:`describe_kept`)."""
        return [int(r) for r in self.model.latent_resolutions]

    @property
    def epoch(self) -> int:
        """Epochs the checkpoint had completed."""
        return int(self.meta.get("position", {}).get("epoch", 0))

    @property
    def batch_size(self) -> int:
        """Images per forward pass unless a method is told otherwise: the run's batch size."""
        return int(self.config.training.batch_size)

    def __repr__(self) -> str:
        h, w, c = self.image_shape
        where = str(self.run.path) if self.run is not None else None
        return (
            f"TrainedModel({where!r}, epoch {self.epoch}, {h}x{w}x{c} images, "
            f"{self.num_bits} bits, {self.num_latent_layers} latent layers, "
            f"{self.model.count_params():,} parameters)"
        )

    # -- its noise ----------------------------------------------------------------------------

    def noise_shapes(self, n: int) -> NoiseShapes:
        """The noise a pass over ``n`` images takes: ``latents``, per latent layer (top, 1x1,
        first) a standard normal array (n, R, R, z_width), and ``pixels``, the likelihood's
        uniforms (n, H, W, M + C) where pixels are sampled (``output_temperature`` > 0)."""
        return self.model.noise_shapes(_count(n, "n"))

    def draw_noise(self, n: int, seed: int | None = None, *, pixels: bool = True) -> Noise:
        """A draw of the noise for ``n`` images with NumPy, from ``seed`` (None: the model's
        own stream continues): what the methods draw when given a seed, so the same seed
        gives the same numbers here, on every backend and in an exported model."""
        n = _at_most(_count(n, "n"), MAX_SAMPLES, "n", "images")
        if seed is not None:
            self.reseed(seed)
        return draw_noise(self.noise_shapes(n), self._rng, pixels)

    def reseed(self, seed: int) -> None:
        """Restart the model's noise stream (latent layers, pixel sampling) from ``seed`` (an
        integer in 0..2**32 - 1, like NumPy's and the backends' seeds)."""
        self._rng = np.random.default_rng(checked_seed(seed))

    # -- what it does -------------------------------------------------------------------------

    def sample(
        self,
        n: int,
        temperature: float | Sequence[float] = 1.0,
        output_temperature: float = 1.0,
        *,
        seed: int | None = None,
        batch_size: int | None = None,
        noise: Any = None,
        pixel_noise: Any = None,
    ) -> np.ndarray:
        """``n`` images from the prior, uint8 levels (n, H, W, C): layer by layer z = mean +
        scale * temperature * eps. ``temperature`` scales the prior's noise: one value, or one
        per latent layer (top first); ``output_temperature`` the pixel likelihood's (0: the
        mode of each pixel's chosen component). ``seed`` makes the draw repeatable (None: the
        model's noise stream continues). ``noise`` (one array per latent layer, or a
        :class:`~hvae_core.noise.Noise`) and ``pixel_noise`` (needed when
        ``output_temperature`` > 0) replay a given draw instead (see :meth:`noise_shapes`).
        At most :data:`MAX_SAMPLES` images per call."""
        from hvae_core.model.pixels import to_levels

        n = _at_most(_count(n, "n"), MAX_SAMPLES, "n", "images")
        temps = self._temperatures(temperature)
        output_temperature = _non_negative(output_temperature, "output_temperature")
        latents, pixels = self._noise(n, seed, noise, pixel_noise, output_temperature > 0)
        size = self._batch(batch_size)
        parts = []
        for start in range(0, n, size):
            rows = slice(start, min(start + size, n))

            def generate(
                layer_temps: Any, eps: Any, *uniforms: Any, count: int = rows.stop - rows.start
            ) -> Any:
                per_layer = [layer_temps[i] for i in range(len(temps))]
                x = self.model.generate(
                    count,
                    temperature=per_layer,
                    output_temperature=output_temperature,
                    noise=list(eps),
                    pixel_noise=uniforms[0] if uniforms else None,
                )
                return to_levels(x, self.num_bits)

            # The temperatures are an input, not part of the key: one compiled sampler serves
            # them all (the output temperature stays a key: 0 takes another code path).
            key = ("sample", rows.stop - rows.start, output_temperature)
            layer_temps = np.asarray(temps, dtype=np.float32)
            extra = () if pixels is None else (pixels[rows],)
            eps = [e[rows] for e in latents]
            parts.append(to_numpy(self.runner.run(key, generate, layer_temps, eps, *extra)))
        return np.concatenate(parts).astype(np.uint8)

    def reconstruct(
        self,
        images: Any,
        output_temperature: float = 0.0,
        *,
        latent_layers: int | None = None,
        temperature: float = 1.0,
        batch_size: int | None = None,
        seed: int | None = None,
        noise: Any = None,
        pixel_noise: Any = None,
    ) -> np.ndarray:
        """``images`` decoded from latents drawn from their posterior, uint8 levels. With
        ``latent_layers`` = j, only the top j layers take the posterior's latents and the
        layers below draw from the prior at ``temperature`` (0: a sample, all layers: a
        reconstruction): what each part of the hierarchy encodes. ``seed``, ``noise`` and
        ``pixel_noise`` as for :meth:`sample` (a layer's eps makes its posterior z where it is
        kept, its prior z below)."""
        from hvae_core.model.pixels import to_levels

        output_temperature = _non_negative(output_temperature, "output_temperature")
        temperature = _non_negative(temperature, "temperature")
        latent_layers = self._layer_count(latent_layers)
        images = self._check(images)
        latents, pixels = self._noise(len(images), seed, noise, pixel_noise, output_temperature > 0)

        def reconstruct(batch: Any, layers: Any, temp: Any, eps: Any, *uniforms: Any) -> Any:
            x = self._unit(batch)
            pixel = uniforms[0] if uniforms else None
            if latent_layers is None:
                out = self.model.reconstruct(x, output_temperature, list(eps), pixel)
            else:
                out = self.model.reconstruct_from_top(
                    x, layers, temp, output_temperature, list(eps), pixel
                )
            return to_levels(out, self.num_bits)

        # The depth and the temperature are inputs: one compiled pass serves every j and t.
        key = ("reconstruct", output_temperature, latent_layers is None)
        layers = np.int32(self.num_latent_layers if latent_layers is None else latent_layers)
        parts = []
        for rows, batch in self._slices(images, batch_size):
            extra = () if pixels is None else (pixels[rows],)
            eps = [e[rows] for e in latents]
            args = (batch, layers, np.float32(temperature), eps, *extra)
            parts.append(to_numpy(self.runner.run(key, reconstruct, *args)))
        return np.concatenate(parts).astype(np.uint8)

    def decode(
        self,
        latents: Sequence[Any],
        output_temperature: float = 0.0,
        *,
        batch_size: int | None = None,
        seed: int | None = None,
        pixel_noise: Any = None,
    ) -> np.ndarray:
        """Images decoded from given latents, uint8 levels (n, H, W, C): ``latents`` holds every
        latent layer's z, top (1x1) first, float arrays (n, R, R, z_width) as
        :meth:`noise_shapes` gives them (e.g. :meth:`encode`'s ``sample``, or a mix of two
        images' latents). The decoder takes them in place of the prior's draws, so
        ``decode(z of an image's posterior)`` is that image's reconstruction from z.
        ``output_temperature`` > 0 samples the pixels (``seed`` or ``pixel_noise`` as for
        :meth:`sample`)."""
        from hvae_core.model.pixels import to_levels

        output_temperature = _non_negative(output_temperature, "output_temperature")
        zs = self._checked_latents(latents)
        n = len(zs[0])
        pixels = None
        if output_temperature > 0:
            shapes = self.model.noise_shapes(n)
            if pixel_noise is not None:
                if seed is not None:
                    raise InputError("give either seed or pixel_noise, not both")
                pixels = checked_pixel_noise(pixel_noise, shapes)
            else:
                if seed is not None:
                    self.reseed(seed)
                pixels = draw_noise(shapes, self._rng, True).pixels
        elif pixel_noise is not None:
            raise InputError("pixel_noise is given but output_temperature is 0")

        def decode(given: Any, *uniforms: Any) -> Any:
            x = self.model.decode(
                list(given), output_temperature, uniforms[0] if uniforms else None
            )
            return to_levels(x, self.num_bits)

        size = self._batch(batch_size)
        parts = []
        for start in range(0, n, size):
            rows = slice(start, min(start + size, n))
            extra = () if pixels is None else (pixels[rows],)
            given = [z[rows] for z in zs]
            parts.append(
                to_numpy(self.runner.run(("decode", output_temperature), decode, given, *extra))
            )
        return np.concatenate(parts).astype(np.uint8)

    def interpolate(
        self,
        a: Any,
        b: Any,
        steps: int = 8,
        *,
        posterior: str = "mean",
        output_temperature: float = 0.0,
        seed: int | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """``steps`` images (steps, H, W, C), uint8 levels, decoded (:meth:`decode`) from
        latents interpolated linearly, layer by layer, between those of images ``a`` and ``b``
        (each (H, W, C) or (1, H, W, C)): step i takes z = (1 - w) z_a + w z_b with w = i /
        (steps - 1), so the first step decodes a's latents and the last b's. ``posterior``:
        ``"mean"`` (the default) takes each layer's z at eps = 0 (the posterior mean; with a
        flow, the flow of the mean), ``"sample"`` one posterior draw per image from ``seed``.
        At ``output_temperature`` 0 (the default) and with the means, the ends equal
        ``reconstruct(a)`` and ``reconstruct(b)`` with zero noise."""
        steps = _count(steps, "steps")
        if steps < 2:
            raise InputError(f"steps must be at least 2 (the two ends), got {steps}")
        if posterior not in ("mean", "sample"):
            raise InputError(f"posterior must be 'mean' or 'sample', got {posterior!r}")
        pair = np.concatenate([self._one_image(a, "a"), self._one_image(b, "b")])
        if seed is not None:
            self.reseed(seed)
        shapes = self.model.noise_shapes(2).latents
        if posterior == "mean":
            eps = [np.zeros(s, np.float32) for s in shapes]
        else:
            eps = list(self._draw(2, pixels=False).latents)
        layers = self.encode(pair, noise=eps, batch_size=2)
        w = np.linspace(0.0, 1.0, steps, dtype=np.float64)
        zs = []
        for layer in layers:
            z = layer["sample"].astype(np.float32)
            weight = w.reshape(-1, 1, 1, 1).astype(np.float32)
            zs.append((1.0 - weight) * z[0:1] + weight * z[1:2])
        return self.decode(zs, output_temperature, batch_size=batch_size)

    def encode(
        self,
        images: Any,
        *,
        batch_size: int | None = None,
        seed: int | None = None,
        noise: Any = None,
    ) -> list[dict[str, np.ndarray]]:
        """Every latent layer's posterior for ``images``, top (1x1) first: ``{"mean",
        "scale", "sample"}`` arrays (N, R, R, z_width); ``sample`` is mean + scale * eps for
        the latent noise (``seed``, ``noise`` as for :meth:`sample`; with a flow, ``mean`` and
        ``scale`` are those of the flow's input and ``sample`` is after the flow)."""
        images = self._check(images)
        latents, _ = self._noise(len(images), seed, noise, None, False)

        def encode(batch: Any, eps: Any) -> Any:
            return self.model.encode(self._unit(batch), list(eps))

        parts = [
            self.runner.run("encode", encode, batch, [e[rows] for e in latents])
            for rows, batch in self._slices(images, batch_size)
        ]
        return [
            {
                k: np.concatenate([to_numpy(p[i][k]) for p in parts])
                for k in ("mean", "scale", "sample")
            }
            for i in range(self.num_latent_layers)
        ]

    def elbo(
        self,
        images: Any,
        *,
        batch_size: int | None = None,
        seed: int | None = None,
        noise: Any = None,
    ) -> dict[str, Any]:
        """The negative ELBO of ``images`` in bits per dimension, averaged over them, and how
        the latent layers are used, for one posterior draw per image (``seed``, ``noise`` as
        for :meth:`sample`). ``images``: an image array, or an iterator of batches (a split
        streamed through its dataset's transform, say; then no ``noise``). Keys: ``bpd`` (=
        ``elbo_bpd``), ``recon_bpd``, ``kl_bpd``, ``kl_layers_bpd`` (every layer's KL, top
        first; they sum to ``kl_bpd``), ``kl_scales_bpd``, ``active_units`` and
        ``latent_dims`` per layer and their totals, ``active_layers``, ``images`` (see
        :func:`hvae_core.model.evaluation.summarise`)."""
        from hvae_core.model.evaluation import add_terms, summarise

        def terms(batch: Any, eps: Any) -> dict[str, Any]:
            return self.model.evaluation_terms(self._unit(batch), list(eps))

        given = None
        if noise is not None:
            if _is_stream(images):
                raise InputError("noise is given for an image array, not a stream of batches")
            images = self._check(images)
            given, _ = self._noise(len(images), None, noise, None, False)
        elif seed is not None:
            self.reseed(seed)
        totals: dict[str, Any] = {}
        done = 0
        for batch in self._batches(images, batch_size):
            if given is None:
                eps = list(self._draw(len(batch), pixels=False).latents)
            else:
                eps = [e[done : done + len(batch)] for e in given]
            done += len(batch)
            values = self.runner.run("evaluation_terms", terms, batch, eps)
            add_terms(totals, to_numpy(values))
        if not totals:
            raise InputError("no images to evaluate")
        out = summarise(totals, self.model.latent_resolutions)
        out["bpd"] = out["elbo_bpd"]
        return out

    def log_likelihood(
        self,
        images: Any,
        num_samples: int = 100,
        *,
        batch_size: int | None = None,
        progress: Progress | None = None,
        seed: int | None = None,
        noise: Any = None,
    ) -> dict[str, Any]:
        """The importance-weighted bound on -log p(x) (Burda et al. 2016) with ``num_samples``
        = K posterior draws per image, in bits per dimension:

            -log p(x) <= -log (1/K) sum_k p(x, z_k) / q(z_k | x)

        It tightens as K grows and equals the ELBO in expectation at K = 1. The K draws of
        all images run ``batch_size`` at a time (default: the run's batch size): memory stays
        that of one forward pass, time is K forward passes per image. ``seed`` as for
        :meth:`sample`; ``noise``: per latent layer (N, K, R, R, z_width), image i's draw k
        at [i, k]. Returns ``bpd`` (the mean over images), ``per_image_bpd``, ``num_samples``
        and ``images``. K is at most :data:`MAX_IW_SAMPLES`."""
        k = _at_most(_count(num_samples, "num_samples"), MAX_IW_SAMPLES, "num_samples", "draws")
        images = self._check(images)
        n, rows = len(images), self._batch(batch_size)
        shapes = self.model.noise_shapes(n)
        given = None
        if noise is not None:
            given = checked_latent_noise(noise, shapes, rows=(n, k))
        elif seed is not None:
            self.reseed(seed)
        total = n * k
        # Running log-sum-exp per image, in float64: the draws of an image may span calls.
        log_sum = np.full(n, -np.inf)
        key = ("log_importance_weights",)

        def weights_of(batch: Any, eps: Any) -> Any:
            return self.model.log_importance_weights(self._unit(batch), list(eps))

        for start in range(0, total, rows):
            draw = np.arange(start, start + rows)
            owner = np.minimum(draw, total - 1) // k  # the last call is padded: one shape
            if given is None:
                eps = list(self._draw(rows, pixels=False).latents)
            else:
                which = np.minimum(draw, total - 1) % k
                eps = [e[owner, which] for e in given]
            weights = to_numpy(
                self.runner.run(key, weights_of, self._levels(images[owner]), eps)
            ).astype(np.float64)
            valid = draw < total
            np.logaddexp.at(log_sum, owner[valid], weights[valid])
            if progress is not None:
                progress(min(start + rows, total), total)
        log_px = log_sum - math.log(k)
        per_image = -log_px / (math.prod(self.image_shape) * math.log(2.0))
        return {
            "bpd": float(np.mean(per_image)),
            "per_image_bpd": per_image,
            "num_samples": k,
            "images": n,
        }

    # -- helpers ------------------------------------------------------------------------------

    def _temperatures(self, temperature: float | Sequence[float]) -> list[float]:
        # A string or a mapping iterates, but into characters or keys, never temperatures.
        if isinstance(temperature, str | bytes | Mapping):
            raise InputError(
                f"temperature must be a number, or one per latent layer, got {_short(temperature)}"
            )
        try:
            values = list(temperature)
        except TypeError:  # one value: a float, a NumPy scalar or 0-d array, a Decimal, None
            values = [temperature]
        temps = [_non_negative(t, "temperature") for t in values]
        if len(temps) == 1:
            return temps * self.num_latent_layers
        if len(temps) != self.num_latent_layers:
            raise InputError(
                f"expected one temperature or {self.num_latent_layers} (one per latent layer), "
                f"got {len(temps)}"
            )
        return temps

    def _checked_latents(self, latents: Any) -> list[np.ndarray]:
        """Every latent layer's z as float32 (n, R, R, z_width) with one n, or one
        :class:`InputError` naming the layer and both shapes."""
        count = self.num_latent_layers
        if isinstance(latents, np.ndarray) or not isinstance(latents, Sequence):
            raise InputError(
                f"latents must be a list of {count} arrays, one per latent layer (top first), "
                f"got {type(latents).__name__}"
            )
        if len(latents) != count:
            raise InputError(f"latents hold {len(latents)} arrays; the model has {count} layers")
        shapes = self.model.noise_shapes(None).latents
        out: list[np.ndarray] = []
        for i, (z, shape) in enumerate(zip(latents, shapes, strict=True)):
            dtype = getattr(z, "dtype", None)
            if dtype is None or not np.issubdtype(np.dtype(dtype), np.floating):
                raise InputError(f"latents of layer {i} must be a float array")
            got = tuple(int(d) for d in np.shape(z))
            n = len(out[0]) if out else (got[0] if got else 0)
            if len(got) != 4 or got[1:] != tuple(shape[1:]) or got[0] != n or n == 0:
                raise InputError(
                    f"latents of layer {i} ({shape[1]}x{shape[2]}) have shape {got}, expected "
                    f"({n or 'N'}, {', '.join(map(str, shape[1:]))})"
                )
            array = np.asarray(z, dtype=np.float32)
            if not np.all(np.isfinite(array)):
                raise InputError(f"latents of layer {i} hold non-finite values")
            out.append(array)
        return out

    def _layer_count(self, value: Any) -> int | None:
        """``latent_layers``: None (all), or an integer in 0..L; 1.5, '2' or True are refused,
        not rounded or parsed."""
        count = self.num_latent_layers
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | np.integer)
            or not 0 <= value <= count
        ):
            raise InputError(
                f"latent_layers must be an integer in 0..{count} (or None: all), got "
                f"{_short(value)}"
            )
        return int(value)

    def _one_image(self, image: Any, what: str) -> np.ndarray:
        """One image as a batch of one, checked."""
        if not hasattr(image, "shape") and not isinstance(image, list | tuple):
            raise self._not_images(image, what, "one image")
        array = image if hasattr(image, "shape") else np.asarray(image)
        if len(array.shape) == 3:
            array = array[None]
        if len(array.shape) != 4 or array.shape[0] != 1:
            raise InputError(
                f"{what} must be one image ({', '.join(map(str, self.image_shape))}), got shape "
                f"{tuple(array.shape)}"
            )
        return self._levels(self._check(array))

    def _draw(self, n: int, pixels: bool) -> Noise:
        return draw_noise(self.model.noise_shapes(n), self._rng, pixels)

    def _noise(
        self, n: int, seed: int | None, noise: Any, pixel_noise: Any, pixels: bool
    ) -> tuple[tuple[np.ndarray, ...], np.ndarray | None]:
        """The latent noise and (where ``pixels`` are sampled) the likelihood's uniforms for
        ``n`` images: the given ones, checked, or a draw from ``seed`` / the stream."""
        shapes = self.model.noise_shapes(n)
        if noise is None:
            if pixel_noise is not None:
                raise InputError("pixel_noise is given without the latent noise")
            if seed is not None:
                self.reseed(seed)
            drawn = self._draw(n, pixels)
            return drawn.latents, drawn.pixels
        if seed is not None:
            raise InputError("give either seed or noise, not both")
        latents = checked_latent_noise(noise, shapes)
        if isinstance(noise, Noise) and pixel_noise is None:
            pixel_noise = noise.pixels
        return latents, (checked_pixel_noise(pixel_noise, shapes) if pixels else None)

    def _slices(self, images: Any, batch_size: int | None) -> Any:
        """(rows, batch) for every batch of the checked ``images``."""
        size = self._batch(batch_size)
        for start in range(0, len(images), size):
            rows = slice(start, min(start + size, len(images)))
            yield rows, self._levels(images[rows])

    def _batch(self, batch_size: int | None) -> int:
        return self.batch_size if batch_size is None else _count(batch_size, "batch_size")

    def _check(self, images: Any) -> Any:
        """``images`` as the model takes them, or an :class:`InputError` saying why not."""
        shape = tuple(getattr(images, "shape", ()))
        if not hasattr(images, "dtype"):
            if not isinstance(images, list | tuple):
                raise self._not_images(images, "images", "an array of pixel levels")
            try:
                images = np.asarray(images)
            except (TypeError, ValueError):  # ragged nesting
                raise self._not_images(images, "images", "an array of pixel levels") from None
            shape = images.shape
        if len(shape) != 4 or tuple(shape[1:]) != tuple(self.image_shape) or shape[0] == 0:
            raise InputError(
                f"expected images of shape (N, {', '.join(map(str, self.image_shape))}) with "
                f"N >= 1, got {shape}"
            )
        if not np.issubdtype(np.dtype(images.dtype), np.integer):
            raise InputError(
                f"expected integer pixel levels (uint8), got {np.dtype(images.dtype)}",
                hint=f"levels run from 0 to {2**self.num_bits - 1} ({self.num_bits} bits)",
            )
        return images

    def _batches(self, images: Any, batch_size: int | None) -> Any:
        """An array's batches, or those of every array an iterable of batches gives: one level
        deep, so that an iterable of anything else ends in one error, not a recursion."""
        size = self._batch(batch_size)
        for part in images if _is_stream(images) else [images]:
            part = self._check(part)
            for start in range(0, len(part), size):
                yield self._levels(part[start : start + size])

    def _not_images(self, value: Any, what: str, expected: str) -> InputError:
        """The error for ``value`` where images belong: it names what was given."""
        dims = ", ".join(map(str, self.image_shape))
        shape = f"({dims})" if expected == "one image" else f"(N, {dims})"
        if isinstance(value, str | bytes | os.PathLike):
            hint = (
                "read the file first: hvae_core.cli.read_images(path, model.image_shape, "
                "model.num_bits) reads a PNG, a folder of PNGs or an .npz"
            )
        else:
            hint = (
                f"uint8 levels 0..{2**self.num_bits - 1} in a NumPy array; elbo also takes an "
                "iterable of such batches"
            )
        return InputError(f"{what} must be {expected} {shape}, got {_described(value)}", hint=hint)

    def _levels(self, batch: Any) -> np.ndarray:
        batch = np.asarray(batch)
        top = 2**self.num_bits - 1
        if batch.min() < 0 or batch.max() > top:
            raise InputError(
                f"pixel levels must lie in 0..{top} ({self.num_bits} bits), found "
                f"{batch.min()}..{batch.max()}"
            )
        return batch.astype(np.uint8)

    def _unit(self, batch: Any) -> Any:
        from hvae_core.model.pixels import to_unit_range

        return to_unit_range(batch, self.num_bits)


def describe_kept(resolutions: Sequence[int], k: int) -> str:
    """What keeping the top ``k`` of the latent layers at ``resolutions`` (top first) keeps, in
    resolution terms: e.g. "every layer up to 4x4" or "every layer up to 4x4 and 2 of the 6
    at 8x8" (see :attr:`TrainedModel.latent_resolutions`)."""
    if k <= 0:
        return "no layer (a sample from the prior)"
    if k >= len(resolutions):
        return f"all {len(resolutions)} layers (a reconstruction)"
    kept = list(resolutions[:k])
    top = kept[-1]
    at_top = resolutions.count(top)
    if kept.count(top) == at_top:
        return f"every layer up to {top}x{top}"
    done = [r for r in dict.fromkeys(kept) if r != top]
    text = f"every layer up to {done[-1]}x{done[-1]} and " if done else ""
    return text + f"{kept.count(top)} of the {at_top} at {top}x{top}"


def load(
    run_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    backend: str | None = None,
    *,
    jit: bool | None = None,
    verbose: bool = False,
    registry: Any = None,
) -> TrainedModel:
    """The trained model of ``run_dir`` with its EMA weights, on one device: no optimizer, no
    distributed set-up, no dataset. ``checkpoint``: another checkpoint of the run (default:
    the run's own). ``backend``: the Keras backend (default: the one already imported, else
    $KERAS_BACKEND, else the run's); Keras cannot switch backends within a process. Besides
    the three training backends, ``"openvino"`` (Keras' inference-only OpenVINO backend) runs
    every method, eagerly.
    ``jit``: compile the computations (default: the run's ``run.jit``). ``verbose``: let the
    backend's native libraries log as they start (default: as $HVAE_LOG_LEVEL says)."""
    from hvae_core.backends import native_logs as logs
    from hvae_core.backends.select import import_backend, select_backend
    from hvae_core.run import checkpoint as checkpoint_meta

    _check_path(run_dir, "run_dir", "the path of a run directory")
    # bool("no") is True: a flag is a bool, never coerced from what it is not.
    if jit is not None and not isinstance(jit, bool | np.bool_):
        raise InputError(
            f"jit must be True, False or None (the run's run.jit), got {_short(jit)}",
            hint="e.g. hvae_core.load(run_dir, jit=False)",
        )
    if not isinstance(verbose, bool | np.bool_):
        raise InputError(
            f"verbose must be True or False, got {_short(verbose)}",
            hint="e.g. hvae_core.load(run_dir, verbose=True)",
        )
    if backend is not None and not isinstance(backend, str):
        raise InputError(
            f"backend must be the name of a Keras backend, got {_described(backend)}",
            hint="e.g. hvae_core.load(run_dir, backend='jax')",
        )
    if checkpoint is not None:
        _check_path(checkpoint, "checkpoint", "the path of a checkpoint file (None: the run's)")
    run = RunDirectory.open(run_dir)
    saved = run.read_checkpoint(checkpoint=checkpoint)  # read once: metadata and arrays
    path, meta = saved.path, saved.meta
    for message in check_plugins(meta.get("plugins", []), registry):
        warnings.warn(message, RunWarning, stacklevel=2)
    config = run.config(registry, trackers=False)  # a model logs nothing: none need be installed
    if "image_shape" not in meta or "num_bits" not in meta:
        raise HvaeError(
            f"checkpoint {path} records no image shape or bit depth",
            hint="it predates hvae's run format; resume the run for an epoch to rewrite it",
        )
    # Before the model is built: it would blame "the dataset's images" for what is a mismatch
    # between two files of the run.
    height, width, channels = (int(d) for d in meta["image_shape"])
    size = int(config.image_size)
    if (height, width) != (size, size):
        raise HvaeError(
            f"checkpoint {path} records {height}x{width}x{channels} images; the run's "
            f"config.yaml describes {size}x{size} images",
            hint="was config.yaml edited after the run started? restore the one it trained with",
        )
    # The model takes the checkpoint's bit depth (its weights were trained on it); a config
    # that names another would make the commands read the data at that depth, and score
    # images of one depth with a model of another without a word.
    bits, wanted = int(meta["num_bits"]), config.data.num_bits
    if wanted is not None and int(wanted) != bits:
        raise HvaeError(
            f"checkpoint {path} records {bits}-bit images; the run's config.yaml sets "
            f"data.num_bits to {wanted}",
            hint="was config.yaml edited after the run started? restore the one it trained with",
        )
    # Warned only once the differences that would make the warning untrue are refused above.
    changed = checkpoint_meta.differences(meta, config)
    if changed:
        warnings.warn(
            f"the run's config.yaml differs from the config its checkpoint was trained with "
            f"(in {', '.join(changed[:5])}); loading it as config.yaml says",
            RunWarning,
            stacklevel=2,
        )
    if "keras" in sys.modules:
        backend = backend or sys.modules["keras"].backend.backend()
    else:
        backend = backend or os.environ.get("KERAS_BACKEND") or config.run.backend
    select_backend(backend, compile_cache_on=config.run.compile_cache, inference=True)
    quiet = logs.log_level(verbose) == logs.QUIET
    if quiet:
        logs.quiet_native_logs()
    import_backend(quiet)
    model = _build(config, meta, saved.arrays, registry)
    from hvae_core.backends.engine import make_runner

    runner = make_runner(model, config.run.jit if jit is None else bool(jit))
    return TrainedModel(model, config, run, meta, runner)


def _check_path(value: Any, what: str, expected: str) -> None:
    """A path given to :func:`load`, as a str or a path object: pathlib would raise a bare
    TypeError for anything else, and read None as a run not yet begun."""
    if not isinstance(value, str | os.PathLike):
        raise InputError(
            f"{what} must be {expected}, got {_described(value)}",
            hint="e.g. hvae_core.load('runs/digits-20261123-204312')",
        )
    if not os.fspath(value):  # "" would be the current folder
        raise InputError(
            f"{what} is empty", hint="e.g. hvae_core.load('runs/digits-20261123-204312')"
        )
    try:  # pathlib's exists() raises what the system refuses to look up as a bare OSError
        os.stat(value)
    except (FileNotFoundError, NotADirectoryError):
        pass  # said in the words of the run directory, by RunDirectory.open
    except OSError as exc:
        raise InputError(
            f"{what} {_short(os.fspath(value))}: {exc.strerror or exc}",
            hint="give the path of an existing run directory (and checkpoint)",
        ) from None


def _build(config: Any, meta: dict[str, Any], arrays: dict[str, np.ndarray], registry: Any) -> Any:
    """The run's model holding the checkpoint's weights, the EMA in place of the trained ones
    where the run kept one."""
    from hvae_core.model.hvae import HVAE

    model = HVAE(
        config,
        meta["image_shape"],
        int(meta["num_bits"]),
        registry=registry,
        seed=config.training.seed,
    )
    model.build_weights()
    from hvae_core.model.weights import assign_saved, in_model_layout

    has_ema = any(k.startswith("ema/") for k in arrays)
    try:
        arrays = in_model_layout(arrays, model, None, has_ema)
        assign_saved(arrays, "model", list(model.variables))
        if has_ema:  # the EMA is what a finished run is scored with
            assign_saved(arrays, "ema", list(model.trainable_variables))
    except ValueError as exc:
        raise HvaeError(
            f"the checkpoint does not fit the run's model: {exc}",
            hint="was config.yaml edited after the run started?",
        ) from None
    return model


def to_numpy(values: Any) -> Any:
    """Tensors (or nestings of them) as numpy arrays. Imported when called: importing this
    module must not import Keras before :func:`load` has chosen the backend."""
    from hvae_core.backends.engine import to_numpy as convert

    return convert(values)


MAX_SEED = 2**32 - 1


def checked_seed(seed: Any) -> int:
    """``seed`` when it is an integer in 0..2**32 - 1, else one line of :class:`InputError`."""
    if (
        isinstance(seed, bool)
        or not isinstance(seed, int | np.integer)
        or not 0 <= seed <= MAX_SEED
    ):
        raise InputError(
            f"seed must be an integer in 0..2**32 - 1 ({MAX_SEED}), got {seed!r}",
            hint="give a seed in that range, or None for the model's own noise streams",
        )
    return int(seed)


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InputError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _at_most(value: int, limit: int, what: str, unit: str) -> int:
    """``value`` where it is within ``limit`` (see MAX_SAMPLES), else one InputError."""
    if value > limit:
        raise InputError(
            f"{what} = {value:,}: at most {limit:,} {unit} per call",
            hint="make several calls (with different seeds) and combine what they return"
            if unit == "images"
            else "papers report K = 1,000 to 5,000; the bound changes little beyond",
        )
    return value


def _non_negative(value: Any, what: str) -> float:
    """One real number >= 0: a float, an int, a NumPy scalar or 0-d array, a Decimal. float()
    alone would also take "0.5", True and a one-element array, none of which is meant."""
    if isinstance(value, str | bytes | bool | np.bool_) or getattr(value, "ndim", 0) != 0:
        raise InputError(f"{what} must be a number, got {_short(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {_short(value)}") from None
    if not math.isfinite(number) or number < 0:
        raise InputError(f"{what} must be a finite number >= 0, got {_short(value)}")
    return number


def _is_stream(images: Any) -> bool:
    """Whether ``images`` is an iterable of batches (elbo's other input) rather than one array:
    never a string, a path, a mapping or a number, which iterate (or not) into anything but
    batches."""
    if hasattr(images, "dtype") or isinstance(images, list | tuple):
        return False
    if isinstance(images, str | bytes | os.PathLike | Mapping | numbers.Number):
        return False
    return isinstance(images, Iterable)


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _described(value: Any) -> str:
    """What a caller handed over, as an error names it: "None", "a str ('x.png')", "a dict"."""
    if value is None:
        return "None"
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    if isinstance(value, os.PathLike):
        return f"{article} {name} ({_short(os.fspath(value))})"
    if isinstance(value, str | bytes | numbers.Number):
        return f"{article} {name} ({_short(value)})"
    return f"{article} {name}"
