"""Configuration: precedence of sources, per-scale lists, validation errors, YAML round trip."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import yaml

import hvae_core as hvae
from hvae_core.config import (
    DataConfig,
    ModelConfig,
    TrainingConfig,
    build_config,
    load_run_config,
    resolve_config,
)
from hvae_core.errors import ConfigError, PluginError
from hvae_core.plugins import get_registry
from hvae_core.testing import temporary_plugin


def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_follow_the_dataclasses() -> None:
    cfg = resolve_config()
    assert cfg.training.epochs == TrainingConfig().epochs
    assert cfg.data.dataset == DataConfig().dataset == "digits"
    assert cfg.image_size == 8 and cfg.num_scales == 4 and cfg.resolutions == [8, 4, 2, 1]
    # Per-scale defaults (one value) are expanded to one value per scale.
    assert cfg.model.z_width == ModelConfig().z_width * 4


def test_precedence_defaults_preset_flags_set(tmp_path) -> None:
    assert resolve_config().training.epochs == 100
    assert resolve_config("tiny").training.epochs == 2
    user = write_yaml(tmp_path / "user.yaml", {"training": {"epochs": 3, "batch_size": 16}})
    assert resolve_config(user).training.epochs == 3
    cfg = resolve_config(user, {"epochs": 4})
    assert (cfg.training.epochs, cfg.training.batch_size) == (4, 16)
    cfg = resolve_config(user, {"epochs": 4}, ["training.epochs=5"])
    assert (cfg.training.epochs, cfg.training.batch_size) == (5, 16)
    # Later --set wins over an earlier one; a flag left as None does not override.
    cfg = resolve_config(user, {"epochs": None}, ["training.epochs=6", "training.epochs=7"])
    assert cfg.training.epochs == 7


def test_preset_keeps_unrelated_defaults() -> None:
    cfg = resolve_config("tiny")
    assert cfg.model.z_width == [2, 2, 2, 2]
    assert cfg.model.b_act == ModelConfig().b_act


def test_set_values_are_yaml() -> None:
    cfg = resolve_config(
        overrides=[
            "model.z_width=[1, 2, 3, 4]",
            "model.block_gn=true",
            "training.learning_rate=1e-4",  # YAML 1.1 reads this as a string: still a number
            "model.flow=null",
        ]
    )
    assert cfg.model.z_width == [1, 2, 3, 4]
    assert cfg.model.block_gn is True
    assert cfg.training.learning_rate == pytest.approx(1e-4)
    assert cfg.model.flow is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [(8, [8, 8, 8, 8]), ([8], [8, 8, 8, 8]), ([1, 2, 3, 4], [1, 2, 3, 4])],
)
def test_per_scale_expansion(value, expected) -> None:
    cfg = build_config({"model": {"enc_num_blocks": value}})
    assert cfg.model.enc_num_blocks == expected


@pytest.mark.parametrize("value", [[1, 2], [1, 2, 3, 4, 5, 6]])
def test_per_scale_wrong_length_names_key_and_count(value) -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"model": {"z_width": value}})
    message = err.value.one_line()
    assert "model.z_width" in message
    assert "a list of 4 integers (one per scale)" in message
    assert f"a list of {len(value)}" in message


def test_per_scale_wrong_element_type() -> None:
    with pytest.raises(ConfigError, match=r"model.z_width: expected an integer .* got .*'a'"):
        build_config({"model": {"z_width": [1, "a", 3, 4]}})


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"model": {"z_widht": 3}}, "unknown key model.z_widht"),
        ({"modle": {}}, "unknown config section 'modle'"),
        ({"training": {"epochs": "many"}}, "training.epochs: expected an integer, got 'many'"),
        ({"training": {"epochs": 2.5}}, "training.epochs: expected an integer"),
        ({"training": {"epochs": True}}, "training.epochs: expected an integer, got True"),
        ({"model": {"block_gn": 1}}, "model.block_gn: expected true or false, got 1"),
        ({"model": {"b_act": "swishy"}}, "model.b_act: expected one of 'silu'"),
        ({"model": {"output_head": "both"}}, "model.output_head: expected one of"),
        ({"training": {"learning_rate": "fast"}}, "training.learning_rate: expected a number"),
        ({"training": "fast"}, "training: expected a mapping"),
        ({"training": {"batch_size": 0}}, "training.batch_size: expected values > 0"),
        ({"training": {"ema_rate": 1.0}}, "training.ema_rate: expected a number in [0, 1)"),
        ({"model": {"dec_num_blocks": 0}}, "model.dec_num_blocks: expected at least one"),
        ({"data": {"num_bits": 9}}, "data.num_bits: expected 1 to 8"),
        ({"run": {"backend": "mxnet"}}, "run.backend: expected one of 'tensorflow'"),
    ],
)
def test_bad_values_name_the_key(raw, fragment) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert fragment in err.value.one_line()


def test_unknown_key_suggests_the_closest() -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"model": {"z_widht": 3}})
    assert "did you mean model.z_width?" in err.value.one_line()


def test_batch_size_must_divide_by_batch_size_div() -> None:
    with pytest.raises(ConfigError, match="batch_size_div: 3 does not divide"):
        build_config({"training": {"batch_size": 32, "batch_size_div": 3}})
    assert build_config({"training": {"batch_size": 32, "batch_size_div": 4}}).training


def test_torch_compile_is_off_by_default_and_needs_jit() -> None:
    assert build_config({}).run.torch_compile is False
    assert build_config({"run": {"torch_compile": True}}).run.torch_compile is True
    with pytest.raises(ConfigError) as err:
        build_config({"run": {"torch_compile": "yes"}})
    assert "run.torch_compile: expected true or false, got 'yes'" in err.value.one_line()
    with pytest.raises(ConfigError) as err:
        build_config({"run": {"torch_compile": True, "jit": False}})
    line = err.value.one_line()
    assert "run.torch_compile is true but run.jit is false" in line
    assert "\n" not in line and line.endswith(")") and "(hint: " in line


def test_resolved_config_round_trips_through_yaml(tmp_path) -> None:
    cfg = resolve_config(
        "tiny",
        {"epochs": 3},
        ["model.z_width=[1,2,3,4]", "training.learning_rate=3e-4", "lr_schedule.warmup_steps=7"],
    )
    text = cfg.to_yaml()
    assert yaml.safe_load(text) == cfg.to_dict()
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    again = resolve_config(path)
    assert again.to_dict() == cfg.to_dict()
    assert again.to_yaml() == text


def test_a_run_config_without_grad_norm_unit_keeps_the_bits_scale(tmp_path) -> None:
    # A run written before grad_norm_unit existed clipped and skipped on the bits scale.
    stored = resolve_config("tiny").to_dict()
    del stored["training"]["grad_norm_unit"]
    del stored["model"]["scale_fn"]
    old = load_run_config(write_yaml(tmp_path / "old.yaml", stored))
    assert old.training.grad_norm_unit == "bits"
    assert old.model.scale_fn == "softplus"  # what every older run used
    # A run that records its unit keeps it; a new config gets the new default.
    for unit in ("nats", "bits"):
        stored["training"]["grad_norm_unit"] = unit
        path = write_yaml(tmp_path / f"{unit}.yaml", stored)
        assert load_run_config(path).training.grad_norm_unit == unit
    assert resolve_config("tiny").training.grad_norm_unit == "nats"


def test_plugin_sections_hold_the_chosen_plugins_options() -> None:
    cfg = resolve_config(
        overrides=["training.scheduler=linear-warmup", "lr_schedule.warmup_steps=5"]
    )
    assert cfg.options("lr-schedule").warmup_steps == 5
    assert cfg.options("flow") is None
    assert "flow" not in cfg.to_dict()


def test_plugin_options_are_checked_and_expanded_per_scale() -> None:
    @dataclass
    class FlowOptions:
        num_flows: list[int] = hvae.per_scale([1], "flows per scale")
        hidden: int = hvae.option(8, "hidden width")

    registry = get_registry()
    with temporary_plugin(registry, "flow", "test-flow", lambda *a, **k: None, options=FlowOptions):
        cfg = resolve_config(flags={"flow": "test-flow"}, overrides=["flow.num_flows=[0,1,1,2]"])
        assert cfg.options("flow") == FlowOptions(num_flows=[0, 1, 1, 2], hidden=8)
        assert resolve_config(flags={"flow": "test-flow"}).options("flow").num_flows == [1] * 4
        with pytest.raises(ConfigError, match="flow.num_flows: expected"):
            resolve_config(flags={"flow": "test-flow"}, overrides=["flow.num_flows=[1,2]"])
        with pytest.raises(ConfigError, match="unknown key flow.depth"):
            resolve_config(flags={"flow": "test-flow"}, overrides=["flow.depth=3"])


def test_options_for_an_unchosen_plugin_are_an_error() -> None:
    with pytest.raises(ConfigError, match="section 'flow' but no flow is chosen"):
        resolve_config(overrides=["flow.num_flows=2"])


@pytest.mark.parametrize("flag", ["flow", "attention", "regularizer", "dataset"])
def test_unknown_plugin_names_the_kind(flag) -> None:
    with pytest.raises(PluginError, match=f"unknown {flag} 'nope'"):
        resolve_config(flags={flag: "nope"})


def test_none_string_means_no_plugin() -> None:
    assert resolve_config(flags={"flow": "none"}).model.flow is None


def test_cyclic_beta_selects_the_cyclic_schedule() -> None:
    cfg = resolve_config(overrides=["training.cyclic_beta=true"])
    assert cfg.training.beta_schedule == "cyclic"
    with pytest.raises(ConfigError, match="cyclic_beta is true but"):
        resolve_config(overrides=["training.cyclic_beta=true", "training.beta_schedule=constant"])


def test_depthwise_selects_the_depthwise_block() -> None:
    assert resolve_config(overrides=["model.depthwise=true"]).model.block == "depthwise"
    assert resolve_config().model.block == "vdvae"


def test_backend_defaults_to_keras_backend_env(monkeypatch) -> None:
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    assert resolve_config().run.backend == "jax"  # installed here; else tensorflow
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "jax" else real(name, *a)
    )
    assert resolve_config().run.backend == "tensorflow"
    monkeypatch.undo()
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert resolve_config().run.backend == "jax"
    assert resolve_config(flags={"backend": "torch"}).run.backend == "torch"
    monkeypatch.setenv("KERAS_BACKEND", "theano")
    with pytest.raises(ConfigError, match="KERAS_BACKEND.backend: expected one of"):
        resolve_config()


def test_dataset_image_size_must_be_a_power_of_two() -> None:
    registry = get_registry()
    with (
        temporary_plugin(registry, "dataset", "odd", lambda *a: None, image_size=28),
        pytest.raises(ConfigError, match="expected a power of two"),
    ):
        resolve_config(flags={"dataset": "odd"})
    with (
        temporary_plugin(registry, "dataset", "sizeless", lambda *a: None),
        pytest.raises(ConfigError, match="declares no image_size"),
    ):
        resolve_config(flags={"dataset": "sizeless"})


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("model: [unclosed\n", "is not valid YAML at line"),
        ("- a\n- b\n", "expected a mapping of sections, got list"),
    ],
)
def test_bad_yaml_files(tmp_path, content, fragment) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=fragment):
        resolve_config(path)


def test_missing_file_and_unknown_preset(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError) as err:
        resolve_config("cifar11")
    assert "unknown config preset 'cifar11'" in err.value.one_line()
    assert "tiny" in err.value.hint


@pytest.mark.parametrize("item", ["epochs=3", "training.epochs", "a.b.c=1", ".x=1"])
def test_malformed_set(item) -> None:
    with pytest.raises(ConfigError, match="expected section.key=value"):
        resolve_config(overrides=[item])
