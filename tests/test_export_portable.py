"""ONNX and OpenVINO exports: deterministic graphs whose noise is an input, checked against
Keras for the same NumPy noise (ONNX Runtime and OpenVINO's runtime are the oracles' hosts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from backends import run_hvae
from click.testing import CliRunner
from conftest import trainer_with_run

from hvae_core.cli import cli
from hvae_core.config import resolve_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny run whose weights are moved off their initial values (every layer matters)."""
    cfg = resolve_config("tiny", overrides=["run.jit=false"])
    trainer = trainer_with_run(cfg, tmp_path_factory.mktemp("portable") / "run")
    rng = np.random.default_rng(0)
    for v in trainer.engine.trainable + trainer.engine.ema:
        v.assign(v.value + rng.normal(0.0, 0.05, v.shape).astype(np.float32))
    trainer.engine.after_external_change()
    trainer.save()
    return trainer.run_dir


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for fmt in ("onnx", "openvino"):
        folders[fmt] = tmp_path_factory.mktemp(fmt) / "export"
        result = CliRunner().invoke(
            cli, ["export", str(run_dir), "--format", fmt, "--out", str(folders[fmt])]
        )
        assert result.exit_code == 0, result.output
    return folders


@pytest.fixture(scope="module")
def model(run_dir):
    import hvae_core

    return hvae_core.load(run_dir)


def recipe_noise(manifest: dict, n: int, seed: int) -> dict[str, np.ndarray]:
    """The noise as export.json tells a user without hvae to draw it (NumPy only)."""
    rng = np.random.default_rng(seed)
    feed = {
        f"latent_noise_{i}": rng.standard_normal((n, *shape), dtype=np.float32)
        for i, shape in enumerate(manifest["latent_noise_shapes"])
    }
    feed["pixel_noise"] = rng.random((n, *manifest["pixel_noise_shape"]), dtype=np.float32)
    return feed


class Runtime:
    """One exported graph in ONNX Runtime or OpenVINO, called with named inputs."""

    def __init__(self, folder: Path, name: str, fmt: str) -> None:
        if fmt == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(folder / f"{name}.onnx"))
            names = [o.name for o in session.get_outputs()]
            self.inputs = [i.name for i in session.get_inputs()]
            self.call = lambda feed: dict(zip(names, session.run(None, feed), strict=True))
        else:
            import openvino

            compiled = openvino.Core().compile_model(str(folder / f"{name}.xml"), "CPU")
            self.inputs = [i.get_any_name() for i in compiled.inputs]

            def call(feed):
                result = compiled(feed)
                return {o.get_any_name(): result[o] for o in compiled.outputs}

            self.call = call

    def __call__(self, **feed: np.ndarray) -> dict[str, np.ndarray]:
        return self.call({k: feed[k] for k in self.inputs})


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_the_sampler_draws_what_keras_draws_for_the_same_seed(fmt, exports, model) -> None:
    folder = exports[fmt]
    manifest = json.loads((folder / "export.json").read_text())
    sampler = Runtime(folder, "sampler", fmt)
    assert sampler.inputs == manifest["sampler"]["inputs"]
    n, temps = 5, np.array([0.0, 0.5, 0.8, 1.0, 1.0], "float32")
    noise = recipe_noise(manifest, n, seed=7)
    drawn = model.draw_noise(n, seed=7)  # the recipe is hvae's own draw
    for i, eps in enumerate(drawn.latents):
        np.testing.assert_array_equal(noise[f"latent_noise_{i}"], eps)
    np.testing.assert_array_equal(noise["pixel_noise"], drawn.pixels)

    out = sampler(temperature=temps, **noise)
    expected = np.concatenate(
        [model.sample(1, float(t), noise=_row(drawn, i)) for i, t in enumerate(temps)]
    )
    assert out["images"].dtype == np.uint8 and out["images"].shape == expected.shape
    assert np.abs(out["images"].astype(int) - expected.astype(int)).max() <= 1
    params = model.model.prior_params(n, temps.reshape(-1, 1, 1, 1), list(drawn.latents))
    np.testing.assert_allclose(out["dmol_params"], np.asarray(params), atol=1e-4)


def _row(noise, i):
    from hvae_core import Noise

    return Noise(tuple(e[i : i + 1] for e in noise.latents), noise.pixels[i : i + 1])


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_a_seed_is_a_draw_and_temperature_zero_the_mean_path(fmt, exports) -> None:
    # Two seeds give different images and one seed the same ones: the noise is an input, not
    # a constant frozen into the graph at conversion.
    folder = exports[fmt]
    manifest = json.loads((folder / "export.json").read_text())
    sampler = Runtime(folder, "sampler", fmt)
    hot = np.ones(4, "float32")
    a, b = (sampler(temperature=hot, **recipe_noise(manifest, 4, s)) for s in (1, 2))
    again = sampler(temperature=hot, **recipe_noise(manifest, 4, 1))
    np.testing.assert_array_equal(a["images"], again["images"])
    assert not np.array_equal(a["images"], b["images"])
    cold = np.zeros(4, "float32")  # every layer at its prior's mean: the latent noise is unused
    c, d = (
        sampler(temperature=cold, **recipe_noise(manifest, 4, s))["dmol_params"] for s in (1, 2)
    )
    np.testing.assert_array_equal(c, d)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_the_encoder_gives_each_layers_posterior_for_the_noise(fmt, exports, model) -> None:
    folder = exports[fmt]
    encoder = Runtime(folder, "encoder", fmt)
    images = model.sample(3, 1.0, seed=0)
    noise = model.draw_noise(3, seed=5, pixels=False)
    feed = {f"latent_noise_{i}": e for i, e in enumerate(noise.latents)}
    out = encoder(images=images, **feed)
    expected = model.encode(images, noise=noise)
    for i, layer in enumerate(expected):
        for key in ("mean", "scale", "sample"):
            np.testing.assert_allclose(out[f"{key}_{i}"], layer[key], atol=1e-4)


def test_bad_requests_are_one_line_and_write_nothing(run_dir, exports, tmp_path, monkeypatch):
    def fails(*args: str) -> str:
        result = CliRunner().invoke(cli, ["export", str(run_dir), *args])
        assert result.exit_code != 0
        assert "Traceback" not in result.output
        return result.output

    out = tmp_path / "none"
    assert "--backend" in fails("--format", "onnx", "--backend", "jax", "--out", str(out))
    assert "seed" in fails("--format", "onnx", "--seed", "3", "--out", str(out))
    assert "'tflite'" in fails("--format", "tflite", "--out", str(out))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name)
    )
    assert "pip install 'hvae[export]'" in fails("--format", "openvino", "--out", str(out))
    assert not out.exists()
    before = {p.name: p.stat().st_mtime_ns for p in exports["onnx"].iterdir()}
    assert "--force" in fails("--format", "onnx", "--out", str(exports["onnx"]))
    assert {p.name: p.stat().st_mtime_ns for p in exports["onnx"].iterdir()} == before


def test_the_python_api_says_which_backend_converts(model, tmp_path, monkeypatch) -> None:
    import keras

    from hvae_core.errors import HvaeError
    from hvae_core.export import export_model

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(HvaeError, match="runs Keras on jax") as err:
        export_model(model, "onnx", tmp_path / "x")
    assert "backend='tensorflow'" in err.value.hint
    assert not (tmp_path / "x").exists()


def test_keras_openvino_backend_runs_a_loaded_run_like_the_others(run_dir, model, tmp_path):
    # hvae_core.load(run, backend="openvino"): Keras' inference-only backend, eagerly; for the
    # same noise it samples and scores as TensorFlow does here.
    from backends import run_on_backend

    images = model.sample(3, 1.0, seed=2)
    got = run_on_backend(
        "openvino",
        """
import hvae_core
model = hvae_core.load(inputs["run"].item(), backend="openvino")
outputs["samples"] = model.sample(4, 0.8, seed=3)
outputs["elbo"] = model.elbo(inputs["images"], seed=4)["elbo_bpd"]
""",
        {"run": np.array(str(run_dir)), "images": images},
        tmp_path,
    )
    expected = model.sample(4, 0.8, seed=3)
    assert np.abs(got["samples"].astype(int) - expected.astype(int)).max() <= 1
    assert np.isclose(got["elbo"], model.elbo(images, seed=4)["elbo_bpd"], rtol=1e-5)


def test_a_training_command_refuses_the_inference_only_backend() -> None:
    from hvae_core.backends.select import select_backend
    from hvae_core.errors import HvaeError

    with pytest.raises(HvaeError, match="runs trained models only"):
        select_backend("openvino")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_runs_trained_on_other_backends_export_what_they_sample(backend, tmp_path) -> None:
    # A run trained for an epoch on jax or torch, exported (converted on TensorFlow in the CLI's
    # own process), samples in ONNX Runtime what the run samples on its own backend.
    from backends import run_on_backend

    runs = tmp_path / "runs"
    run_hvae(
        *("train", "--config", "tiny", "--epochs", "1", "--batch-size", "64"),
        *("--save-dir", str(runs), "--quiet"),
        backend=backend,
    )
    (run,) = [p for p in runs.iterdir() if (p / "config.yaml").exists()]
    run_hvae("export", str(run), "--format", "onnx", "--out", str(tmp_path / "x"), backend=backend)

    got = run_on_backend(
        backend,
        """
import hvae_core
model = hvae_core.load(inputs["run"].item())
noise = model.draw_noise(4, seed=11)
outputs["images"] = model.sample(4, 1.0, noise=noise)
outputs["latents"] = np.concatenate([e.reshape(4, -1) for e in noise.latents], axis=1)
outputs["pixels"] = noise.pixels
""",
        {"run": np.array(str(run))},
        tmp_path,
    )
    manifest = json.loads((tmp_path / "x" / "export.json").read_text())
    feed = recipe_noise(manifest, 4, seed=11)
    np.testing.assert_array_equal(feed["pixel_noise"], got["pixels"])
    out = Runtime(tmp_path / "x", "sampler", "onnx")(temperature=np.ones(4, "float32"), **feed)
    assert np.abs(out["images"].astype(int) - got["images"].astype(int)).max() <= 1
