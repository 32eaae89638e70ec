"""``hvae train --init-from RUN_DIR``: a new run that starts from another run's weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner

from hvae_core.cli import cli
from hvae_core.run import files as rundir

FAST = ["--set", "run.jit=false", "--set", "training.batch_size=64"]


def train(save_dir: Path, *args: str) -> Path:
    done = CliRunner().invoke(
        cli, ["train", "--epochs", "1", *FAST, "--set", f"run.save_dir={save_dir}", *args]
    )
    assert done.exit_code == 0, done.output
    (run,) = save_dir.iterdir()
    return run


def test_a_run_initialised_from_another_starts_from_its_weights(tmp_path: Path) -> None:
    first = train(tmp_path / "a", "--config", "tiny")
    before, _ = rundir.load_checkpoint(first / rundir.CHECKPOINT)
    # A learning rate of 1e-12 keeps the weights where they start, the first run's.
    second = train(
        tmp_path / "b",
        "--config",
        str(first / "config.yaml"),
        "--init-from",
        str(first),
        "--set",
        "training.learning_rate=1e-12",
        "--set",
        "training.learning_rate_end=1e-12",
    )
    after, meta = rundir.load_checkpoint(second / rundir.CHECKPOINT)
    model_keys = sorted(k for k in before if k.startswith("model/"))
    assert model_keys and model_keys == sorted(k for k in after if k.startswith("model/"))
    for key in model_keys:
        np.testing.assert_allclose(after[key], before[key], rtol=0, atol=1e-8)
    # The control: the same command without --init-from keeps its own initial weights.
    alone = train(
        tmp_path / "c",
        "--config",
        str(first / "config.yaml"),
        "--set",
        "training.learning_rate=1e-12",
        "--set",
        "training.learning_rate_end=1e-12",
    )
    fresh, _ = rundir.load_checkpoint(alone / rundir.CHECKPOINT)
    assert any(not np.allclose(fresh[k], before[k]) for k in model_keys)  # the first run trained
    assert meta["position"]["epoch"] == 1  # a new run: its own first epoch, not the second
    # A fresh optimizer: its step counter counts this run's steps only.
    counters = [k for k in after if k.startswith("optimizer/") and after[k].ndim == 0]
    assert counters and all(int(after[k]) == meta["position"]["step"] for k in counters[:1])


def test_init_from_another_model_is_refused_in_one_line(tmp_path: Path) -> None:
    first = train(tmp_path / "a", "--config", "tiny")
    done = CliRunner().invoke(
        cli,
        ["train", "--config", "tiny", "--init-from", str(first), "--epochs", "1", *FAST]
        + ["--set", "model.z_width=3", "--set", f"run.save_dir={tmp_path / 'b'}"],
    )
    assert done.exit_code != 0
    assert "holds another model (differs in model.z_width" in done.output
    done = CliRunner().invoke(cli, ["train", "--init-from", str(first), "--resume", str(first)])
    assert done.exit_code != 0 and "--init-from starts a new run" in done.output
