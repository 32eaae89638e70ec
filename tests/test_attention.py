"""The ``depthwise`` attention plugin: lossless moves between scales, attention over the depth
axis at every pixel, the gamma = 0 identity with the plain model, gradients, sampling, and
training through the CLI on every backend."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import yaml
from backends import run_hvae, run_on_backend
from click.testing import CliRunner
from hvae_plugins.attention.depthwise import (
    DepthwiseAttention,
    Entries,
    attend,
    depth_to_space,
    space_to_depth,
)
from keras import ops

from hvae_core.cli import cli
from hvae_core.config import resolve_config
from hvae_core.errors import ConfigError
from hvae_core.model.hvae import HVAE
from hvae_core.run import files as rundir

ATTENTION = "model.attention=depthwise"
# Two blocks at most scales, so that blocks also read entries of their own resolution.
DEEPER = "model.dec_num_blocks=[2,2,1,2]"


def build(*overrides: str, seed: int = 0, stack_blocks: bool = True) -> HVAE:
    cfg = resolve_config("tiny", overrides=list(overrides))
    model = HVAE(cfg, (8, 8, 1), 8, seed=seed, stack_blocks=stack_blocks)
    model.build_weights()
    return model


def images(n: int, seed: int = 0) -> np.ndarray:
    levels = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1))
    return (levels / 255 * 2 - 1).astype("float32")


def np_(x) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(x), dtype="float64")


def set_gammas(model: HVAE, value: float) -> None:
    gammas = model.attention.gammas
    gammas.assign(np.full(gammas.shape, value, dtype="float32"))


@pytest.fixture
def no_noise(monkeypatch):
    """Deterministic passes: the latent noise is zero."""
    monkeypatch.setattr(
        HVAE,
        "draw_latent_noise",
        lambda self, b: [ops.zeros(s) for s in self.noise_shapes(b).latents],
    )


# --- moving entries between scales ----------------------------------------------------------


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_space_to_depth_is_a_lossless_permutation(factor) -> None:
    rng = np.random.default_rng(factor)
    # Distinct values, so that equal multisets mean a permutation.
    x = rng.permutation(2 * 8 * 8 * 3 * 5).reshape(2, 8, 8, 3, 5).astype("float32")
    moved = np_(space_to_depth(ops.convert_to_tensor(x), factor))
    s = 8 // factor
    assert moved.shape == (2, s, s, factor * factor * 3, 5)
    np.testing.assert_array_equal(np.sort(moved, axis=None), np.sort(x, axis=None))
    # Each pixel of the coarse grid holds the f x f pixels it covers, row by row, as entries.
    for a in range(factor):
        for c in range(factor):
            for length in range(3):
                np.testing.assert_array_equal(
                    moved[:, :, :, (a * factor + c) * 3 + length],
                    x[:, a::factor, c::factor, length],
                )
    back = np_(depth_to_space(ops.convert_to_tensor(moved.astype("float32")), factor))
    np.testing.assert_array_equal(back, x)


def test_depth_to_space_then_space_to_depth_round_trips() -> None:
    x = np.random.default_rng(1).normal(size=(2, 2, 2, 16 * 3, 4)).astype("float32")
    up = depth_to_space(ops.convert_to_tensor(x), 4)
    assert tuple(up.shape) == (2, 8, 8, 3, 4)
    np.testing.assert_array_equal(np_(space_to_depth(up, 4)), x)


# --- the attention read -------------------------------------------------------------------


def test_attention_over_depth_matches_a_per_pixel_oracle() -> None:
    rng = np.random.default_rng(2)
    b, res, q, c = 2, 4, 2, 3

    def arr(*shape):
        return rng.normal(size=shape).astype("float32")

    queries = arr(b, res, res, q, c)
    coarse1 = (arr(b, 1, 1, 2, c), arr(b, 1, 1, 2, 5))  # two entries on the 1x1 grid
    coarse2 = (arr(b, 2, 2, 1, c), arr(b, 2, 2, 1, 5))
    same = (arr(b, 4, 4, 3, c), arr(b, 4, 4, 3, 5))
    fine = (arr(b, 8, 8, 1, c), arr(b, 8, 8, 1, 6))  # another value width
    t = ops.convert_to_tensor
    # Given in any order; the weights come ordered by grid, coarsest first, then as given.
    groups = [
        Entries(4, t(same[0]), t(same[1])),
        Entries(2, t(coarse2[0]), t(coarse2[1])),
        Entries(4, space_to_depth(t(fine[0]), 2), space_to_depth(t(fine[1]), 2)),
        Entries(1, t(coarse1[0]), t(coarse1[1])),
    ]
    reads, weights = attend(t(queries), groups, res)
    weights = np_(weights)
    reads = {width: np_(read) for width, read in reads.items()}
    assert sorted(reads) == [5, 6]
    assert weights.shape == (b, res, res, q, 2 + 1 + 3 + 4)
    assert np.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-6)

    # Oracle: at pixel (y, x) a coarser grid's entry is that of the pixel covering it; the
    # 8x8 grid gives the 2x2 pixels under it. Plain softmax(q.k / sqrt(c)) over them all.
    for n in range(b):
        for y in range(res):
            for x in range(res):
                keys = [
                    *coarse1[0][n, 0, 0],
                    *coarse2[0][n, y // 2, x // 2],
                    *same[0][n, y, x],
                    *(fine[0][n, 2 * y + i, 2 * x + j, 0] for i in (0, 1) for j in (0, 1)),
                ]
                values = [
                    coarse1[1][n, 0, 0],
                    coarse2[1][n, y // 2, x // 2],
                    same[1][n, y, x],
                    np.stack([fine[1][n, 2 * y + i, 2 * x + j, 0] for i in (0, 1) for j in (0, 1)]),
                ]
                logits = queries[n, y, x] @ np.stack(keys).T / math.sqrt(c)
                w = np.exp(logits - logits.max(axis=-1, keepdims=True))
                w /= w.sum(axis=-1, keepdims=True)
                np.testing.assert_allclose(weights[n, y, x], w, rtol=1e-5, atol=1e-6)
                # Values of width 5: the first 6 entries; of width 6: the last 4.
                expected = {5: w[:, :6] @ np.concatenate(values[:3]), 6: w[:, 6:] @ values[3]}
                for width, read in expected.items():
                    np.testing.assert_allclose(reads[width][n, y, x], read, rtol=1e-4, atol=1e-5)


def record_reads(monkeypatch) -> list[tuple[int, int, str, np.ndarray | None]]:
    """Every read of the model's attention: (block, resolution, branch, weights)."""
    seen: list[tuple[int, int, str, np.ndarray | None]] = []
    original = DepthwiseAttention.read_with_weights

    def recording(self, state, memory, *, block, resolution, branch):
        read, weights = original(
            self, state, memory, block=block, resolution=resolution, branch=branch
        )
        seen.append((block, resolution, branch, None if weights is None else np_(weights)))
        return read, weights

    monkeypatch.setattr(DepthwiseAttention, "read_with_weights", recording)
    return seen


@pytest.mark.parametrize(
    "overrides",
    [
        [DEEPER],
        # Several queries and a different value width per scale (the combination convolution);
        # five blocks at 4x4, whose entries are grouped in threes, then as one.
        [
            "model.dec_num_blocks=[2,5,1,2]",
            "attention.num_queries=2",
            "model.stage_in_width=[16,8,8,12]",
        ],
    ],
    ids=["one-query", "two-queries-mixed-widths"],
)
def test_every_read_attends_over_the_depth_axis_it_may_see(overrides, monkeypatch) -> None:
    model = build(ATTENTION, *overrides)
    set_gammas(model, 0.5)
    seen = record_reads(monkeypatch)
    model(images(2))
    blocks = model.decoder.blocks
    assert sorted((b, r, c) for b, r, c, _ in seen) == sorted(
        (b.index, b.scale.resolution, c) for b in blocks for c in ("prior", "posterior")
    )
    resolutions = [8, 4, 2, 1]
    queries = model.attention.num_queries

    def check(reads: list, batch: int) -> None:
        for block, res, branch, weights in reads:
            # The prior sees the states of the earlier blocks, one entry each; the posterior
            # also every encoder scale: a finer one as the (r/R)^2 pixels under each pixel.
            expected = block
            if branch == "posterior":
                expected += sum((r // res) ** 2 if r >= res else 1 for r in resolutions)
            if expected == 0:
                assert weights is None  # the first block's prior: nothing before it
                continue
            assert weights.shape == (batch, res, res, queries, expected), (block, branch)
            np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-5)

    check(seen, 2)
    # Sampling from the prior: no image, no encoder, the same prior reads.
    seen.clear()
    samples = np_(model.generate(3, temperature=0.8))
    assert samples.shape == (3, 8, 8, 1)
    assert np.all(np.isfinite(samples)) and np.all(np.abs(samples) <= 1.0)
    assert sorted((b, r, c) for b, r, c, _ in seen) == sorted(
        (b.index, b.scale.resolution, "prior") for b in blocks
    )
    check(seen, 3)


# --- the model ------------------------------------------------------------------------------


def copy_shared_weights(source: HVAE, target: HVAE) -> None:
    """``source``'s weights into the same layers of ``target`` (matched by path below the
    model's own name)."""

    def by_path(model: HVAE) -> dict:
        weights = {v.path.split("/", 1)[1]: v for v in model.weights}
        assert len(weights) == len(model.weights)
        return weights

    targets = by_path(target)
    for path, v in by_path(source).items():
        targets[path].assign(v.value)


def test_with_gamma_zero_the_model_equals_the_plain_model(no_noise) -> None:
    # Block by block, as the attention model runs, so that their weights match layer by layer.
    plain = build(DEEPER, seed=1, stack_blocks=False)
    model = build(DEEPER, ATTENTION, "attention.num_queries=2", seed=2)
    assert model.count_params() > plain.count_params()
    copy_shared_weights(plain, model)
    x = images(4)
    expected, got = plain.losses_for(x), model.losses_for(x)
    np.testing.assert_array_equal(np_(got["outputs"].params), np_(expected["outputs"].params))
    for key in ("loss", "recon_bpd", "kl_bpd", "kl_layers_bpd"):
        np.testing.assert_array_equal(np_(got[key]), np_(expected[key]), err_msg=key)
    # The reads are live: a non-zero gamma changes the output.
    set_gammas(model, 0.5)
    moved, before = np_(model.posterior_pass(x).params), np_(expected["outputs"].params)
    # (A fresh model's likelihood parameters are all small: compare relative to them.)
    assert np.abs(moved - before).max() > 0.01 * np.abs(before).max()


def loss_gradients(model: HVAE, x: np.ndarray, variables: list) -> list[np.ndarray]:
    """Gradients of the loss with respect to ``variables``, on whichever backend Keras runs."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = model.losses_for(x)["loss"]
        grads = tape.gradient(loss, variables)
    elif backend == "jax":
        import jax

        trainable = model.trainable_variables
        fixed = [(v, v.value) for v in model.non_trainable_variables]

        def loss_of(values):
            mapping = [*zip(trainable, values, strict=True), *fixed]
            with keras.StatelessScope(state_mapping=mapping):
                return model.losses_for(x)["loss"]

        all_grads = jax.jit(jax.grad(loss_of))([v.value for v in trainable])
        by_id = {id(v): g for v, g in zip(trainable, all_grads, strict=True)}
        grads = [by_id[id(v)] for v in variables]
    elif backend == "torch":
        import torch

        loss = model.losses_for(x)["loss"]
        grads = torch.autograd.grad(loss, [v.value for v in variables], allow_unused=True)
    else:
        pytest.skip(f"no gradient helper for the {backend} backend")
    assert all(g is not None for g in grads), "a variable is not on the loss's path"
    return [np_(g) for g in grads]


def test_gradients_reach_gamma_and_then_the_query_blocks(no_noise) -> None:
    model = build(DEEPER, ATTENTION, "attention.num_queries=2")
    attention = model.attention
    x = images(4)
    queries = [w for block in attention.query_blocks for w in block.trainable_weights]
    gamma_grad, *grads = loss_gradients(model, x, [attention.gammas, *queries])
    prior, posterior = gamma_grad[:, 0], gamma_grad[:, 1]  # one row per block
    # At gamma = 0 the posterior gammas learn, and nothing behind any gamma does yet (the read
    # is * 0). The prior's gammas wait for its last layer, which starts at zero (so that the
    # prior starts as N(0, 1) whatever its input, the read included).
    assert np.all(posterior != 0)
    assert not np.any(prior)
    assert all(not np.any(g) for g in grads)

    rng = np.random.default_rng(0)
    for block in model.decoder.blocks:
        for w in block.prior.trainable_weights:
            if not np.any(np_(w.value)):  # as after a few updates
                w.assign(rng.normal(0, 0.01, w.shape).astype("float32"))
    [gamma_grad] = loss_gradients(model, x, [attention.gammas])
    assert np.all(gamma_grad[1:, 0] != 0) and np.all(gamma_grad[:, 1] != 0)
    assert gamma_grad[0, 0] == 0  # the first block has no prior read

    set_gammas(model, 0.1)
    others = [
        w
        for layer in (
            *attention.encoder_keys.values(),
            *attention.decoder_keys,
            *attention.combines.values(),
        )
        for w in layer.trainable_weights
    ]
    grads = loss_gradients(model, x, queries + others)
    assert all(np.isfinite(g).all() for g in grads)
    start = 0
    for block in attention.query_blocks:
        stop = start + len(block.trainable_weights)
        # (The first block starts from a state of zeros: there only biases can learn yet.)
        assert any(np.any(g) for g in grads[start:stop]), f"{block.name} gets no gradient"
        start = stop
    assert all(np.any(g) for g in grads[start:]), "a key or combination layer gets no gradient"


def test_mixed_precision_runs_the_reads_in_bfloat16() -> None:
    model = build(ATTENTION, "model.precision=mixed_bfloat16")
    set_gammas(model, 0.5)
    result = model.losses_for(images(2))
    assert keras.backend.standardize_dtype(result["loss"].dtype) == "float32"
    assert np.isfinite(float(np_(result["loss"])))


# --- options and the command line -------------------------------------------------------------


def test_plugins_show_lists_the_options() -> None:
    result = CliRunner().invoke(cli, ["plugins", "show", "attention", "depthwise"])
    assert result.exit_code == 0, result.output
    for option in ("attention.query_width", "attention.num_queries"):
        assert option in result.stdout
    cfg = resolve_config("tiny", {"attention": "depthwise"})
    options = cfg.options("attention")
    assert (options.query_width, options.num_queries) == (32, 1)


@pytest.mark.parametrize("key", ["query_width", "num_queries"])
def test_non_positive_options_name_the_key(key) -> None:
    with pytest.raises(ConfigError, match=f"attention.{key}"):
        resolve_config("tiny", overrides=[ATTENTION, f"attention.{key}=0"])


def train_cli(tmp_path, backend: str, *flags: str) -> tuple[list[dict], dict]:
    """``hvae train --config tiny --attention depthwise`` for two epochs: the metrics and the
    resolved config of the run."""
    run_hvae(
        *("train", "--config", "tiny", "--attention", "depthwise", "--epochs", "2"),
        *("--batch-size", "64", "--save-dir", str(tmp_path), "--quiet", *flags),
        backend=backend,
    )
    [run_dir] = list(tmp_path.iterdir())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["attention"] == "depthwise"
    return rundir.read_metrics(run_dir), config


@pytest.mark.slow  # 50 s on 2 cores; the unit tests above cover the reads and their gradients
def test_cli_trains_with_attention_and_the_loss_falls(tmp_path) -> None:
    rows, _ = train_cli(tmp_path, "tensorflow", "--set", "run.jit=false")
    assert rows[1]["train_bpd"] < rows[0]["train_bpd"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_other_backends_train_with_attention(backend, tmp_path) -> None:
    pytest.importorskip(backend)
    rows, _ = train_cli(tmp_path, backend, "--set", "training.batch_size_div=2")
    assert rows[1]["train_bpd"] < rows[0]["train_bpd"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_attention_combines_with_a_flow_and_a_regularizer(backend, tmp_path) -> None:
    # All three optional parts at once: --attention depthwise --flow conv-sylvester
    # --regularizer cr-vae, on every backend.
    pytest.importorskip(backend)
    flags = ["--flow", "conv-sylvester", "--regularizer", "cr-vae"]
    if backend == "tensorflow":
        flags += ["--set", "run.jit=false"]  # XLA's compile of all three is the slow part
    rows, config = train_cli(tmp_path, backend, *flags)
    assert config["training"]["regularizer"] == "cr-vae"
    assert config["model"]["flow"] == "conv-sylvester"
    assert all(r["consistency_bpd"] > 0 for r in rows)
    assert all(math.isfinite(r["kl_flow_bpd"]) for r in rows)
    assert rows[1]["train_bpd"] < rows[0]["train_bpd"]
    assert all(math.isfinite(r["kl_bpd"]) and r["kl_bpd"] > 0 for r in rows)


PARITY_SCRIPT = """
import keras
from hvae_core.config import resolve_config
from hvae_core.model.hvae import HVAE

HVAE.draw_latent_noise = lambda self, b: [keras.ops.zeros(s) for s in self.noise_shapes(b).latents]
cfg = resolve_config("tiny", overrides=[{overrides}])
model = HVAE(cfg, (8, 8, 1), 8, seed=0)
model.build_weights()
model.set_weights([inputs[f"w{{i}}"] for i in range(len(model.weights))])
outputs["loss"] = keras.ops.convert_to_numpy(model.losses_for(inputs["x"])["loss"])
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_same_weights_give_the_same_loss_on_every_backend(backend, tmp_path, no_noise) -> None:
    overrides = [ATTENTION, DEEPER, "attention.num_queries=2"]
    model = build(*overrides)
    set_gammas(model, 0.5)
    x = images(4)
    inputs = {f"w{i}": np_(w.value).astype("float32") for i, w in enumerate(model.weights)}
    inputs["x"] = x
    script = PARITY_SCRIPT.format(overrides=", ".join(repr(o) for o in overrides))
    got = run_on_backend(backend, script, inputs, tmp_path)
    assert float(got["loss"]) == pytest.approx(float(np_(model.losses_for(x)["loss"])), rel=1e-5)
