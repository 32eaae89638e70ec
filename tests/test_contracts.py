"""The plugin contracts of hvae_core.interfaces, as a third party reads them: the core calls every
factory exactly as its contract says, a plugin cannot overwrite the core's metrics, and what a
plugin's factory raises names the plugin."""

from __future__ import annotations

import collections
import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIRST_PARTY_ENTRY_POINTS
from keras import ops

import hvae_core
from hvae_core.cli import cli
from hvae_core.config import SELECTOR, resolve_config
from hvae_core.data import InMemoryDataset, open_dataset
from hvae_core.errors import HvaeError, PluginError
from hvae_core.interfaces import CORE_METRICS
from hvae_core.model.blocks import ResidualBlock
from hvae_core.model.hvae import HVAE
from hvae_core.plugins import get_registry, load_registry
from hvae_core.training.engine import METRIC_KEYS
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
        return {"strict_term": ops.mean(outputs["stats"][0]["kl"]) * 0.0}


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
            stack.enter_context(registry.temporary(kind, "strict", factory, **info))
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


# --- a regularizer cannot overwrite a core metric --------------------------------------------


class ClashingRegularizer:
    def transform_batch(self, images, rng):
        return images

    def loss_terms(self, outputs, images):
        return {"kl_bpd": ops.mean(outputs["stats"][0]["kl"])}


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


def test_the_engines_metrics_are_core_metrics() -> None:
    assert set(METRIC_KEYS) <= CORE_METRICS


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
    with registry.temporary("block", "broken", broken_block, package="broken-blocks"):
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
    with registry.temporary("flow", "fussy", strict_flow, options=FussyOptions, package="fussy"):
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
    with registry.temporary("dataset", "own-error", dataset, image_size=8):
        cfg = resolve_config(overrides=["data.dataset=own-error"])
        with pytest.raises(HvaeError) as err:
            open_dataset(cfg)
    assert err.value.one_line() == "images.npy does not exist (hint: save your images there)"


def test_the_cli_prints_one_line_and_with_debug_the_traceback(monkeypatch) -> None:
    def dataset(options, data):
        raise TypeError("__init__() got an unexpected keyword argument 'root'")

    registry = get_registry()
    args = ["train", "--dataset", "bad-data", "--no-save", "--set", "run.jit=false"]
    with registry.temporary("dataset", "bad-data", dataset, package="bad-pkg", image_size=8):
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
