"""The CR-VAE regularizer: its augmentation, its batch layout, the consistency term's maths and
gradients, its errors, and training runs that use it on every backend."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from backends import run_hvae, run_on_backend
from click.testing import CliRunner
from hvae_plugins.datasets.digits import digits_images
from hvae_plugins.regularizers.augment import translate_and_flip
from hvae_plugins.regularizers.cr_vae import TERM, consistency_kl, make_cr_vae

from hvae_core.api import LayerStats, ModelOutputs
from hvae_core.cli import cli
from hvae_core.config import resolve_config
from hvae_core.errors import ConfigError, HvaeError
from hvae_core.model.hvae import HVAE
from hvae_core.model.pixels import to_unit_range
from hvae_core.run import files as rundir

BITS = 4  # the digits' bit depth


def random_images(n: int, size: int = 8, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**BITS, (n, size, size, channels), np.uint8)


def shifted(image: np.ndarray, dy: int, dx: int, padding: str) -> np.ndarray:
    """Oracle, one pixel at a time: ``image`` (H, W, C) moved down by dy and right by dx."""
    height, width = image.shape[:2]

    def source(k: int, n: int) -> int | None:
        if 0 <= k < n:
            return k
        if padding == "edge":
            return min(max(k, 0), n - 1)
        if padding == "reflect":  # mirrored about the border pixel, which is not repeated
            return -k if k < 0 else 2 * (n - 1) - k
        return None  # constant: level 0

    out = np.zeros_like(image)
    for i, j in itertools.product(range(height), range(width)):
        si, sj = source(i - dy, height), source(j - dx, width)
        if si is not None and sj is not None:
            out[i, j] = image[si, sj]
    return out


def resolved(batch_size: int = 8, batch_size_div: int = 1, **overrides):
    return resolve_config(
        "tiny",
        overrides=[
            f"training.batch_size={batch_size}",
            f"training.batch_size_div={batch_size_div}",
            "training.regularizer=cr-vae",
            *(f"regularizer.{k}={v}" for k, v in overrides.items()),
        ],
    )


def regularizer(batch_size: int = 8, batch_size_div: int = 1, **overrides):
    cfg = resolved(batch_size, batch_size_div, **overrides)
    return make_cr_vae(cfg.options("regularizer"), cfg.training)


# --- augmentation ---------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["edge", "reflect", "constant"])
def test_translations_and_flips_move_pixels_on_the_grid(padding) -> None:
    images = random_images(64)
    rng = np.random.default_rng(1)
    out = translate_and_flip(images, rng, max_shift=2, padding=padding, flip=True)
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert not np.shares_memory(out, images)
    seen = set()
    for image, result in zip(images, out, strict=True):
        allowed = set(np.unique(image)) | ({0} if padding == "constant" else set())
        assert set(np.unique(result)) <= allowed  # only values the image has: on the grid
        matches = [
            (dy, dx, mirrored)
            for dy, dx, mirrored in itertools.product(range(-2, 3), range(-2, 3), (False, True))
            if np.array_equal(
                result,
                shifted(image, dy, dx, padding)[:, ::-1]
                if mirrored
                else shifted(image, dy, dx, padding),
            )
        ]
        assert matches, "not a translation (and flip) of its image"
        seen.update(matches)
    # Random, not a fixed move: many shifts, both orientations.
    assert len({(dy, dx) for dy, dx, _ in seen}) >= 10
    assert {m for _, _, m in seen} == {False, True}


def test_flips_alone_mirror_exactly_and_nothing_else() -> None:
    images = random_images(32)
    out = translate_and_flip(images, np.random.default_rng(0), max_shift=0, flip=True)
    mirrored = [np.array_equal(o, i[:, ::-1]) for i, o in zip(images, out, strict=True)]
    unchanged = [np.array_equal(o, i) for i, o in zip(images, out, strict=True)]
    assert all(m != u for m, u in zip(mirrored, unchanged, strict=True))
    assert 0 < sum(mirrored) < len(images)


def test_no_augmentation_is_an_exact_copy_and_the_same_seed_the_same_batch() -> None:
    images = random_images(16)
    same = translate_and_flip(images, np.random.default_rng(0), max_shift=0, flip=False)
    np.testing.assert_array_equal(same, images)
    a = translate_and_flip(images, np.random.default_rng(5), max_shift=1)
    b = translate_and_flip(images, np.random.default_rng(5), max_shift=1)
    np.testing.assert_array_equal(a, b)


# --- the batch ------------------------------------------------------------------------------


def test_the_batch_is_half_originals_then_their_augmentations() -> None:
    images = random_images(8)
    reg = regularizer(batch_size=8, cr_max_shift=1)
    out = reg.transform_batch(images, np.random.default_rng(3))
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:4], images[:4])  # the originals, in order
    expected = translate_and_flip(images[:4], np.random.default_rng(3), max_shift=1)
    np.testing.assert_array_equal(out[4:], expected)
    assert not np.array_equal(out[4:], images[:4])


def test_every_micro_batch_holds_its_own_pairs() -> None:
    # The engine cuts the batch into batch_size_div consecutive micro-batches, and the model
    # shares noise between the halves of each: so each must be [originals_k; augmented_k].
    images = random_images(24)
    reg = regularizer(batch_size=24, batch_size_div=3, cr_max_shift=0, cr_flip=False)
    assert reg.noise_groups == 2
    out = reg.transform_batch(images, np.random.default_rng(0))
    for k, chunk in enumerate(np.split(out, 3)):
        np.testing.assert_array_equal(chunk[:4], images[4 * k : 4 * k + 4])
        np.testing.assert_array_equal(chunk[4:], images[4 * k : 4 * k + 4])
    reg = regularizer(batch_size=24, batch_size_div=3, cr_max_shift=2)
    out = reg.transform_batch(images, np.random.default_rng(0))
    augmented = translate_and_flip(images[:12], np.random.default_rng(0), max_shift=2)
    for k, chunk in enumerate(np.split(out, 3)):
        np.testing.assert_array_equal(chunk[:4], images[4 * k : 4 * k + 4])
        np.testing.assert_array_equal(chunk[4:], augmented[4 * k : 4 * k + 4])


@pytest.mark.parametrize(
    ("batch_size", "div", "fragment"),
    [(7, 1, "training.batch_size 7 is odd"), (12, 4, "the micro-batch of 3")],
)
def test_a_batch_that_cannot_be_halved_is_a_clear_error(batch_size, div, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        regularizer(batch_size=batch_size, batch_size_div=div)
    assert "divisible by 2 * training.batch_size_div" in info.value.one_line()


def test_a_batch_of_another_size_is_refused() -> None:
    reg = regularizer(batch_size=8, batch_size_div=2)
    with pytest.raises(HvaeError, match="6 images"):
        reg.transform_batch(random_images(6), np.random.default_rng(0))


def test_an_odd_batch_size_stops_the_cli_with_one_line(tmp_path) -> None:
    result = CliRunner().invoke(
        cli,
        ["train", "--config", "tiny", "--regularizer", "cr-vae", "--batch-size", "9"]
        + ["--save-dir", str(tmp_path), "--quiet"],
    )
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "training.batch_size 9 is odd" in lines[0]


def test_bad_options_name_the_key() -> None:
    with pytest.raises(ConfigError, match="regularizer.cr_lambda"):
        resolved(cr_lambda=-1)
    with pytest.raises(ConfigError, match="regularizer.cr_max_shift"):
        resolved(cr_max_shift=-2)
    with pytest.raises(ConfigError, match="regularizer.cr_padding"):
        resolved(cr_padding="wrap")


# --- the consistency term -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> HVAE:
    cfg = resolve_config("tiny")
    model = HVAE(cfg, (8, 8, 1), BITS, seed=0)
    model.build_weights()
    return model


def step_terms(model: HVAE, reg, images: np.ndarray, seed: int = 0) -> list[dict]:
    """What the engine computes for each micro-batch of one training batch."""
    batch = reg.transform_batch(images, np.random.default_rng(seed))
    return [
        model.losses_for(
            to_unit_range(chunk, BITS),
            training=True,
            regularizer=reg,
            noise_groups=reg.noise_groups,
        )
        for chunk in np.split(batch, reg.batch_size_div)
    ]


def np_(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)


def test_identical_copies_with_shared_noise_cost_exactly_nothing(model) -> None:
    reg = regularizer(batch_size=32, batch_size_div=2, cr_max_shift=0, cr_flip=False, cr_lambda=1.0)
    for result in step_terms(model, reg, digits_images()[:32]):
        assert float(result[TERM]) == 0.0
        # ... although the noise is on: the latents are samples, not the posterior means.
        out = result["outputs"]
        for z, layer in zip(out.latents, out.layers, strict=True):
            assert np.abs(np_(z) - np_(layer.q_mean)).max() > 1e-3


def np_kl(mq, sq, mp, sp) -> np.ndarray:
    """Oracle in float64: elementwise KL(N(mq, sq^2) || N(mp, sp^2))."""
    return np.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5


def test_the_kl_runs_from_the_augmented_posterior_to_the_original_summed_over_layers() -> None:
    rng = np.random.default_rng(0)
    shapes = [(6, 1, 1, 3), (6, 2, 2, 2), (6, 4, 4, 1)]  # three layers, three pairs
    stats = [
        {"q_mean": rng.normal(size=s), "q_scale": rng.uniform(0.2, 3.0, size=s)} for s in shapes
    ]
    forward = np.zeros(3)
    backward = np.zeros(3)
    for layer in stats:
        m, s = layer["q_mean"], layer["q_scale"]
        forward += np_kl(m[3:], s[3:], m[:3], s[:3]).reshape(3, -1).sum(axis=1)
        backward += np_kl(m[:3], s[:3], m[3:], s[3:]).reshape(3, -1).sum(axis=1)
    layers = tuple(
        LayerStats(
            kl=keras.ops.zeros((6,)),
            q_mean=keras.ops.convert_to_tensor(s["q_mean"], "float32"),
            q_scale=keras.ops.convert_to_tensor(s["q_scale"], "float32"),
            p_mean=keras.ops.zeros(s["q_mean"].shape),
            p_scale=keras.ops.ones(s["q_mean"].shape),
        )
        for s in stats
    )
    got = np_(consistency_kl(layers))
    np.testing.assert_allclose(got, forward, rtol=1e-5)
    assert np.abs(forward - backward).max() > 0.1  # the oracle tells the directions apart
    reg = regularizer(cr_lambda=0.25)
    outputs = ModelOutputs(params=None, latents=(), layers=layers)
    term = reg.loss_terms(outputs, None)[TERM]
    assert float(term) == pytest.approx(0.25 * forward.mean(), rel=1e-5)


def test_the_term_enters_the_loss_in_bits_per_dimension(model) -> None:
    reg = regularizer(batch_size=16, cr_max_shift=1, cr_lambda=0.5)
    [result] = step_terms(model, reg, digits_images()[:16])
    stats = result["outputs"].layers
    per_pair = sum(
        np_kl(m[8:], s[8:], m[:8], s[:8]).reshape(8, -1).sum(axis=1)
        for m, s in ((np_(layer.q_mean), np_(layer.q_scale)) for layer in stats)
    )
    assert per_pair.max() > 0
    to_bpd = 1.0 / (8 * 8 * 1 * np.log(2.0))
    # Near-identical posteriors at initialisation: float32 cancellation limits the agreement.
    assert float(result[TERM]) == pytest.approx(0.5 * per_pair.mean() * to_bpd, rel=1e-2)
    # It is part of the loss; the reported ELBO is not.
    parts = np_(result["recon_bpd"]) + np_(result["kl_bpd"]) + np_(result[TERM])
    assert np_(result["loss"]) == pytest.approx(parts, rel=1e-6)
    assert np_(result["elbo_bpd"]) == pytest.approx(parts - np_(result[TERM]), rel=1e-6)


def test_augmentation_makes_the_term_positive(model) -> None:
    reg = regularizer(batch_size=32, batch_size_div=2, cr_max_shift=1)
    for result in step_terms(model, reg, digits_images()[:32]):
        assert float(result[TERM]) > 0.0


def test_without_shared_noise_identical_copies_drift_apart_below_the_top(model) -> None:
    reg = regularizer(batch_size=16, cr_max_shift=0, cr_flip=False, cr_duplicate_noise=False)
    assert reg.noise_groups == 1
    [result] = step_terms(model, reg, digits_images()[:16])
    assert float(result[TERM]) > 0.0
    per_layer = [np_(consistency_kl([s])) for s in result["outputs"].layers]
    # The top layer sees only the image, the same in both copies; the layers below see the
    # latents above them, sampled with different noise.
    assert np.all(per_layer[0] == 0.0)
    assert all(layer.mean() > 0.0 for layer in per_layer[1:])


def test_gradients_flow_from_the_term_into_the_encoder(model) -> None:
    reg = regularizer(batch_size=16, cr_max_shift=1)
    batch = reg.transform_batch(digits_images()[:16], np.random.default_rng(0))
    x = to_unit_range(batch, BITS)
    encoder = model.encoder.trainable_variables
    with tf.GradientTape() as tape:
        term = reg.loss_terms(model.posterior_pass(x, training=True, noise_groups=2), x)[TERM]
    grads = tape.gradient(term, encoder)
    assert float(term) > 0.0
    norms = [0.0 if g is None else float(tf.norm(g)) for g in grads]
    assert all(np.isfinite(norms))
    assert sum(n > 0 for n in norms) >= len(encoder) // 2
    assert max(norms) > 1e-6


# --- the command line and training runs -----------------------------------------------------


def test_plugins_show_lists_the_options() -> None:
    runner = CliRunner()
    table = runner.invoke(cli, ["plugins", "show", "regularizer", "cr-vae"])
    assert table.exit_code == 0, table.output
    assert "CR-VAE" in table.stdout
    data = json.loads(
        runner.invoke(cli, ["plugins", "show", "regularizer", "cr-vae", "--json"]).stdout
    )
    assert data["section"] == "regularizer"
    defaults = {o["name"]: o["default"] for o in data["options"]}
    assert defaults == {
        "cr_lambda": 0.1,
        "cr_duplicate_noise": True,
        "cr_max_shift": 1,
        "cr_padding": "edge",
        "cr_flip": True,
    }
    for name in defaults:
        assert f"regularizer.{name}" in table.stdout


def check_run(run_dir: Path) -> list[dict]:
    rows = rundir.read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_bpd"] < rows[0]["train_bpd"]
    assert all(np.isfinite(r["val_bpd"]) for r in rows)
    assert all(r[TERM] > 0.0 and np.isfinite(r[TERM]) for r in rows)
    saved = resolve_config(run_dir / "config.yaml")
    assert saved.training.regularizer == "cr-vae"
    assert saved.options("regularizer").cr_duplicate_noise is True
    return rows


TRAIN = [
    "train",
    "--config",
    "tiny",
    "--regularizer",
    "cr-vae",
    "--epochs",
    "2",
    "--batch-size",
    "64",
]


def test_cli_training_learns_and_logs_the_consistency_term(tmp_path) -> None:
    result = CliRunner().invoke(
        cli,
        [*TRAIN, "--save-dir", str(tmp_path), "--quiet"]
        + ["--set", "run.jit=false", "--set", "training.batch_size_div=2"],
    )
    assert result.exit_code == 0, result.output
    [run_dir] = list(tmp_path.iterdir())
    check_run(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_other_backends_train_with_cr_vae(backend, tmp_path) -> None:
    pytest.importorskip(backend)
    done = run_hvae(
        *TRAIN,
        "--save-dir",
        str(tmp_path),
        "--quiet",
        "--set",
        "training.batch_size_div=2",
        backend=backend,
    )
    [run_dir] = list(tmp_path.iterdir())
    check_run(run_dir)
    assert f"backend {backend}" in done.stderr


ENGINE_STEP = """
from hvae_core.config import resolve_config
from hvae_core.model.hvae import HVAE
from hvae_core.plugins import get_registry
from hvae_core.backends.engine import make_engine
from hvae_core.training.optim import make_optimizer
from hvae_plugins.regularizers.cr_vae import make_cr_vae

cfg = resolve_config("tiny", overrides=[
    "training.batch_size=16", "training.batch_size_div=2", "training.regularizer=cr-vae",
    "regularizer.cr_max_shift=0", "regularizer.cr_flip=false",
])
model = HVAE(cfg, (8, 8, 1), 4, seed=0)
model.build_weights()
reg = make_cr_vae(cfg.options("regularizer"), cfg.training)
engine = make_engine(model, make_optimizer(cfg, 10, get_registry()), cfg, reg)
batch = reg.transform_batch(inputs["images"], np.random.default_rng(0))
steps = [engine.train_step(batch, 1.0) for _ in range(2)]
outputs["term"] = np.array([s["consistency_bpd"] for s in steps])
outputs["elbo"] = np.array([s["elbo_bpd"] for s in steps])
outputs["kl"] = np.array([s["kl_bpd"] for s in steps])
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_the_compiled_step_pairs_each_micro_batch(backend, tmp_path) -> None:
    # Through each backend's compiled step (XLA on jax and tensorflow), with micro-batches:
    # identical copies and shared noise give exactly 0 only if every micro-batch holds its
    # own pairs and the model shares the noise within each.
    out = run_on_backend(backend, ENGINE_STEP, {"images": digits_images()[:16]}, tmp_path)
    assert np.all(out["term"] == 0.0)
    assert np.all(np.isfinite(out["elbo"])) and np.all(out["kl"] > 0.0)
