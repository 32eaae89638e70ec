"""The ``hvae`` command line: every command answers, every user error is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

import hvae_core
from hvae_core.cli import cli
from hvae_core.config import resolve_config
from hvae_core.errors import ConfigError

HVAE = [sys.executable, "-m", "hvae_core"]


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result, fragment: str, code: int | None = None) -> None:
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"hvae, version {hvae_core.__version__}"


def test_console_script_runs_as_a_module() -> None:
    done = subprocess.run([*HVAE, "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0
    for command in ("train", "evaluate", "sample", "plugins", "config"):
        assert command in done.stdout


def test_plugins_list_json_has_the_core_builtins() -> None:
    result = run("plugins", "list", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert all(set(r) == {"kind", "name", "package", "version", "summary"} for r in rows)
    listed = {(r["kind"], r["name"]) for r in rows}
    expected = {
        ("block", "vdvae"),
        ("lr-schedule", "constant"),
        ("lr-schedule", "linear-warmup"),
        ("lr-schedule", "cosd"),
        ("beta-schedule", "constant"),
        ("beta-schedule", "linear-warmup"),
        ("beta-schedule", "cyclic"),
        ("dataset", "digits"),
    }
    assert expected <= listed
    assert {r["package"] for r in rows} == {"hvae"}


def test_plugins_list_filters_by_kind_and_prints_a_table() -> None:
    rows = json.loads(run("plugins", "list", "--kind", "lr-schedule", "--json").stdout)
    assert sorted(r["name"] for r in rows) == ["constant", "cosd", "linear-warmup"]
    table = run("plugins", "list").stdout
    assert "beta-schedule" in table and "cyclic" in table and "digits" in table


def test_plugins_list_reports_a_broken_package(install_distribution) -> None:
    install_distribution(
        "broken-pkg",
        "0.1",
        {"broken": "broken_mod"},
        {"broken_mod": "import no_such_dependency_xyz\n"},
    )
    result = run("plugins", "list", "--json")
    assert result.exit_code == 0
    assert "warning: plugin package broken-pkg" in result.stderr
    assert "no_such_dependency_xyz" in result.stderr
    assert ("block", "vdvae") in {(r["kind"], r["name"]) for r in json.loads(result.stdout)}


CLASHING_FLOW = """
import hvae_core as hvae

@hvae.hookimpl
def register_flows(register):
    register("same", "{module}:Flow", summary="a flow from {module}")
"""


def test_plugins_list_shows_clashes_and_failures_and_using_a_clash_is_the_error(
    install_distribution,
) -> None:
    for package, module in [("first-pkg", "first_mod"), ("second-pkg", "second_mod")]:
        source = CLASHING_FLOW.format(module=module)
        install_distribution(package, "1.0", {module: module}, {module: source})
    install_distribution("broken-pkg", "0.1", {"broken": "broken_mod"}, {"broken_mod": "1/0\n"})
    result = run("plugins", "list", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    clash = "flow 'same' is registered by 2 packages: first-pkg 1.0 and second-pkg 1.0"
    same = [r for r in rows if r["name"] == "same"]
    assert [(r["package"], r["error"]) for r in same] == [
        ("first-pkg", clash),
        ("second-pkg", clash),
    ]
    [failed] = [r for r in rows if r["package"] == "broken-pkg"]
    assert failed["error"] == "ZeroDivisionError: division by zero"
    assert (failed["kind"], failed["name"], failed["entry_point"]) == (None, None, "broken")
    assert all("error" not in r for r in rows if r["package"] == "hvae")
    assert f"warning: {clash}" in result.stderr
    assert "warning: plugin package broken-pkg (entry point broken) failed" in result.stderr
    table = run("plugins", "list", "--kind", "flow")
    assert table.exit_code == 0
    assert table.stdout.count(f"error: {clash}") == 2 and "conv-sylvester" in table.stdout
    assert_one_line_error(run("config", "show", "--flow", "same"), clash, 2)
    assert_one_line_error(run("config", "show", "--use", "flow=same"), clash, 2)


def test_plugins_show_lists_options() -> None:
    result = run("plugins", "show", "lr-schedule", "cosd")
    assert result.exit_code == 0
    assert "lr_schedule.warmup_steps" in result.stdout
    data = json.loads(run("plugins", "show", "lr-schedule", "cosd", "--json").stdout)
    assert data["section"] == "lr_schedule"
    [opt] = data["options"]
    assert (opt["name"], opt["default"], opt["per_scale"]) == ("warmup_steps", None, False)
    assert "no options" in run("plugins", "show", "block", "vdvae").stdout


def test_config_show_prints_the_resolved_yaml() -> None:
    result = run(
        "config", "show", "--config", "tiny", "--epochs", "3", "--set", "model.z_width=[1,2,3,4]"
    )
    assert result.exit_code == 0
    expected = resolve_config("tiny", {"epochs": 3}, ["model.z_width=[1,2,3,4]"]).to_dict()
    assert yaml.safe_load(result.stdout) == expected


def test_config_show_maps_every_flag(tmp_path) -> None:
    result = run(
        "config",
        "show",
        "--dataset",
        "digits",
        "--data-dir",
        str(tmp_path),
        "--backend",
        "jax",
        "--epochs",
        "4",
        "--batch-size",
        "16",
        "--seed",
        "9",
        "--save-dir",
        str(tmp_path / "runs"),
        "--flow",
        "none",
        "--attention",
        "none",
        "--regularizer",
        "none",
        "--tracker",
        "tensorboard",
    )
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.stdout)
    assert cfg["data"]["data_dir"] == str(tmp_path)
    assert cfg["run"] == {
        "backend": "jax",
        "jit": True,
        "torch_compile": False,
        "compile_cache": True,
        "remat_blocks": True,
        "images_minutes": 5.0,
        "save_dir": str(tmp_path / "runs"),
        "devices": 0,
        "connect_timeout": 120,
        "gpus": None,
        "save": True,
        "trackers": ["tensorboard"],
    }
    assert (cfg["training"]["epochs"], cfg["training"]["batch_size"]) == (4, 16)
    assert cfg["training"]["seed"] == 9
    assert cfg["model"]["flow"] is None and cfg["training"]["regularizer"] is None


def test_config_presets_lists_tiny() -> None:
    assert "tiny" in run("config", "presets").stdout.split()


def test_evaluate_and_sample_need_a_checkpoint(tmp_path) -> None:
    (tmp_path / "config.yaml").write_text(resolve_config("tiny").to_yaml())
    assert_one_line_error(run("evaluate", str(tmp_path)), "no checkpoint at")
    assert_one_line_error(run("sample", str(tmp_path), "--n", "4"), "no checkpoint at")


@pytest.mark.parametrize(
    ("args", "fragment", "code"),
    [
        (["train", "--foo"], "No such option '--foo'", 2),
        (["train", "--backend", "mxnet"], "'mxnet' is not one of", 2),
        (["train", "--epochs", "-1"], "-1 is not in the range x>=0", 2),
        (["train", "--batch-size", "zero"], "'zero' is not a valid integer", 2),
        (["train", "--set", "epochs=3"], "expected section.key=value", 2),
        (["train", "--set", "model.z_width=[1,2]"], "model.z_width: expected", 2),
        (["train", "--set", "model.nope=1"], "unknown key model.nope", 2),
        (["train", "--dataset", "imagenet999"], "unknown dataset 'imagenet999'", 2),
        (["train", "--flow", "planarr"], "unknown flow 'planarr'", 2),
        (["train", "--attention", "spatial"], "unknown attention 'spatial'", 2),
        (["train", "--regularizer", "cr"], "unknown regularizer 'cr'", 2),
        (["train", "--config", "no_such_preset"], "unknown config preset", 2),
        (["train", "--config", "missing/file.yaml"], "does not exist", 2),
        (["train", "--set", "training.batch_size_div=3"], "does not divide", 2),
        (["config", "show", "--set", "training.seed=x"], "training.seed: expected an integer", 2),
        (["plugins", "show", "flow", "nope"], "unknown flow 'nope'", 2),
        (["plugins", "show", "flows", "x"], "'flows' is not one of", 2),
        (["plugins", "list", "--kind", "widget"], "'widget' is not one of", 2),
        (["evaluate", "/no/such/run"], "is not a run directory", 1),
        (["sample", "/no/such/run"], "is not a run directory", 1),
        (["frobnicate"], "No such command 'frobnicate'", 2),
    ],
)
def test_user_errors_are_one_line(args, fragment, code) -> None:
    assert_one_line_error(run(*args), fragment, code)


def test_bad_yaml_file_is_one_line(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  z_width: [1, 2\n")
    assert_one_line_error(run("config", "show", "--config", str(path)), "is not valid YAML", 2)


def test_resume_of_a_non_run_dir_is_one_line(tmp_path) -> None:
    assert_one_line_error(run("train", "--resume", str(tmp_path)), "is not a run directory")


def test_errors_through_the_real_console_script() -> None:
    done = subprocess.run(
        [*HVAE, "train", "--set", "model.nope=1"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: unknown key model.nope (hint: known keys: block, flow")


def test_plugins_show_prints_list_defaults_that_look_like_markup() -> None:
    # rich used to swallow "[false]" as a markup tag, leaving the default blank.
    result = run("plugins", "show", "flow", "conv-sylvester")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "convsylv_splitfirst" in x)
    assert "[false]" in line


@pytest.mark.parametrize(("value", "stored"), [("1", "1"), ("0,1", "0,1"), ("null", None)])
def test_run_gpus_reads_indices_even_as_a_yaml_number(value, stored) -> None:
    assert resolve_config(overrides=[f"run.gpus={value}"]).run.gpus == stored


@pytest.mark.parametrize("value", ["-1", "'0;1'", "cuda:0", "true"])
def test_run_gpus_refuses_anything_but_indices(value) -> None:
    with pytest.raises(ConfigError, match="run.gpus"):
        resolve_config(overrides=[f"run.gpus={value}"])


GPUS_PROBE = """
import os, sys
from hvae_core.backends.select import select_backend
from hvae_core.errors import HvaeError
select_backend("jax", "1,0")
print("visible", os.environ["CUDA_VISIBLE_DEVICES"], "jax" in sys.modules)
import jax  # the framework starts after the choice, so it reads it
select_backend("jax", "1,0")  # the same choice again is fine
try:
    select_backend("jax", "2")
except HvaeError as exc:
    print("refused:", exc.one_line())
"""


def test_gpus_are_chosen_before_the_backend_starts_and_not_after() -> None:
    pytest.importorskip("jax")
    done = subprocess.run(
        [sys.executable, "-c", GPUS_PROBE], capture_output=True, text=True, check=True
    )
    assert "visible 1,0 False" in done.stdout
    assert "refused: cannot choose GPUs 2: jax has already started" in done.stdout


# --- choosing plugins: --use KIND=NAME --------------------------------------------------------


def test_use_chooses_a_plugin_of_every_kind_as_the_old_spellings_do() -> None:
    new = run(
        *("config", "show", "--use", "block=depthwise", "--use", "flow=conv-sylvester"),
        *("--use", "attention=depthwise", "--use", "regularizer=cr-vae"),
        *("--use", "dataset=digits", "--use", "lr-schedule=constant"),
        *("--use", "beta-schedule=cyclic"),
    )
    old = run(
        *("config", "show", "--set", "model.block=depthwise", "--flow", "conv-sylvester"),
        *("--attention", "depthwise", "--regularizer", "cr-vae", "--dataset", "digits"),
        *("--set", "training.scheduler=constant", "--set", "training.beta_schedule=cyclic"),
    )
    assert new.exit_code == 0, new.output
    assert new.stdout == old.stdout
    chosen = yaml.safe_load(new.stdout)
    assert chosen["model"]["block"] == "depthwise"
    assert chosen["training"]["scheduler"] == "constant"
    assert chosen["training"]["beta_schedule"] == "cyclic"
    sections = {"block", "flow", "attention", "regularizer", "lr_schedule", "beta_schedule"}
    assert sections <= set(chosen)


def test_use_none_drops_an_optional_plugin_and_set_still_wins() -> None:
    cfg = resolve_config("tiny", {"use": ["flow=conv-sylvester", "flow=conv-sylvester"]})
    assert cfg.model.flow == "conv-sylvester"
    assert resolve_config(None, {"use": ["flow=none"]}).model.flow is None
    overridden = resolve_config(None, {"use": ["block=vdvae"]}, ["model.block=depthwise"])
    assert overridden.model.block == "depthwise"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["--use", "flows=planar"],
            "--use flows=planar: unknown plugin kind 'flows' (hint: did you mean 'flow'? kinds: "
            "block, flow, attention, regularizer, dataset, lr-schedule, beta-schedule",
        ),
        (["--use", "lr_schedule=cosd"], "(hint: did you mean 'lr-schedule'?"),
        (
            ["--use", "flow"],
            "--use flow: expected KIND=NAME (hint: e.g. --use flow=conv-sylvester; kinds: ",
        ),
        (["--use", "=cosd"], "expected KIND=NAME"),
        (
            ["--use", "tracker=tensorboard"],
            "a tracker is not chosen with --use (hint: use --tracker tensorboard (repeatable)",
        ),
        (["--use", "flow=frobnicate"], "unknown flow 'frobnicate'"),
        (
            ["--flow", "conv-sylvester", "--use", "flow=none"],
            "--use flow=none and --flow conv-sylvester choose two plugins for model.flow",
        ),
    ],
)
def test_use_mistakes_are_one_line_naming_the_kinds(args, fragment) -> None:
    assert_one_line_error(run("config", "show", *args), fragment, 2)
    assert_one_line_error(run("train", *args), fragment, 2)
