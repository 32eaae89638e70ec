"""Exports of a trained run: loaded in a fresh process without hvae's trainer, they sample
what ``hvae sample`` samples."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hvae_core.cli import cli


@pytest.fixture(scope="module")
def run_dir(untrained_tiny_run: Path) -> Path:
    return untrained_tiny_run  # read only: tests that change a run copy it first


def cli_ok(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def fresh_process(script: str, workdir: Path) -> dict[str, np.ndarray]:
    """``script`` in a new TensorFlow process; it stores arrays in ``outputs``."""
    out = workdir / "outputs.npz"
    program = "import numpy as np\noutputs = {}\n" + textwrap.dedent(script)
    program += f"\nnp.savez({str(out)!r}, **outputs)\n"
    done = subprocess.run(
        [sys.executable, "-c", program],
        env=dict(os.environ, KERAS_BACKEND="tensorflow"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(out))


def test_exports_sample_in_a_fresh_process_what_hvae_sample_draws(run_dir, tmp_path) -> None:
    keras_dir, saved_dir = tmp_path / "keras", tmp_path / "savedmodel"
    for fmt, folder in (("keras", keras_dir), ("savedmodel", saved_dir)):
        cli_ok("export", str(run_dir), "--format", fmt, "--out", str(folder), "--seed", "5")
    cold_dir = tmp_path / "cold"
    cli_ok("export", str(run_dir), "--out", str(cold_dir), "--output-temperature", "0")
    assert sorted(p.name for p in keras_dir.iterdir()) == ["encoder.keras", "sampler.keras"]
    assert sorted(p.name for p in saved_dir.iterdir()) == ["encoder", "sampler"]
    raw = tmp_path / "s.npz"
    cli_ok(
        "sample",
        str(run_dir),
        "--n",
        "4",
        "--temperature",
        "0",
        "--output-temperature",
        "0",
        "--npz",
        str(raw),
        "--out",
        str(tmp_path / "s.png"),
    )
    script = f"""
    import sys
    import tensorflow as tf
    saved = tf.saved_model.load({str(saved_dir / "sampler")!r})  # needs no hvae at all
    outputs["saved"] = saved.serve(tf.ones(4)).numpy()
    outputs["hvae_imported"] = any(m.startswith("hvae") for m in sys.modules)
    import keras
    import hvae_core.export  # registers hvae's models with Keras
    sampler = keras.saving.load_model({str(keras_dir / "sampler.keras")!r}, safe_mode=True)
    encoder = keras.saving.load_model({str(keras_dir / "encoder.keras")!r}, safe_mode=True)
    outputs["keras"] = keras.ops.convert_to_numpy(sampler(np.ones(4, "float32")))
    outputs["keras_next"] = keras.ops.convert_to_numpy(sampler(np.ones(4, "float32")))
    outputs["latents"] = [keras.ops.convert_to_numpy(t).shape for t in encoder(outputs["keras"])]
    cold = keras.saving.load_model({str(cold_dir / "sampler.keras")!r}, safe_mode=True)
    outputs["cold"] = keras.ops.convert_to_numpy(cold(np.zeros(4, "float32")))
    outputs["trainer"] = "hvae_core.training.trainer" in sys.modules
    """
    got = fresh_process(script, tmp_path)
    assert not got["hvae_imported"] and not got["trainer"]
    # The same seed, the same draw, in either format; the stream goes on from there.
    np.testing.assert_array_equal(got["keras"], got["saved"])
    assert not np.array_equal(got["keras"], got["keras_next"])
    assert got["keras"].dtype == np.uint8 and got["saved"].dtype == np.uint8
    # With no noise at all (both temperatures 0) the export computes what hvae sample does.
    with np.load(raw) as data:
        np.testing.assert_array_equal(got["cold"], data["samples"])
    shapes = [tuple(s) for s in got["latents"]]
    assert shapes == [(4, r, r, 2) for r in (1, 2, 4, 8) for _ in ("mean", "sample")]


def test_an_export_never_replaces_an_earlier_one_without_force(run_dir, tmp_path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "sampler.keras").write_bytes(b"earlier")
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(folder)])
    assert result.exit_code == 1 and "already holds an export (sampler.keras)" in result.stderr
    assert (folder / "sampler.keras").read_bytes() == b"earlier"
    cli_ok("export", str(run_dir), "--out", str(folder), "--force")
    assert (folder / "sampler.keras").stat().st_size > 1000
