"""A trained model in use: the importance-weighted bound against a brute-force log p(x)."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from hvae_plugins.datasets.digits import digits_images

from hvae_core.backends.engine import make_runner
from hvae_core.config import resolve_config
from hvae_core.model.hvae import HVAE
from hvae_core.model.likelihood import dmol_log_prob
from hvae_core.model.pixels import to_unit_range
from hvae_core.run import RunDirectory
from hvae_core.trained import TrainedModel

# One latent layer of one dimension (1x1x1, at the top): log p(x) = log of a 1-d integral over
# the prior's noise, which a fine grid computes to far better than the tolerances below.
ONE_LATENT = ["model.dec_num_blocks=[0,0,0,1]", "model.z_width=[1]"]
GRID = np.linspace(-12.0, 12.0, 4001)


def one_latent_model(*overrides: str, z_scale: float = 20.0) -> TrainedModel:
    keras.utils.set_random_seed(0)
    cfg = resolve_config("tiny", overrides=[*ONE_LATENT, *overrides])
    model = HVAE(cfg, (8, 8, 1), 4, seed=0)
    model.build_weights()
    # A latent that matters: scaled up, z moves the pixels' likelihood a lot, so that the
    # untrained posterior is a poor proposal and the bound's gap is wide at K = 1.
    (block,) = model.decoder.blocks
    kernel = block.z_proj.kernel
    kernel.assign(kernel.value * z_scale)
    if block.flow is not None:  # away from its initial near-identity: a log-det that matters
        rng = np.random.default_rng(0)
        for w in block.flow.weights:
            w.assign(w.value + rng.normal(0.0, 0.5, w.shape).astype(np.float32))
    return TrainedModel(model, cfg, RunDirectory("."), {}, make_runner(model, jit=False))


def brute_force_log_px(trained: TrainedModel, images: np.ndarray) -> np.ndarray:
    """log p(x) in nats per image: the decoder run from the prior with the noise set to every
    grid point (z = prior mean + prior scale * eps), p(x) = integral of N(eps) p(x | z(eps))."""
    model = trained.model
    (block,) = model.decoder.blocks
    eps = GRID.reshape(-1, 1, 1, 1).astype(np.float32)  # the grid as the prior's noise
    state, zs, _ = model.decoder(activations=None, batch_size=len(GRID), noise=[eps])
    params = model.head(state, zs)
    x = to_unit_range(images, trained.num_bits)
    log_prior = -0.5 * GRID**2 - 0.5 * math.log(2 * math.pi)
    step = GRID[1] - GRID[0]
    out = []
    for image in keras.ops.convert_to_numpy(x):
        tiled = np.repeat(image[None], len(GRID), axis=0)
        log_px_z = keras.ops.convert_to_numpy(
            dmol_log_prob(
                params,
                tiled,
                num_mixtures=model.num_mixtures,
                num_bits=model.num_bits,
                gradient_smoothing=model.gradient_smoothing,
                scale_fn=model.scale_fn,
            )
        ).astype(np.float64)
        terms = log_prior + log_px_z
        top = terms.max()
        out.append(top + math.log(np.exp(terms - top).sum() * step))
    return np.array(out)


def nats(trained: TrainedModel, bpd: np.ndarray) -> np.ndarray:
    return -np.asarray(bpd) * 64 * math.log(2.0)


@pytest.mark.parametrize("flow", [None, "orthogonal-sylvester"])
def test_the_importance_weighted_bound_approaches_log_px_from_below(flow) -> None:
    trained = one_latent_model(*([f"model.flow={flow}"] if flow else []))
    images = digits_images()[:3]
    truth = brute_force_log_px(trained, images)
    bounds, spreads = {}, {}
    for k, repeats in ((1, 1000), (10, 200), (100, 40)):
        stacked = np.repeat(images, repeats, axis=0)  # independent draws of each image
        result = trained.log_likelihood(stacked, num_samples=k, batch_size=1000)
        per_image = nats(trained, result["per_image_bpd"]).reshape(len(images), repeats)
        bounds[k] = per_image.mean(axis=1)
        spreads[k] = per_image.std(axis=1) / math.sqrt(repeats)
        # A lower bound in expectation: the mean of the draws stays below log p(x).
        assert np.all(bounds[k] <= truth + 3 * spreads[k] + 1e-3), (k, bounds[k], truth)
    assert np.all(truth - bounds[1] > 0.15), truth - bounds[1]  # the ELBO is loose here
    # It rises with K (K = 100 may only match K = 10 within the draws' spread).
    assert np.all(bounds[10] - bounds[1] > 3 * (spreads[1] + spreads[10]))
    assert np.all(bounds[100] - bounds[10] > -3 * (spreads[10] + spreads[100]))
    large = trained.log_likelihood(images, num_samples=5000, batch_size=1000)
    np.testing.assert_allclose(nats(trained, large["per_image_bpd"]), truth, atol=0.05)
    assert large["bpd"] == pytest.approx(float(np.mean(large["per_image_bpd"])))


def test_with_one_sample_the_bound_is_the_elbo_on_average() -> None:
    trained = one_latent_model()
    images = np.repeat(digits_images()[:2], 2000, axis=0)
    one = trained.log_likelihood(images, num_samples=1, batch_size=1000)["per_image_bpd"]
    elbo = trained.elbo(images, batch_size=1000)["bpd"]
    # The bound draws its KL, the ELBO computes it in closed form: equal means.
    assert float(np.mean(one)) == pytest.approx(elbo, abs=4 * np.std(one) / math.sqrt(len(one)))


def test_a_plugin_the_run_used_must_be_installed() -> None:
    from hvae_core.errors import PluginError
    from hvae_core.run import check_plugins

    gone = [{"kind": "flow", "name": "fancy", "package": "hvae-fancy", "version": "1.2"}]
    with pytest.raises(PluginError) as error:
        check_plugins(gone)
    assert error.value.one_line() == (
        "this run used the flow plugin 'fancy' from the package hvae-fancy 1.2, which is not "
        "installed (hint: pip install 'hvae-fancy==1.2')"
    )
    older = [{"kind": "dataset", "name": "digits", "package": "hvae", "version": "0.0.9"}]
    assert check_plugins(older) == [
        "the run used dataset 'digits' from hvae 0.0.9; installed is hvae 0.1.0"
    ]


def test_one_compiled_pass_serves_every_temperature_and_depth(monkeypatch) -> None:
    # Temperatures and the top-down depth are inputs of the compiled passes, not part of their
    # keys: `hvae analyze` and a user's temperature sweep compile each pass once. Given
    # noise (all ones) makes the draws deterministic, so the values can be checked exactly.
    cfg = resolve_config("tiny")
    model = HVAE(cfg, (8, 8, 1), 4, seed=0)
    model.build_weights()
    # Weights away from their initial values (some start at zero): latents that move pixels.
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:
        v.assign(v.value + rng.normal(0.0, 0.3, v.shape).astype(np.float32))
    runner = make_runner(model, jit=True)
    keys = []
    run = runner.run
    monkeypatch.setattr(runner, "run", lambda key, *a: keys.append(key) or run(key, *a))
    trained = TrainedModel(model, cfg, RunDirectory("."), {}, runner)
    images = digits_images()[:4]
    layers = trained.num_latent_layers
    ones = [np.ones(s, np.float32) for s in trained.noise_shapes(4).latents]

    cold, warm = (trained.sample(4, t, output_temperature=0.0, noise=ones) for t in (0.0, 1.0))
    depths = [
        trained.reconstruct(images, latent_layers=j, temperature=t, noise=ones)
        for j in range(layers + 1)
        for t in (0.0, 1.0)
    ]
    assert len(set(keys)) == 2  # one sampler, one top-down pass
    assert not np.array_equal(cold, warm)  # the temperature reached the compiled sampler
    # Depth 0 at temperature t is the prior's sample at t; all layers, the reconstruction.
    np.testing.assert_array_equal(depths[0], cold)
    np.testing.assert_array_equal(depths[1], warm)
    full = trained.reconstruct(images, noise=ones)
    np.testing.assert_array_equal(depths[-1], full)
    np.testing.assert_array_equal(depths[-2], full)
    assert len({d.tobytes() for d in depths[::2]}) > 1  # the depth reached the compiled pass


# --- the noise as an input ----------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with a tiny model's checkpoint (weights moved off their initial values,
    so every latent layer matters)."""
    from conftest import trainer_with_run

    cfg = resolve_config("tiny", overrides=["run.jit=false"])
    trainer = trainer_with_run(cfg, tmp_path_factory.mktemp("noise") / "run")
    rng = np.random.default_rng(0)
    for v in trainer.engine.trainable + trainer.engine.ema:
        v.assign(v.value + rng.normal(0.0, 0.2, v.shape).astype(np.float32))
    trainer.engine.after_external_change()
    trainer.save()
    return trainer.run_dir


def test_the_same_seed_draws_the_same_noise_and_given_noise_replays_it(run_dir) -> None:
    import hvae_core

    model = hvae_core.load(run_dir)
    a, b = model.sample(6, 0.9, seed=1, batch_size=4), model.sample(6, 0.9, seed=1)
    np.testing.assert_array_equal(a, b)  # the batch size does not change the draw
    assert not np.array_equal(a, model.sample(6, 0.9, seed=2))
    noise = model.draw_noise(6, seed=1)
    assert [e.shape for e in noise.latents] == [s for s in model.noise_shapes(6).latents]
    assert noise.pixels.shape == model.noise_shapes(6).pixels == (6, 8, 8, 2 + 1)
    np.testing.assert_array_equal(model.sample(6, 0.9, noise=noise), a)
    np.testing.assert_array_equal(
        model.sample(6, 0.9, noise=list(noise.latents), pixel_noise=noise.pixels), a
    )
    # Temperature 0 everywhere is the mean path: the noise no longer matters.
    zeros = [np.zeros_like(e) for e in noise.latents]
    np.testing.assert_array_equal(
        model.sample(6, 0.0, 0.0, noise=noise), model.sample(6, 0.0, 0.0, noise=zeros)
    )
    images = digits_images()[:6]
    first, again = (model.elbo(images, seed=7)["bpd"] for _ in range(2))
    assert first == again
    assert model.elbo(images, noise=model.draw_noise(6, seed=7))["bpd"] == first


def test_a_posterior_draw_is_mean_plus_scale_times_the_given_eps(run_dir) -> None:
    import hvae_core

    model = hvae_core.load(run_dir)
    images = digits_images()[:5]
    noise = model.draw_noise(5, seed=3, pixels=False)
    layers = model.encode(images, noise=noise)
    for layer, eps in zip(layers, noise.latents, strict=True):  # no flows: z = mean + scale eps
        np.testing.assert_allclose(
            layer["sample"], layer["mean"] + layer["scale"] * eps, rtol=1e-5, atol=1e-5
        )
    # The importance weights with K = 1 and the given noise: the same draw as the ELBO's.
    per_layer = [e[:, None] for e in noise.latents]  # (N, K = 1, R, R, Z)
    iw = model.log_likelihood(images, 1, noise=per_layer)["per_image_bpd"]
    assert np.all(np.isfinite(iw))


def test_noise_that_does_not_fit_is_one_clear_error(run_dir) -> None:
    import hvae_core
    from hvae_core.errors import InputError

    model = hvae_core.load(run_dir)
    good = model.draw_noise(3, seed=0)
    wrong_shape = [*good.latents[:2], np.zeros((3, 5, 5, 2), np.float32), good.latents[3]]
    cases = [
        (dict(noise=list(good.latents[:3])), "noise holds 3 arrays; the model has 4 latent"),
        (dict(noise=wrong_shape), r"latent layer 2 \(4x4\) has shape \(3, 5, 5, 2\), expected "),
        (dict(noise=[e.astype(np.int32) for e in good.latents]), "must be a float array"),
        (dict(noise=[e * np.nan for e in good.latents]), "non-finite"),
        (dict(noise=good.latents), "no pixel_noise was given"),
        (dict(noise=good.latents, pixel_noise=good.pixels + 2), r"uniforms in \[0, 1\]"),
        (dict(noise=good, seed=1), "either seed or noise"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            model.sample(3, **kwargs)
    with pytest.raises(ValueError, match="expected"):  # InputError is a ValueError
        model.elbo(digits_images()[:2], noise=good)


PARITY_SCRIPT = """
import hvae_core
from hvae_core.noise import Noise

model = hvae_core.load(inputs["run"].item())
noise = Noise(tuple(inputs[f"eps{i}"] for i in range(4)), inputs["pixels"])
outputs["elbo"] = model.elbo(inputs["images"], noise=noise)["bpd"]
outputs["samples"] = model.sample(len(inputs["images"]), 0.9, noise=noise)
outputs["recon"] = model.reconstruct(inputs["images"], 1.0, latent_layers=2, noise=noise)
"""


def test_the_backends_agree_on_a_pass_given_the_same_noise(run_dir, tmp_path) -> None:
    from backends import run_on_backend

    import hvae_core

    images = digits_images()[:6]
    noise = hvae_core.load(run_dir).draw_noise(6, seed=11)
    inputs = {"run": np.array(str(run_dir)), "images": images, "pixels": noise.pixels}
    inputs.update({f"eps{i}": e for i, e in enumerate(noise.latents)})
    got = {b: run_on_backend(b, PARITY_SCRIPT, inputs, tmp_path) for b in BACKENDS}
    reference = got["jax"]
    assert len({s.tobytes() for s in reference["samples"]}) == 6
    for backend in ("tensorflow", "torch"):
        out = got[backend]
        assert float(out["elbo"]) == pytest.approx(float(reference["elbo"]), rel=1e-5)
        for key in ("samples", "recon"):
            # Pixel levels: equal but where float error crosses a level's edge (one level).
            diff = np.abs(out[key].astype(int) - reference[key].astype(int))
            assert diff.max() <= 1 and np.mean(diff == 0) > 0.99, (backend, key)


BACKENDS = ("jax", "tensorflow", "torch")
