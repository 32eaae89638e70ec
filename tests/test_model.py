"""The HVAE model: structure from the config, the maths of its loss, its hooks, its presets."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from backends import BACKENDS, run_on_backend
from keras import ops

from hvae_core.config import resolve_config
from hvae_core.errors import ConfigError
from hvae_core.model.distributions import (
    gaussian_kl,
    gaussian_log_prob,
    gaussian_params,
    softplus_beta,
)
from hvae_core.model.hvae import HVAE
from hvae_core.model.likelihood import dmol_log_prob
from hvae_core.plugins import get_registry
from hvae_core.testing import temporary_plugin

LN2 = math.log(2.0)


def build(
    *overrides: str, preset: str = "tiny", seed: int = 0, channels: int = 1, num_bits: int = 8
) -> HVAE:
    cfg = resolve_config(preset, overrides=list(overrides))
    model = HVAE(cfg, (cfg.image_size, cfg.image_size, channels), num_bits, seed=seed)
    model.build_weights()
    return model


def images(n: int, size: int = 8, channels: int = 1, bits: int = 8, seed: int = 0) -> np.ndarray:
    levels = np.random.default_rng(seed).integers(0, 2**bits, (n, size, size, channels))
    return (levels / (2**bits - 1) * 2 - 1).astype("float32")


def np_(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x), dtype="float64")


def np_gaussian_kl(mq, sq, mp, sp) -> np.ndarray:
    return np.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5


# --- distributions -----------------------------------------------------------------------


def test_analytic_kl_matches_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    mq, mp = rng.normal(size=5), rng.normal(size=5)
    sq, sp = rng.uniform(0.3, 2.0, 5), rng.uniform(0.3, 2.0, 5)
    analytic = np_(gaussian_kl(*(ops.convert_to_tensor(a, "float32") for a in (mq, sq, mp, sp))))
    np.testing.assert_allclose(analytic, np_gaussian_kl(mq, sq, mp, sp), rtol=1e-5)
    z = mq + sq * rng.normal(size=(400_000, 5))
    samples = np_(
        gaussian_log_prob(z.astype("float32"), mq.astype("float32"), sq.astype("float32"))
        - gaussian_log_prob(z.astype("float32"), mp.astype("float32"), sp.astype("float32"))
    )
    stderr = samples.std(axis=0) / math.sqrt(len(z))
    assert np.all(np.abs(samples.mean(axis=0) - analytic) < 4 * stderr + 1e-4)


def test_gaussian_log_prob_is_the_normal_density() -> None:
    z, m, s = 0.3, -0.2, 1.7
    expected = -0.5 * ((z - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
    assert float(np_(gaussian_log_prob(z, m, s))) == pytest.approx(expected, rel=1e-6)


def vdvae_kl(mu1, mu2, logsigma1, logsigma2) -> np.ndarray:
    """VDVAE's gaussian_analytical_kl, in float64."""
    return (
        -0.5
        + logsigma2
        - logsigma1
        + 0.5 * (np.exp(logsigma1) ** 2 + (mu1 - mu2) ** 2) / np.exp(logsigma2) ** 2
    )


def test_exp_scales_give_vdvaes_kl_and_log_prob() -> None:
    rng = np.random.default_rng(3)
    n = 400
    raw = {k: rng.normal(0.0, 1.5, n) for k in ("mq", "mp")}
    # Log-scales from very sharp to wide; the last ones near where exp(2 log s) leaves float32.
    raw["lq"] = rng.uniform(-30.0, 5.0, n)
    raw["lp"] = raw["lq"] + rng.uniform(-4.0, 4.0, n)
    raw["lq"][-3:], raw["lp"][-3:] = [-60.0, -80.0, -40.0], [-59.0, -79.5, -41.0]
    raw["mp"][-3:] = raw["mq"][-3:] + np.exp(raw["lp"][-3:]) * np.array([0.5, -2.0, 1.0])
    f32 = {k: v.astype("float32") for k, v in raw.items()}
    mq, sq, lq = gaussian_params(f32["mq"], f32["lq"], LN2, scale_fn="exp")
    mp, sp, lp = gaussian_params(f32["mp"], f32["lp"], LN2, scale_fn="exp")
    np.testing.assert_allclose(np_(sq), np.exp(f32["lq"].astype("float64")), rtol=1e-6)
    np.testing.assert_array_equal(np_(lq), f32["lq"])  # the log-scale is the raw output
    kl = np_(gaussian_kl(mq, sq, mp, sp, lq, lp))
    expected = vdvae_kl(*(f32[k].astype("float64") for k in ("mq", "mp", "lq", "lp")))
    assert np.isfinite(kl).all()
    np.testing.assert_allclose(kl, expected, rtol=1e-4, atol=1e-5)
    z = (raw["mq"] + np.exp(raw["lq"]) * rng.normal(size=n)).astype("float32")
    log_prob = np_(gaussian_log_prob(z, mq, sq, lq))
    m, ls, zz = (a.astype("float64") for a in (f32["mq"], f32["lq"], z))
    expected = -0.5 * ((zz - m) / np.exp(ls)) ** 2 - ls - 0.5 * math.log(2 * math.pi)
    assert np.isfinite(log_prob).all()
    np.testing.assert_allclose(log_prob, expected, rtol=1e-4, atol=1e-4)


def test_softplus_scales_keep_their_form() -> None:
    raw = np.linspace(-20.0, 6.0, 27).astype("float32")
    _, scale, log_scale = gaussian_params(np.zeros_like(raw), raw, 0.8)
    expected = np.logaddexp(0.0, 0.8 * raw.astype("float64")) / 0.8 + 1e-5
    np.testing.assert_allclose(np_(scale), expected, rtol=1e-5)
    np.testing.assert_allclose(np_(log_scale), np.log(expected), rtol=1e-5, atol=1e-6)


def test_softplus_beta_gives_unit_scale_at_zero() -> None:
    assert float(np_(softplus_beta(ops.zeros(()), LN2))) == pytest.approx(1.0, rel=1e-6)
    x = np.linspace(-5, 5, 11).astype("float32")
    for beta in (0.5, LN2, 2.0):
        np.testing.assert_allclose(
            np_(softplus_beta(x, beta)), np.log1p(np.exp(beta * x)) / beta, rtol=1e-5
        )


# --- structure ---------------------------------------------------------------------------


def test_structure_follows_the_per_scale_options() -> None:
    model = build(
        "model.enc_num_blocks=[2,0,1,1]",
        "model.dec_num_blocks=[1,2,0,1]",
        "model.z_width=[1,2,3,4]",
        "model.stage_in_width=[8,12,16,16]",
    )
    assert [len(stage) for stage in model.encoder.stages] == [2, 0, 1, 1]
    assert model.num_latent_layers == 4
    out = model.posterior_pass(images(3))
    # Top (1x1) first; no block at 2x2.
    assert [tuple(z.shape) for z in out.latents] == [
        (3, 1, 1, 4),
        (3, 4, 4, 2),
        (3, 4, 4, 2),
        (3, 8, 8, 1),
    ]
    assert tuple(out.params.shape) == (3, 8, 8, 3 * 2)  # grayscale: 3 per mixture
    # Width changes between scales go through 1x1 convolutions.
    assert [p.conv is not None for p in model.encoder.pools] == [True, True, False]
    assert sorted(model.decoder.unpools, key=int) == ["2", "4", "8"]
    assert [model.decoder.unpools[r].conv is not None for r in ("2", "4", "8")] == [
        False,
        True,
        True,
    ]


def test_no_3x3_convolutions_at_resolutions_up_to_two() -> None:
    model = build()
    for block in model.decoder.blocks:
        kernel = block.resnet.convs[1].kernel.shape[0]
        assert kernel == (1 if block.scale.resolution <= 2 else 3)


def test_pool_block_keeps_the_activation_before_the_pooling_block() -> None:
    x = images(2)
    for pool_block in (False, True):
        model = build("model.enc_num_blocks=[3,1,1,1]", f"model.pool_block={pool_block}")
        enc = model.encoder
        acts = enc(x)
        h = enc.in_conv(x)
        for block in enc.stages[0][: 2 if pool_block else 3]:
            h = block(h)
        np.testing.assert_allclose(np_(acts[8]), np_(h), atol=1e-6)
        if pool_block:  # VDVAE: the scale's last block pools; 4x4's only block is its pool block
            expected = enc.pools[0](enc.stages[0][2](h))
        else:
            expected = enc.stages[1][0](enc.pools[0](h))
        np.testing.assert_allclose(np_(acts[4]), np_(expected), atol=1e-6)


def test_init_zeros_drops_the_top_bias() -> None:
    assert "1" in build().decoder.biases
    assert "1" not in build("model.init_zeros=true").decoder.biases


def test_both_output_heads_give_likelihood_parameters() -> None:
    x = images(2)
    for head in ("decoder", "aggregate"):
        model = build(f"model.output_head={head}")
        assert tuple(model.posterior_pass(x).params.shape) == (2, 8, 8, 6)
    rgb = build("model.num_output_mixtures=3", channels=3)
    assert tuple(rgb(images(2, channels=3))["params"].shape) == (2, 8, 8, 30)


def test_image_size_must_match_the_config() -> None:
    cfg = resolve_config("tiny")
    with pytest.raises(ConfigError, match="16x16 but the config expects 8x8"):
        HVAE(cfg, (16, 16, 1), 8)


# --- loss --------------------------------------------------------------------------------


def test_loss_parts_and_bits_per_dimension() -> None:
    model = build()
    x = images(4)
    result = model.losses_for(x, beta=0.25)
    out, dims = result["outputs"], 8 * 8 * 1
    recon_nats = -np_(
        dmol_log_prob(
            out.params,
            x,
            num_mixtures=2,
            num_bits=8,
            gradient_smoothing=model.gradient_smoothing,
        )
    )
    kl_nats = sum(
        np_gaussian_kl(np_(s.q_mean), np_(s.q_scale), np_(s.p_mean), np_(s.p_scale))
        .reshape(4, -1)
        .sum(axis=1)
        for s in out.layers
    )
    to_bpd = 1 / (dims * LN2)
    assert float(result["recon_bpd"]) == pytest.approx(recon_nats.mean() * to_bpd, rel=1e-5)
    assert float(result["kl_bpd"]) == pytest.approx(kl_nats.mean() * to_bpd, rel=1e-4, abs=1e-7)
    assert float(result["elbo_bpd"]) == pytest.approx(
        (recon_nats + kl_nats).mean() * to_bpd, rel=1e-5
    )
    assert float(result["loss"]) == pytest.approx(
        (recon_nats + 0.25 * kl_nats).mean() * to_bpd, rel=1e-5
    )
    np.testing.assert_allclose(
        np_(result["kl_layers_bpd"]).sum(), float(result["kl_bpd"]), rtol=1e-5
    )


def test_scale_fn_reaches_the_latents_and_the_likelihood() -> None:
    soft, exp = build(), build("model.scale_fn=exp")
    exp.set_weights(soft.get_weights())
    x = images(4)
    out_soft, out_exp = soft.losses_for(x), exp.losses_for(x)
    # The top block's posterior sees no latent yet: the same raw output r in both models.
    r = np.log(np_(out_exp["outputs"].layers[0].q_scale))  # exp: q_scale = e^r
    np.testing.assert_allclose(
        np_(out_soft["outputs"].layers[0].q_scale),
        np.logaddexp(0.0, LN2 * r) / LN2 + 1e-5,
        rtol=1e-4,
    )
    params = out_exp["outputs"].params
    kw = dict(num_mixtures=2, num_bits=8, gradient_smoothing=LN2)
    to_bpd = 1 / (8 * 8 * LN2)
    recon = {
        fn: -np_(dmol_log_prob(params, x, scale_fn=fn, **kw)).mean() * to_bpd
        for fn in ("exp", "softplus")
    }
    assert float(out_exp["recon_bpd"]) == pytest.approx(recon["exp"], rel=1e-5)
    assert abs(recon["exp"] - recon["softplus"]) > 1e-3  # the check can tell them apart


def test_an_untrained_model_is_close_to_uniform_bits() -> None:
    # Near initialisation the likelihood is broad: a few bits per dimension, not ~0 or ~inf.
    elbo = float(build().losses_for(images(8))["elbo_bpd"])
    assert 4.0 < elbo < 16.0


# --- sampling ----------------------------------------------------------------------------


def test_samples_have_the_image_shape_and_lie_on_the_grid() -> None:
    model = build(num_bits=5)
    x = np_(model.generate(5, temperature=0.8))
    assert x.shape == (5, 8, 8, 1)
    levels = (x + 1) / 2 * 31
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert x.min() >= -1 and x.max() <= 1


def test_temperature_zero_sampling_is_deterministic() -> None:
    model = build()
    first = np_(model.generate(4, temperature=0.0, output_temperature=0.0))
    second = np_(model.generate(4, temperature=0.0, output_temperature=0.0))
    np.testing.assert_array_equal(first, second)
    per_layer = np_(
        model.generate(4, temperature=[0.0] * model.num_latent_layers, output_temperature=0.0)
    )
    np.testing.assert_array_equal(first, per_layer)
    noisy = [np_(model.generate(4, temperature=1.0)) for _ in range(2)]
    assert not np.array_equal(*noisy)


def test_per_layer_temperatures_must_match_the_layers() -> None:
    model = build()
    with pytest.raises(ConfigError, match="one per latent layer"):
        model.generate(2, temperature=[1.0, 1.0])


def test_reconstruction_and_latents() -> None:
    model = build()
    x = images(3)
    assert tuple(model.reconstruct(x).shape) == (3, 8, 8, 1)
    assert len(model.latents(x)) == model.num_latent_layers


def test_shared_noise_groups_give_identical_halves() -> None:
    model = build()
    x = images(3)
    out = model.posterior_pass(np.concatenate([x, x]), noise_groups=2)
    for z in out.latents:
        np.testing.assert_allclose(np_(z)[:3], np_(z)[3:], atol=1e-5)
    independent = model.posterior_pass(np.concatenate([x, x]))
    last = np_(independent.latents[-1])
    assert np.abs(last[:3] - last[3:]).max() > 0.1


# --- hooks, exercised by test doubles ----------------------------------------------------


class AffineFlow(keras.layers.Layer):
    """z_K = z_0 * exp(a) + t: a flow whose pushed-forward posterior is again Gaussian."""

    context_width = 2

    def __init__(self, log_scale: float, shift: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log_scale, self.shift = log_scale, shift
        self.context_shapes: list[tuple] = []

    def call(self, z0, context, training=False):
        self.context_shapes.append(tuple(context.shape))
        dims = math.prod(z0.shape[1:])
        log_det = ops.ones((ops.shape(z0)[0],)) * self.log_scale * dims
        return z0 * math.exp(self.log_scale) + self.shift, log_det


def flow_model(log_scale: float, shift: float):
    made: list[AffineFlow] = []

    def factory(options, model, *, scale, resolution, z_width, name):
        made.append(AffineFlow(log_scale, shift, name=name))
        return made[-1]

    registry = get_registry()
    with temporary_plugin(registry, "flow", "test-affine", factory):
        model = build("model.flow=test-affine")
    return model, made


@pytest.mark.parametrize(("log_scale", "shift"), [(0.0, 0.0), (-0.4, 0.3)])
def test_flow_hook_kl_estimate_is_unbiased(log_scale, shift) -> None:
    model, flows = flow_model(log_scale, shift)
    assert len(flows) == model.num_latent_layers
    for block in model.decoder.blocks:  # the posterior branch grew by the context channels
        assert block.posterior.out_width == 2 * block.scale.z_width + 2
    x = np.repeat(images(1), 4000, axis=0)
    out = model.posterior_pass(x)
    for flow, block in zip(flows, model.decoder.blocks, strict=True):
        r = block.scale.resolution
        assert flow.context_shapes[-1] == (4000, r, r, 2)
    a = math.exp(log_scale)
    for stats in out.layers:
        # The flow maps N(m, s) to N(m a + t, (s a)^2): the exact KL per copy is Gaussian.
        exact = np_gaussian_kl(
            np_(stats.q_mean) * a + shift,
            np_(stats.q_scale) * a,
            np_(stats.p_mean),
            np_(stats.p_scale),
        )
        exact = exact.reshape(len(x), -1).sum(axis=1)
        estimate = np_(stats.kl)
        diff = estimate - exact
        assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(len(x)) + 1e-3


class ConstantAttention:
    def __init__(self, value: float) -> None:
        self.value = value
        self.reads: list[tuple[int, int, str]] = []
        self.updates = 0

    def encode(self, activations):
        return None if activations is None else dict(activations)

    def read(self, state, memory, *, block, resolution, branch):
        self.reads.append((block, resolution, branch))
        return ops.zeros_like(state) + self.value

    def update(self, state, memory, *, block, resolution):
        self.updates += 1
        return memory


def test_attention_hook_reads_on_both_branches() -> None:
    plain = build()
    x = images(2)
    registry = get_registry()
    for value in (0.0, 0.5):
        attention = ConstantAttention(value)
        with temporary_plugin(
            registry, "attention", "test-const", lambda *a, _attention=attention, **k: _attention
        ):
            model = build("model.attention=test-const")
        model.set_weights(plain.get_weights())
        attention.reads.clear()
        rng = np.random.default_rng(0)  # both passes take the same noise
        noise = [rng.standard_normal(s, dtype=np.float32) for s in model.noise_shapes(2).latents]
        out = model.posterior_pass(x, noise=noise)
        expected = np_(plain.posterior_pass(x, noise=noise).params)
        layers = model.num_latent_layers
        assert sorted(attention.reads) == sorted(
            (b.index, b.scale.resolution, branch)
            for b in model.decoder.blocks
            for branch in ("prior", "posterior")
        )
        assert attention.updates >= layers
        same = np.allclose(np_(out.params), expected, atol=1e-5)
        assert same == (value == 0.0)


class SquaredMeanRegularizer:
    def loss_terms(self, outputs, images):
        total = sum(
            ops.mean(ops.sum(ops.reshape(s.q_mean**2, (ops.shape(images)[0], -1)), axis=1))
            for s in outputs.layers
        )
        return {"squared_mean": total}


def test_regularizer_hook_adds_named_terms() -> None:
    model = build()
    x = images(2)
    base = model.losses_for(x)
    regularized = model.losses_for(x, regularizer=SquaredMeanRegularizer())
    term = float(regularized["squared_mean"])
    assert term > 0
    # Same weights but new noise: compare the loss to its own parts.
    assert float(regularized["loss"]) == pytest.approx(
        float(regularized["recon_bpd"]) + float(regularized["kl_bpd"]) + term, rel=1e-5
    )
    assert "squared_mean" not in base


# --- precision ---------------------------------------------------------------------------


def test_mixed_bfloat16_matches_float32() -> None:
    full = build(seed=3)
    mixed = build("model.precision=mixed_bfloat16", seed=3)
    mixed.set_weights(full.get_weights())
    x = images(8, seed=4)
    a, b = full.losses_for(x), mixed.losses_for(x)
    assert keras.backend.standardize_dtype(b["loss"].dtype) == "float32"
    assert keras.backend.standardize_dtype(mixed(x)["params"].dtype) == "bfloat16"
    # bfloat16 keeps 8 bits of mantissa: the losses agree to 2%.
    assert float(b["elbo_bpd"]) == pytest.approx(float(a["elbo_bpd"]), rel=0.02)


# --- presets -----------------------------------------------------------------------------


def with_dataset(name: str, size: int):
    registry = get_registry()
    if registry.has("dataset", name):
        from contextlib import nullcontext

        return nullcontext()
    return temporary_plugin(registry, "dataset", name, lambda *a: None, image_size=size)


@pytest.mark.parametrize(
    ("preset", "size", "expected"),
    [
        ("cifar10", 32, 39_145_700),
        pytest.param("imagenet32", 32, 119_280_868, marks=pytest.mark.slow),
        pytest.param("imagenet64", 64, 125_005_860, marks=pytest.mark.slow),
    ],
)
def test_presets_have_vdvae_parameter_counts(preset, size, expected) -> None:
    # VDVAE's published sizes: 39.1M (CIFAR-10), 119M (ImageNet32), 125M (ImageNet64).
    with with_dataset(preset, size):
        model = build(preset=preset, channels=3)
    assert model.count_params() == expected
    published = {"cifar10": 39.1e6, "imagenet32": 119e6, "imagenet64": 125e6}[preset]
    assert abs(model.count_params() - published) / published < 0.01


# VDVAE's hps (grad_clip, skip_threshold), on the gradient of its loss in nats per dimension.
VDVAE_THRESHOLDS = {"cifar10": (200, 400), "imagenet32": (200, 300), "imagenet64": (220, 380)}


@pytest.mark.parametrize(
    ("preset", "size"), [("cifar10", 32), ("imagenet32", 32), ("imagenet64", 64)]
)
def test_vdvae_presets_use_vdvaes_scales_and_nats_thresholds(preset, size) -> None:
    with with_dataset(preset, size):
        cfg = resolve_config(preset)
    assert cfg.model.scale_fn == "exp"
    assert cfg.training.grad_norm_unit == "nats"
    training = cfg.training
    assert (training.gradient_clipnorm, training.gradient_skipnorm) == VDVAE_THRESHOLDS[preset]


def test_other_configs_keep_softplus_scales_on_the_nats_scale() -> None:
    for cfg in (resolve_config(), resolve_config("tiny")):
        assert (cfg.model.scale_fn, cfg.training.grad_norm_unit) == ("softplus", "nats")


@pytest.mark.slow  # builds the whole cifar10 model a second time (30 s on a 2-core CPU)
def test_cifar10_aggregate_variant_changes_the_parameter_count() -> None:
    with with_dataset("cifar10", 32):
        model = build("model.output_head=aggregate", preset="cifar10", channels=3)
    assert model.count_params() == 39_665_924
    assert model.num_latent_layers == 43


@pytest.mark.slow
def test_cifar10_forward_backward_at_batch_8() -> None:
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the gradient here is taken with TensorFlow")
    import tensorflow as tf

    with with_dataset("cifar10", 32):
        model = build(preset="cifar10", channels=3)
    x = images(8, size=32, channels=3)
    with tf.GradientTape() as tape:
        loss = model.losses_for(x, training=True)["loss"]
    grads = tape.gradient(loss, model.trainable_variables)
    assert np.isfinite(float(loss))
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)


# --- backends ----------------------------------------------------------------------------

# Every convolution that runs while the models are built, by the device it runs on.
BUILD_SCRIPT = """
import torch.nn.functional as tnn
from hvae_core.config import resolve_config
from hvae_core.model.hvae import HVAE

devices = []
conv2d = tnn.conv2d
def spy(x, *args, **kwargs):
    devices.append(x.device.type)
    return conv2d(x, *args, **kwargs)
tnn.conv2d = spy
for overrides in (["model.output_head=aggregate"], ["model.width_change=pad"]):
    cfg = resolve_config("tiny", overrides=overrides)
    HVAE(cfg, (8, 8, 1), 8, seed=0).build_weights()
outputs["devices"] = np.array(sorted(set(devices)))
"""


def test_nearest_upsampling_is_keras_upsampling2d() -> None:
    from hvae_core.model.resample import NearestUpsampling

    x = np.random.default_rng(0).standard_normal((3, 4, 5, 6)).astype("float32")
    for factor in (2, 4):
        got = np_(NearestUpsampling(factor)(x))
        np.testing.assert_array_equal(got, np_(keras.layers.UpSampling2D(factor)(x)))
    assert NearestUpsampling(4).compute_output_shape((None, 2, 3, 5)) == (None, 8, 12, 5)


def test_building_a_model_on_torch_computes_nothing(tmp_path) -> None:
    """Keras' torch backend infers shapes on the "meta" device; where one operation fails
    there it computes the whole pass instead, at batch 83 and again at 89 (Keras 3.15's
    ``ops.repeat``, which UpSampling2D uses, did): ten minutes and 8 GB to load VDVAE's
    CIFAR-10 model on a 2-core CPU, more memory than a machine has for FFHQ-256."""
    got = run_on_backend("torch", BUILD_SCRIPT, {}, tmp_path)
    assert list(got["devices"]) == ["meta"]


PARITY_SCRIPT = """
import keras
from hvae_core.config import resolve_config
from hvae_core.model.hvae import HVAE

# The same noise on every backend: it is an input of the pass.
noise = [inputs[f"eps{i}"] for i in range(4)]
for head in ("aggregate", "decoder"):
    cfg = resolve_config("tiny", overrides=["model.output_head=" + head])
    model = HVAE(cfg, (8, 8, 1), 8, seed=0)
    model.build_weights()
    model.set_weights([inputs[f"{head}_w{i}"] for i in range(len(model.weights))])
    result = model.losses_for(inputs["x"], beta=0.5, noise=noise)
    for key in ("loss", "recon_bpd", "kl_bpd", "elbo_bpd"):
        outputs[f"{head}_{key}"] = keras.ops.convert_to_numpy(result[key])
"""


def test_same_weights_give_the_same_loss_on_every_backend(tmp_path) -> None:
    rng = np.random.default_rng(5)
    inputs = {"x": images(4, seed=6)}
    for i, shape in enumerate(build().noise_shapes(4).latents):
        inputs[f"eps{i}"] = rng.standard_normal(shape).astype(np.float32)
    for head in ("aggregate", "decoder"):
        model = build(f"model.output_head={head}", seed=1)
        # Non-trivial weights everywhere (zero-initialised layers included).
        for i, w in enumerate(model.get_weights()):
            inputs[f"{head}_w{i}"] = w + rng.normal(scale=0.05, size=w.shape).astype(w.dtype)
    here = keras.backend.backend()
    reference: dict[str, np.ndarray] = {}
    exec(PARITY_SCRIPT, {"inputs": inputs, "outputs": reference})  # this process's backend
    assert float(reference["aggregate_kl_bpd"]) > 0
    for backend in BACKENDS:
        if backend == here:
            continue
        got = run_on_backend(backend, PARITY_SCRIPT, inputs, tmp_path)
        for key, value in reference.items():
            assert float(got[key]) == pytest.approx(float(value), rel=1e-4), (backend, key)
