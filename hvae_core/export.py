"""A trained model as self-contained inference models: a sampler (prior -> pixels) and an
encoder (pixels -> every layer's posterior), saved as Keras' own ``.keras`` or a TensorFlow
SavedModel.

The model itself draws nothing (its noise is an input); these two exports draw theirs with a
Keras ``SeedGenerator`` of their own, so a loaded sampler is a self-contained random sampler.
Such a draw is a ``Stateless*Random*`` op, which ONNX lacks.

Importing this module registers the two models with Keras' serialization, so that a fresh
process loads a ``.keras`` export with::

    import hvae_core.export  # registers hvae's models (imports no trainer)
    sampler = keras.saving.load_model("export/sampler.keras")  # safe_mode stays on
    levels = sampler(np.full(16, 0.8, "float32"))  # 16 images at temperature 0.8
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
from keras import ops

from hvae_core.backends.engine import refuse_unless
from hvae_core.backends.native_logs import QUIET, log_level
from hvae_core.backends.select import import_tensorflow_quietly
from hvae_core.errors import ConfigError, InputError
from hvae_core.export_formats import PORTABLE, SUFFIX, check_format, staged_export
from hvae_core.model.hvae import HVAE
from hvae_core.model.pixels import to_levels, to_unit_range
from hvae_core.model.weights import copy_weights
from hvae_core.trained import MAX_SEED, checked_seed

MAX_BITS = 8  # levels are uint8
MODEL_KEYS = ("name", "trainable", "dtype")  # what keras.Model.get_config writes


class _Exported(keras.Model):
    """Holds an :class:`HVAE` rebuilt from its config (the run's resolved config as a dict),
    and the noise stream its passes draw from: started from ``seed`` wherever it is loaded
    (None: the run's training seed)."""

    # What get_config writes; a loaded file's config is checked against it (see from_config).
    CONFIG_KEYS: tuple[str, ...] = ("hvae_config", "image_shape", "num_bits", "seed")

    def __init__(
        self,
        hvae_config: dict[str, Any],
        image_shape: Any,
        num_bits: int,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        from hvae_core.config import build_config

        super().__init__(**kwargs)
        # A .keras file's config is data anyone could have edited: an impossible value ends
        # here, in one line naming it, not in a model that loads and samples garbage.
        if not isinstance(hvae_config, Mapping):
            raise _bad_config("hvae_config", hvae_config, "the run's config as a mapping")
        config = build_config(dict(hvae_config))
        self.hvae_config = hvae_config
        self.image_shape = _checked_shape(image_shape, config.image_size)
        if (
            isinstance(num_bits, bool)
            or not isinstance(num_bits, int)
            or not 1 <= num_bits <= MAX_BITS
        ):
            raise _bad_config("num_bits", num_bits, f"an integer in 1..{MAX_BITS}")
        self.num_bits = num_bits
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED
        ):
            raise _bad_config("seed", seed, f"an integer in 0..2**32 - 1 ({MAX_SEED}) or null")
        self.seed = seed
        self.hvae = HVAE(config, self.image_shape, self.num_bits, seed=config.training.seed)
        self.noise_stream = keras.random.SeedGenerator(
            config.training.seed if seed is None else seed, name="noise_stream"
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> _Exported:
        # Keras would pass an unknown key to __init__ and report the TypeError in a page.
        unknown = sorted(set(config) - set(MODEL_KEYS) - set(cls.CONFIG_KEYS))
        if unknown:
            raise ConfigError(
                f"the exported {cls.__name__.lower()}'s config has an unknown key '{unknown[0]}'",
                hint=EXPORT_AGAIN,
            )
        missing = [k for k in cls.CONFIG_KEYS if k not in config and k != "seed"]
        if missing:
            raise ConfigError(
                f"the exported {cls.__name__.lower()}'s config has no '{missing[0]}'",
                hint=EXPORT_AGAIN,
            )
        return cls(**config)

    def draw_latents(self, batch: Any) -> list[Any]:
        return [
            keras.random.normal(s, seed=self.noise_stream)
            for s in self.hvae.noise_shapes(batch).latents
        ]

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "hvae_config": self.hvae_config,
            "image_shape": list(self.image_shape),
            "num_bits": self.num_bits,
            "seed": self.seed,
        }


EXPORT_AGAIN = "the file was changed after hvae export wrote it; export the run again"


def _bad_config(key: str, value: Any, expected: str) -> ConfigError:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return ConfigError(
        f"the export's config has {key} = {text}: expected {expected}", hint=EXPORT_AGAIN
    )


def _checked_shape(value: Any, size: int) -> tuple[int, int, int]:
    """(H, W, C) of the run's images: H and W the config's image size, C 1 or more."""
    ok = (
        isinstance(value, list | tuple)
        and len(value) == 3
        and all(isinstance(d, int) and not isinstance(d, bool) for d in value)
    )
    if not ok or tuple(value[:2]) != (size, size) or value[2] < 1:
        raise _bad_config("image_shape", value, f"[{size}, {size}, channels] (its image size)")
    return (int(value[0]), int(value[1]), int(value[2]))


@keras.saving.register_keras_serializable(package="hvae")
class Sampler(_Exported):
    """Images from the prior. Input: one temperature per image, shape (n,) float32 (it scales
    every latent layer's prior noise), each finite and >= 0, n >= 1. Output: uint8 pixel
    levels (n, H, W, C) of the run's bit depth. ``output_temperature`` (fixed at export)
    scales the pixel likelihood's noise."""

    CONFIG_KEYS = (*_Exported.CONFIG_KEYS, "output_temperature")

    def __init__(self, *args: Any, output_temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if (
            isinstance(output_temperature, bool)
            or not isinstance(output_temperature, int | float)
            or not math.isfinite(output_temperature)
            or output_temperature < 0
        ):
            raise _bad_config("output_temperature", output_temperature, "a finite number >= 0")
        self.output_temperature = float(output_temperature)

    def build(self, input_shape: Any = None) -> None:
        self.hvae.build_weights()
        self.built = True

    def call(self, temperature: Any) -> Any:
        temperature = ops.reshape(ops.cast(temperature, "float32"), (-1,))
        # A NaN temperature made black images, a negative one drew as if it were positive.
        refuse_unless(
            [
                (
                    ops.size(temperature) > 0,
                    "the sampler takes one temperature per image, got none",
                ),
                (
                    ops.all(ops.isfinite(temperature)),
                    "sampler temperatures must be finite numbers >= 0, got NaN or infinity",
                ),
                (
                    ops.all(temperature >= 0),
                    "sampler temperatures must be finite numbers >= 0, got a negative one",
                ),
            ]
        )
        per_image = ops.reshape(temperature, (-1, 1, 1, 1))
        n = ops.shape(per_image)[0]
        pixel_noise = None
        if self.output_temperature > 0:
            pixel_noise = keras.random.uniform(
                self.hvae.noise_shapes(n).pixels, seed=self.noise_stream
            )
        pixels = self.hvae.generate(
            n,
            temperature=per_image,
            output_temperature=self.output_temperature,
            noise=self.draw_latents(n),
            pixel_noise=pixel_noise,
        )
        return ops.cast(to_levels(pixels, self.num_bits), "uint8")

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "output_temperature": self.output_temperature}


@keras.saving.register_keras_serializable(package="hvae")
class Encoder(_Exported):
    """Every latent layer's posterior for a batch of images. Input: integer pixel levels (n,
    H, W, C), uint8, each within the run's bit depth, n >= 1. Output: a list, top layer
    first, of ``[mean, sample]`` pairs flattened to ``mean_0, sample_0, mean_1, ...``, each
    (n, R, R, z_width)."""

    def build(self, input_shape: Any = None) -> None:
        self.hvae.build_weights()
        self.built = True

    def call(self, images: Any) -> list[Any]:
        top = 2**self.num_bits - 1
        dtype = keras.backend.standardize_dtype(images.dtype)
        if "int" not in dtype:  # known while tracing: floats in [0, 1] would pass as levels
            raise InputError(
                f"the encoder takes integer pixel levels 0..{top} (uint8), got {dtype}"
            )
        shape = tuple(images.shape)
        if len(shape) != 4 or tuple(shape[1:]) != self.image_shape:  # else a page from a layer
            wanted = ", ".join(map(str, self.image_shape))
            raise InputError(f"the encoder takes images of shape (n, {wanted}), got {shape}")
        levels = f"encoder pixel levels must lie in 0..{top} ({self.num_bits} bits)"
        # Levels above the bit depth encoded as brighter-than-white images without a word.
        refuse_unless(
            [
                (ops.size(images) > 0, "the encoder takes a batch of one image or more, got none"),
                (ops.all(images >= 0), f"{levels}, got a negative one"),
                (ops.all(images <= top), f"{levels}, got a higher one"),
            ]
        )
        noise = self.draw_latents(ops.shape(images)[0])
        layers = self.hvae.encode(to_unit_range(images, self.num_bits), noise)
        return [tensor for layer in layers for tensor in (layer["mean"], layer["sample"])]


def export_model(trained: Any, fmt: str, out: str | os.PathLike[str], **options: Any) -> list[Path]:
    """Write ``trained`` (a :class:`~hvae_core.trained.TrainedModel`) as a sampler and an
    encoder in format ``fmt`` into the folder ``out``; returns the paths written.
    ``options``: the sampler's ``output_temperature``, and ``seed``: the exports' noise
    streams start from this seed wherever they are loaded (the same seed, the same draws;
    None: the run's training seed); ``replace``: replace an earlier export in ``out``, once
    the new one is completely written (see :func:`~hvae_core.export_formats.staged_export`);
    ``verbose``: let TensorFlow log as it loads (default: as $HVAE_LOG_LEVEL says)."""
    check_format(fmt)
    output_temperature = _checked_temperature(options.get("output_temperature", 1.0))
    if fmt in PORTABLE:
        from hvae_core.export_portable import export_portable

        return export_portable(
            trained,
            fmt,
            Path(out),
            output_temperature=output_temperature,
            replace=bool(options.get("replace")),
        )
    folder = Path(out)
    common = {
        "hvae_config": trained.config.to_dict(),
        "image_shape": [int(d) for d in trained.image_shape],
        "num_bits": int(trained.num_bits),
    }
    seed = options.get("seed")
    if seed is not None:
        seed = checked_seed(seed)
    sampler = Sampler(**common, output_temperature=output_temperature, seed=seed, name="sampler")
    encoder = Encoder(**common, seed=seed, name="encoder")
    for exported in (sampler, encoder):
        exported.build()
        copy_weights(trained.model, exported.hvae)
    names = [f"{exported.name}{SUFFIX[fmt]}" for exported in (sampler, encoder)]
    quiet = log_level(bool(options.get("verbose"))) == QUIET
    import_tensorflow_quietly(quiet)  # either format imports it, even on JAX or PyTorch
    with staged_export(folder, names, bool(options.get("replace"))) as staging:
        for exported, name in zip((sampler, encoder), names, strict=True):
            write_exported(exported, fmt, staging / name)
    return [folder / name for name in names]


def write_exported(exported: _Exported, fmt: str, path: Path) -> None:
    """One exported model at ``path`` (a new path) as ``fmt``: keras or savedmodel."""
    if fmt == "keras":
        exported.save(path)
        return
    h, w, c = exported.image_shape
    signature = {
        "sampler": [keras.InputSpec(shape=(None,), dtype="float32")],
        "encoder": [keras.InputSpec(shape=(None, h, w, c), dtype="uint8")],
    }[exported.name]
    exported.export(str(path), format="tf_saved_model", input_signature=signature, verbose=False)


def _checked_temperature(value: Any) -> float:
    """The sampler's ``output_temperature``: a real number, finite and >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise InputError(
            f"output_temperature must be a finite number >= 0, got {value!r}",
            hint="0 samples the pixel likelihood's mode, 1 its full noise",
        )
    return float(value)
