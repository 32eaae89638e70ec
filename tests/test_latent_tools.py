"""Latent tools (#29 item 3): resampling below the top K latent layers of given images
(``hvae sample --from --keep-layers``), decoding given latents and interpolating between two
images' latents (``TrainedModel.decode``/``interpolate``, ``hvae interpolate``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hvae_plugins.datasets.digits import digits_images
from PIL import Image

from hvae_core import figures
from hvae_core.backends.engine import make_runner
from hvae_core.cli import _resolution_runs, cli
from hvae_core.config import resolve_config
from hvae_core.model.hvae import HVAE
from hvae_core.model.layout import scales
from hvae_core.model.pixels import to_uint8
from hvae_core.run import RunDirectory
from hvae_core.trained import TrainedModel, describe_kept


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run (8x8x1 digits, 4 bits, 4 latent layers: 1x1, 2x2, 4x4, 8x8) whose weights
    moved off their initial values, so that every latent layer matters."""
    from conftest import trainer_with_run

    cfg = resolve_config("tiny", overrides=["run.jit=false"])
    trainer = trainer_with_run(cfg, tmp_path_factory.mktemp("latent") / "run")
    rng = np.random.default_rng(0)
    for v in trainer.engine.trainable + trainer.engine.ema:
        v.assign(v.value + rng.normal(0.0, 0.2, v.shape).astype(np.float32))
    trainer.engine.after_external_change()
    trainer.save()
    return trainer.run_dir


@pytest.fixture(scope="module")
def model(run_dir):
    import hvae_core

    return hvae_core.load(run_dir)


def in_memory(*overrides: str) -> TrainedModel:
    """A tiny model with perturbed weights, not saved (eager passes)."""
    import keras

    keras.utils.set_random_seed(0)
    cfg = resolve_config("tiny", overrides=list(overrides))
    hvae = HVAE(cfg, (8, 8, 1), 4, seed=0)
    hvae.build_weights()
    rng = np.random.default_rng(0)
    for v in hvae.trainable_variables:
        v.assign(
            keras.ops.convert_to_numpy(v.value) + rng.normal(0.0, 0.3, v.shape).astype(np.float32)
        )
    return TrainedModel(hvae, cfg, RunDirectory("."), {}, make_runner(hvae, jit=False))


def zeros(model: TrainedModel, n: int) -> list[np.ndarray]:
    return [np.zeros(s, np.float32) for s in model.noise_shapes(n).latents]


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def png_pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# --- what K means --------------------------------------------------------------------------


def test_k_is_described_in_resolutions_and_the_help_text_is_true_of_cifar10() -> None:
    cfg = resolve_config("cifar10")
    resolutions = [
        s.resolution
        for s in reversed(scales(cfg.model, cfg.resolutions))
        for _ in range(s.dec_blocks)
    ]
    assert len(resolutions) == 43
    # What `hvae sample --help` says of --keep-layers.
    assert _resolution_runs(resolutions) == "1 at 1x1, 3 at 4x4, 6 at 8x8, 11 at 16x16, 22 at 32x32"
    assert describe_kept(resolutions, 4) == "every layer up to 4x4"
    assert describe_kept(resolutions, 3) == "every layer up to 1x1 and 2 of the 3 at 4x4"
    assert describe_kept(resolutions, 1) == "every layer up to 1x1"
    assert describe_kept(resolutions, 0) == "no layer (a sample from the prior)"
    assert describe_kept(resolutions, 43) == "all 43 layers (a reconstruction)"
    help_text = " ".join(run("sample", "--help").output.split())
    assert "1 layer at 1x1, 3 at 4x4, 6 at 8x8, 11 at 16x16, 22 at 32x32" in help_text
    assert "K=4 keeps every layer up to 4x4" in help_text


def test_the_trained_model_lists_its_layer_resolutions(model) -> None:
    assert model.latent_resolutions == [1, 2, 4, 8]
    assert describe_kept(model.latent_resolutions, 2) == "every layer up to 2x2"


# --- keeping the top K layers ----------------------------------------------------------------


def test_keeping_every_layer_at_output_temperature_0_is_the_reconstruction(model) -> None:
    images = digits_images()[:5]
    layers = model.num_latent_layers
    full = model.reconstruct(images, seed=4)
    for t in (0.0, 1.0):  # the temperature of the layers below does not matter: there are none
        kept = model.reconstruct(images, latent_layers=layers, temperature=t, seed=4)
        np.testing.assert_array_equal(kept, full)
    fewer = model.reconstruct(images, latent_layers=layers - 1, temperature=1.0, seed=4)
    assert not np.array_equal(fewer, full)  # the last layer matters: the test can fail


def test_keeping_no_layer_is_a_prior_sample_that_ignores_the_image(model) -> None:
    images = digits_images()
    some, others = images[:4], images[10:14]
    assert not np.array_equal(some, others)
    a = model.reconstruct(some, latent_layers=0, temperature=0.8, seed=5)
    b = model.reconstruct(others, latent_layers=0, temperature=0.8, seed=5)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, model.sample(4, 0.8, 0.0, seed=5))
    # One layer kept: the images matter again.
    assert not np.array_equal(
        model.reconstruct(some, latent_layers=1, temperature=0.8, seed=5),
        model.reconstruct(others, latent_layers=1, temperature=0.8, seed=5),
    )


def test_hvae_sample_from_npz_keeps_the_top_layers_and_writes_the_grid(
    model, run_dir, tmp_path
) -> None:
    images = digits_images()[:3]
    source = save_npz(tmp_path / "in.npz", images=images)
    out, raw = tmp_path / "grid.png", tmp_path / "raw.npz"
    result = run(
        "sample", str(run_dir), "--from", str(source), "--keep-layers", "2",
        "--temperature", "0.7", "--n", "2", "--seed", "9", "--out", str(out), "--npz", str(raw),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "kept the top 2 of 4 latent layers (every layer up to 2x2) of 3 images" in result.stdout
    with np.load(raw) as data:
        np.testing.assert_array_equal(data["images"], images)
        samples = data["samples"]
        assert int(data["keep_layers"]) == 2 and int(data["num_bits"]) == 4
    # Two draws per image, the images in order in each row; what reconstruct computes.
    expected = model.reconstruct(
        np.concatenate([images, images]), latent_layers=2, temperature=0.7, seed=9
    )
    np.testing.assert_array_equal(samples, expected)
    assert not np.array_equal(samples[:3], samples[3:])  # two draws, not one
    # The grid: the originals' row, then one row per draw.
    grid = figures.grid_pixels(to_uint8(np.concatenate([images, samples]), 4), columns=3)
    np.testing.assert_array_equal(png_pixels(out), grid[..., 0])


def test_from_alone_keeps_every_layer_and_k_0_ignores_the_images(run_dir, model, tmp_path) -> None:
    images = digits_images()[:4]
    source = save_npz(tmp_path / "in.npz", x=images[..., 0])  # the only array, (N, H, W)
    out = tmp_path / "recon.npz"
    result = run("sample", str(run_dir), "--from", str(source), "--seed", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "(all 4 layers (a reconstruction))" in result.stdout
    with np.load(out) as data:  # an .npz --out: the arrays
        np.testing.assert_array_equal(data["samples"], model.reconstruct(images, seed=2))
    other = save_npz(tmp_path / "other.npz", images=digits_images()[20:24])
    got = []
    for i, path in enumerate((source, other)):
        target = tmp_path / f"prior{i}.npz"
        args = ["--from", str(path), "--keep-layers", "0", "--seed", "3", "--out", str(target)]
        assert run("sample", str(run_dir), *args).exit_code == 0
        with np.load(target) as data:
            got.append(data["samples"])
    np.testing.assert_array_equal(got[0], got[1])


def test_what_hvae_sample_writes_is_an_input_of_hvae_sample_from(run_dir, model, tmp_path):
    # `hvae sample --npz` writes samples and num_bits: --from takes the samples.
    drawn = tmp_path / "drawn.npz"
    assert (
        run("sample", str(run_dir), "--n", "3", "--seed", "1", "--out", str(drawn)).exit_code == 0
    )
    out = tmp_path / "kept.npz"
    result = run("sample", str(run_dir), "--from", str(drawn), "--seed", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    with np.load(drawn) as data, np.load(out) as kept:
        np.testing.assert_array_equal(kept["images"], data["samples"])
        np.testing.assert_array_equal(kept["samples"], model.reconstruct(data["samples"], seed=2))


def test_sample_from_pngs_and_a_folder_of_them(run_dir, model, tmp_path) -> None:
    images = digits_images()[:3]
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):  # as hvae writes pixels of 4-bit levels
        Image.fromarray(to_uint8(image, 4)[..., 0]).save(folder / f"{i}.png")
    out = tmp_path / "from_folder.npz"
    result = run(
        "sample", str(run_dir), "--from", str(folder), "--keep-layers", "4", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    with np.load(out) as data:
        np.testing.assert_array_equal(data["images"], images)
    one = tmp_path / "one.npz"
    result = run("sample", str(run_dir), "--from", str(folder / "1.png"), "--out", str(one))
    assert result.exit_code == 0, result.output
    with np.load(one) as data:
        np.testing.assert_array_equal(data["images"], images[1:2])


def bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    images = digits_images()[:2]
    wide = save_npz(tmp_path / "wide.npz", images=np.zeros((2, 16, 16, 1), np.uint8))
    bright = save_npz(tmp_path / "bright.npz", images=images * 16)
    floats = save_npz(tmp_path / "floats.npz", images=images.astype(np.float32))
    many = save_npz(tmp_path / "many.npz", a=images, b=images)
    good = save_npz(tmp_path / "good.npz", images=images)
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(rgb)
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(big)
    off_grid = tmp_path / "off.png"
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(off_grid)
    text = tmp_path / "notes.txt"
    text.write_text("not images")
    return [
        (["--from", str(wide)], "has shape (2, 16, 16, 1); the model takes images (N, 8, 8, 1)"),
        (["--from", str(bright)], "levels run 0..240; the model's 4-bit images run 0..15"),
        (["--from", str(floats)], "not integer pixel levels"),
        (["--from", str(many)], "holds 2 arrays (a, b) and none named 'images'"),
        (["--from", str(rgb)], "is a PNG of mode RGB; the model takes 8-bit grayscale images"),
        (["--from", str(big)], "is 16x16; the model takes 8x8 images"),
        (["--from", str(off_grid)], "not on the model's 4-bit grid"),
        (["--from", str(text)], "expected an .npz, a .png or a folder of PNGs"),
        (["--from", str(tmp_path / "missing.npz")], "missing.npz does not exist"),
        (
            ["--from", str(good), "--keep-layers", "5"],
            "the model has 4 latent layers (K runs 0..4)",
        ),
        (["--from", str(good), "--keep-layers", "-1"], "--keep-layers"),
        (["--from", str(good), "--keep-layers", "two"], "'two' is not a valid integer"),
        (["--keep-layers", "2"], "--keep-layers needs --from"),
        (["--from", str(good), "--temperature", "1,0.5"], "with --from it takes one temperature"),
    ]


def test_bad_inputs_are_one_line_and_write_nothing(run_dir, tmp_path) -> None:
    for args, fragment in bad_inputs(tmp_path):
        out = tmp_path / "out" / "grid.png"
        raw = tmp_path / "out" / "raw.npz"
        result = run("sample", str(run_dir), *args, "--out", str(out), "--npz", str(raw))
        assert_one_line_error(result, fragment)
        assert not out.exists() and not raw.exists(), args


# --- decoding given latents, interpolating -----------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.dec_num_blocks=[2]"],  # stacked runs of blocks: the given z go in per layer
        ["model.flow=orthogonal-sylvester"],  # z after the posterior's flow
    ],
)
def test_decoding_an_images_own_latents_is_its_reconstruction(overrides) -> None:
    model = in_memory(*overrides)
    images = digits_images()[:3]
    for noise in (zeros(model, 3), model.draw_noise(3, seed=1, pixels=False).latents):
        layers = model.encode(images, noise=noise)
        decoded = model.decode([layer["sample"] for layer in layers])
        np.testing.assert_array_equal(decoded, model.reconstruct(images, noise=noise))
    # Given latents are what the decoder uses: other latents, other images.
    shifted = [layer["sample"] + 2.0 for layer in layers]
    assert not np.array_equal(model.decode(shifted), decoded)


def test_interpolation_ends_are_the_reconstructions_from_the_posterior_means(model) -> None:
    a, b = digits_images()[0], digits_images()[7]
    steps = model.interpolate(a, b, steps=5)
    assert steps.shape == (5, 8, 8, 1) and steps.dtype == np.uint8
    ends = model.reconstruct(np.stack([a, b]), noise=zeros(model, 2))
    np.testing.assert_array_equal(steps[0], ends[0])
    np.testing.assert_array_equal(steps[-1], ends[1])
    assert not np.array_equal(ends[0], ends[1])
    middle = steps[2]
    assert not np.array_equal(middle, ends[0]) and not np.array_equal(middle, ends[1])
    # A posterior draw from a seed: repeatable, and another draw than the means.
    drawn = model.interpolate(a, b, steps=5, posterior="sample", seed=3)
    np.testing.assert_array_equal(drawn, model.interpolate(a, b, 5, posterior="sample", seed=3))
    assert not np.array_equal(drawn, steps)


def test_interpolation_and_decode_refuse_what_does_not_fit(model) -> None:
    from hvae_core.errors import InputError

    a = digits_images()[0]
    with pytest.raises(InputError, match="steps must be at least 2"):
        model.interpolate(a, a, steps=1)
    with pytest.raises(InputError, match=r"b must be one image \(8, 8, 1\)"):
        model.interpolate(a, digits_images()[:2])
    with pytest.raises(InputError, match="posterior must be 'mean' or 'sample'"):
        model.interpolate(a, a, posterior="median")
    good = [np.zeros(s, np.float32) for s in model.noise_shapes(2).latents]
    with pytest.raises(InputError, match="latents hold 3 arrays; the model has 4"):
        model.decode(good[:3])
    with pytest.raises(InputError, match=r"layer 2 \(4x4\) have shape \(2, 5, 5, 2\)"):
        model.decode([*good[:2], np.zeros((2, 5, 5, 2), np.float32), good[3]])


def test_hvae_interpolate_writes_the_row(run_dir, model, tmp_path) -> None:
    images = digits_images()[:10]
    source = save_npz(tmp_path / "in.npz", images=images)
    b_png = tmp_path / "b.png"
    Image.fromarray(to_uint8(images[7], 4)[..., 0]).save(b_png)
    out, raw = tmp_path / "row.png", tmp_path / "row.npz"
    result = run(
        "interpolate", str(run_dir), f"{source}:2", str(b_png), "--steps", "4",
        "--out", str(out), "--npz", str(raw),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = model.interpolate(images[2], images[7], steps=4)
    with np.load(raw) as data:
        np.testing.assert_array_equal(data["interpolation"], expected)
    row = np.concatenate([images[2:3], expected, images[7:8]])
    grid = figures.grid_pixels(to_uint8(row, 4), columns=6)
    np.testing.assert_array_equal(png_pixels(out), grid[..., 0])
    for args, fragment in [
        ([f"{source}:10", str(b_png)], "name one of the 10 images as"),
        ([str(source), str(b_png)], "name one of the 10 images as"),
        ([str(tmp_path / "gone.png"), str(b_png)], "gone.png does not exist"),
        ([str(b_png), str(b_png), "--steps", "1"], "--steps"),
    ]:
        target = tmp_path / "bad.png"
        assert_one_line_error(
            run("interpolate", str(run_dir), *args, "--out", str(target)), fragment
        )
        assert not target.exists()
