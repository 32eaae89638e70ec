"""The posterior flows: exact log-determinants, invertibility, a KL that is right, training.

The oracles are independent of the code under test: log|det| of the Jacobian that automatic
differentiation computes (JAX, TensorFlow and torch), scipy's matrix exponential, numpy's
Gaussian densities and the analytic Gaussian KL.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields

import keras
import numpy as np
import pytest
import scipy.linalg
from backends import run_hvae, run_on_backend
from click.testing import CliRunner
from hvae_plugins.datasets.digits import digits_images
from hvae_plugins.flows.conv_exponential import ConvExponential, series_terms
from hvae_plugins.flows.layers import ActNorm, flip, merge, split, squeeze, unsqueeze

from hvae_core.cli import cli
from hvae_core.config import resolve_config
from hvae_core.errors import ConfigError
from hvae_core.model.hvae import HVAE
from hvae_core.model.layout import scales
from hvae_core.plugins import get_registry
from hvae_core.run import RunDirectory
from hvae_core.run import files as rundir
from hvae_core.training.trainer import Trainer

FLOWS = ("orthogonal-sylvester", "conv-sylvester")

# --- log-determinant oracle ----------------------------------------------------------------

# Run under each backend in float64. Every layer and whole flow gets random parameters (every
# weight redrawn, the zero-initialised ones and ActNorm included) and returns its log|det| next
# to log|det J| of the Jacobian that the backend's autodiff computes.
ORACLE_SCRIPT = """
import keras
backend = keras.backend.backend()
if backend == "jax":
    import jax
    jax.config.update("jax_enable_x64", True)
keras.config.set_floatx("float64")
from keras import ops

from hvae_core.config import resolve_config
from hvae_core.plugins import get_registry
from hvae_plugins.flows.conv_exponential import ConvExponential
from hvae_plugins.flows.conv_sylvester import GeneralizedSylvester
from hvae_plugins.flows.layers import ActNorm, flip, squeeze
from hvae_plugins.flows.orthogonal_sylvester import OrthogonalSylvesterFlow

z, ctx = inputs["z"], inputs["context"]
batch, dim = z.shape[0], z[0].size
rng = np.random.default_rng(1)


built = []
# Every weight is redrawn below, so the initializers' own random draws are skipped: on JAX
# each would compile for its shape, which took most of this script's time.
_add_weight = keras.layers.Layer.add_weight


def add_zero_weight(self, *args, **kwargs):
    kwargs["initializer"] = "zeros"
    return _add_weight(self, *args, **kwargs)


keras.layers.Layer.add_weight = add_zero_weight


def randomized(layer, *args, scale=0.4):
    layer.build(*(a.shape for a in args))
    for w in layer.weights:
        w.assign(rng.normal(scale=scale, size=w.shape))
    built.append(layer)
    return layer


def from_registry(name, *overrides):
    cfg = resolve_config("tiny", {"flow": name}, list(overrides))
    factory = get_registry().get("flow", name).load()
    # The tiny preset's scales are 8, 4, 2, 1: index 1 is the 4x4 scale of z.
    flow = factory(cfg.options("flow"), cfg.model, scale=1, resolution=4, z_width=2, name="f")
    flow = randomized(flow, z, ctx)
    return lambda x, c: flow(x, c)


def no_log_det(fn):
    return lambda x, c: (fn(x), ops.zeros((ops.shape(x)[0],), dtype=x.dtype))


def layer_case(layer, *args, scale=0.4):
    layer = randomized(layer, *args, scale=scale)
    return lambda x, c: layer(x, c) if len(args) == 2 else layer(x)


builders = {
    "actnorm": lambda: layer_case(ActNorm(), z),
    # A kernel well past the norm bound: the bounded kernel is at it.
    "conv_exponential": lambda: layer_case(ConvExponential(), z, scale=1.0),
    "flip": lambda: no_log_det(flip),
    "squeeze": lambda: no_log_det(squeeze),
    "sylvester_layer": lambda: layer_case(GeneralizedSylvester(2, 8, 3), z, ctx),
    "sylvester_layer_spectral_norm": lambda: layer_case(
        GeneralizedSylvester(2, 8, 3, spectral_norm=True), z, ctx
    ),
    "orthogonal_sylvester_layer": lambda: layer_case(
        OrthogonalSylvesterFlow(z_width=2, resolution=4, context_width=3, num_flows=1), z, ctx
    ),
    "orthogonal_sylvester_flow": lambda: from_registry(
        "orthogonal-sylvester", "flow.num_flows=3", "flow.num_ortho_vecs=5", "flow.flow_in_ch=3"
    ),
    "conv_sylvester_flow": lambda: from_registry(
        "conv-sylvester",
        "flow.flow_in_ch=3",
        "flow.convsylv_channels=8",
        "flow.convsylv_flows_per_stage=2",
        "flow.convsylv_stage_limit=1",
    ),
    "conv_sylvester_flow_chained_split_first": lambda: from_registry(
        "conv-sylvester",
        "flow.num_flows=2",
        "flow.flow_in_ch=3",
        "flow.convsylv_channels=8",
        "flow.convsylv_splitfirst=true",
        "flow.convsylv_stage_limit=2",
        "flow.spectral_norm=true",
    ),
}
cases = {str(name): builders[str(name)]() for name in inputs["cases"]}


def stateless(fn):
    # JAX compiles each case once (op by op, every loop in a flow would compile anew); the
    # weights go in as arguments, since as constants XLA would spend minutes folding them.
    variables = [v for layer in built for v in layer.variables]

    def run(values, x):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(x, ctx)

    return run, [v.value for v in variables]


def jacobians(fn):
    # (B, D, B, D): output (b, i) by input (b', j).
    if backend == "jax":
        run, values = stateless(fn)
        flat = lambda values, x: ops.reshape(run(values, x)[0], (batch, -1))  # noqa: E731
        return np.asarray(jax.jit(jax.jacfwd(flat, argnums=1))(values, z))
    if backend == "torch":
        import torch

        x = torch.tensor(z)
        jac = torch.autograd.functional.jacobian(lambda x: fn(x, ctx)[0].reshape(batch, -1), x)
        return jac.numpy()
    import tensorflow as tf

    x = tf.constant(z)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = tf.reshape(fn(x, ctx)[0], (batch, -1))
        rows = [y[:, i] for i in range(dim)]
    # Row i of every example at once: the examples are independent (the JAX and torch runs
    # check that their cross blocks are zero), so d sum_b y[b, i] / dx[b] = d y[b, i] / dx[b].
    grads = np.stack([tape.gradient(r, x).numpy().reshape(batch, dim) for r in rows], axis=1)
    out = np.zeros((batch, dim, batch, dim))
    for b in range(batch):
        out[b, :, b] = grads[b]
    return out


for name, fn in cases.items():
    if backend == "jax":
        run, values = stateless(fn)
        y, log_det = jax.jit(run)(values, z)
    else:
        y, log_det = fn(z, ctx)
    jac = jacobians(fn).reshape(batch, dim, batch, dim)
    blocks = np.stack([jac[b, :, b] for b in range(batch)])
    cross = max(
        (np.abs(jac[b, :, c]).max() for b in range(batch) for c in range(batch) if b != c),
        default=0.0,
    )
    outputs[name + ":log_det"] = ops.convert_to_numpy(log_det)
    outputs[name + ":oracle"] = np.linalg.slogdet(blocks)[1]
    outputs[name + ":cross"] = np.array(cross)
    outputs[name + ":moved"] = np.array(
        np.abs(ops.convert_to_numpy(y).reshape(batch, -1) - z.reshape(batch, -1)).max()
    )
"""

# Every layer and each whole flow; the two variants (spectral norm, chained split-first flows)
# only with -m slow, where torch joins too, to keep the default run short.
CASES = (
    "actnorm",
    "conv_exponential",
    "flip",
    "squeeze",
    "sylvester_layer",
    "orthogonal_sylvester_layer",
    "orthogonal_sylvester_flow",
    "conv_sylvester_flow",
)
VARIANTS = ("sylvester_layer_spectral_norm", "conv_sylvester_flow_chained_split_first")
VOLUME_PRESERVING = ("flip", "squeeze")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    results: dict[tuple[str, bool], dict[str, np.ndarray]] = {}
    rng = np.random.default_rng(0)
    z, context = rng.normal(size=(2, 4, 4, 2)), rng.normal(size=(2, 4, 4, 3))

    def on(backend: str, variants: bool) -> dict[str, np.ndarray]:
        key = (backend, variants)
        if key not in results:
            cases = np.array(VARIANTS if variants else CASES)
            inputs = {"z": z, "context": context, "cases": cases}
            workdir = tmp_path_factory.mktemp(f"oracle_{backend}")
            results[key] = run_on_backend(backend, ORACLE_SCRIPT, inputs, workdir)
        return results[key]

    return on


def oracle_params() -> list:
    params = []
    for backend in ("jax", "tensorflow", "torch"):
        for case in CASES + VARIANTS:
            slow = backend == "torch" or case in VARIANTS
            marks = [pytest.mark.slow] if slow else []
            params.append(pytest.param(backend, case, marks=marks, id=f"{backend}-{case}"))
    return params


@pytest.mark.parametrize(("backend", "case"), oracle_params())
def test_log_det_equals_log_det_of_the_autodiff_jacobian(oracle, backend, case) -> None:
    out = oracle(backend, case in VARIANTS)
    log_det, expected = out[f"{case}:log_det"], out[f"{case}:oracle"]
    np.testing.assert_allclose(log_det, expected, rtol=0, atol=1e-4)
    assert out[f"{case}:moved"] > 0.05, "the parameters must make it a non-identity map"
    if case in VOLUME_PRESERVING:
        np.testing.assert_allclose(expected, 0.0, atol=1e-9)
    else:
        assert np.abs(expected).min() > 0.05, "a test with log|det| = 0 would prove little"
    if backend != "tensorflow":
        assert out[f"{case}:cross"] == 0.0, "one example's output must not see another's z"


# --- the convolution exponential and the invertible pieces ---------------------------------


def conv_matrix(layer: ConvExponential, shape: tuple[int, int, int]) -> np.ndarray:
    """The dense (D, D) matrix of the layer's (bounded) convolution M, column j = M e_j."""
    dim = math.prod(shape)
    basis = np.eye(dim).reshape(dim, *shape)
    kernel = layer.effective_kernel()
    cols = keras.ops.conv(keras.ops.convert_to_tensor(basis), kernel, padding="same")
    return keras.ops.convert_to_numpy(cols).reshape(dim, dim).T


def test_conv_exponential_is_the_matrix_exponential_and_inverts() -> None:
    rng = np.random.default_rng(2)
    shape = (4, 4, 3)
    x = rng.normal(size=(2, *shape))
    layer = ConvExponential(dtype="float64")
    layer.build(x.shape)
    layer.kernel.assign(rng.normal(scale=1.0, size=layer.kernel.shape))
    m = conv_matrix(layer, shape)
    # The bounded kernel keeps the operator norm at or below the bound (here: at it).
    assert np.linalg.norm(m, 2) <= layer.bound + 1e-12
    assert np.linalg.norm(m, 2) > 0.3 * layer.bound
    y, log_det = (keras.ops.convert_to_numpy(t) for t in layer(x))
    flat = x.reshape(2, -1)
    np.testing.assert_allclose(y.reshape(2, -1), flat @ scipy.linalg.expm(m).T, atol=1e-10)
    np.testing.assert_allclose(log_det, np.trace(m), atol=1e-10)
    np.testing.assert_allclose(log_det, np.linalg.slogdet(scipy.linalg.expm(m))[1], atol=1e-9)
    back = keras.ops.convert_to_numpy(layer.inverse(y))
    np.testing.assert_allclose(back, x, atol=1e-10)
    assert np.abs(y - x).max() > 0.1


def test_the_series_is_long_enough_for_its_bound() -> None:
    terms = series_terms(1.0)
    # The product of the two truncated series misses terms of order >= terms + 1.
    assert 2 * math.e**2 / math.factorial(terms + 1) <= 1e-9
    assert 2 * math.e**2 / math.factorial(terms) > 1e-9


def test_actnorm_squeeze_split_and_flip_invert() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 4, 4, 6)).astype("float32")
    norm = ActNorm()
    norm.build(x.shape)
    for w in norm.weights:
        w.assign(rng.normal(scale=0.5, size=w.shape))
    y, log_det = norm(x)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(norm.inverse(y)), x, atol=1e-5)
    expected = 16 * np.sum(keras.ops.convert_to_numpy(norm.log_scale))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(log_det), [expected] * 2, rtol=1e-5)

    squeezed = keras.ops.convert_to_numpy(squeeze(x))
    assert squeezed.shape == (2, 2, 2, 24)
    # A 2x2 patch becomes one position's channels.
    np.testing.assert_array_equal(squeezed[0, 1, 0].reshape(2, 2, 6), x[0, 2:4, 0:2])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(unsqueeze(squeezed)), x)
    kept, aside = split(x)
    assert kept.shape[-1] == aside.shape[-1] == 3
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(merge(kept, aside)), x)
    flipped = keras.ops.convert_to_numpy(flip(x))
    np.testing.assert_array_equal(flipped[:, 0, 0, 0], x[:, 3, 3, 5])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(flip(flipped)), x)


# --- the KL of a flow block ----------------------------------------------------------------

LOG_2PI = math.log(2 * math.pi)


def log_normal(z: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    z, mean, scale = (np.asarray(a, np.float64) for a in (z, mean, scale))
    per_dim = -0.5 * ((z - mean) / scale) ** 2 - 0.5 * LOG_2PI - np.log(scale)
    return per_dim.reshape(len(z), -1).sum(axis=1)


def analytic_kl(q_mean, q_scale, p_mean, p_scale) -> np.ndarray:
    q_mean, q_scale, p_mean, p_scale = (
        np.asarray(a, np.float64) for a in (q_mean, q_scale, p_mean, p_scale)
    )
    per_dim = (
        np.log(p_scale / q_scale) + (q_scale**2 + (q_mean - p_mean) ** 2) / (2 * p_scale**2) - 0.5
    )
    return per_dim.reshape(len(q_mean), -1).sum(axis=1)


class Recording:
    """Stands in for a block's flow and keeps what went through it."""

    def __init__(self, flow) -> None:
        self.flow, self.context_width = flow, flow.context_width
        self.seen: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def __call__(self, z0, context, training=False):
        zk, log_det = self.flow(z0, context, training=training)
        self.seen.append(tuple(keras.ops.convert_to_numpy(t) for t in (z0, zk, log_det)))
        return zk, log_det


def tiny_model(flow: str, *overrides: str) -> HVAE:
    cfg = resolve_config("tiny", {"flow": flow}, list(overrides))
    keras.utils.set_random_seed(0)
    model = HVAE(cfg, (8, 8, 1), 4, seed=0)
    model.build_weights()
    return model


@pytest.fixture(scope="module")
def models():
    """A tiny model per flow, built once (a build is most of a KL test's time) and reset to
    its initial weights for every test."""
    cache: dict[str, tuple[HVAE, list[np.ndarray]]] = {}

    def get(flow: str) -> HVAE:
        if flow not in cache:
            model = tiny_model(flow)
            cache[flow] = (model, model.get_weights())
        model, weights = cache[flow]
        model.set_weights(weights)
        return model

    return get


def flow_blocks_on_one_image(model: HVAE, n: int) -> list[dict[str, np.ndarray]]:
    """Every flow block's z_0, z_K, log|det|, q, p and KL estimate for ``n`` posterior samples
    of one digit (independent noise per copy)."""
    recorders = {}
    for block in model.decoder.blocks:
        if block.flow is not None:
            recorders[block.index] = Recording(block.flow)
            object.__setattr__(block, "flow", recorders[block.index])  # no Keras tracking
    image = digits_images()[:1].astype("float32") * (2.0 / 15.0) - 1.0
    try:
        out = model.posterior_pass(np.repeat(image, n, axis=0))
    finally:
        for block in model.decoder.blocks:
            if block.index in recorders:
                object.__setattr__(block, "flow", recorders[block.index].flow)
    blocks = []
    for index, recorder in recorders.items():
        [(z0, zk, log_det)] = recorder.seen
        layer = out.layers[index]
        stats = {f.name: keras.ops.convert_to_numpy(getattr(layer, f.name)) for f in fields(layer)}
        blocks.append({"index": index, "z0": z0, "zk": zk, "log_det": log_det, **stats})
    assert blocks, "the model has no flow blocks"
    return blocks


@pytest.mark.parametrize("flow", FLOWS)
def test_an_identity_flow_gives_the_analytic_kl(models, flow) -> None:
    # Both flows start as the identity (ActNorm at zero, R = 0, f = 0), so the one-sample
    # estimate must be log q(z) - log p(z) for each sample and average to the analytic KL.
    model = models(flow)
    rng = np.random.default_rng(5)
    for block in model.decoder.blocks:  # a posterior well away from the prior
        last, zw = block.posterior.convs[-1], block.scale.z_width
        kernel = keras.ops.convert_to_numpy(last.kernel).copy()
        bias = keras.ops.convert_to_numpy(last.bias).copy()
        kernel[..., : 2 * zw] += rng.normal(scale=0.3, size=kernel[..., : 2 * zw].shape)
        bias[: 2 * zw] += rng.normal(scale=0.3, size=2 * zw)
        last.kernel.assign(kernel)
        last.bias.assign(bias)
    n = 2000
    for b in flow_blocks_on_one_image(model, n):
        np.testing.assert_allclose(b["zk"], b["z0"], atol=1e-6)
        np.testing.assert_allclose(b["log_det"], 0.0, atol=1e-6)
        exact = log_normal(b["z0"], b["q_mean"], b["q_scale"]) - log_normal(
            b["z0"], b["p_mean"], b["p_scale"]
        )
        np.testing.assert_allclose(b["kl"], exact, rtol=1e-4, atol=1e-3)
        kl = analytic_kl(b["q_mean"], b["q_scale"], b["p_mean"], b["p_scale"])
        diff = b["kl"] - kl
        assert abs(diff.mean()) <= 3 * diff.std() / math.sqrt(n) + 1e-6, (b["index"], diff.mean())
        assert kl.mean() > 0.01  # q differs from p: the comparison is not 0 = 0


def assert_kl_estimates_are_consistent(b: dict[str, np.ndarray]) -> None:
    """One flow block's per-sample KL estimates: their mean is not below 0 (within 3 SE), and
    E[exp(-KL)] = 1 (within 4 SE), which holds for any correct log-det."""
    kl = b["kl"].astype(np.float64)
    n = len(kl)
    mean, err = kl.mean(), kl.std() / math.sqrt(n)
    assert mean >= -3 * err, f"block {b['index']}: KL estimate {mean:.5f} +- {err:.5f} < 0"
    w = np.exp(-kl)
    w_mean, w_err = w.mean(), w.std() / math.sqrt(n)
    assert abs(w_mean - 1.0) <= 4 * w_err, f"block {b['index']}: E[w] {w_mean} +- {w_err}"


@pytest.mark.parametrize("flow", FLOWS)
def test_the_flow_kl_estimate_is_non_negative_and_normalised(models, flow) -> None:
    # With w = exp(-KL estimate) = p(z_K) |det dz_K/dz_0| / q(z_0), E_q[w] = integral of
    # p(z_K) dz_K = 1 for any bijection z_0 -> z_K of R^D, and by Jensen E_q[KL estimate]
    # = -E_q[log w] >= -log E_q[w] = 0. The first is two-sided and sharp: a log|det| off by d
    # moves E_q[w] by a factor of about e^d, whichever the sign (a flipped or dropped log-det
    # term misses it by 15 to several thousand standard errors here).
    # q = p (the posterior's mean and scale outputs zeroed like the prior's) and flows a small
    # random perturbation away from the identity keep the weights' variance low.
    model = models(flow)
    rng = np.random.default_rng(4)
    for block in model.decoder.blocks:
        zw = block.scale.z_width
        last = block.posterior.convs[-1]
        kernel = keras.ops.convert_to_numpy(last.kernel).copy()
        bias = keras.ops.convert_to_numpy(last.bias).copy()
        kernel[..., : 2 * zw], bias[: 2 * zw] = 0.0, 0.0
        last.kernel.assign(kernel)
        last.bias.assign(bias)
        for w in block.flow.weights:
            w.assign(keras.ops.convert_to_numpy(w) + rng.normal(scale=0.03, size=w.shape))
    n = 4000
    moved = []
    for b in flow_blocks_on_one_image(model, n):
        np.testing.assert_allclose(b["q_mean"], b["p_mean"], atol=1e-6)
        np.testing.assert_allclose(b["q_scale"], b["p_scale"], atol=1e-6)
        # The core's estimate is log N(z0; q) - log|det| - log N(zK; p), sample by sample.
        estimate = (
            log_normal(b["z0"], b["q_mean"], b["q_scale"])
            - b["log_det"]
            - log_normal(b["zk"], b["p_mean"], b["p_scale"])
        )
        np.testing.assert_allclose(b["kl"], estimate, rtol=1e-4, atol=1e-3)
        assert_kl_estimates_are_consistent(b)
        moved.append(np.abs(b["log_det"]).mean())
    assert min(moved) > 1e-4 and max(moved) > 4e-3, "the flows must not be the identity"


def test_kl_flow_bpd_sums_the_flow_blocks_only() -> None:
    model = tiny_model("conv-sylvester", "flow.max_resolution=2")
    with_flow = [b.index for b in model.decoder.blocks if b.flow is not None]
    resolutions = {b.index: b.scale.resolution for b in model.decoder.blocks}
    assert with_flow and all(resolutions[i] <= 2 for i in with_flow)
    assert len(with_flow) < len(model.decoder.blocks)
    x = digits_images()[:16].astype("float32") * (2.0 / 15.0) - 1.0
    result = model.losses_for(x)
    layers = keras.ops.convert_to_numpy(result["kl_layers_bpd"])
    flow_bpd = float(keras.ops.convert_to_numpy(result["kl_flow_bpd"]))
    assert flow_bpd == pytest.approx(float(layers[with_flow].sum()), rel=1e-5, abs=1e-7)


# --- options and registration --------------------------------------------------------------


def test_plugins_show_lists_each_flows_options() -> None:
    expected = {
        "conv-sylvester": {
            "num_flows",
            "flow_in_ch",
            "convsylv_channels",
            "convsylv_flows_per_stage",
            "convsylv_splitfirst",
            "convsylv_stage_limit",
            "spectral_norm",
            "max_resolution",
        },
        "orthogonal-sylvester": {"num_flows", "flow_in_ch", "num_ortho_vecs", "max_resolution"},
    }
    for name, options in expected.items():
        result = CliRunner().invoke(cli, ["plugins", "show", "flow", name])
        assert result.exit_code == 0, result.output
        for option in options:
            assert option in result.stdout, (name, option)
    listed = json.loads(CliRunner().invoke(cli, ["plugins", "list", "--json"]).stdout)
    flows = {r["name"]: r for r in listed if r["kind"] == "flow"}
    assert set(FLOWS) <= set(flows) and flows["conv-sylvester"]["package"] == "hvae"


def test_bad_flow_options_name_the_key() -> None:
    with pytest.raises(ConfigError, match="flow.convsylv_stage_limit"):
        resolve_config("tiny", {"flow": "conv-sylvester"}, ["flow.convsylv_stage_limit=-1"])
    with pytest.raises(ConfigError, match="flow.num_ortho_vecs"):
        resolve_config("tiny", {"flow": "orthogonal-sylvester"}, ["flow.num_ortho_vecs=[1,0]"])


@pytest.mark.parametrize("flow", FLOWS)
def test_flows_only_where_the_per_scale_options_put_them(flow) -> None:
    cfg = resolve_config("tiny", {"flow": flow}, ["flow.num_flows=[0,1,2,0]"])
    factory = get_registry().get("flow", flow).load()
    made = {
        s.resolution: factory(
            cfg.options("flow"),
            cfg.model,
            scale=s.index,
            resolution=s.resolution,
            z_width=s.z_width,
            name="f",
        )
        for s in scales(cfg.model, cfg.resolutions)
    }
    assert made[8] is None and made[1] is None
    assert made[4] is not None and made[2] is not None


# --- training ------------------------------------------------------------------------------


def expected_flow_params(flow: str) -> int:
    """The flows' parameter count, built block by block from the factory, apart from the
    model."""
    cfg = resolve_config("tiny", {"flow": flow})
    factory = get_registry().get("flow", flow).load()
    total = 0
    for s in scales(cfg.model, cfg.resolutions):
        for _ in range(s.dec_blocks):
            made = factory(
                cfg.options("flow"),
                cfg.model,
                scale=s.index,
                resolution=s.resolution,
                z_width=s.z_width,
                name="f",
            )
            if made is not None:
                r = s.resolution
                made.build((1, r, r, s.z_width), (1, r, r, made.context_width))
                total += made.count_params()
    return total


def check_startup_line(line: str, flow: str) -> None:
    match = re.search(r"([\d,]+) parameters \(flows ([\d,]+)\)", line)
    assert match, line
    total, flows = (int(g.replace(",", "")) for g in match.groups())
    assert flows == expected_flow_params(flow)
    assert 0 < flows < total


@pytest.mark.parametrize("flow", FLOWS)
def test_the_startup_line_counts_the_flow_parameters(flow) -> None:
    cfg = resolve_config("tiny", {"flow": flow})
    check_startup_line(Trainer(cfg, quiet=True).summary(), flow)


def test_the_startup_line_has_no_flow_count_without_flows() -> None:
    line = Trainer(resolve_config("tiny"), quiet=True).summary()
    assert "flows" not in line and re.search(r"[\d,]+ parameters,", line)


def check_run(run_dir, startup: str, flow: str) -> None:
    rows = rundir.read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_bpd"] < rows[0]["train_bpd"]
    assert all(np.isfinite(r["kl_flow_bpd"]) for r in rows)
    # Every block of the tiny preset has a flow with the defaults: all of the KL is theirs.
    assert all(r["kl_flow_bpd"] == pytest.approx(r["kl_bpd"], abs=1e-6) for r in rows)
    check_startup_line(startup, flow)


def train_args(flow: str, save_dir, jit: bool = False) -> list[str]:
    return [
        "train",
        "--config",
        "tiny",
        "--flow",
        flow,
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--set",
        f"run.jit={str(jit).lower()}",
        "--save-dir",
        str(save_dir),
        "--quiet",
    ]


# About a minute each on two busy CPU cores, mostly tracing the step: slow.
@pytest.mark.slow
@pytest.mark.parametrize("flow", FLOWS)
def test_train_with_a_flow(flow, tmp_path) -> None:
    result = CliRunner().invoke(cli, train_args(flow, tmp_path))
    assert result.exit_code == 0, result.output
    [run_dir] = list(tmp_path.iterdir())
    check_run(run_dir, result.stderr, flow)
    # The trained flows' KL, over many posterior samples of one digit, per block.
    cfg = resolve_config(run_dir / "config.yaml")
    run = RunDirectory(run_dir)
    trainer = Trainer(cfg, run, quiet=True)
    trainer.restore(run.read_checkpoint(cfg))
    n = 4000
    for b in flow_blocks_on_one_image(trainer.model, n):
        assert_kl_estimates_are_consistent(b)


@pytest.mark.slow
@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_train_with_a_flow_on_other_backends(backend, flow, tmp_path) -> None:
    pytest.importorskip(backend)
    # JAX compiles the step (op by op, its loops would compile on every call); torch has no
    # compiled step.
    done = run_hvae(
        *train_args(flow, tmp_path, jit=backend == "jax"), backend=backend, timeout=1800
    )
    assert f"backend {backend}" in done.stderr
    [run_dir] = list(tmp_path.iterdir())
    check_run(run_dir, done.stderr, flow)
