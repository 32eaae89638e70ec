"""The first-party MLflow and Weights & Biases trackers, read back offline with the tools' own
readers: MLflow's client on the tracker's store, W&B's protocol buffers on an offline run's
records (tracking.py). No test reaches the network: W&B runs offline, or online against an
address that refuses (127.0.0.1, port 9) with no credentials anywhere it looks."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from tracking import (
    mlflow_client,
    mlflow_history,
    mlflow_images,
    offline_runs,
    one_line_error,
    run,
)

from hvae_core.config import resolve_config
from hvae_core.errors import HvaeError
from hvae_core.plugins import get_registry

# SQLAlchemy 2.1 on MLflow's own code, when a store opens.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"
)


def make_tracker(name: str, run_dir: Path, *overrides: str) -> tuple[Any, Any]:
    cfg = resolve_config("tiny", {"tracker": [name]}, overrides)
    factory = get_registry().get("tracker", name).load()
    return factory(cfg.options("tracker")[name], cfg.run, run_dir=run_dir), cfg


def dotted(config: dict[str, Any]) -> dict[str, str]:
    """The resolved config as MLflow params should hold it: section.option (tracker.NAME.option)
    -> the value as a string, JSON for all but strings."""
    out = {}
    for section, options in config.items():
        for key, value in options.items():
            if section == "tracker":
                out.update({f"tracker.{key}.{k}": v for k, v in value.items()})
            else:
                out[f"{section}.{key}"] = value
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in out.items()}


RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (17, 33, 1), dtype=np.uint8)
COLOR = RNG.integers(0, 256, (9, 12, 3), dtype=np.uint8)
KL = [0.5, 0.25, 0.0, 1.5]
FIRST_ROW = {
    "epoch": 1,
    "step": 23,
    "train_bpd": 3.5,
    "val_bpd": None,  # non-finite
    "lr": 2e-3,
    "grad_norm_unit": "nats",
    "skipped_updates": 0,
    "val_kl_layers_bpd": KL,
    "gaps": [1.0, None, 3.0],  # a non-finite element
    "flag": True,
}
SECOND_ROW = {"epoch": 2, "step": 46, "train_bpd": 3.25, "val_bpd": 3.0}


def same_pixels(pixels: np.ndarray, grid: np.ndarray) -> None:
    """A PNG read back shows the grid (a one-channel grid may come back 2-D, or as RGB)."""
    if grid.shape[-1] == 1:
        pixels = pixels if pixels.ndim == 3 else pixels[..., None]
        for channel in range(pixels.shape[-1]):
            np.testing.assert_array_equal(pixels[..., channel], grid[..., 0])
    else:
        np.testing.assert_array_equal(pixels[..., :3], grid)


# --- MLflow ------------------------------------------------------------------------------------


def sqlite_uri(path: Path) -> str:
    from sqlalchemy.engine import URL

    return URL.create("sqlite", database=path.resolve().as_posix()).render_as_string()


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with no run, made once per test session (MLflow builds its
    tables in seconds; under pytest-xdist, the workers share it): the tests copy it where a new
    store is wanted."""
    pytest.importorskip("mlflow")
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "mlflow-empty.db"
    with (root / "mlflow-empty.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            made = root / f"mlflow-empty.{os.getpid()}.db"
            mlflow_client(sqlite_uri(made)).search_experiments()
            made.rename(path)
    return path


@pytest.fixture
def no_mlflow_env(monkeypatch) -> None:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


def store_in(run_dir: Path, empty_store: Path) -> str:
    """The tracker's own store in run_dir, already made (as the tracker would make it)."""
    (run_dir / "mlflow").mkdir(parents=True)
    shutil.copy(empty_store, run_dir / "mlflow" / "mlflow.db")
    return sqlite_uri(run_dir / "mlflow" / "mlflow.db")


def test_mlflow_logs_params_metrics_layers_images_and_the_run_dir(
    tmp_path, empty_store, no_mlflow_env
) -> None:
    run_dir = tmp_path / "digits-20260101-000000"
    uri = store_in(run_dir, empty_store)
    tracker, cfg = make_tracker("mlflow", run_dir)
    tracker.start(cfg.to_dict(), 1)
    tracker.log_epoch(dict(FIRST_ROW), {"samples": GRAY, "reconstructions": COLOR})
    tracker.log_epoch(dict(SECOND_ROW), {})
    tracker.close()

    client = mlflow_client(uri)
    [experiment] = [e for e in client.search_experiments() if e.name != "Default"]
    assert experiment.name == "hvae"
    [found] = client.search_runs([experiment.experiment_id])
    run_id = found.info.run_id
    assert json.loads((run_dir / "mlflow" / "run.json").read_text()) == {
        "run_id": run_id,
        "tracking_uri": None,
    }
    assert found.info.run_name == run_dir.name and found.info.status == "FINISHED"
    assert found.data.tags["hvae.run_dir"] == str(run_dir.resolve())
    # The artifacts are in the run directory too.
    assert found.info.artifact_uri.startswith((run_dir / "mlflow" / "artifacts").as_uri())

    # The resolved config, as params with dotted keys.
    params = found.data.params
    assert params == dotted(cfg.to_dict())
    assert params["model.z_width"] == "[2, 2, 2, 2]" and params["data.dataset"] == "digits"
    assert params["tracker.mlflow.images"] == "true" and params["data.data_dir"] == "null"
    config = client.download_artifacts(run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(config).read_text()) == cfg.to_dict()

    # Every number of the rows at step = epoch; a list's elements as KEY/00, ...
    assert mlflow_history(client, run_id, "train_bpd") == [(1, 3.5), (2, 3.25)]
    assert mlflow_history(client, run_id, "val_bpd") == [(2, 3.0)]  # None: left out
    assert mlflow_history(client, run_id, "step") == [(1, 23), (2, 46)]
    assert mlflow_history(client, run_id, "lr") == [(1, pytest.approx(2e-3))]
    assert mlflow_history(client, run_id, "skipped_updates") == [(1, 0)]
    for i, value in enumerate(KL):
        assert mlflow_history(client, run_id, f"val_kl_layers_bpd/{i:02d}") == [(1, value)]
    assert set(found.data.metrics) == {
        "train_bpd",
        "val_bpd",
        "step",
        "lr",
        "skipped_updates",
        *(f"val_kl_layers_bpd/{i:02d}" for i in range(4)),
        "gaps/00",
        "gaps/02",
    }

    # The grids, as PNGs at their epoch's step, pixel for pixel.
    images = mlflow_images(client, run_id, tmp_path / "download")
    assert set(images) == {("samples", 1), ("reconstructions", 1)}
    same_pixels(images["samples", 1], GRAY)
    same_pixels(images["reconstructions", 1], COLOR)


def test_mlflow_resume_continues_the_same_run(tmp_path, empty_store, no_mlflow_env) -> None:
    run_dir = tmp_path / "run"
    uri = store_in(run_dir, empty_store)
    tracker, cfg = make_tracker("mlflow", run_dir)
    tracker.start(cfg.to_dict(), 1)
    for epoch in (1, 2, 3):
        tracker.log_epoch({"epoch": epoch, "val_bpd": 9.0 - epoch}, {})
    tracker.close()
    first_id = tracker.run_id

    # The run goes back to its checkpoint of epoch 1, with more epochs.
    again, longer = make_tracker("mlflow", run_dir, "training.epochs=5")
    assert again.run_id == first_id
    client = mlflow_client(uri)
    assert client.get_run(first_id).info.status == "RUNNING"
    again.start(longer.to_dict(), 2)
    again.log_epoch({"epoch": 2, "val_bpd": 4.0}, {})
    again.close()

    assert len(client.search_runs([client.get_run(first_id).info.experiment_id])) == 1
    found = client.get_run(first_id)
    assert found.info.status == "FINISHED"
    # MLflow never changes a param: the first value stays, the new one is a tag.
    assert found.data.params["training.epochs"] == "2"
    assert found.data.tags["hvae.config.training.epochs"] == "5"
    assert "hvae.config.model.z_width" not in found.data.tags  # unchanged
    config = client.download_artifacts(first_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(config).read_text())["training"]["epochs"] == 5
    # MLflow cannot delete values: an epoch done again has its new value last.
    assert mlflow_history(client, first_id, "val_bpd") == [(1, 8), (2, 7), (3, 6), (2, 4)]
    assert found.data.metrics["val_bpd"] == 6  # MLflow's latest: the highest step


def test_mlflow_options_and_its_own_variables(
    tmp_path, empty_store, monkeypatch, no_mlflow_env
) -> None:
    # A store of the user's ($MLFLOW_TRACKING_URI), where MLflow puts a new experiment's
    # artifacts by its own default (./mlruns).
    shared = tmp_path / "shared.db"
    shutil.copy(empty_store, shared)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(shared))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-the-environment")
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker, cfg = make_tracker(
        "mlflow",
        run_dir,
        "tracker.mlflow.run_name=named",
        "tracker.mlflow.images=false",
        "tracker.mlflow.layer_scalars=false",
    )
    tracker.start(cfg.to_dict(), 1)
    tracker.log_epoch(dict(FIRST_ROW), {"samples": GRAY})
    tracker.close()

    client = mlflow_client(sqlite_uri(shared))
    found = client.get_run(tracker.run_id)
    experiment = client.get_experiment(found.info.experiment_id)
    assert experiment.name == "from-the-environment" and found.info.run_name == "named"
    assert "gaps/00" not in found.data.metrics and "train_bpd" in found.data.metrics
    assert not client.list_artifacts(tracker.run_id, "images")
    assert sorted(p.name for p in (run_dir / "mlflow").iterdir()) == ["run.json"]

    # An option beats the variable; another store: another MLflow run, found by run.json.
    other = tmp_path / "other.db"
    shutil.copy(empty_store, other)
    again, cfg = make_tracker(
        "mlflow",
        run_dir,
        f"tracker.mlflow.tracking_uri={sqlite_uri(other)}",
        "tracker.mlflow.experiment=chosen",
    )
    again.start(cfg.to_dict(), 2)
    again.close()
    assert again.run_id != tracker.run_id
    state = json.loads((run_dir / "mlflow" / "run.json").read_text())
    assert state == {"run_id": again.run_id, "tracking_uri": sqlite_uri(other)}
    moved = mlflow_client(sqlite_uri(other)).get_run(again.run_id)
    assert mlflow_client(sqlite_uri(other)).get_experiment(moved.info.experiment_id).name == (
        "chosen"
    )


def test_mlflow_without_sqlalchemy_its_own_store_is_one_clear_error(
    tmp_path, monkeypatch, no_mlflow_env
) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # what an absent package gives
    with pytest.raises(HvaeError, match="store in the run directory .SQLite. needs sqlalchemy"):
        make_tracker("mlflow", tmp_path)


# --- Weights & Biases --------------------------------------------------------------------------


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> Any:
    """W&B as on a machine that never logged in, offline, saving no telemetry; any request it
    still made would go to 127.0.0.1:9 and be refused. A fresh W&B singleton reads it."""
    wandb = pytest.importorskip("wandb")
    for name in list(os.environ):
        if name.startswith("WANDB_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / "netrc"))  # none
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "wandb-data"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")  # no system-metrics sampler
    wandb.teardown()
    yield wandb
    wandb.teardown()


def wandb_id(run_dir: Path) -> str:
    return (run_dir / "wandb" / "hvae-run-id").read_text().strip()


def written(wandb: Any, wandb_dir: Path) -> list[Any]:
    """The offline runs in wandb_dir once W&B has written them out: ``run.finish()`` may
    return before W&B's service has flushed the run's transaction log, which it does at the
    latest when it stops (as it does when the process exits)."""
    wandb.teardown()
    return offline_runs(wandb_dir)


def test_wandb_offline_run_holds_config_metrics_layers_and_images(tmp_path, wandb_env) -> None:
    run_dir = tmp_path / "digits-20260101-000000"
    run_dir.mkdir()
    tracker, cfg = make_tracker("wandb", run_dir)
    tracker.start(cfg.to_dict(), 1)
    tracker.log_epoch(dict(FIRST_ROW), {"samples": GRAY, "reconstructions": COLOR})
    tracker.log_epoch(dict(SECOND_ROW), {})
    tracker.close()

    [found] = written(wandb_env, run_dir / "wandb")  # W&B's files: in the run directory
    assert found.run_id == wandb_id(run_dir)
    assert (found.project, found.name) == ("hvae", run_dir.name)
    assert {k: v for k, v in found.config.items() if k != "_wandb"} == cfg.to_dict()
    first, second = found.history
    assert (first["_step"], first["epoch"], second["_step"], second["epoch"]) == (1, 1, 2, 2)
    assert {k: v for k, v in first.items() if not k.startswith("_")} == {
        "epoch": 1,
        "step": 23,
        "train_bpd": 3.5,
        "lr": 2e-3,
        "skipped_updates": 0,
        **{f"val_kl_layers_bpd/{i:02d}": v for i, v in enumerate(KL)},
        "gaps/00": 1.0,
        "gaps/02": 3.0,
        "samples": first["samples"],
        "reconstructions": first["reconstructions"],
    }
    same_pixels(found.media(first, "samples"), GRAY)
    same_pixels(found.media(first, "reconstructions"), COLOR)
    assert {k for k in second if not k.startswith("_")} == {"epoch", "step", "train_bpd", "val_bpd"}
    # The summary: each key's last value.
    summary = found.summary
    assert (summary["train_bpd"], summary["val_bpd"], summary["step"]) == (3.25, 3.0, 46)
    assert summary["val_kl_layers_bpd/03"] == 1.5 and summary["samples"]["height"] == 17


def test_wandb_resume_keeps_the_run_id(tmp_path, wandb_env) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker, cfg = make_tracker("wandb", run_dir)
    tracker.start(cfg.to_dict(), 1)
    tracker.log_epoch({"epoch": 1, "val_bpd": 5.0}, {})
    tracker.close()
    again, longer = make_tracker("wandb", run_dir, "training.epochs=5")
    again.start(longer.to_dict(), 2)
    again.log_epoch({"epoch": 2, "val_bpd": 4.0}, {})
    again.close()

    # Offline, each session is a folder of its own, with the same run id.
    first, second = written(wandb_env, run_dir / "wandb")
    assert first.run_id == second.run_id == wandb_id(run_dir)
    assert [(row["_step"], row["val_bpd"]) for row in first.history] == [(1, 5.0)]
    assert [(row["_step"], row["val_bpd"]) for row in second.history] == [(2, 4.0)]
    assert second.config["training"]["epochs"] == 5


def test_wandb_options_and_its_own_variables(tmp_path, wandb_env, monkeypatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(elsewhere))
    monkeypatch.setenv("WANDB_PROJECT", "from-the-environment")
    monkeypatch.setenv("WANDB_MODE", "online")  # the option says offline, and wins
    wandb_env.teardown()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker, cfg = make_tracker(
        "wandb",
        run_dir,
        "tracker.wandb.mode=offline",
        "tracker.wandb.run_name=named",
        "tracker.wandb.images=false",
        "tracker.wandb.layer_scalars=false",
    )
    tracker.start(cfg.to_dict(), 1)
    tracker.log_epoch(dict(FIRST_ROW), {"samples": GRAY})
    tracker.close()

    [found] = written(wandb_env, elsewhere / "wandb")
    assert (found.project, found.name, found.run_id) == (
        "from-the-environment",
        "named",
        wandb_id(run_dir),
    )
    assert sorted(p.name for p in (run_dir / "wandb").iterdir()) == ["hvae-run-id"]
    [row] = found.history
    assert "samples" not in row and "gaps/00" not in row and row["train_bpd"] == 3.5
    assert not (found.folder / "files" / "media").exists()


def test_wandb_online_without_credentials_is_one_line(tmp_path, wandb_env, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    wandb_env.teardown()
    with pytest.raises(HvaeError) as err:
        make_tracker("wandb", tmp_path)
    assert err.value.one_line().startswith("the wandb tracker is online but W&B has no credentials")
    assert "wandb login" in err.value.hint and "WANDB_MODE=offline" in err.value.hint
    assert not (tmp_path / "wandb").exists()  # no run was begun


# --- both: what a run without the package says, what listing plugins imports, and a run ------


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_a_missing_package_stops_the_run_before_it_starts(tmp_path, monkeypatch, name) -> None:
    monkeypatch.setitem(sys.modules, name, None)  # what an absent package gives
    monkeypatch.delitem(sys.modules, f"hvae_plugins.trackers.{name}", raising=False)
    save_dir = tmp_path / "runs"
    result = run(
        *("train", "--config", "tiny", "--tracker", name, "--quiet"),
        *("--save-dir", str(save_dir), "--set", "run.jit=false"),
    )
    one_line_error(result, f"the {name} tracker needs the package {name}")
    assert f'(hint: pip install "hvae[{name}]")' in result.stderr
    assert not save_dir.exists()  # before any run directory was made


LISTING = """
import sys
from hvae_core.cli import main
for args in (["plugins", "list"], ["plugins", "show", "tracker", "mlflow"],
             ["plugins", "show", "tracker", "wandb"]):
    try:
        main(args)
    except SystemExit:
        pass
print("LOADED:", sorted({m.split(".")[0] for m in sys.modules} & {"mlflow", "wandb"}))
"""


def test_listing_the_trackers_imports_neither_package() -> None:
    done = subprocess.run(
        [sys.executable, "-c", LISTING], capture_output=True, text=True, check=True
    )
    assert "tracker.mlflow.tracking_uri" in done.stdout and "tracker.wandb.mode" in done.stdout
    assert "LOADED: []" in done.stdout


@pytest.mark.slow
def test_hvae_train_and_resume_feed_one_mlflow_run_and_one_wandb_run(
    tmp_path, wandb_env, no_mlflow_env
) -> None:
    pytest.importorskip("mlflow")
    save_dir = tmp_path / "runs"
    common = ("--quiet", "--tracker", "mlflow", "--tracker", "wandb", "--set", "run.jit=false")
    first = run(
        *("train", "--config", "tiny", "--epochs", "1", "--save-dir", str(save_dir)),
        *common,
        *("--set", "training.batch_size=512"),
    )
    assert first.exit_code == 0, first.output
    [run_dir] = save_dir.iterdir()
    resumed = run("train", "--resume", str(run_dir), "--epochs", "2", *common)
    assert resumed.exit_code == 0, resumed.output
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    val = [(row["epoch"], pytest.approx(row["val_bpd"])) for row in rows]

    # MLflow: one run, continued, in the store in the run directory.
    client = mlflow_client(f"sqlite:///{(run_dir / 'mlflow' / 'mlflow.db').resolve()}")
    [experiment] = [e for e in client.search_experiments() if e.name != "Default"]
    [found] = client.search_runs([experiment.experiment_id])
    assert found.info.run_id == json.loads((run_dir / "mlflow" / "run.json").read_text())["run_id"]
    assert found.info.status == "FINISHED" and found.info.run_name == run_dir.name
    assert mlflow_history(client, found.info.run_id, "val_bpd") == val
    assert found.data.params["training.epochs"] == "1"
    assert found.data.tags["hvae.config.training.epochs"] == "2"
    images = mlflow_images(client, found.info.run_id, tmp_path / "download")
    assert set(images) == {(k, e) for k in ("samples", "reconstructions") for e in (1, 2)}
    samples = np.asarray(Image.open(run_dir / "samples.png"))
    samples = samples[..., None] if samples.ndim == 2 else samples  # digits: one channel
    same_pixels(images["samples", 2], samples)

    # W&B: two offline sessions of one run.
    sessions = written(wandb_env, run_dir / "wandb")
    assert [s.run_id for s in sessions] == [wandb_id(run_dir)] * 2
    logged = [(r["epoch"], r["val_bpd"]) for s in sessions for r in s.history]
    assert logged == val
    assert [s.config["training"]["epochs"] for s in sessions] == [1, 2]
    same_pixels(sessions[1].media(sessions[1].history[0], "samples"), samples)
