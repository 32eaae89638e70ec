"""A trained model as ONNX or OpenVINO: deterministic graphs whose noise is an input.

The sampler takes one temperature per image, one standard normal array per latent layer (top
first, (n, R, R, z_width)) and, when it samples pixels, the pixel likelihood's uniforms; it
returns uint8 pixel levels and the likelihood's parameters. The encoder takes uint8 levels and
the latent noise and returns every layer's posterior mean, scale and z. The host draws the
noise (any NumPy, no hvae: the recipe is in the export's ``export.json``), so a seed gives the
same images in Keras, ONNX Runtime and OpenVINO, and nothing in the graph is a random op that
a converter could freeze.

The ONNX graph is converted from the model's TensorFlow graph by tf2onnx, so the run is loaded
on the TensorFlow backend (its weights are the same on every backend); OpenVINO's IR is
converted from that ONNX graph, with float32 weights.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import keras
from keras import ops

from hvae_core.errors import HvaeError
from hvae_core.export_formats import CONVERTING_BACKEND, MANIFEST, SUFFIX, staged_export
from hvae_core.model.hvae import HVAE
from hvae_core.model.pixels import to_levels, to_unit_range
from hvae_core.model.weights import copy_weights

OPSET = 17


class PortableSampler(keras.Model):
    """Inputs: ``temperature`` (n,), ``latent_noise_<i>`` per latent layer and, with an
    ``output_temperature`` above 0, ``pixel_noise``. Outputs: ``images`` (uint8 levels) and
    ``dmol_params`` (the pixel likelihood's parameters, float32)."""

    def __init__(self, hvae: HVAE, num_bits: int, output_temperature: float) -> None:
        super().__init__(name="sampler")
        self.hvae, self.num_bits = hvae, int(num_bits)
        self.output_temperature = float(output_temperature)
        self.outputs_named = ["images", "dmol_params"]
        self.built = True  # its one part, the HVAE, is built

    def call(self, inputs: list[Any]) -> dict[str, Any]:
        temperature, *noise = inputs
        layers = self.hvae.num_latent_layers
        latents, pixel_noise = noise[:layers], (noise[layers] if len(noise) > layers else None)
        per_image = ops.reshape(ops.cast(temperature, "float32"), (-1, 1, 1, 1))
        n = ops.shape(latents[0])[0]
        params = self.hvae.prior_params(n, per_image, latents)
        pixels = self.hvae.sample_pixels(params, self.output_temperature, pixel_noise)
        return {
            "images": ops.cast(to_levels(pixels, self.num_bits), "uint8"),
            "dmol_params": ops.cast(params, "float32"),
        }


class PortableEncoder(keras.Model):
    """Inputs: ``images``, uint8 levels (n, H, W, C), and ``latent_noise_<i>`` per latent
    layer. Outputs per latent layer, top first, each (n, R, R, z_width): ``mean_<i>`` and
    ``scale_<i>`` of the Gaussian the layer's posterior draws from (with a flow, the flow's
    input) and ``sample_<i>``, its z for the noise. A layer's posterior depends on the z of
    the layers above it, so every layer but the top one depends on the noise."""

    def __init__(self, hvae: HVAE, num_bits: int) -> None:
        super().__init__(name="encoder")
        self.hvae, self.num_bits = hvae, int(num_bits)
        layers = range(hvae.num_latent_layers)
        self.outputs_named = [f"{k}_{i}" for i in layers for k in ("mean", "scale", "sample")]
        self.built = True

    def call(self, inputs: list[Any]) -> dict[str, Any]:
        images, *noise = inputs
        layers = self.hvae.encode(to_unit_range(images, self.num_bits), noise)
        out = {}
        for i, layer in enumerate(layers):
            for key in ("mean", "scale", "sample"):
                out[f"{key}_{i}"] = ops.cast(layer[key], "float32")
        return out


def manifest(trained: Any, output_temperature: float) -> dict[str, Any]:
    """What a user of the files needs: shapes per image, the inputs in order, the recipe that
    draws the noise :meth:`TrainedModel.draw_noise` draws from a seed."""
    shapes = trained.model.noise_shapes(None)
    latents = [list(s[1:]) for s in shapes.latents]
    inputs = ["temperature"] + [f"latent_noise_{i}" for i in range(len(latents))]
    if output_temperature > 0:
        inputs.append("pixel_noise")
    return {
        "image_shape": list(trained.image_shape),
        "num_bits": trained.num_bits,
        "output_temperature": output_temperature,
        "latent_noise_shapes": latents,
        "pixel_noise_shape": list(shapes.pixels[1:]),
        "sampler": {"inputs": inputs, "outputs": ["images", "dmol_params"]},
        "encoder": {
            "inputs": ["images"] + [f"latent_noise_{i}" for i in range(len(latents))],
            "outputs": [
                f"{k}_{i}" for i in range(len(latents)) for k in ("mean", "scale", "sample")
            ],
        },
        "noise_recipe": (
            "rng = numpy.random.default_rng(seed); latent_noise_i = "
            "rng.standard_normal((n, *latent_noise_shapes[i]), dtype=numpy.float32) for each i "
            "in order; then pixel_noise = rng.random((n, *pixel_noise_shape), "
            "dtype=numpy.float32)"
        ),
    }


def export_portable(
    trained: Any,
    fmt: str,
    folder: Path,
    *,
    output_temperature: float = 1.0,
    replace: bool = False,
) -> list[Path]:
    """Write ``trained``'s sampler and encoder as ``fmt`` (onnx, openvino) and the manifest
    into ``folder``; an earlier export there is replaced only with ``replace``, and only once
    the new one is complete (a failed export leaves the folder as it was)."""
    if keras.backend.backend() != CONVERTING_BACKEND:
        raise HvaeError(
            f"the {fmt} export converts the model's TensorFlow graph, and this process runs "
            f"Keras on {keras.backend.backend()}",
            hint="load the run with backend='tensorflow' (hvae export does this by itself)",
        )
    names = _file_names(fmt)
    targets = [folder / name for name in names]
    hvae = _float32_copy(trained)
    sampler = PortableSampler(hvae, trained.num_bits, output_temperature)
    encoder = PortableEncoder(hvae, trained.num_bits)
    with staged_export(folder, names, replace) as staging:
        for model, signature in (
            (sampler, _sampler_signature(hvae, output_temperature)),
            (encoder, _encoder_signature(hvae, trained.image_shape)),
        ):
            onnx_path = staging / f"{model.name}.onnx"
            _write_onnx(model, signature, onnx_path)
            if fmt == "openvino":
                _onnx_to_openvino(onnx_path, staging / f"{model.name}{SUFFIX[fmt]}")
        text = json.dumps({"format": fmt, **manifest(trained, output_temperature)}, indent=2)
        (staging / MANIFEST).write_text(text + "\n")
    return targets


def _file_names(fmt: str) -> list[str]:
    per_model = {"onnx": [".onnx"], "openvino": [".xml", ".bin"]}[fmt]
    return [f"{stem}{suffix}" for stem in ("sampler", "encoder") for suffix in per_model] + [
        MANIFEST
    ]


def _float32_copy(trained: Any) -> HVAE:
    """The model rebuilt in float32 (ONNX and OpenVINO run it so) with the trained weights."""
    from hvae_core.config import build_config

    raw = trained.config.to_dict()
    raw["model"]["precision"] = "float32"
    config = build_config(raw)
    hvae = HVAE(config, trained.image_shape, trained.num_bits, seed=config.training.seed)
    hvae.build_weights()
    copy_weights(trained.model, hvae)
    return hvae


def _sampler_signature(hvae: HVAE, output_temperature: float) -> list[Any]:
    shapes = hvae.noise_shapes(None)
    specs = [_spec((None,), "temperature")]
    specs += [_spec(s, f"latent_noise_{i}") for i, s in enumerate(shapes.latents)]
    if output_temperature > 0:
        specs.append(_spec(shapes.pixels, "pixel_noise"))
    return [specs]


def _encoder_signature(hvae: HVAE, image_shape: Any) -> list[Any]:
    specs = [_spec((None, *image_shape), "images", "uint8")]
    specs += [_spec(s, f"latent_noise_{i}") for i, s in enumerate(hvae.noise_shapes(None).latents)]
    return [specs]


def _spec(shape: Any, name: str, dtype: str = "float32") -> Any:
    return keras.InputSpec(shape=tuple(shape), dtype=dtype, name=name)


def _write_onnx(model: keras.Model, signature: list[Any], path: Path) -> None:
    """``model`` as ONNX at ``path``, its outputs named as ``model`` names them."""
    import onnx

    with warnings.catch_warnings():
        # Keras' tf2onnx shim asks NumPy for np.object as it loads, and NumPy answers with a
        # FutureWarning about its own plans: two lines of noise on every hvae export.
        warnings.filterwarnings("ignore", r"In the future `np\.object`", FutureWarning)
        model.export(
            str(path), format="onnx", input_signature=signature, opset_version=OPSET, verbose=False
        )
    graph = onnx.load(str(path))
    _name_outputs(graph, sorted(model.outputs_named))
    onnx.save(graph, str(path))


def _name_outputs(graph: Any, names: list[str]) -> None:
    """tf2onnx names a function's outputs ``Identity:0``...; in the order of the output dict's
    sorted keys (how TensorFlow flattens a dict), give them those keys."""
    outputs = list(graph.graph.output)
    if len(outputs) != len(names):
        raise HvaeError(f"the ONNX graph has {len(outputs)} outputs, expected {len(names)}")
    for output, name in zip(outputs, names, strict=True):
        old = output.name
        for node in graph.graph.node:
            node.output[:] = [name if o == old else o for o in node.output]
            node.input[:] = [name if i == old else i for i in node.input]
        output.name = name


def _onnx_to_openvino(onnx_path: Path, xml_path: Path) -> None:
    """OpenVINO's IR (.xml and .bin) of an ONNX file; float32 weights (saving's default
    compresses them to float16, which moves the likelihood's parameters by about 1e-3)."""
    import openvino

    converted = openvino.convert_model(str(onnx_path))
    openvino.save_model(converted, str(xml_path), compress_to_fp16=False)
