"""Importing openai/vdvae checkpoints, checked against the reference's own numbers.

The oracle (tests/data/vdvae, from ../shared/oracles/vdvae-models; ORACLE-README.md there) is
openai/vdvae's own model code run on two small random models saved as VDVAE saves its
checkpoints, with every latent draw taken from numpy seeds: the same noise handed to the
imported hvae model must give the same ELBO, KL and likelihood parameters on every backend.
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from hvae_core.errors import HvaeError
from tests.backends import BACKENDS, require_backend, run_hvae, run_on_backend

DATA = Path(__file__).parent / "data" / "vdvae"
SMALL = ("cifar10", "imagenet32")
FULL = ("cifar10", "imagenet32", "imagenet64", "ffhq256", "ffhq1024")


def oracle(name: str) -> tuple[dict[str, np.ndarray], dict]:
    arrays = dict(np.load(DATA / f"{name}-w16-oracle.npz"))
    meta = json.loads((DATA / f"{name}-w16-oracle.json").read_text())
    return arrays, meta


# Every path of the oracle, computed by the imported model from the oracle's noise: the
# posterior pass (seed 11), prior samples at t = 0.8 (12) and at per-layer temperatures (13),
# and image 0's top 3 posterior latents kept with the rest drawn at t = 0.7 (14).
SCRIPT = """
import json
from pathlib import Path
import hvae_core
from keras.ops import convert_to_numpy as as_numpy
from hvae_core.vdvae_import import import_vdvae, likelihood_order

data = Path(inputs["data"].item())
for name in inputs["names"]:
    run = Path(inputs["tmp"].item()) / name
    import_vdvae(data / f"{name}-w16-model-ema.th", out=run)
    m = hvae_core.load(run)
    model = m.model
    meta = json.loads((data / f"{name}-w16-oracle.json").read_text())
    seeds = meta["eps_seeds"]
    images = np.load(data / f"{name}-w16-oracle.npz")["images"]
    n = len(images)
    order = likelihood_order(model.num_mixtures)

    def eps(seed, batch, skip=0):
        rng = np.random.default_rng(seed)
        shapes = model.noise_shapes(batch).latents[skip:]
        return [rng.standard_normal(s, dtype=np.float32) for s in shapes]

    post = eps(seeds["post"], n)
    elbo, kl = [], []
    for i in range(n):  # per image, through the public API
        result = m.elbo(images[i : i + 1], noise=[e[i : i + 1] for e in post])
        elbo.append(result["bpd"])
        kl.append(result["kl_layers_bpd"])
    outputs[name + "/elbo_bpd"] = np.array(elbo)
    outputs[name + "/kl_layers_bpd"] = np.array(kl)
    x = m._unit(images[:1])
    params = model.posterior_pass(x, noise=[e[:1] for e in post]).params
    outputs[name + "/post_dmol_first"] = as_numpy(params)[..., np.argsort(order)]
    prior = model.prior_params(1, 0.8, eps(seeds["prior_t08"], 1))
    outputs[name + "/prior_t08_dmol"] = as_numpy(prior)[..., np.argsort(order)]
    temps = [float(t) for t in inputs[name + "/temperatures"]]
    prior = model.prior_params(1, temps, eps(seeds["prior_tlist"], 1))
    outputs[name + "/prior_tlist_dmol"] = as_numpy(prior)[..., np.argsort(order)]
    kept = [e[:1] for e in post[:3]] + eps(seeds["fixed3_t07"], 1, skip=3)
    state, zs, _ = model.decoder(
        activations=model.encoder(x),
        batch_size=1,
        temperatures=[0.7] * model.num_latent_layers,
        noise=kept,
        posterior_layers=3,
    )
    outputs[name + "/fixed3_t07_dmol"] = as_numpy(model.head(state, zs))[..., np.argsort(order)]
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_imported_models_reproduce_vdvae_with_its_noise(backend: str, tmp_path: Path) -> None:
    inputs = {"data": np.array(str(DATA)), "tmp": np.array(str(tmp_path)), "names": SMALL}
    for name in SMALL:
        inputs[name + "/temperatures"] = oracle(name)[0]["prior_tlist_temperatures"]
    got = run_on_backend(backend, SCRIPT, inputs, tmp_path / "io", timeout=900)
    for name in SMALL:
        want, meta = oracle(name)
        dims = 32 * 32 * 3
        elbo_nats = got[name + "/elbo_bpd"] * math.log(2)
        np.testing.assert_allclose(elbo_nats, want["post_elbo"], rtol=1e-5)
        kl_nats = got[name + "/kl_layers_bpd"] * math.log(2) * dims
        np.testing.assert_allclose(kl_nats, want["post_kl_blocks"], rtol=1e-4)
        assert want["post_kl_blocks"].shape[1] == meta["blocks"]
        for key in ("post_dmol_first", "prior_t08_dmol", "prior_tlist_dmol", "fixed3_t07_dmol"):
            np.testing.assert_allclose(got[f"{name}/{key}"], want[key], atol=1e-4, err_msg=key)


def test_the_presets_normalise_inputs_as_vdvae_did() -> None:
    """VDVAE's encoder saw (pixel + shift) * scale on 0..255; hvae's presets say it for images
    in [-1, 1]: the same numbers for every level."""
    from hvae_core.vdvae_import import preset_config

    levels = np.arange(256, dtype=np.float64)
    for name in SMALL:
        pre = oracle(name)[1]["preprocess"]
        model = preset_config(name).model
        x = levels / 127.5 - 1.0
        ours = (x + model.input_shift) * model.input_scale
        theirs = (levels + pre["shift"]) * pre["scale"]
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
        # The loss target is the [-1, 1] grid the likelihood already scores.
        np.testing.assert_allclose((levels + pre["shift_loss"]) * pre["scale_loss"], x)


def test_the_likelihood_order_is_a_permutation_matching_the_layouts() -> None:
    """Each of hvae's likelihood outputs takes the VDVAE output that means the same thing:
    checked against both layouts written out by name."""
    from hvae_core.vdvae_import import likelihood_order

    m = 10
    order = likelihood_order(m)
    assert sorted(order) == list(range(10 * m))
    names_vdvae = [f"logit{k}" for k in range(m)]
    for ch in range(3):
        names_vdvae += [f"mean{k},{ch}" for k in range(m)]
        names_vdvae += [f"scale{k},{ch}" for k in range(m)]
        names_vdvae += [f"coef{k},{ch}" for k in range(m)]  # pair slot ch
    names_hvae = [f"logit{k}" for k in range(m)]
    names_hvae += [f"mean{k},{c}" for k in range(m) for c in range(3)]
    names_hvae += [f"scale{k},{c}" for k in range(m) for c in range(3)]
    names_hvae += [f"coef{k},{p}" for k in range(m) for p in range(3)]
    assert [names_vdvae[i] for i in order] == names_hvae


@pytest.mark.parametrize("preset", FULL)
def test_every_published_checkpoints_tensors_fit_the_preset(preset: str) -> None:
    """The full-size models: the preset has the published checkpoint's parameter count, and a
    state dict of the manifest's names and shapes maps onto it with no tensor left over."""
    import keras

    from hvae_core.model.hvae import HVAE
    from hvae_core.vdvae_import import assign, expected_shapes, preset_config, recognise, targets

    manifest = json.loads((DATA / f"{preset}-manifest.json").read_text())
    shapes = {k: tuple(v) for k, v in manifest["state_dict"].items()}
    assert recognise(shapes) == preset
    config = preset_config(preset)
    assert expected_shapes(config) == shapes
    size = config.image_size
    model = HVAE(config, (size, size, 3), config.data.num_bits or 8)
    model.build_weights()
    assert model.count_params() == manifest["parameters"]
    mapping = targets(model)
    assert {k: v.vdvae_shape for k, v in mapping.items()} == shapes
    assert len({id(t.variable) for t in mapping.values()}) == len(mapping)  # one weight each
    state = {k: np.full(v, 0.5, np.float32) for k, v in shapes.items()}
    assign(model, state, preset)  # every weight filled, no tensor left over
    assert all(float(np.min(keras.ops.convert_to_numpy(v))) == 0.5 for v in model.variables)


@pytest.fixture(scope="module")
def small_state() -> dict[str, np.ndarray]:
    from hvae_core.vdvae_import import read_state_dict

    return read_state_dict(DATA / "cifar10-w16-model-ema.th")


def save_state(path: Path, state: dict[str, np.ndarray], prefix: str = "") -> Path:
    import torch

    torch.save({prefix + k: torch.from_numpy(v) for k, v in state.items()}, path)
    return path


def import_error(path: Path, **kwargs) -> str:
    from hvae_core.vdvae_import import VdvaeImportError, import_vdvae

    with pytest.raises(VdvaeImportError) as caught:
        import_vdvae(path, out=path.parent / "run", **kwargs)
    assert "\n" not in caught.value.message and caught.value.hint
    assert not (path.parent / "run").exists()
    return caught.value.message


def test_a_ddp_prefixed_state_dict_reads_as_the_plain_one(tmp_path: Path, small_state) -> None:
    from hvae_core.vdvae_import import read_state_dict

    path = save_state(tmp_path / "ddp.th", small_state, prefix="module.")
    again = read_state_dict(path)
    assert again.keys() == small_state.keys()
    assert all(np.array_equal(again[k], small_state[k]) for k in again)


def test_torch_files_read_as_torch_reads_them_without_torch(tmp_path: Path) -> None:
    """hvae's own reader against torch.load: views with offsets and strides, shared storages,
    scalars, empty tensors and other dtypes come out as the same arrays."""
    require_backend("torch")
    import torch

    from hvae_core import torch_files

    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    tensors = {
        "plain": torch.randn(2, 3),
        "transposed": base.permute(2, 0, 1),
        "offset": base[1:, 2:, ::2],
        "shared": base[2],
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "double": torch.randn(3, dtype=torch.float64),
        "half": torch.randn(4).half(),
        "long": torch.arange(5),
    }
    torch.save(tensors, tmp_path / "t.th")
    got = torch_files.load(tmp_path / "t.th")
    assert got.keys() == tensors.keys()
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(got[name], tensor.numpy(), err_msg=name)
        assert got[name].dtype == tensor.numpy().dtype and got[name].shape == tuple(tensor.shape)


def test_broken_and_hostile_files_are_refused_in_one_line(tmp_path: Path, small_state) -> None:
    require_backend("torch")

    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    import torch

    evil = tmp_path / "evil.th"
    torch.save({"decoder.gain": torch.ones(1), "x": Boom()}, evil)
    assert "pickled objects other than tensors" in import_error(evil)
    assert not (tmp_path / "ran").exists()
    plain_pickle = tmp_path / "plain.th"
    plain_pickle.write_bytes(pickle.dumps({"a": 1}))
    import_error(plain_pickle)

    truncated = tmp_path / "truncated.th"
    data = save_state(tmp_path / "whole.th", small_state).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert "cannot read" in import_error(truncated)
    assert "does not exist" in import_error(tmp_path / "missing.th")
    not_zip = tmp_path / "text.th"
    not_zip.write_text("hello")
    import_error(not_zip)
    with zipfile.ZipFile(tmp_path / "zip.th", "w") as archive:
        archive.writestr("x", "y")
    import_error(tmp_path / "zip.th")
    torch.save([torch.ones(2)], tmp_path / "list.th")
    assert "not a state dict" in import_error(tmp_path / "list.th")
    torch.save({}, tmp_path / "empty.th")
    assert "no tensors" in import_error(tmp_path / "empty.th")


def test_missing_extra_and_misshapen_tensors_are_named(tmp_path: Path, small_state) -> None:
    require_backend("torch")
    missing = dict(small_state)
    del missing["decoder.dec_blocks.7.z_proj.bias"]
    message = import_error(save_state(tmp_path / "missing.th", missing))
    assert "decoder.dec_blocks.7.z_proj.bias" in message and "(16,)" in message

    extra = dict(small_state, **{"decoder.extra.weight": np.ones((3, 3), np.float32)})
    message = import_error(save_state(tmp_path / "extra.th", extra))
    assert "decoder.extra.weight" in message and "(3, 3)" in message

    bad = dict(small_state)
    bad["decoder.dec_blocks.5.prior.c2.weight"] = np.ones((4, 4, 1, 1), np.float32)
    message = import_error(save_state(tmp_path / "shape.th", bad))
    assert "decoder.dec_blocks.5.prior.c2.weight" in message
    assert "(4, 4, 1, 1)" in message and "(4, 4, 3, 3)" in message

    message = import_error(save_state(tmp_path / "preset.th", small_state), preset="imagenet32")
    assert "imagenet32" in message

    fewer = {k: v for k, v in small_state.items() if not k.startswith("decoder.dec_blocks.42.")}
    message = import_error(save_state(tmp_path / "fewer.th", fewer))
    assert "none of the VDVAE presets" in message


def test_import_into_an_existing_run_is_refused(tmp_path: Path) -> None:
    from hvae_core.vdvae_import import VdvaeImportError, import_vdvae

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("x: 1\n")
    with pytest.raises(VdvaeImportError, match="already exists"):
        import_vdvae(DATA / "cifar10-w16-model-ema.th", out=tmp_path / "run")
    assert (tmp_path / "run" / "config.yaml").read_text() == "x: 1\n"


def test_hvae_import_then_every_command_on_the_imported_run(tmp_path: Path) -> None:
    """From the CLI: import, then sample, evaluate (on CIFAR-10 files holding the oracle's
    images as the test split: the ELBO of one posterior draw per image, near the oracle's
    mean)."""
    require_backend("torch")
    from tests.test_datasets import write_cifar

    run = tmp_path / "run"
    done = run_hvae(
        "import",
        "vdvae",
        str(DATA / "cifar10-w16-model-ema.th"),
        "--out",
        str(run),
        backend="jax",
    )
    assert "'cifar10' preset" in done.stdout and "119,116 parameters" in done.stdout
    assert "1,393 tensors" in done.stdout
    meta = json.loads(
        __import__("safetensors").safe_open(run / "checkpoint.safetensors", "np").metadata()["hvae"]
    )
    assert meta["provenance"]["source"] == "imported from openai/vdvae"
    assert meta["provenance"]["file"] == "cifar10-w16-model-ema.th"
    import hashlib

    digest = hashlib.sha256((DATA / "cifar10-w16-model-ema.th").read_bytes()).hexdigest()
    assert meta["provenance"]["sha256"] == digest

    run_hvae("sample", str(run), "--n", "2", "--out", str(tmp_path / "s.png"), backend="jax")
    assert (tmp_path / "s.png").stat().st_size > 0

    want, _ = oracle("cifar10")
    cifar = tmp_path / "cifar"
    write_cifar(cifar, per_batch=1001, n_test=1)
    from tests.test_datasets import chw_rows, cifar_batch

    batch = cifar_batch(chw_rows(want["images"]), "testing batch 1 of 1")
    (cifar / "cifar-10-batches-py" / "test_batch").write_bytes(batch)
    done = run_hvae(
        "evaluate",
        str(run),
        "--split",
        "test",
        "--data-dir",
        str(cifar),
        "--json",
        "--quiet",
        backend="jax",
    )
    result = json.loads(done.stdout)
    reference_bpd = float(np.mean(want["post_elbo"])) / math.log(2)
    assert result["images"] == 8
    assert abs(result["bpd"] - reference_bpd) < 0.02 * reference_bpd


@pytest.mark.slow
def test_an_imported_model_exports_to_onnx(tmp_path: Path) -> None:
    """Slow: tf2onnx's graph optimiser takes minutes on the 43 latent layers."""
    require_backend("torch")
    run = tmp_path / "run"
    run_hvae(
        "import",
        "vdvae",
        str(DATA / "cifar10-w16-model-ema.th"),
        "--out",
        str(run),
        backend="tensorflow",
    )
    run_hvae(
        "export",
        str(run),
        "--format",
        "onnx",
        "--out",
        str(tmp_path / "onnx"),
        backend="tensorflow",
    )
    assert any((tmp_path / "onnx").iterdir())


def test_a_run_written_by_import_loads_with_its_provenance_checked(tmp_path: Path) -> None:
    """A tampered provenance (not strings) is invalid metadata, one line."""
    from hvae_core.run import checkpoint

    meta = {
        "position": {},
        "num_bits": 8,
        "image_shape": [32, 32, 3],
        "provenance": {"source": 5},
    }
    with pytest.raises(HvaeError, match="provenance must be an object of strings"):
        checkpoint.validate(meta, tmp_path / "c")
