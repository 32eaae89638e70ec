"""The plugin contracts of hvae_core.interfaces, as a third party reads them: the core calls every
factory exactly as its contract says, a plugin cannot overwrite the core's metrics, and what a
plugin's factory raises names the plugin."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass

import keras
import numpy as np
import pytest
from backends import run_on_backend
from click.testing import CliRunner
from conftest import FIRST_PARTY_ENTRY_POINTS, ROOT
from keras import ops

import hvae_core
from hvae_core import api
from hvae_core.api import LayerStats, ModelOutputs
from hvae_core.cli import cli
from hvae_core.config import MULTI_SELECTOR, PLUGIN_SECTION, SELECTOR, resolve_config
from hvae_core.data import InMemoryDataset, open_dataset
from hvae_core.errors import HvaeError, PluginError
from hvae_core.hookspecs import HOOK_FOR_KIND, KINDS
from hvae_core.interfaces import CORE_METRICS
from hvae_core.model.blocks import ResidualBlock
from hvae_core.model.hvae import HVAE
from hvae_core.plugins import get_registry, load_registry
from hvae_core.testing import temporary_plugin
from hvae_core.training.trainer import Trainer

# --- strict doubles: each signature is exactly its contract's (no defaults, no **kwargs) ------

calls: collections.Counter[str] = collections.Counter()


def strict_block(
    options,
    model,
    *,
    in_width,
    middle_width,
    out_width,
    kernel_size,
    residual,
    last_scale,
    name,
    dtype,
):
    calls["block"] += 1
    return ResidualBlock(
        in_width,
        middle_width,
        out_width,
        kernel_size=kernel_size,
        residual=residual,
        last_scale=last_scale,
        name=name,
        dtype=dtype,
    )


class ScaleFlow(keras.layers.Layer):
    """z_K = z_0 exp(a): log|det| = a times the latent's size."""

    context_width = 0

    def build(self, z0_shape, context_shape=None):
        self.a = self.add_weight(shape=(), initializer="zeros", name="a")

    def call(self, z0, context, training=False):
        size = ops.cast(ops.prod(ops.shape(z0)[1:]), z0.dtype)
        return z0 * ops.exp(self.a), ops.ones((ops.shape(z0)[0],), z0.dtype) * self.a * size


def strict_flow(options, model, *, scale, resolution, z_width, name):
    calls["flow"] += 1
    return ScaleFlow(name=name)


class StrictAttention(keras.layers.Layer):
    """Adds a block of its own (zero at first) to every read, through the model's make_block."""

    def __init__(self, widths, make_block, **kwargs):
        super().__init__(**kwargs)
        self.blocks = {
            r: make_block(
                in_width=w,
                middle_width=w,
                out_width=w,
                kernel_size=1,
                residual=False,
                last_scale=0.0,
                name=f"attention_{r}",
            )
            for r, w in widths.items()
        }

    def encode(self, activations):
        return ()

    def prepare(self, state, memory, *, block, resolution):
        return memory

    def read(self, state, memory, *, block, resolution, branch):
        calls["attention read"] += 1
        return self.blocks[resolution](state)

    def update(self, state, memory, *, block, resolution):
        return memory


def strict_attention(options, model, *, widths, make_block):
    calls["attention"] += 1
    return StrictAttention(widths, make_block)


class StrictRegularizer:
    def transform_batch(self, images, rng):
        calls["transform_batch"] += 1
        return images

    def loss_terms(self, outputs, images):
        calls["loss_terms"] += 1
        return {"strict_term": ops.mean(outputs.layers[0].kl) * 0.0}


def strict_regularizer(options, training):
    calls["regularizer"] += 1
    return StrictRegularizer()


def strict_dataset(options, data):
    calls["dataset"] += 1
    rng = np.random.default_rng(0)
    splits = {
        s: rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
        for s, n in [("train", 16), ("val", 8)]
    }
    return InMemoryDataset(splits, num_bits=8)


def strict_lr_schedule(options, training, steps_per_epoch):
    calls["lr-schedule"] += 1
    return 1e-3


def strict_beta_schedule(options, training, steps_per_epoch):
    calls["beta-schedule"] += 1

    def beta(step):
        return 1.0

    return beta


STRICT = {
    "block": strict_block,
    "flow": strict_flow,
    "attention": strict_attention,
    "regularizer": strict_regularizer,
    "dataset": strict_dataset,
    "lr-schedule": strict_lr_schedule,
    "beta-schedule": strict_beta_schedule,
}


def test_the_doubles_have_no_defaults_and_no_catch_alls() -> None:
    for factory in STRICT.values():
        for p in inspect.signature(factory).parameters.values():
            assert p.default is inspect.Parameter.empty, (factory.__name__, p.name)
            assert p.kind is not inspect.Parameter.VAR_KEYWORD, factory.__name__


@pytest.fixture(scope="module")
def strict_trainer() -> Iterator[Trainer]:
    """A run's set-up (no training: a compiled step costs seconds) with every kind a double."""
    registry = load_registry(allow=set(FIRST_PARTY_ENTRY_POINTS.split(",")))
    calls.clear()
    with contextlib.ExitStack() as stack:
        for kind, factory in STRICT.items():
            info = {"image_size": 8} if kind == "dataset" else {}
            stack.enter_context(temporary_plugin(registry, kind, "strict", factory, **info))
        choices = [f"{section}.{key}=strict" for section, key in SELECTOR.values()]
        cfg = resolve_config(
            "tiny", overrides=["run.jit=false", "run.save=false", *choices], registry=registry
        )
        yield Trainer(cfg, quiet=True, registry=registry)


def test_the_core_calls_every_kind_exactly_as_its_contract_says(strict_trainer) -> None:
    model = strict_trainer.model
    assert set(STRICT) <= set(calls)
    assert calls["flow"] == model.num_latent_layers
    x = np.zeros((2, 8, 8, 1), "float32")
    reads = calls["attention read"]
    terms = model.losses_for(x, training=True, regularizer=strict_trainer.regularizer)
    assert calls["attention read"] - reads == 2 * model.num_latent_layers  # prior, posterior
    assert calls["loss_terms"] == 1
    assert "kl_flow_bpd" in terms and "strict_term" in terms
    assert set(terms) - {"strict_term"} <= CORE_METRICS


# --- what a regularizer receives: ModelOutputs, field by field as documented ----------------


class DocumentedFieldsRegularizer:
    """A third party's regularizer, written against ModelOutputs' documented fields only."""

    def __init__(self):
        self.seen: list[tuple[ModelOutputs, object]] = []

    def transform_batch(self, images, rng):
        return images

    def loss_terms(self, outputs: ModelOutputs, images):
        self.seen.append((outputs, images))
        # Nats per image, as the contract asks: logged in bits per dimension, like kl_bpd.
        return {"layers_kl": ops.mean(sum(layer.kl for layer in outputs.layers))}


def np_log_normal(z, mean, scale) -> np.ndarray:
    """Oracle in float64: log N(z; mean, scale^2) summed over all but the batch axis."""
    z, mean, scale = (np.asarray(ops.convert_to_numpy(t), np.float64) for t in (z, mean, scale))
    log_p = -0.5 * ((z - mean) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi)
    return log_p.reshape(len(z), -1).sum(axis=1)


def test_a_regularizer_gets_the_documented_outputs(strict_trainer) -> None:
    model = strict_trainer.model
    flows = [block.flow for block in model.decoder.blocks]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 8, 8, 1)).astype("float32") / 127.5 - 1.0
    reg = DocumentedFieldsRegularizer()
    initial = [w.numpy() for w in model.trainable_weights]
    # Weights away from their initialisation (there the posterior and the prior nearly agree),
    # and a flow that moves z: latents are z_K, q is its base q_0.
    for w in model.trainable_weights:
        w.assign(w + rng.normal(0.0, 0.2, w.shape).astype("float32"))
    for flow in flows:
        flow.a.assign(0.3)
    try:
        terms = model.losses_for(x, training=True, regularizer=reg)
    finally:
        for w, value in zip(model.trainable_weights, initial, strict=True):
            w.assign(value)
    [(outputs, images)] = reg.seen
    assert isinstance(outputs, ModelOutputs) and images is x
    mixtures = strict_trainer.config.model.num_output_mixtures
    assert tuple(outputs.params.shape) == (3, 8, 8, 3 * mixtures)  # C = 1: P = 3 M
    assert len(outputs.latents) == len(outputs.layers) == model.num_latent_layers
    for block, z, layer in zip(model.decoder.blocks, outputs.latents, outputs.layers, strict=True):
        r, width = block.scale.resolution, block.scale.z_width
        assert isinstance(layer, LayerStats)
        for name in ("q_mean", "q_scale", "p_mean", "p_scale"):
            assert tuple(getattr(layer, name).shape) == (3, r, r, width), name
        assert tuple(z.shape) == (3, r, r, width) and tuple(layer.kl.shape) == (3,)
        # The flow's one-sample KL: log N(z_0; q) - log|det| - log N(z_K; p), z_0 = z_K e^-a.
        z0 = ops.convert_to_numpy(z) * np.exp(-0.3)
        log_det = 0.3 * r * r * width
        oracle = (
            np_log_normal(z0, layer.q_mean, layer.q_scale)
            - log_det
            - np_log_normal(z, layer.p_mean, layer.p_scale)
        )
        np.testing.assert_allclose(ops.convert_to_numpy(layer.kl), oracle, rtol=1e-4, atol=1e-3)
    # Nats per image in, bits per dimension out: the sum of the layers' KL is the KL term.
    assert float(terms["layers_kl"]) == pytest.approx(float(terms["kl_bpd"]), rel=1e-6)
    loss = terms["recon_bpd"] + terms["kl_bpd"] + terms["layers_kl"]
    assert float(terms["loss"]) == pytest.approx(float(loss), rel=1e-6)


def test_the_outputs_are_immutable(strict_trainer) -> None:
    reg = DocumentedFieldsRegularizer()
    strict_trainer.model.losses_for(np.zeros((2, 8, 8, 1), "float32"), regularizer=reg)
    [(outputs, _)] = reg.seen
    with pytest.raises(dataclasses.FrozenInstanceError):
        outputs.layers[0].kl = None
    assert isinstance(outputs.latents, tuple) and isinstance(outputs.layers, tuple)


COMPILED_STEP = """
from keras import ops
from hvae_core.api import gaussian_kl, sum_per_example
from hvae_core.config import resolve_config
from hvae_core.model.hvae import HVAE
from hvae_core.plugins import get_registry
from hvae_core.backends.engine import make_engine
from hvae_core.training.optim import make_optimizer

class DocumentedFields:
    def transform_batch(self, images, rng):
        return images

    def loss_terms(self, outputs, images):
        layers = outputs.layers
        closed = sum(
            sum_per_example(gaussian_kl(q.q_mean, q.q_scale, q.p_mean, q.p_scale)) for q in layers
        )
        return {
            "layers_kl": ops.mean(sum(layer.kl for layer in layers)),
            "closed_kl": ops.mean(closed),
            "latents": 0.0 * ops.mean(sum(ops.mean(z) for z in outputs.latents)),
        }

cfg = resolve_config("tiny", overrides=["training.batch_size=8", "run.jit=true"])
model = HVAE(cfg, (8, 8, 1), 8, seed=0)
model.build_weights()
engine = make_engine(model, make_optimizer(cfg, 10, get_registry()), cfg, DocumentedFields())
steps = [engine.train_step(inputs["images"], 1.0) for _ in range(2)]
for key in ("layers_kl", "closed_kl", "kl_bpd", "latents"):
    outputs[key] = np.array([s[key] for s in steps])
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_the_outputs_reach_a_regularizer_in_each_backends_compiled_step(backend, tmp_path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
    out = run_on_backend(backend, COMPILED_STEP, {"images": images}, tmp_path)
    assert np.all(out["kl_bpd"] > 0.0) and out["kl_bpd"][0] != out["kl_bpd"][1]
    np.testing.assert_allclose(out["layers_kl"], out["kl_bpd"], rtol=1e-5)
    np.testing.assert_allclose(out["closed_kl"], out["kl_bpd"], rtol=1e-4)
    assert np.all(out["latents"] == 0.0)


# --- a regularizer cannot overwrite a core metric --------------------------------------------


class ClashingRegularizer:
    def transform_batch(self, images, rng):
        return images

    def loss_terms(self, outputs, images):
        return {"kl_bpd": ops.mean(outputs.layers[0].kl)}


def test_a_regularizer_term_named_like_a_core_metric_is_an_error_naming_the_plugin(
    strict_trainer,
) -> None:
    x = np.zeros((2, 8, 8, 1), "float32")
    with pytest.raises(PluginError) as err:
        strict_trainer.model.losses_for(x, regularizer=ClashingRegularizer())
    line = err.value.one_line()
    assert line.startswith(
        "regularizer 'strict' from package tests returns the loss term 'kl_bpd', which is the "
        "name of a core metric"
    )


def raise_plugin_error(x):
    raise PluginError("from traced code", hint="keep me")


def test_an_hvae_error_leaves_a_traced_tensorflow_function_as_it_is() -> None:
    # Autograph (TensorFlow's data-parallel step) would turn it into a multi-line StagingError.
    import tensorflow as tf

    with pytest.raises(PluginError) as err:
        tf.function(raise_plugin_error, autograph=True)(tf.constant(1.0))
    assert err.value.one_line() == "from traced code (hint: keep me)"


def test_an_epochs_row_is_its_steps_means_in_the_declared_order() -> None:
    """The row of metrics.jsonl from an epoch's steps, against sums done by hand."""
    from hvae_core.interfaces import ROW_KEYS
    from hvae_core.training.metrics import accumulate, epoch_row

    nan, inf = float("nan"), float("inf")
    steps = [
        dict(loss=1.0, elbo_bpd=2.0, recon_bpd=1.5, kl_bpd=0.5, grad_norm=3.0, skipped=0, cr=0.25),
        dict(loss=3.0, elbo_bpd=4.0, recon_bpd=3.0, kl_bpd=1.0, grad_norm=5.0, skipped=1, cr=0.75),
        # A step that diverged: counted as skipped, its norm not in the mean.
        dict(loss=nan, elbo_bpd=nan, recon_bpd=nan, kl_bpd=nan, grad_norm=inf, skipped=1, cr=9.0),
    ]
    sums: dict = {}
    for step in steps:
        accumulate(sums, step)
    val = {"elbo_bpd": 1.25, "kl_bpd": 0.5, "recon_bpd": 0.75, "kl_scales_bpd": {1: 0.5}}
    row = epoch_row(
        sums, val, epoch=3, step=30, lr=1e-3, beta=0.5, grad_norm_unit="bits", seconds=2.0
    )
    assert tuple(row) == (*ROW_KEYS, "cr")
    assert (row["epoch"], row["step"], row["lr"], row["beta"]) == (3, 30, 1e-3, 0.5)
    assert (row["train_bpd"], row["recon_bpd"], row["kl_bpd"]) == (3.0, 2.25, 0.75)
    assert (row["val_bpd"], row["val_kl_scales_bpd"]) == (1.25, {"1": 0.5})
    assert (row["grad_norm_max"], row["grad_norm_mean"]) == (5.0, 4.0)
    assert row["skipped_updates"] == 2 and row["cr"] == 0.5
    assert "loss" not in row and "count" not in row


# --- what a factory raises names its plugin -------------------------------------------------


def broken_block(
    options,
    model,
    *,
    in_width,
    middle_width,
    out_width,
    kernel_size,
    residual,
    last_scale,
    name,
    dtype,
):
    raise ValueError("middle_width must be even")


def test_an_error_in_a_factory_names_the_plugin_and_keeps_the_cause() -> None:
    registry = get_registry()
    with temporary_plugin(registry, "block", "broken", broken_block, package="broken-blocks"):
        cfg = resolve_config("tiny", overrides=["model.block=broken"])
        with pytest.raises(PluginError) as err:
            HVAE(cfg, (8, 8, 1), 8, seed=0)
    line = err.value.one_line()
    assert line.startswith(
        "block 'broken' from package broken-blocks failed: ValueError: middle_width must be even"
    )
    assert "--debug" in line
    assert isinstance(err.value.__cause__, ValueError)


@dataclass
class FussyOptions:
    size: int = hvae_core.option(3, "a size")

    def validate(self, section):
        if self.size % 2:
            raise ValueError(f"{section}.size must be even")


def test_an_error_in_a_plugins_options_class_names_the_plugin() -> None:
    registry = get_registry()
    with temporary_plugin(
        registry, "flow", "fussy", strict_flow, options=FussyOptions, package="fussy"
    ):
        with pytest.raises(PluginError) as err:
            resolve_config(flags={"flow": "fussy"})
        assert resolve_config(flags={"flow": "fussy"}, overrides=["flow.size=4"])
    assert err.value.one_line().startswith(
        "flow 'fussy' from package fussy (options) failed: ValueError: flow.size must be even"
    )


def test_an_hvae_error_from_a_plugin_keeps_its_own_message() -> None:
    def dataset(options, data):
        raise HvaeError("images.npy does not exist", hint="save your images there")

    registry = get_registry()
    with temporary_plugin(registry, "dataset", "own-error", dataset, image_size=8):
        cfg = resolve_config(overrides=["data.dataset=own-error"])
        with pytest.raises(HvaeError) as err:
            open_dataset(cfg)
    assert err.value.one_line() == "images.npy does not exist (hint: save your images there)"


def test_the_cli_prints_one_line_and_with_debug_the_traceback(monkeypatch) -> None:
    def dataset(options, data):
        raise TypeError("__init__() got an unexpected keyword argument 'root'")

    registry = get_registry()
    args = ["train", "--dataset", "bad-data", "--no-save", "--set", "run.jit=false"]
    with temporary_plugin(
        registry, "dataset", "bad-data", dataset, package="bad-pkg", image_size=8
    ):
        plain = CliRunner().invoke(cli, args)
        debug = CliRunner().invoke(cli, ["--debug", *args])
        monkeypatch.setenv("HVAE_DEBUG", "1")
        env = CliRunner().invoke(cli, args)
    [line] = plain.stderr.strip().splitlines()
    assert line.startswith("error: dataset 'bad-data' from package bad-pkg failed: TypeError:")
    assert plain.exit_code == 2 and "Traceback" not in plain.output
    for result in (debug, env):
        assert result.exit_code == 2
        assert "Traceback" in result.stderr
        assert "unexpected keyword argument 'root'" in result.stderr
        assert "in dataset" in result.stderr  # the plugin's own frame
        assert result.stderr.strip().splitlines()[-1] == line


# --- the README's plugin contract says what the code does ------------------------------------


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def table_rows(section: str, first_cell: str, second_cell: str = ".*") -> dict[str, list[str]]:
    """The rows of the README's tables whose first two cells match these patterns, by their
    first cell."""
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if (
            line.startswith("| `")
            and re.fullmatch(first_cell, cells[0])
            and re.fullmatch(second_cell, cells[1])
        ):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_the_readme_says_how_every_kind_is_chosen() -> None:
    choose = table_rows(readme_section("Writing a plugin"), r"`[a-z-]+`", r"`register_\w+`")
    assert sorted(choose) == sorted(KINDS)
    defaults = resolve_config()
    for kind, (hook, flags, key, default, section) in choose.items():
        assert hook == f"`{HOOK_FOR_KIND[kind]}`", kind
        selector = SELECTOR.get(kind) or MULTI_SELECTOR[kind]
        assert key.startswith(f"`{'.'.join(selector)}`"), kind
        if kind in SELECTOR:
            assert f"`--use {kind}=NAME`" in flags, kind
            assert default == f"`{defaults.selected(kind)}`" or (
                default == "none" and defaults.selected(kind) is None
            ), kind
        nested = ".NAME" if kind in MULTI_SELECTOR else ""
        assert section == f"`{PLUGIN_SECTION[kind]}{nested}`", kind


def test_the_readme_documents_the_public_names_and_every_outputs_field() -> None:
    section = readme_section("Writing a plugin")
    imports = section[section.index("**What a plugin may import.**") :]
    imports = imports[: imports.index("\n\n")]
    assert [n for n in api.__all__ if f"`{n}`" not in imports] == []
    fields = table_rows(section, r"`outputs\..*")
    documented = " ".join(fields)
    for name in (f.name for f in dataclasses.fields(ModelOutputs)):
        assert f"outputs.{name}" in documented, name
    for name in (f.name for f in dataclasses.fields(LayerStats)):
        assert re.search(rf"\.{name}\b", documented), name
