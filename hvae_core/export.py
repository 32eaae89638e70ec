"""A trained model as self-contained inference models: a sampler (prior -> pixels) and an
encoder (pixels -> every layer's posterior), saved as Keras' own ``.keras`` or a TensorFlow
SavedModel.

No ONNX: converted from TensorFlow (tf2onnx 1.17), the models' random draws become ops ONNX
lacks (StatelessRandomNormalV2, StatelessRandomUniformV2, and the Bitcast and BitwiseAnd of
Keras' seed handling), and onnxruntime refuses the graphs.

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
from hvae_core.model.hvae import HVAE, is_noise_seed
from hvae_core.model.pixels import to_levels, to_unit_range
from hvae_core.trained import checked_seed

FORMATS = ("keras", "savedmodel")
SUFFIX = {"keras": ".keras", "savedmodel": ""}


class _Exported(keras.Model):
    """Holds an :class:`HVAE` rebuilt from its config (the run's resolved config as a dict)."""

    def __init__(
        self, hvae_config: dict[str, Any], image_shape: Any, num_bits: int, **kwargs: Any
    ) -> None:
        from hvae_core.config import build_config

        super().__init__(**kwargs)
        self.hvae_config = hvae_config
        self.image_shape = tuple(int(d) for d in image_shape)
        self.num_bits = int(num_bits)
        config = build_config(hvae_config)
        self.hvae = HVAE(config, self.image_shape, self.num_bits, seed=config.training.seed)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "hvae_config": self.hvae_config,
            "image_shape": list(self.image_shape),
            "num_bits": self.num_bits,
        }


@keras.saving.register_keras_serializable(package="hvae")
class Sampler(_Exported):
    """Images from the prior. Input: one temperature per image, shape (n,) float32 (it scales
    every latent layer's prior noise). Output: uint8 pixel levels (n, H, W, C) of the run's bit
    depth. ``output_temperature`` (fixed at export) scales the pixel likelihood's noise."""

    def __init__(
        self, *args: Any, output_temperature: float = 1.0, seed: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.output_temperature = float(output_temperature)
        self.seed = seed

    def build(self, input_shape: Any = None) -> None:
        self.hvae.build_weights()
        # Keras saves no noise-stream states: a loaded sampler starts its streams from the
        # seed it was exported with (None: the model's own initial streams).
        if self.seed is not None:
            self.hvae.reseed(self.seed)
        self.built = True

    def call(self, temperature: Any) -> Any:
        per_image = ops.reshape(ops.cast(temperature, "float32"), (-1, 1, 1, 1))
        pixels = self.hvae.generate(
            ops.shape(per_image)[0],
            temperature=per_image,
            output_temperature=self.output_temperature,
        )
        return ops.cast(to_levels(pixels, self.num_bits), "uint8")

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "output_temperature": self.output_temperature,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="hvae")
class Encoder(_Exported):
    """Every latent layer's posterior for a batch of images. Input: uint8 pixel levels (n, H,
    W, C). Output: a list, top layer first, of ``[mean, sample]`` pairs flattened to
    ``mean_0, sample_0, mean_1, ...``, each (n, R, R, z_width)."""

    def build(self, input_shape: Any = None) -> None:
        self.hvae.build_weights()
        self.built = True

    def call(self, images: Any) -> list[Any]:
        layers = self.hvae.encode(to_unit_range(images, self.num_bits))
        return [tensor for layer in layers for tensor in (layer["mean"], layer["sample"])]


def export_model(trained: Any, fmt: str, out: str | os.PathLike[str], **options: Any) -> list[Path]:
    """Write ``trained`` (a :class:`~hvae_core.trained.TrainedModel`) as a sampler and an
    encoder in format ``fmt`` into the folder ``out``; returns the paths written.
    ``options``: the sampler's ``output_temperature``, and ``seed``: its noise streams start
    from this seed wherever it is loaded (its first draw equals
    ``trained.sample(n, seed=seed)`` on the same backend); ``replace``: replace an earlier
    export in ``out``."""
    if fmt not in FORMATS:
        raise HvaeError(f"unknown export format '{fmt}'", hint=f"choose {', '.join(FORMATS)}")
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
    encoder = Encoder(**common, name="encoder")
    for exported in (sampler, encoder):
        exported.build()
        _copy_variables(trained.model, exported.hvae, weights_only=seed is not None)
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


def _copy_variables(source: Any, target: Any, weights_only: bool) -> None:
    """The trained model's variables (its EMA weights, and unless ``weights_only`` its noise
    streams' states) into ``target``, an identically built model."""
    pairs = list(zip(source.variables, target.variables, strict=True))
    for a, b in pairs:
        if tuple(a.shape) != tuple(b.shape):
            raise HvaeError(f"cannot export: {a.path} is {a.shape}, its copy {b.shape}")
        if not (weights_only and is_noise_seed(a)):
            b.assign(a.value)
