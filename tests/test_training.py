"""Training: the compiled step's maths, the run directory, resume, and the CLI around them."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from backends import run_hvae, run_on_backend
from click.testing import CliRunner
from conftest import trainer_with_run
from hvae_plugins.datasets.digits import digits_images
from PIL import Image
from tracking import FailingTracker, events, factory_for, scalars

from hvae_core.backends import engine as engine_module
from hvae_core.backends.engine import clip_and_skip, make_engine
from hvae_core.cli import cli
from hvae_core.config import resolve_config
from hvae_core.interfaces import CORE_METRICS, ROW_KEYS
from hvae_core.model.hvae import HVAE
from hvae_core.plugins import get_registry
from hvae_core.run import files as rundir
from hvae_core.testing import temporary_plugin
from hvae_core.training.optim import make_optimizer
from hvae_core.training.trainer import Trainer

# Small and quick: 23 steps per epoch on the digits, no XLA compile.
FAST = ["run.jit=false", "training.batch_size=64"]


def engine_for(*overrides: str, seed: int = 0):
    # A constant rate: the tiny preset's warm-up starts at 0, and the first step would not move.
    cfg = resolve_config("tiny", overrides=[*FAST, "training.scheduler=constant", *overrides])
    model = HVAE(cfg, (8, 8, 1), 4, seed=seed)
    model.build_weights()
    return make_engine(model, make_optimizer(cfg, 10, get_registry()), cfg)


def numpy_weights(variables) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v.value).copy() for v in variables]


@pytest.fixture
def no_noise(monkeypatch):
    """Deterministic steps: the latent noise is zero."""
    cut = engine_module.latent_noise
    monkeypatch.setattr(
        engine_module,
        "latent_noise",
        lambda model, flat, groups=1: [keras.ops.zeros_like(e) for e in cut(model, flat, groups)],
    )


# --- the step -----------------------------------------------------------------------------


def test_accumulation_gives_the_same_update_as_the_full_batch(no_noise) -> None:
    images = digits_images()[:8]
    full = engine_for("training.batch_size=8", "training.use_ema=false")
    split = engine_for(
        "training.batch_size=8", "training.batch_size_div=2", "training.use_ema=false"
    )
    split.model.set_weights(full.model.get_weights())
    before = numpy_weights(full.trainable)
    a, b = full.train_step(images, 1.0), split.train_step(images, 1.0)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    moved = False
    for w0, wa, wb in zip(
        before, numpy_weights(full.trainable), numpy_weights(split.trainable), strict=True
    ):
        np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-7)
        moved |= not np.allclose(w0, wa)
    assert moved


ACCUMULATION_SCRIPT = """
import keras
from hvae_core.config import resolve_config
from hvae_core.backends import engine as engine_module
from hvae_core.model.hvae import HVAE
from hvae_core.plugins import get_registry
from hvae_core.backends.engine import clip_and_skip, make_engine
from hvae_core.training.optim import make_optimizer

_cut = engine_module.latent_noise  # no noise: micro-batches and the full batch draw their own
engine_module.latent_noise = lambda model, flat, groups=1: [
    keras.ops.zeros_like(e) for e in _cut(model, flat, groups)
]
engines = []
for div in (1, 4):
    cfg = resolve_config("tiny", overrides=[
        "run.jit=true", "training.batch_size=8", f"training.batch_size_div={div}",
        "training.scheduler=constant", "training.use_ema=false",
    ])
    model = HVAE(cfg, (8, 8, 1), 4, seed=0)
    model.build_weights()
    engines.append(make_engine(model, make_optimizer(cfg, 10, get_registry()), cfg))
engines[1].model.set_weights(engines[0].model.get_weights())
engines[1].after_external_change()
for i, engine in enumerate(engines):
    terms = engine.train_step(inputs["images"], 1.0)
    engine.sync()
    outputs[f"loss{i}"] = terms["loss"]
    outputs[f"norm{i}"] = terms["grad_norm"]
    for j, w in enumerate(engine.model.get_weights()):
        outputs[f"w{i}_{j}"] = w
# The compiled step takes the skip threshold as an argument: on, then off again.
outputs["skipped"] = [engines[0].train_step(inputs["images"], 1.0, s)["skipped"] for s in
                      (1e-9, 0.0)]
"""


# TensorFlow's XLA compile of both engines takes 50 s on 2 cores: in the slow set.
@pytest.mark.parametrize("backend", [pytest.param("tensorflow", marks=pytest.mark.slow), "jax"])
def test_compiled_accumulation_loop_gives_the_full_batch_update(backend, tmp_path) -> None:
    # The compiled steps run micro-batches in a loop (lax.scan / tf.while_loop), not unrolled.
    out = run_on_backend(backend, ACCUMULATION_SCRIPT, {"images": digits_images()[:8]}, tmp_path)
    assert out["loss0"] == pytest.approx(out["loss1"], rel=1e-5)
    assert out["norm0"] == pytest.approx(out["norm1"], rel=1e-4)
    n = sum(1 for k in out if k.startswith("w0_"))
    for j in range(n):
        np.testing.assert_allclose(out[f"w0_{j}"], out[f"w1_{j}"], rtol=1e-4, atol=1e-6)
    assert out["skipped"].tolist() == [1.0, 0.0]


def test_skipped_updates_leave_weights_optimizer_and_ema_alone() -> None:
    engine = engine_for("training.gradient_skipnorm=1e-9")
    images = digits_images()[:64]
    state = engine.state()
    result = engine.train_step(images, 1.0)
    assert result["skipped"] == 1.0 and result["grad_norm"] > 1e-9
    after = engine.state()
    # The noise seeds advance; weights, EMA and optimizer state (its step count too) do not.
    for key, value in state.items():
        if key.startswith(("ema/", "optimizer/")) or key in trainable_keys(engine):
            np.testing.assert_array_equal(value, after[key], err_msg=key)


SKIPNORM_SCRIPT = """
from hvae_core.config import resolve_config
from hvae_core.model.hvae import HVAE
from hvae_core.plugins import get_registry
from hvae_core.backends.engine import clip_and_skip, make_engine
from hvae_core.training.optim import make_optimizer

cfg = resolve_config("tiny", overrides=["training.batch_size=8", "training.gradient_skipnorm=1e-9"])
model = HVAE(cfg, (8, 8, 1), 4, seed=0)
model.build_weights()
engine = make_engine(model, make_optimizer(cfg, 10, get_registry()), cfg)
outputs["skipped"] = [engine.train_step(inputs["images"], 1.0, s)["skipped"] for s in
                      (None, 0.0, 1e-9, 1e9)]
"""


def test_the_skip_threshold_can_change_from_step_to_step_on_torch(tmp_path) -> None:
    out = run_on_backend("torch", SKIPNORM_SCRIPT, {"images": digits_images()[:8]}, tmp_path)
    assert out["skipped"].tolist() == [1.0, 0.0, 1.0, 0.0]


TORCH_COMPILE_SCRIPT = """
import contextlib, io
import keras, torch
from hvae_core.config import resolve_config
from hvae_core.model.hvae import HVAE
from hvae_core.plugins import get_registry
from hvae_core.backends.engine import make_engine
from hvae_core.training.optim import make_optimizer

def engine(*overrides):
    cfg = resolve_config("tiny", overrides=[
        "training.batch_size=8", "training.batch_size_div=2", "training.scheduler=constant",
        *overrides])
    model = HVAE(cfg, (8, 8, 1), 4, seed=0)
    model.build_weights()
    return make_engine(model, make_optimizer(cfg, 10, get_registry()), cfg)

def fail_after_a_step(module, **options):
    def run(*args):  # fails late: noise drawn, gradients accumulated
        module(*args)["loss"].backward()
        raise RuntimeError("cannot compile this model\\nsecond line")
    return run

if inputs["broken"]:
    torch.compile = fail_after_a_step
tried, eager = engine("run.torch_compile=true"), engine()
eager.model.set_weights(tried.model.get_weights())  # the noise seeds' states too
err = io.StringIO()
with contextlib.redirect_stderr(err):
    steps = [tried.train_step(inputs["images"], b) for b in (1.0, 0.5, 0.25)]
reference = [eager.train_step(inputs["images"], b) for b in (1.0, 0.5, 0.25)]
for key in ("loss", "grad_norm"):
    outputs[key] = [[s[key] for s in steps], [s[key] for s in reference]]
for i, (v, w) in enumerate(zip(tried.trainable, eager.trainable)):
    outputs[f"weight_{i}"] = keras.ops.convert_to_numpy(v.value)
    outputs[f"reference_{i}"] = keras.ops.convert_to_numpy(w.value)
outputs["stderr"] = err.getvalue()
"""


def torch_compile_against_eager(tmp_path: Path, broken: bool) -> dict[str, np.ndarray]:
    inputs = {"images": digits_images()[:8], "broken": np.array(broken)}
    out = run_on_backend("torch", TORCH_COMPILE_SCRIPT, inputs, tmp_path, timeout=1800)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(out[key][0], out[key][1], rtol=1e-4, err_msg=key)
    weights = [k for k in out if k.startswith("weight_")]
    assert weights
    for key in weights:
        reference = out[key.replace("weight_", "reference_")]
        np.testing.assert_allclose(out[key], reference, rtol=1e-4, atol=1e-6, err_msg=key)
    return out


def test_a_failing_torch_compile_warns_once_and_trains_eagerly(tmp_path) -> None:
    out = torch_compile_against_eager(tmp_path, broken=True)
    lines = str(out["stderr"]).splitlines()
    assert lines == [
        "warning: torch.compile failed (RuntimeError: cannot compile this model); "
        "the train step runs eagerly"
    ]


# torch.compile traces Keras' Python for minutes on a 2-core CPU (README: performance).
@pytest.mark.slow
def test_torch_compile_gives_the_eager_losses(tmp_path) -> None:
    out = torch_compile_against_eager(tmp_path, broken=False)
    assert "Traceback" not in str(out["stderr"])


def test_skipping_on_the_norm_waits_for_skipnorm_warmup_epochs(tmp_path) -> None:
    trainer = train_run(
        tmp_path,
        "skip-warmup",
        "training.gradient_skipnorm=1e-9",  # every update's norm is above it
        "training.skipnorm_warmup_epochs=1.5",
        "training.max_consecutive_skips=0",
        epochs=3,
    )
    rows = trainer.fit()
    steps = trainer.steps_per_epoch
    first_checked = math.ceil(1.5 * steps)  # the first step (0-based) the norm test is on
    assert [r["skipped_updates"] for r in rows] == [0, 2 * steps - first_checked, steps]


def trainable_keys(engine) -> set[str]:
    ids = {id(v) for v in engine.trainable}
    return {f"model/{i:05d}" for i, v in enumerate(engine.model.variables) if id(v) in ids}


def test_a_nan_loss_is_skipped_and_never_reaches_the_weights() -> None:
    engine = engine_for()
    images = digits_images()[:64]
    before = numpy_weights(engine.trainable)
    result = engine.train_step(images, float("nan"))  # beta NaN: the loss is NaN
    assert result["skipped"] == 1.0 and not np.isfinite(result["loss"])
    for w0, w1 in zip(before, numpy_weights(engine.trainable), strict=True):
        np.testing.assert_array_equal(w0, w1)
    assert engine.train_step(images, 1.0)["skipped"] == 0.0
    assert all(np.isfinite(w).all() for w in numpy_weights(engine.trainable))


@pytest.mark.parametrize("unit", ["nats", "bits"])
def test_clipping_and_ema_follow_their_formulas(no_noise, unit) -> None:
    engine = engine_for(
        "training.gradient_clipnorm=1e-3",
        "training.ema_rate=0.9",
        "training.weight_decay=0",
        f"training.grad_norm_unit={unit}",
    )
    images = digits_images()[:64]
    before = numpy_weights(engine.trainable)
    result = engine.train_step(images, 1.0)
    assert result["skipped"] == 0.0 and result["grad_norm"] > 1e-3
    engine.sync()  # JAX keeps the state apart from the Keras variables
    after = numpy_weights(engine.trainable)
    for w0, w1, e in zip(before, after, numpy_weights(engine.ema), strict=True):
        np.testing.assert_allclose(e, 0.9 * w0 + 0.1 * w1, rtol=1e-5, atol=1e-7)
    # Adamax's first step moves each weight by lr * sign(g) whatever the clipping: compare
    # the unclipped step instead through the optimizer's first moment, which is (1-b1) * g.
    m = [
        keras.ops.convert_to_numpy(v.value)
        for v in engine.optimizer.variables
        if "momentum" in v.path
    ]
    norm = np.sqrt(sum(float(np.sum((x / 0.1) ** 2)) for x in m))
    # The applied gradients are the bits loss's, clipped so that their norm on the unit's
    # scale (ln 2 times larger in nats) is the clip norm.
    assert norm == pytest.approx(1e-3 / (math.log(2.0) if unit == "nats" else 1.0), rel=1e-3)


def vdvae_rule(grads_bits: list[np.ndarray], clip: float, skip: float) -> tuple[bool, float]:
    """VDVAE's step, written from its train loop: ``clip_grad_norm_`` of the loss in nats per
    dimension, and no update when that norm is not finite or reaches ``skip_threshold``.
    float32, as VDVAE's torch computes it (the norms at a threshold are exact here)."""
    sq = [np.sum(np.square(g.astype(np.float32)), dtype=np.float32) for g in grads_bits]
    norm_nats = np.float32(np.log(2.0)) * np.sqrt(np.sum(sq, dtype=np.float32))
    skipped = not np.isfinite(norm_nats) or norm_nats >= skip
    return bool(skipped), min(1.0, clip / (float(norm_nats) + 1e-6))


def gradient_with_bits_norm(norm: float, rng) -> list[np.ndarray]:
    """Gradients shaped like a few weights, whose global norm is ``norm`` (bits scale)."""
    if not np.isfinite(norm):
        return [np.full((3, 3), norm, np.float32), np.zeros(5, np.float32)]
    # One non-zero entry: its norm is exactly ``norm`` in float32, also at the thresholds.
    one = np.zeros((3, 3), np.float32)
    one[1, 2] = norm
    return [one, np.zeros(5, np.float32), np.zeros((2, 4), np.float32)]


def spread_gradient(norm: float, rng) -> list[np.ndarray]:
    grads = [rng.normal(size=s).astype(np.float32) for s in ((3, 3), (5,), (2, 4))]
    total = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads))
    return [(g * (norm / total)).astype(np.float32) for g in grads]


def test_the_vdvae_presets_clip_and_skip_where_vdvae_does() -> None:
    training = resolve_config("cifar10").training
    clip, skip = training.gradient_clipnorm, training.gradient_skipnorm
    assert (clip, skip, training.grad_norm_unit) == (200.0, 400.0, "nats")
    ln2 = np.float32(np.log(2.0))
    at_clip, at_skip = np.float32(clip / np.log(2.0)), np.float32(skip / np.log(2.0))
    assert ln2 * at_skip == np.float32(skip)  # exactly at the threshold on the nats scale
    below = [np.nextafter(t, np.float32(0)) for t in (at_clip, at_skip)]
    above = [np.nextafter(t, np.float32(np.inf)) for t in (at_clip, at_skip)]
    norms = [0.5, 150.0, 250.0, 300.0, 450.0, 560.0, 600.0, 1e4, *below, at_clip, at_skip]
    norms += [*above, np.inf, np.nan]
    rng = np.random.default_rng(0)
    skips = []
    for norm in norms:
        makers = [gradient_with_bits_norm] + ([spread_gradient] if np.isfinite(norm) else [])
        for make in makers:
            grads = make(float(norm), rng)
            want_skip, want_scale = vdvae_rule(grads, clip, skip)
            got_norm, got_skip, got_scale = clip_and_skip(
                [keras.ops.convert_to_tensor(g) for g in grads],
                keras.ops.convert_to_tensor(np.float32(1.0)),
                training,
                skip,
            )
            assert bool(got_skip) == want_skip, (norm, make.__name__)
            skips.append(want_skip)
            if not want_skip:
                assert float(got_scale) == pytest.approx(want_scale, rel=1e-6), norm
                assert float(got_norm) == pytest.approx(float(ln2) * norm, rel=1e-6)
    # 450 and 560 bits (312 and 388 nats): updates VDVAE makes and the old bits rule skipped.
    assert any(skips) and not all(skips)


def test_the_step_reports_and_skips_on_the_grad_norm_unit_scale(no_noise) -> None:
    images = digits_images()[:64]
    engines = {u: engine_for(f"training.grad_norm_unit={u}") for u in ("bits", "nats")}
    engines["nats"].model.set_weights(engines["bits"].model.get_weights())
    engines["nats"].after_external_change()
    # A skipped step leaves the weights alone, so the next step sees the same gradient.
    norms = {u: e.train_step(images, 1.0, 1e-9)["grad_norm"] for u, e in engines.items()}
    assert norms["nats"] == pytest.approx(math.log(2.0) * norms["bits"], rel=1e-5)
    between = 0.5 * (norms["nats"] + norms["bits"])
    skipped = {u: e.train_step(images, 1.0, between)["skipped"] for u, e in engines.items()}
    assert skipped == {"bits": 1.0, "nats": 0.0}


def test_swapping_the_ema_twice_restores_the_weights() -> None:
    # Regression: TensorFlow's v.value read the variable lazily, so a swap made the weights
    # equal to the EMA for good.
    engine = engine_for()
    engine.train_step(digits_images()[:64], 1.0)
    weights, ema = numpy_weights(engine.trainable), numpy_weights(engine.ema)
    assert any(not np.array_equal(w, e) for w, e in zip(weights, ema, strict=True))
    engine.swap_ema()
    for w, e in zip(numpy_weights(engine.trainable), ema, strict=True):
        np.testing.assert_array_equal(w, e)
    engine.swap_ema()
    for w0, w1 in zip(weights, numpy_weights(engine.trainable), strict=True):
        np.testing.assert_array_equal(w0, w1)
    for e0, e1 in zip(ema, numpy_weights(engine.ema), strict=True):
        np.testing.assert_array_equal(e0, e1)


EMA_SWAP_SCRIPT = """
from hvae_core.config import resolve_config
from hvae_core.model.hvae import HVAE
from hvae_core.plugins import get_registry
from hvae_core.backends.engine import make_engine
from hvae_core.training.optim import make_optimizer

cfg = resolve_config("tiny", overrides=["run.jit=true", "training.batch_size=8"])
model = HVAE(cfg, (8, 8, 1), 4, seed=0)
model.build_weights()
engine = make_engine(model, make_optimizer(cfg, 10, get_registry()), cfg)
for _ in range(2):  # the first step's learning rate is 0 (warm-up)
    engine.train_step(inputs["images"], 1.0)
ids = {id(v) for v in engine.trainable}
keys = [f"model/{i:05d}" for i, v in enumerate(model.variables) if id(v) in ids]
for name in ("before", "swapped", "back"):
    if name != "before":
        engine.swap_ema()
    state = engine.state()
    for j, key in enumerate(keys):
        outputs[f"{name}_w{j}"] = state[key]
        outputs[f"{name}_e{j}"] = state[f"ema/{j:05d}"]
    outputs[f"{name}_loss"] = engine.eval_step(inputs["images"])["elbo_bpd"]
"""


def test_swapping_the_ema_on_jax_exchanges_the_state_arrays(tmp_path) -> None:
    # JAX swaps by exchanging the state's lists; what the variables then hold, and what
    # evaluation scores, must be the other set of weights.
    out = run_on_backend("jax", EMA_SWAP_SCRIPT, {"images": digits_images()[:8]}, tmp_path)
    n = sum(1 for k in out if k.startswith("before_w"))
    assert any(not np.array_equal(out[f"before_w{j}"], out[f"before_e{j}"]) for j in range(n))
    for j in range(n):
        np.testing.assert_array_equal(out[f"swapped_w{j}"], out[f"before_e{j}"])
        np.testing.assert_array_equal(out[f"swapped_e{j}"], out[f"before_w{j}"])
        np.testing.assert_array_equal(out[f"back_w{j}"], out[f"before_w{j}"])
        np.testing.assert_array_equal(out[f"back_e{j}"], out[f"before_e{j}"])
    assert out["swapped_loss"] != out["before_loss"]


# --- runs ---------------------------------------------------------------------------------


def train_run(tmp_path: Path, name: str, *overrides: str, epochs: int = 2) -> Trainer:
    cfg = resolve_config("tiny", {"epochs": epochs}, [*FAST, *overrides])
    return trainer_with_run(cfg, tmp_path / name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One finished two-epoch run, shared by the tests that read a run directory."""
    trainer = train_run(tmp_path_factory.mktemp("runs"), "run")
    trainer.fit()
    return trainer.run_dir


def test_run_directory_contract(trained) -> None:
    names = {p.name for p in trained.iterdir()}
    assert {
        "config.yaml",
        "metrics.jsonl",
        "checkpoint.safetensors",
        "samples.png",
        "reconstructions.png",
        "loss.png",
        "grad_norm.png",
    } <= names
    rows = rundir.read_metrics(trained)
    assert [r["epoch"] for r in rows] == [1, 2]
    required = {
        "epoch",
        "step",
        "train_bpd",
        "val_bpd",
        "kl_bpd",
        "recon_bpd",
        "lr",
        "beta",
        "grad_norm_max",
        "skipped_updates",
        "seconds",
    }
    assert all(required <= set(r) for r in rows)
    assert all(tuple(r)[: len(ROW_KEYS)] == ROW_KEYS for r in rows)  # one order, declared once
    assert all(set(r) <= CORE_METRICS for r in rows)  # what a regularizer's terms must not be
    assert rows[1]["step"] == 2 * (1497 // 64)
    assert rows[1]["train_bpd"] < rows[0]["train_bpd"]  # it learns
    for row in rows:  # how the latent layers are used, on the validation set
        assert len(row["val_kl_layers_bpd"]) == 4 and len(row["active_units"]) == 4
        assert sum(row["val_kl_layers_bpd"]) == pytest.approx(row["val_kl_bpd"], rel=1e-5)
        assert sum(row["val_kl_scales_bpd"].values()) == pytest.approx(row["val_kl_bpd"], rel=1e-5)
        assert set(row["val_kl_scales_bpd"]) == {"1", "2", "4", "8"}  # JSON keys
        assert row["active_units_total"] == sum(row["active_units"])
        assert row["latent_dims_total"] == 2 * (1 + 4 + 16 + 64)
        assert row["active_layers"] == sum(1 for a in row["active_units"] if a > 0)
    assert (
        resolve_config(trained / "config.yaml").to_dict()
        == resolve_config("tiny", {"epochs": 2}, FAST).to_dict()
    )
    from PIL import Image

    assert Image.open(trained / "samples.png").size[0] >= 64


def test_resume_continues_exactly(trained, tmp_path) -> None:
    # ``trained`` is the same two epochs in one go.
    straight_rows = rundir.read_metrics(trained)
    first = train_run(tmp_path, "halves", epochs=1)
    first.fit()
    cfg = resolve_config("tiny", {"epochs": 2}, FAST)
    second = Trainer(cfg, first.run, quiet=True)
    second.restore(first.run.read_checkpoint(cfg))
    resumed_rows = second.fit()
    assert len(resumed_rows) == 2
    for a, b in zip(straight_rows, resumed_rows, strict=True):
        for key in ("step", "train_bpd", "val_bpd", "kl_bpd", "recon_bpd", "lr", "skipped_updates"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_evaluate_and_sample_a_finished_run(trained, tmp_path) -> None:
    result = run_cli("evaluate", str(trained), "--split", "test", "--json", "--iw-samples", "4")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["split"] == "test" and row["images"] == 150
    assert row["bpd"] == pytest.approx(row["recon_bpd"] + row["kl_bpd"], rel=1e-5)
    assert sum(row["kl_layers_bpd"]) == pytest.approx(row["kl_bpd"], rel=1e-5)
    assert 0 < row["bpd"] < 4  # 4-bit digits
    # The importance-weighted bound with K = 4 is at least as tight as the ELBO (on average).
    assert row["iw_samples"] == 4 and 0 < row["iw_bpd"] <= row["bpd"] + 0.01
    out, raw = tmp_path / "grid.png", tmp_path / "raw.npz"
    result = run_cli(
        "sample",
        str(trained),
        "--n",
        "6",
        "--temperature",
        "0.5",
        "--out",
        str(out),
        "--npz",
        str(raw),
    )
    assert result.exit_code == 0, result.output
    with np.load(raw) as data:
        assert data["samples"].shape == (6, 8, 8, 1) and int(data["num_bits"]) == 4
        assert data["samples"].max() <= 15
    assert out.stat().st_size > 0
    bad = run_cli("sample", str(trained), "--temperature", "0.5,0.5")
    assert bad.exit_code != 0 and "one per latent layer" in bad.stderr


def test_a_loaded_run_holds_the_ema_weights_and_records_its_plugins(trained) -> None:
    import hvae_core

    model = hvae_core.load(trained)
    arrays, meta = rundir.load_checkpoint(trained / rundir.CHECKPOINT)
    variables = model.model.trainable_variables
    for i, v in enumerate(variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v.value), arrays[f"ema/{i:05d}"])
    assert {"kind": "dataset", "name": "digits", "package": "hvae", "version": "0.1.0"} in (
        meta["plugins"]
    )
    assert model.epoch == 2 and model.image_shape == (8, 8, 1) and model.num_bits == 4
    images = digits_images()[:32]
    scores = model.elbo(images)
    assert sum(scores["kl_layers_bpd"]) == pytest.approx(scores["kl_bpd"], rel=1e-5)
    assert scores["bpd"] == pytest.approx(scores["recon_bpd"] + scores["kl_bpd"], rel=1e-6)
    latents = model.encode(images[:3])
    assert [z["sample"].shape for z in latents] == [(3, r, r, 2) for r in (1, 2, 4, 8)]
    assert model.reconstruct(images[:5]).shape == (5, 8, 8, 1)
    with pytest.raises(ValueError, match="levels must lie in 0..15"):
        model.elbo(images + 16)
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 8, 8, 1\)"):
        model.elbo(images[:, :4])
    with pytest.raises(ValueError, match="one per latent layer"):
        model.sample(2, temperature=[1.0, 1.0])


def test_a_checkpoint_that_does_not_fit_the_edited_config_is_one_clear_error(
    trained, tmp_path
) -> None:
    import yaml

    import hvae_core
    from hvae_core.errors import HvaeError

    edited = tmp_path / "edited"
    edited.mkdir()
    config = yaml.safe_load((trained / "config.yaml").read_text())
    config["model"]["z_width"] = [3]
    (edited / "config.yaml").write_text(yaml.safe_dump(config))
    (edited / rundir.CHECKPOINT).write_bytes((trained / rundir.CHECKPOINT).read_bytes())
    with pytest.raises(HvaeError, match="the checkpoint does not fit the run's model: .*shape"):
        hvae_core.load(edited)
    result = run_cli("sample", str(edited), "--out", str(tmp_path / "s.png"))
    assert result.exit_code == 1 and "does not fit the run's model" in result.stderr
    assert not (tmp_path / "s.png").exists()


def test_a_run_samples_without_its_dataset(trained, tmp_path) -> None:

    import hvae_core

    # A run whose dataset's files have gone (or moved). Sampling and loading never open the
    # data.
    moved = moved_run(trained, tmp_path)
    out, raw = tmp_path / "s.png", tmp_path / "s.npz"
    args = ("sample", str(moved), "--n", "4", "--seed", "3", "--out", str(out), "--npz", str(raw))
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    with np.load(raw) as data:
        from_cli = data["samples"]
    from_python = hvae_core.load(moved).sample(4, seed=3)
    assert from_python.shape == (4, 8, 8, 1) and from_python.dtype == np.uint8
    np.testing.assert_array_equal(from_cli, from_python)  # seeded: the same draw


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_run_samples_without_its_dataset_on_every_backend(trained, tmp_path, backend) -> None:
    moved = moved_run(trained, tmp_path)
    out = tmp_path / "s.png"
    run_hvae("sample", str(moved), "--n", "4", "--out", str(out), backend=backend)
    assert out.read_bytes().startswith(b"\x89PNG")
    script = f"import hvae_core as hvae; print(hvae.load({str(moved)!r}).sample(4).shape)"
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, KERAS_BACKEND=backend),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "(4, 8, 8, 1)"


def test_sample_never_overwrites_a_run_file_and_other_files_only_with_force(
    trained, tmp_path
) -> None:
    checkpoint, config = trained / rundir.CHECKPOINT, trained / "config.yaml"
    kept = {p: p.read_bytes() for p in (checkpoint, config)}
    base = ("sample", str(trained), "--n", "2")
    for force in ([], ["--force"]):
        result = run_cli(*base, "--out", str(checkpoint), *force)
        assert result.exit_code == 1 and "never overwrites a run's files" in result.stderr
        result = run_cli(*base, "--out", str(tmp_path / "x.png"), "--npz", str(config), *force)
        assert result.exit_code == 1 and "never overwrites a run's files" in result.stderr
    assert all(p.read_bytes() == data for p, data in kept.items())
    existing = tmp_path / "old.png"
    existing.write_bytes(b"keep me")
    result = run_cli(*base, "--out", str(existing))
    assert result.exit_code == 1 and "exists (hint: add --force" in result.stderr
    assert existing.read_bytes() == b"keep me"
    out, raw = tmp_path / "new" / "dir" / "s.png", tmp_path / "other" / "s.npz"
    result = run_cli(*base, "--out", str(existing), "--force")
    assert result.exit_code == 0 and existing.read_bytes().startswith(b"\x89PNG")
    result = run_cli(*base, "--out", str(out), "--npz", str(raw))  # folders are created
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(b"\x89PNG") and raw.stat().st_size > 0


def test_analyze_draws_the_hierarchy_figures_and_needs_data_only_for_some(
    trained, tmp_path
) -> None:
    from PIL import Image

    out = tmp_path / "analysis"
    args = ("analyze", str(trained), "--out", str(out), "--images", "48", "--temperatures")
    result = run_cli(*args, "0.5,1")
    assert result.exit_code == 0, result.output
    assert "48 images:" in result.stdout and "KL per scale (bits/dim): 1x1 " in result.stdout
    assert "active " in result.stdout and " dims in " in result.stdout
    assert "eager pass of 48 images: encoder " in result.stdout
    names = ("latent_usage.png", "top_down.png", "temperatures.png", "scale_times.png")
    assert all(Image.open(out / name).size[0] > 100 for name in names)
    again = run_cli(*args, "0.5,1")
    assert again.exit_code == 1 and "already holds an analysis" in again.stderr
    bad = run_cli(*args, "0.5,nan", "--force")
    assert bad.exit_code == 1 and "temperatures must be finite numbers >= 0" in bad.stderr
    # Without its data (the dataset's folder has gone): the samples figure only.
    moved = moved_run(trained, tmp_path)
    result = run_cli("analyze", str(moved), "--temperatures", "1")
    assert result.exit_code == 0, result.output
    assert "warning: no data" in result.stderr
    assert sorted(p.name for p in (moved / "analysis").iterdir()) == ["temperatures.png"]


def moved_run(trained: Path, tmp_path: Path) -> Path:
    """A copy of ``trained`` whose dataset's files are gone: its config names an image
    folder that does not exist."""
    import yaml

    moved = tmp_path / "moved"
    moved.mkdir()
    config = yaml.safe_load((trained / "config.yaml").read_text())
    config["data"]["dataset"] = "image-folder"
    config["dataset"] = {"path": str(tmp_path / "gone"), "image_size": 8}
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    (moved / rundir.CHECKPOINT).write_bytes((trained / rundir.CHECKPOINT).read_bytes())
    return moved


def test_a_corrupt_checkpoint_is_one_clear_line(trained, tmp_path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.yaml").write_bytes((trained / "config.yaml").read_bytes())
    data = (trained / rundir.CHECKPOINT).read_bytes()
    (copy / rundir.CHECKPOINT).write_bytes(data[: len(data) // 2])
    result = run_cli("evaluate", str(copy))
    assert result.exit_code == 1
    assert (
        result.stderr.strip().splitlines()
        == [
            f"error: checkpoint {copy / rundir.CHECKPOINT} is truncated or corrupt "
            "(SafetensorError) (hint: resume from an intact copy or start a new run)"
        ]
        or "is truncated or corrupt" in result.stderr
    )


def test_resume_refuses_another_model_config(trained) -> None:
    result = run_cli("train", "--resume", str(trained), "--set", "model.z_width=3")
    assert result.exit_code == 1
    assert "was trained with another model or data config (differs in model.z_width)" in (
        result.stderr
    )


# Run directories of older hvae versions: slow (a whole training and resume), so `-m slow`.
@pytest.mark.slow
def test_an_old_run_resumes_on_the_bits_scale_and_a_new_run_uses_nats(tmp_path) -> None:
    trainer = train_run(tmp_path, "old", epochs=1)
    trainer.fit()
    assert rundir.read_metrics(trainer.run_dir)[0]["grad_norm_unit"] == "nats"
    # What a run directory written before grad_norm_unit existed looks like.
    path = trainer.run_dir / "config.yaml"
    text = path.read_text()
    assert "grad_norm_unit: nats\n" in text
    path.write_text(text.replace("  grad_norm_unit: nats\n", ""))
    result = run_cli("train", "--resume", str(trainer.run_dir), "--epochs", "2", "--quiet")
    assert result.exit_code == 0, result.output
    rows = rundir.read_metrics(trainer.run_dir)
    assert [r["grad_norm_unit"] for r in rows] == ["nats", "bits"]
    assert "grad_norm_unit: bits\n" in path.read_text()  # recorded from now on
    assert "max |g|" in result.stderr and "(bits)" in result.stderr


def test_no_save_trains_and_reports_but_writes_nothing(tmp_path) -> None:
    save_dir = tmp_path / "runs"
    result = run_cli(
        *("train", "--config", "tiny", "--epochs", "1", "--no-save", "--quiet"),
        *("--save-dir", str(save_dir), "--set", "run.jit=false", "--set", "training.batch_size=64"),
    )
    assert result.exit_code == 0, result.output
    assert "nothing saved (run.save)" in result.stderr
    assert result.stdout.startswith("done: nothing saved (epoch 1, val ")
    assert "epoch 1: train " in result.stderr
    assert not save_dir.exists() and list(tmp_path.iterdir()) == []


def test_resume_with_no_save_is_refused(trained) -> None:
    result = run_cli("train", "--resume", str(trained), "--no-save")
    assert result.exit_code == 2
    assert "run.save is false, but --resume continues a run directory" in result.stderr


def test_a_locked_run_stops_with_a_clear_message(tmp_path) -> None:
    trainer = train_run(
        tmp_path, "locked", "training.gradient_skipnorm=1e-9", "training.max_consecutive_skips=3"
    )
    from hvae_core.errors import HvaeError

    with pytest.raises(HvaeError, match="3 updates in a row were skipped"):
        trainer.fit()
    _, meta = rundir.load_checkpoint(trainer.run_dir / rundir.CHECKPOINT)
    # Checkpointed where it stopped: the third skip is seen while the fourth step is already
    # queued (metrics are read one step behind), and the checkpoint counts that step too.
    assert meta["position"]["batch"] == 4
    assert meta["position"]["sums"]["skipped"] == 4


def test_a_new_run_never_reuses_a_directory(tmp_path) -> None:
    first = rundir.create_run_dir(tmp_path, "digits")
    second = rundir.create_run_dir(tmp_path, "digits")
    assert first != second and first.is_dir() and second.is_dir()


def test_sigkill_mid_epoch_resumes_from_the_last_checkpoint(tmp_path) -> None:
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    args = [
        sys.executable,
        "-m",
        "hvae_core",
        "train",
        "--config",
        "tiny",
        "--epochs",
        "1",
        "--save-dir",
        str(tmp_path),
        "--quiet",
        "--batch-size",
        "32",
        "--set",
        "run.jit=false",
        "--set",
        "training.checkpoint_minutes=0.001",
    ]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            found = list(tmp_path.glob(f"*/{rundir.CHECKPOINT}"))
            if found:
                _, meta = rundir.load_checkpoint(found[0])
                if meta["position"]["batch"] > 5 and meta["position"]["epoch"] == 0:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("no mid-epoch checkpoint appeared")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert not (run_dir / rundir.METRICS).exists() or not rundir.read_metrics(run_dir)
    done = subprocess.run(
        [sys.executable, "-m", "hvae_core", "train", "--resume", str(run_dir), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = rundir.read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1]
    assert rows[-1]["step"] == 1497 // 32


# JAX, the default backend, learns in tests/test_startup_noise.py's default job.
@pytest.mark.parametrize("backend", [pytest.param("jax", marks=pytest.mark.slow), "torch"])
def test_other_backends_train_and_learn(backend, tmp_path) -> None:
    pytest.importorskip(backend)
    done = run_hvae(
        *("train", "--config", "tiny", "--epochs", "2", "--batch-size", "64", "--quiet"),
        *("--save-dir", str(tmp_path), "--set", "training.batch_size_div=2"),
        backend=backend,
    )
    [run_dir] = list(tmp_path.iterdir())
    rows = rundir.read_metrics(run_dir)
    assert rows[1]["train_bpd"] < rows[0]["train_bpd"]
    assert all(np.isfinite(r["val_bpd"]) for r in rows)
    assert f"backend {backend}" in done.stderr


def test_checkpoints_round_trip_every_shape(tmp_path) -> None:
    # Regression: scalars (the optimizer's step counter) came back as 1-d arrays.
    arrays = {
        "scalar": np.array(7, np.int64),
        "matrix": np.arange(6.0).reshape(2, 3),
        "strided": np.arange(10.0)[::2],
    }
    path = tmp_path / "c.safetensors"
    # Metadata as the trainer writes it: the schema refuses anything less.
    position = {"epoch": 3, "batch": 0, "step": 69, "consecutive_skips": 0, "best_val": None}
    position.update(bad_epochs=0, epoch_seconds=0.0, sums={})
    written = {"position": position, "num_bits": 4, "image_shape": [8, 8, 1]}
    rundir.save_checkpoint(path, arrays, written)
    loaded, meta = rundir.load_checkpoint(path)
    assert meta == written
    for key, value in arrays.items():
        assert loaded[key].shape == value.shape
        np.testing.assert_array_equal(loaded[key], value)
    assert not list(tmp_path.glob(".*.tmp"))


def test_early_stopping_ends_a_run_without_improvement(tmp_path) -> None:
    # A learning rate of ~0 cannot improve val: patience 1 stops after epoch 2 of 5.
    trainer = train_run(
        tmp_path,
        "early",
        "training.early_stopping=1",
        "training.scheduler=constant",
        "training.learning_rate=1e-12",
        "training.weight_decay=0",
        epochs=5,
    )
    rows = trainer.fit()
    assert 2 <= len(rows) < 5
    assert rows[-1]["val_bpd"] >= min(r["val_bpd"] for r in rows[:-1])


def test_ctrl_c_mid_epoch_checkpoints_where_it_stopped_and_exits_130(tmp_path, monkeypatch):
    from hvae_core.errors import Interrupted

    trainer = train_run(tmp_path, "ctrl-c")
    step, done = trainer.engine.dispatch_step, []

    def three_steps_then_ctrl_c(*args, **kwargs):
        if len(done) == 3:
            raise KeyboardInterrupt
        done.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.engine, "dispatch_step", three_steps_then_ctrl_c)
    with pytest.raises(Interrupted) as err:
        trainer.fit()
    assert err.value.exit_code == 130
    assert f"hvae train --resume {trainer.run_dir}" in err.value.hint
    _, meta = rundir.load_checkpoint(trainer.run_dir / rundir.CHECKPOINT)
    assert (meta["position"]["step"], meta["position"]["batch"]) == (3, 3)


def test_out_of_memory_is_one_clear_line(tmp_path, monkeypatch) -> None:
    trainer = train_run(tmp_path, "oom")

    class ResourceExhaustedError(Exception):  # the name TensorFlow's error has
        pass

    def explode(*args, **kwargs):
        raise ResourceExhaustedError("Out of memory while trying to allocate 36.42GiB.")

    monkeypatch.setattr(trainer.engine, "dispatch_step", explode)
    from hvae_core.errors import HvaeError

    with pytest.raises(HvaeError) as err:
        trainer.fit()
    assert "out of memory in the train step at batch size 64" in err.value.one_line()
    assert "batch_size_div" in err.value.hint
    monkeypatch.setattr(
        trainer.engine,
        "dispatch_step",
        lambda *args, **kwargs: (_ for _ in ()).throw(ValueError("a bug")),
    )
    with pytest.raises(ValueError, match="a bug"):  # other errors are not disguised
        trainer.fit()


def test_between_epochs_only_what_is_due_is_written(tmp_path, monkeypatch, capsys) -> None:
    # Images, plots and checkpoints on their minute cadences; after the last epoch, all. The
    # run also feeds three experiment trackers: a test double with the exact signatures of
    # the Tracker protocol, one that fails, and TensorBoard (read back by TensorBoard).
    registry = get_registry()
    calls, made, failing = [], [], []
    with (
        temporary_plugin(registry, "tracker", "strict", factory_for(calls, made)),
        temporary_plugin(registry, "tracker", "failing", factory_for(failing, [], FailingTracker)),
    ):
        trainer = train_run(
            tmp_path,
            "cadence",
            "training.batch_size=512",
            "run.images_minutes=60",
            "training.checkpoint_minutes=60",
            "run.trackers=[strict, failing, tensorboard]",
            epochs=3,
        )
        counted = {"images": [], "checkpoints": []}
        write_images, save_checkpoint = trainer.write_images, rundir.save_checkpoint

        def counted_images() -> None:
            counted["images"].append(trainer.position.epoch)
            write_images()

        def counted_checkpoint(path, state, meta) -> None:
            counted["checkpoints"].append(meta["position"]["epoch"])
            save_checkpoint(path, state, meta)

        monkeypatch.setattr(trainer, "write_images", counted_images)
        monkeypatch.setattr(rundir, "save_checkpoint", counted_checkpoint)
        rows = trainer.fit()
        assert [r["epoch"] for r in rows] == [1, 2, 3]  # metrics.jsonl has every epoch
        assert counted == {"images": [3], "checkpoints": [3]}
        assert {"samples.png", "reconstructions.png", "loss.png"} <= {
            p.name for p in trainer.run_dir.iterdir()
        }
        # A cadence of 0 minutes: every epoch.
        assert trainer._due(time.monotonic(), 0.0) and not trainer._due(time.monotonic(), 60.0)

        # The trackers: made once, on the run directory; started with the resolved config;
        # a row and the images written (none before the last epoch) after every epoch.
        [(options, run_config, run_dir)] = made
        assert run_config is trainer.config.run and run_dir == trainer.run_dir
        assert [name for name, _ in calls] == ["start", *["log_epoch"] * 3, "close"]
        assert calls[0][1] == (trainer.config.to_dict(), 1)
        logged = [args for name, args in calls if name == "log_epoch"]
        assert [row["epoch"] for row, _ in logged] == [-1, -1, -1]  # the double's own copies
        for epoch, (row, _) in enumerate(logged, 1):
            assert row | {"epoch": epoch} == rows[epoch - 1]
        assert [images for _, images in logged[:2]] == [{}, {}]
        images = logged[2][1]
        assert set(images) == {"samples", "reconstructions"}
        for name, grid in images.items():
            assert grid.dtype == np.uint8 and not grid.flags.writeable
            saved = np.asarray(Image.open(trainer.run_dir / f"{name}.png"))
            np.testing.assert_array_equal(grid[..., 0], saved)  # digits: one channel
        # A tracker that raises costs its own records only: one warning, then it is left out.
        warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        assert warnings == [
            "warning: tracker 'failing' (tests) failed in log_epoch: RuntimeError: the server "
            "is down (details); it is off for the rest of this run (metrics.jsonl has every "
            "epoch)"
        ]
        assert [name for name, _ in failing] == ["start", "log_epoch"]
        reader = events(trainer.run_dir / "tensorboard")
        assert scalars(reader, "val_bpd") == pytest.approx({r["epoch"]: r["val_bpd"] for r in rows})
        assert [event.step for event in reader.Images("samples")] == [3]

        # The next session (as `--resume` of the finished run) starts from epoch 4.
        calls.clear()
        trainer.fit()
        assert calls == [("start", (trainer.config.to_dict(), 4)), ("close", ())]


FIGURES_SCRIPT = """
import keras
import numpy as np
import hvae_core
from hvae_core.config import resolve_config
from hvae_core.run import RunDirectory
from hvae_core.training.trainer import Trainer
from pathlib import Path

backend = keras.backend.backend()
cfg = resolve_config("tiny", {"epochs": 1}, ["run.jit=true", "training.batch_size=64"])
folder = Path(inputs["dir"].item())
folder.mkdir()
run = RunDirectory(folder)
run.write_config(cfg)
trainer = Trainer(cfg, run, quiet=True)
trainer.fit()
# How the figures' passes run: compiled on TensorFlow, without autograd on torch.
state = {}


def probe(eps):
    if backend == "tensorflow":
        import tensorflow as tf
        state["eager"] = tf.executing_eagerly()
    if backend == "torch":
        import torch
        state["grad"] = torch.is_grad_enabled()
    return trainer.model.generate(2, noise=list(eps), output_temperature=0.0)


eps = [np.zeros(s, "float32") for s in trainer.model.noise_shapes(2).latents]
trainer.with_ema(lambda: trainer.engine.run_compiled(("probe",), probe, eps))
outputs["eager"] = state.get("eager", False)
outputs["grad"] = state.get("grad", False)
outputs["trainer_samples"] = trainer.sample(6, 0.8, seed=3)
originals = trainer.val[:8]
outputs["trainer_recon"] = trainer.with_ema(
    lambda: trainer.inference().reconstruct(originals, seed=4)
)
loaded = hvae_core.load(trainer.run_dir)
outputs["loaded_samples"] = loaded.sample(6, 0.8, seed=3)
outputs["loaded_recon"] = loaded.reconstruct(originals, seed=4)
"""


@pytest.mark.parametrize("backend", ["jax", "tensorflow", "torch"])
def test_the_training_figures_are_what_a_loaded_run_draws(backend, tmp_path) -> None:
    # One inference path: the trainer's samples and reconstructions (EMA weights, live
    # state) go through the runner hvae_core.load uses, so for the same noise they are
    # the loaded run's, exactly; on TensorFlow compiled, on torch without autograd.
    inputs = {"dir": np.array(str(tmp_path / "run"))}
    out = run_on_backend(backend, FIGURES_SCRIPT, inputs, tmp_path)
    assert not out["eager"] and not out["grad"]
    np.testing.assert_array_equal(out["trainer_samples"], out["loaded_samples"])
    np.testing.assert_array_equal(out["trainer_recon"], out["loaded_recon"])
    assert len({s.tobytes() for s in out["trainer_samples"]}) > 1


OLD_RUN = Path(__file__).parent / "data" / "run_before_noise_input"


def test_a_run_written_while_the_model_drew_its_own_noise_loads_and_resumes(tmp_path) -> None:
    # A tiny run checkpointed at step 6 by hvae d9a40b8, whose model kept a seed state per
    # latent layer and one for pixel sampling (uint32 arrays among its weights): the weights
    # load without them, and the run continues from its position.
    import shutil

    import hvae_core
    from hvae_core.model.weights import is_noise_seed_array

    run = tmp_path / "old"
    shutil.copytree(OLD_RUN, run)
    arrays, meta = rundir.load_checkpoint(run / rundir.CHECKPOINT)
    seeds = [k for k in arrays if k.startswith("model/") and is_noise_seed_array(arrays[k])]
    assert len(seeds) == 5  # four latent layers and the pixel sampler
    weights = [arrays[k] for k in sorted(arrays) if k.startswith("model/") and k not in seeds]

    loaded = hvae_core.load(run)
    assert len(loaded.model.variables) == len(weights)
    assert loaded.sample(2, seed=0).shape == (2, 8, 8, 1)

    cfg = resolve_config(run / "config.yaml", overrides=["training.epochs=1"])
    from hvae_core.run import RunDirectory

    directory = RunDirectory.open(run)
    trainer = Trainer(cfg, directory, quiet=True)
    trainer.restore(directory.read_checkpoint())
    assert trainer.position.step == meta["position"]["step"] == 6
    trainer.engine.sync()
    for variable, saved in zip(trainer.model.variables, weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable.value), saved)
    step = trainer.engine.train_step(trainer.val[:64], 1.0, step=trainer.position.step)
    assert math.isfinite(step["loss"])
    trainer.save()  # written in today's layout: no seed arrays any more
    again, _ = rundir.load_checkpoint(run / rundir.CHECKPOINT)
    assert sum(k.startswith("model/") for k in again) == len(weights)
