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

import os
import shutil
from pathlib import Path
from typing import Any

import keras
from keras import ops

from hvae_core.errors import HvaeError
from hvae_core.export_formats import PORTABLE, SUFFIX, check_format
from hvae_core.model.hvae import HVAE
from hvae_core.model.pixels import to_levels, to_unit_range
from hvae_core.model.weights import copy_weights
from hvae_core.trained import checked_seed


class _Exported(keras.Model):
    """Holds an :class:`HVAE` rebuilt from its config (the run's resolved config as a dict),
    and the noise stream its passes draw from: started from ``seed`` wherever it is loaded
    (None: the run's training seed)."""

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
        self.hvae_config = hvae_config
        self.image_shape = tuple(int(d) for d in image_shape)
        self.num_bits = int(num_bits)
        config = build_config(hvae_config)
        self.seed = seed
        self.hvae = HVAE(config, self.image_shape, self.num_bits, seed=config.training.seed)
        self.noise_stream = keras.random.SeedGenerator(
            config.training.seed if seed is None else seed, name="noise_stream"
        )

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


@keras.saving.register_keras_serializable(package="hvae")
class Sampler(_Exported):
    """Images from the prior. Input: one temperature per image, shape (n,) float32 (it scales
    every latent layer's prior noise). Output: uint8 pixel levels (n, H, W, C) of the run's bit
    depth. ``output_temperature`` (fixed at export) scales the pixel likelihood's noise."""

    def __init__(self, *args: Any, output_temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.output_temperature = float(output_temperature)

    def build(self, input_shape: Any = None) -> None:
        self.hvae.build_weights()
        self.built = True

    def call(self, temperature: Any) -> Any:
        per_image = ops.reshape(ops.cast(temperature, "float32"), (-1, 1, 1, 1))
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
    """Every latent layer's posterior for a batch of images. Input: uint8 pixel levels (n, H,
    W, C). Output: a list, top layer first, of ``[mean, sample]`` pairs flattened to
    ``mean_0, sample_0, mean_1, ...``, each (n, R, R, z_width)."""

    def build(self, input_shape: Any = None) -> None:
        self.hvae.build_weights()
        self.built = True

    def call(self, images: Any) -> list[Any]:
        noise = self.draw_latents(ops.shape(images)[0])
        layers = self.hvae.encode(to_unit_range(images, self.num_bits), noise)
        return [tensor for layer in layers for tensor in (layer["mean"], layer["sample"])]


def export_model(trained: Any, fmt: str, out: str | os.PathLike[str], **options: Any) -> list[Path]:
    """Write ``trained`` (a :class:`~hvae_core.trained.TrainedModel`) as a sampler and an
    encoder in format ``fmt`` into the folder ``out``; returns the paths written.
    ``options``: the sampler's ``output_temperature``, and ``seed``: the exports' noise
    streams start from this seed wherever they are loaded (the same seed, the same draws;
    None: the run's training seed); ``replace``: replace an earlier export in ``out``."""
    check_format(fmt)
    if fmt in PORTABLE:
        from hvae_core.export_portable import export_portable

        return export_portable(
            trained,
            fmt,
            Path(out),
            output_temperature=float(options.get("output_temperature", 1.0)),
            replace=bool(options.get("replace")),
        )
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    common = {
        "hvae_config": trained.config.to_dict(),
        "image_shape": trained.image_shape,
        "num_bits": trained.num_bits,
    }
    seed = options.get("seed")
    if seed is not None:
        seed = checked_seed(seed)
    sampler = Sampler(
        **common,
        output_temperature=float(options.get("output_temperature", 1.0)),
        seed=seed,
        name="sampler",
    )
    encoder = Encoder(**common, seed=seed, name="encoder")
    for exported in (sampler, encoder):
        exported.build()
        copy_weights(trained.model, exported.hvae)
    h, w, c = trained.image_shape
    signatures = {
        "sampler": [keras.InputSpec(shape=(None,), dtype="float32")],
        "encoder": [keras.InputSpec(shape=(None, h, w, c), dtype="uint8")],
    }
    written = []
    for exported in (sampler, encoder):
        path = folder / f"{exported.name}{SUFFIX[fmt]}"
        if path.exists():
            if not options.get("replace"):
                raise HvaeError(f"{path} exists", hint="pass replace=True (--force) to replace it")
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if fmt == "keras":
            exported.save(path)
        else:
            exported.export(
                str(path),
                format="tf_saved_model",
                input_signature=signatures[exported.name],
                verbose=False,
            )
        written.append(path)
    return written
