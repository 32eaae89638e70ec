"""The example third-party package in examples/: found through its entry point, and usable."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import EXAMPLE, FIRST_PARTY_ENTRY_POINTS, ROOT, example_distribution

import hvae_core
from hvae_core import api, plugins
from hvae_core.config import resolve_config
from hvae_core.errors import HvaeError


@pytest.fixture
def example_env(tmp_path, monkeypatch) -> dict[str, str]:
    """The example package importable, with its entry-point metadata, as if pip-installed."""
    site = example_distribution(tmp_path / "site")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(site))
    allow = f"{FIRST_PARTY_ENTRY_POINTS},hvae-example-plugins"
    monkeypatch.setenv(plugins.ALLOW_ENV, allow)
    importlib.invalidate_caches()
    plugins.reset_registry()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(EXAMPLE), env.get("PYTHONPATH", "")])
    return env


def hvae(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hvae_core", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def test_plugins_list_shows_the_example_package(example_env) -> None:
    done = hvae(example_env, "plugins", "list", "--json")
    assert done.returncode == 0, done.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(done.stdout)}
    for key in [("dataset", "example-npy"), ("flow", "example-planar"), ("tracker", "example-csv")]:
        assert rows[key]["package"] == "hvae-example-plugins"
        assert rows[key]["version"] == "0.1.0"
    table = hvae(example_env, "plugins", "list").stdout
    assert "example-planar" in table and "hvae-example-plugins" in table


def test_the_example_package_adds_an_hvae_command(example_env, tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [
        {"epoch": 1, "train_bpd": 2.5, "val_bpd": 2.25},
        {"epoch": 2, "train_bpd": 2.0, "val_bpd": 1.875},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = hvae(example_env, "example-summary", str(run_dir))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["1 2.5000 2.2500", "2 2.0000 1.8750"]
    assert "example-summary" in hvae(example_env, "--help").stdout
    # Its errors end as one line, like hvae's own.
    failed = hvae(example_env, "example-summary", str(tmp_path))
    assert failed.returncode != 0
    assert failed.stderr.strip().splitlines() == [
        f"error: {tmp_path} has no metrics.jsonl (hint: give a run directory)"
    ]
    # Without the package, the command is unknown.
    assert (
        hvae(
            {**example_env, "HVAE_LOAD_PLUGINS": FIRST_PARTY_ENTRY_POINTS},
            "example-summary",
            str(run_dir),
        ).returncode
        == 2
    )


def test_a_plugin_command_cannot_replace_hvaes_own(install_distribution) -> None:
    from click.testing import CliRunner

    from hvae_core.cli import cli

    install_distribution(
        "clashing",
        "1.0",
        {"clashing": "clashing_cmds"},
        {
            "clashing_cmds": """
            import click
            import hvae_core as hvae

            @hvae.hookimpl
            def register_commands(cli):
                @cli.command("train")
                def train():
                    click.echo("not hvae's train")

                @cli.command("hello")
                def hello():
                    click.echo("hello from a plugin")
            """
        },
    )
    runner = CliRunner()
    hello = runner.invoke(cli, ["hello"])
    assert hello.stdout == "hello from a plugin\n"
    assert "the command 'train' of clashing is ignored: hvae has one" in hello.stderr
    shown = runner.invoke(cli, ["train", "--help"])
    assert "not hvae's train" not in shown.stdout and "Train an HVAE" in shown.stdout


def test_dataset_and_flow_flags_resolve_to_the_example(example_env, tmp_path) -> None:
    done = hvae(
        example_env,
        "config",
        "show",
        "--dataset",
        "example-npy",
        "--set",
        "dataset.image_size=16",
        "--flow",
        "example-planar",
        "--set",
        "flow.num_flows=[0,1,1,2,2]",
    )
    assert done.returncode == 0, done.stderr
    cfg = resolve_config(
        flags={"dataset": "example-npy", "flow": "example-planar"},
        overrides=["dataset.image_size=16", "flow.num_flows=[0,1,1,2,2]"],
    )
    assert cfg.num_scales == 5
    assert cfg.options("flow").num_flows == [0, 1, 1, 2, 2]
    assert cfg.options("dataset").image_size == 16


def test_example_dataset_loads_real_files(example_env, tmp_path) -> None:
    images = np.arange(20 * 8 * 8 * 3, dtype=np.uint8).reshape(20, 8, 8, 3)
    np.save(tmp_path / "images.npy", images)
    cfg = resolve_config(
        flags={"dataset": "example-npy", "data_dir": str(tmp_path)},
        overrides=["dataset.image_size=8"],
    )
    spec = plugins.get_registry().get("dataset", "example-npy")
    dataset = spec.load()(cfg.options("dataset"), cfg.data)
    assert dataset.image_shape == (8, 8, 3) and dataset.num_bits == 8
    assert [len(dataset.load(s)) for s in ("train", "val", "test")] == [16, 2, 2]
    np.testing.assert_array_equal(np.concatenate([dataset.load(s) for s in dataset.splits]), images)
    unsized = resolve_config(flags={"dataset": "example-npy", "data_dir": str(tmp_path)})
    assert unsized.image_size == 8  # no dataset.image_size: the file's
    (tmp_path / "images.npy").unlink()
    with pytest.raises(HvaeError, match="images.npy does not exist"):
        spec.load()(cfg.options("dataset"), cfg.data)


def numpy_planar(z: np.ndarray, u_hat: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    for k in range(len(b)):
        z = z + np.tanh(z @ w[k] + b[k])[:, None] * u_hat[k][None, :]
    return z


def test_example_planar_flow_log_det_matches_the_jacobian(example_env) -> None:
    import keras

    spec = plugins.get_registry().get("flow", "example-planar")
    cfg = resolve_config(flags={"flow": "example-planar"}, overrides=["flow.num_flows=3"])
    flow = spec.load()(
        cfg.options("flow"),
        cfg.model,
        scale=2,
        resolution=2,
        z_width=2,
        name="planar",
    )
    rng = np.random.default_rng(0)
    z0 = rng.normal(size=(4, 2, 2, 2)).astype("float32")
    flow.build(z0.shape)
    for weight in flow.weights:  # non-identity parameters
        weight.assign(rng.normal(scale=0.7, size=weight.shape).astype("float32"))
    zk, log_det = (keras.ops.convert_to_numpy(t) for t in flow(z0, None))

    u_hat = np.stack([keras.ops.convert_to_numpy(flow.u_hat(k)) for k in range(3)]).astype(float)
    w = keras.ops.convert_to_numpy(flow.w).astype(float)
    b = keras.ops.convert_to_numpy(flow.b).astype(float)
    flat = z0.reshape(4, -1).astype(float)
    np.testing.assert_allclose(zk.reshape(4, -1), numpy_planar(flat, u_hat, w, b), atol=1e-5)
    # Oracle: log|det| of the Jacobian by central differences in float64.
    eps = 1e-6
    for i in range(4):
        cols = []
        for j in range(flat.shape[1]):
            step = np.zeros_like(flat[i : i + 1])
            step[0, j] = eps
            cols.append(
                (
                    numpy_planar(flat[i : i + 1] + step, u_hat, w, b)
                    - numpy_planar(flat[i : i + 1] - step, u_hat, w, b)
                )[0]
                / (2 * eps)
            )
        _, logabsdet = np.linalg.slogdet(np.stack(cols, axis=1))
        assert log_det[i] == pytest.approx(logabsdet, abs=1e-4)
    assert np.abs(log_det).max() > 0.05  # the parameters really are non-identity


def test_no_flow_at_scales_with_zero_flows(example_env) -> None:
    spec = plugins.get_registry().get("flow", "example-planar")
    cfg = resolve_config(flags={"flow": "example-planar"}, overrides=["flow.num_flows=[0,1,1,1]"])
    assert (
        spec.load()(
            cfg.options("flow"),
            cfg.model,
            scale=0,
            resolution=8,
            z_width=2,
            name="p",
        )
        is None
    )


# --- what a plugin package may import ---------------------------------------------------------

PUBLIC_MODULES = {"hvae_core", "hvae_core.api"}
PUBLIC = set(hvae_core.__all__)


def private_imports(path) -> list[str]:
    """Every import of hvae_core's internals in a Python file, as ``file:line module``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
            if node.module == "hvae_core":  # ``from hvae_core import data`` is a module too
                modules += [f"hvae_core.{a.name}" for a in node.names if a.name not in PUBLIC]
        else:
            continue
        found += [
            f"{path.relative_to(ROOT)}:{node.lineno} {m}"
            for m in modules
            if m.split(".")[0] == "hvae_core" and m not in PUBLIC_MODULES
        ]
    return found


@pytest.mark.parametrize("package", [EXAMPLE / "hvae_example_plugins", ROOT / "plugins"])
def test_plugins_import_only_the_public_api(package) -> None:
    files = sorted(package.rglob("*.py"))
    assert files
    private = [hit for path in files for hit in private_imports(path)]
    assert private == [], "import these from hvae_core.api instead: " + "; ".join(private)


def test_every_public_api_name_resolves() -> None:
    for name in api.__all__:
        assert getattr(api, name) is not None, name
    with pytest.raises(AttributeError, match="has no attribute 'InMemoryDatasetz'"):
        api.InMemoryDatasetz  # noqa: B018


def test_example_csv_tracker_writes_rows_and_drops_them_on_a_resume(example_env, tmp_path) -> None:
    import csv

    cfg = resolve_config(flags={"tracker": ["example-csv"]})
    make = plugins.get_registry().get("tracker", "example-csv").load()

    def session(first_epoch: int, rows: list[dict]) -> None:
        tracker = make(cfg.options("tracker")["example-csv"], cfg.run, run_dir=tmp_path)
        tracker.start(cfg.to_dict(), first_epoch)
        for row in rows:
            tracker.log_epoch(row, {})
        tracker.close()

    unit = {"grad_norm_unit": "nats"}  # not a number: not a column
    session(1, [{"epoch": e, "val_bpd": 3.0 - e, "kl": [1.0], **unit} for e in (1, 2, 3)])
    session(2, [{"epoch": 2, "val_bpd": None, "extra": 5.0}])  # resumed from epoch 1
    with (tmp_path / "metrics.csv").open(newline="") as f:
        assert list(csv.DictReader(f)) == [
            {"epoch": "1", "val_bpd": "2.0"},
            {"epoch": "2", "val_bpd": ""},
        ]
