"""Evaluation statistics: per-layer KL and active units against numpy oracles."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hvae_plugins.datasets.digits import digits_images

from hvae_core.config import resolve_config
from hvae_core.model.evaluation import MEAN_SUM, SQUARE_SUM, add_terms, summarise, usage_line
from hvae_core.model.hvae import HVAE
from hvae_core.model.pixels import to_unit_range


def zero_noise(self, batch):
    """Deterministic passes: the latent noise the model draws for itself is zero."""
    return [keras.ops.zeros(s) for s in self.noise_shapes(batch).latents]


def test_active_units_are_the_dimensions_whose_posterior_mean_varies_over_images() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    images = rng.normal(0.0, 1.0, (n, 2, 2, 2))
    # Layer 0 (1x1x2): one dimension varies (variance 0.04), one barely (0.0025). Layer 1
    # (2x2x1): ignores the images, a constant. Layer 2 (2x2x2): copies the images.
    top = np.stack([rng.normal(1.0, 0.2, n), rng.normal(-3.0, 0.05, n)], axis=-1)
    layers = [top.reshape(n, 1, 1, 2), np.full((n, 2, 2, 1), 5.0), images]
    kl = rng.uniform(0.0, 1.0, (n, 3))
    totals: dict = {}
    for part in np.array_split(np.arange(n), 7):  # uneven batches add up
        add_terms(
            totals,
            {
                "elbo_bpd": np.sum(kl[part].sum(1) + 1.0),
                "recon_bpd": np.float32(len(part)),
                "kl_bpd": np.sum(kl[part]),
                "kl_layers_bpd": kl[part].sum(0),
                MEAN_SUM: [m[part].sum(0) for m in layers],
                SQUARE_SUM: [(m[part] ** 2).sum(0) for m in layers],
                "count": np.float32(len(part)),
            },
        )
    summary = summarise(totals, [1, 2, 2])
    oracle = [int(np.count_nonzero(np.var(m.reshape(n, -1), axis=0) > 0.01)) for m in layers]
    assert summary["active_units"] == oracle == [1, 0, 8]
    assert summary["latent_dims"] == [2, 4, 8] and summary["active_units_total"] == 9
    assert summary["active_layers"] == 2 and summary["images"] == n
    np.testing.assert_allclose(summary["kl_layers_bpd"], kl.mean(0))
    assert summary["kl_scales_bpd"] == pytest.approx(
        {1: kl[:, 0].mean(), 2: kl[:, 1].mean() + kl[:, 2].mean()}
    )
    assert summary["kl_bpd"] == pytest.approx(sum(summary["kl_layers_bpd"]))
    assert usage_line(summary) == "active 9/14 dims in 2/3 layers"


def test_the_evaluation_pass_sums_what_the_loss_and_the_posterior_give(monkeypatch) -> None:
    # Without latent noise every pass sees the same posterior: the sums can be checked.
    monkeypatch.setattr(HVAE, "draw_latent_noise", zero_noise)
    cfg = resolve_config("tiny", overrides=["run.jit=false"])
    model = HVAE(cfg, (8, 8, 1), 4, seed=0)
    model.build_weights()
    x = to_unit_range(digits_images()[:6], 4)
    terms = keras.tree.map_structure(keras.ops.convert_to_numpy, model.evaluation_terms(x))
    losses = model.losses_for(x)
    assert float(terms["count"]) == 6
    for key in ("elbo_bpd", "recon_bpd", "kl_bpd"):
        assert float(terms[key]) == pytest.approx(6 * float(losses[key]), rel=1e-5)
    np.testing.assert_allclose(
        terms["kl_layers_bpd"], 6 * np.asarray(losses["kl_layers_bpd"]), rtol=1e-5
    )
    means = [np.asarray(keras.ops.convert_to_numpy(layer["mean"])) for layer in model.encode(x)]
    for got, want in zip(terms[MEAN_SUM], means, strict=True):
        np.testing.assert_allclose(got, want.sum(0), rtol=1e-5, atol=1e-6)
    for got, want in zip(terms[SQUARE_SUM], means, strict=True):
        np.testing.assert_allclose(got, (want**2).sum(0), rtol=1e-5, atol=1e-6)


def test_reconstructions_from_the_top_layers_run_from_a_sample_to_a_reconstruction(
    monkeypatch,
) -> None:
    # Without noise the posterior's z is its mean and the prior's its mean: with all layers
    # from the posterior it is the reconstruction, with none the prior's sample.
    monkeypatch.setattr(HVAE, "draw_latent_noise", zero_noise)
    cfg = resolve_config("tiny", overrides=["run.jit=false"])
    model = HVAE(cfg, (8, 8, 1), 4, seed=0)
    model.build_weights()
    x = to_unit_range(digits_images()[:5], 4)

    def numpy(tensor):
        return np.asarray(keras.ops.convert_to_numpy(tensor))

    layers = model.num_latent_layers
    full = numpy(model.reconstruct_from_top(x, layers, output_temperature=0.0))
    np.testing.assert_array_equal(full, numpy(model.reconstruct(x, output_temperature=0.0)))
    none = numpy(model.reconstruct_from_top(x, 0, output_temperature=0.0))
    np.testing.assert_array_equal(none, numpy(model.generate(5, 1.0, output_temperature=0.0)))
    middle = numpy(model.reconstruct_from_top(x, 2, output_temperature=0.0))
    assert not np.array_equal(middle, full) or not np.array_equal(middle, none)


def test_scale_times_cover_every_resolution_of_both_passes() -> None:
    from hvae_core.analysis import scale_times

    cfg = resolve_config("tiny", overrides=["run.jit=false"])
    model = HVAE(cfg, (8, 8, 1), 4, seed=0)
    model.build_weights()
    times = scale_times(model, to_unit_range(digits_images()[:4], 4), repeats=1)
    assert set(times) == {"encoder", "decoder"}
    for passes in times.values():
        assert sorted(passes) == [1, 2, 4, 8] and all(t > 0 for t in passes.values())
