"""Exports under hostile input (issue #34): the exported sampler and encoder refuse inputs
they cannot take, a tampered ``.keras`` config is refused on load, and ``hvae export --force``
replaces an earlier export only once the new one is complete, never following a link."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_hostile_input import assert_one_line_error

from hvae_core import cli as cli_module
from hvae_core.cli import cli
from hvae_core.errors import ConfigError, HvaeError, InputError
from hvae_core.run.files import replace_entry


@pytest.fixture(scope="module")
def run_dir(untrained_tiny_run: Path) -> Path:
    return untrained_tiny_run  # read only: tests that change a run copy it first


@pytest.fixture(scope="module")
def model(run_dir):
    import hvae_core

    return hvae_core.load(run_dir)


@pytest.fixture(scope="module")
def exported(model):
    """The sampler and the encoder ``hvae export`` writes, in memory."""
    from hvae_core.export import Encoder, Sampler
    from hvae_core.model.weights import copy_weights

    common = {
        "hvae_config": model.config.to_dict(),
        "image_shape": list(model.image_shape),
        "num_bits": model.num_bits,
    }
    pair = Sampler(**common, name="sampler"), Encoder(**common, name="encoder")
    for part in pair:
        part.build()
        copy_weights(model.model, part.hvae)
    return pair


@pytest.fixture
def loaded(model, monkeypatch) -> None:
    """The commands take the module's model instead of loading the run again."""
    monkeypatch.setattr(cli_module, "_load", lambda *args, **kwargs: model)


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


# --- 1. the exported models refuse what they cannot take -------------------------------------

NAN, INF = float("nan"), float("inf")

SAMPLER_INPUTS = {
    "a NaN temperature": (np.array([0.5, NAN], "float32"), "got NaN or infinity"),
    "an infinite temperature": (np.array([INF], "float32"), "got NaN or infinity"),
    "a negative temperature": (np.array([-0.5], "float32"), "got a negative one"),
    "no temperature": (np.zeros(0, "float32"), "takes one temperature per image, got none"),
}
ENCODER_INPUTS = {
    "a level above the bit depth": (
        np.full((1, 8, 8, 1), 16, "uint8"),
        "levels must lie in 0..15 (4 bits), got a higher one",
    ),
    "a negative level": (np.full((1, 8, 8, 1), -1, "int32"), "got a negative one"),
    "an empty batch": (np.zeros((0, 8, 8, 1), "uint8"), "a batch of one image or more, got none"),
}


@pytest.mark.parametrize("case", [*SAMPLER_INPUTS, *ENCODER_INPUTS])
def test_the_keras_exports_refuse_bad_inputs_in_one_line(exported, case) -> None:
    sampler, encoder = exported
    part, (value, fragment) = (
        (sampler, SAMPLER_INPUTS[case])
        if case in SAMPLER_INPUTS
        else (encoder, ENCODER_INPUTS[case])
    )
    with pytest.raises(InputError) as caught:
        part(value)
    line = str(caught.value)
    assert fragment in line and "\n" not in line, line  # not Keras' page of call arguments


def test_the_keras_encoder_refuses_float_images_and_other_shapes(exported) -> None:
    with pytest.raises(InputError, match="takes integer pixel levels 0..15 .uint8., got float32"):
        exported[1](np.zeros((1, 8, 8, 1), "float32"))
    for shape in [(1, 16, 16, 1), (1, 8, 8, 3), (8, 8, 1)]:
        with pytest.raises(InputError) as caught:
            exported[1](np.zeros(shape, "uint8"))
        assert str(caught.value) == f"the encoder takes images of shape (n, 8, 8, 1), got {shape}"


def test_traced_exports_refuse_bad_inputs_when_they_run(exported) -> None:
    """What a SavedModel keeps: the checks as graph ops, failing the call with the message."""
    import tensorflow as tf

    sampler, encoder = exported
    traced_sampler = tf.function(sampler, input_signature=[tf.TensorSpec((None,), tf.float32)])
    traced_encoder = tf.function(
        encoder, input_signature=[tf.TensorSpec((None, 8, 8, 1), tf.uint8)]
    )
    for value, fragment in SAMPLER_INPUTS.values():
        with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(fragment)):
            traced_sampler(value)
    for name in ("a level above the bit depth", "an empty batch"):
        value, fragment = ENCODER_INPUTS[name]
        with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(fragment)):
            traced_encoder(value)
    assert traced_sampler(np.ones(2, "float32")).shape == (2, 8, 8, 1)
    assert len(traced_encoder(np.full((2, 8, 8, 1), 15, "uint8"))) == 8


@pytest.mark.slow  # a SavedModel export traces both models: about 40 s on 2 cores
def test_an_exported_saved_model_refuses_bad_inputs(model, tmp_path) -> None:
    import tensorflow as tf

    from hvae_core.export import export_model

    export_model(model, "savedmodel", tmp_path)
    sampler = tf.saved_model.load(str(tmp_path / "sampler"))
    encoder = tf.saved_model.load(str(tmp_path / "encoder"))
    for value, fragment in SAMPLER_INPUTS.values():
        with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(fragment)):
            sampler.serve(value)
    for name in ("a level above the bit depth", "an empty batch"):
        value, fragment = ENCODER_INPUTS[name]
        with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(fragment)):
            encoder.serve(value)
    assert sampler.serve(np.zeros(3, "float32")).shape == (3, 8, 8, 1)


# --- 2. a tampered .keras file ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sampler_file(exported, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keras") / "sampler.keras"
    exported[0].save(path)
    return path


def tampered(path: Path, out: Path, change) -> Path:
    """A copy of the .keras file ``path`` at ``out`` with ``change`` applied to its model's
    config (a dict), as an editor of the zip file would."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(out, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                change(config["config"])
                data = json.dumps(config).encode()  # NaN is written as NaN, as json reads it
            target.writestr(item, data)
    return out


def setting(key: str, value):
    def change(config: dict) -> None:
        config[key] = value

    return change


TAMPERED = {
    "a negative seed": (setting("seed", -1), "seed = -1: expected an integer in 0..2**32 - 1"),
    "a string seed": (setting("seed", "5"), "seed = '5': expected an integer"),
    "a float seed": (setting("seed", 1.5), "seed = 1.5"),
    "a huge seed": (setting("seed", 2**40), f"seed = {2**40}"),
    "a NaN output temperature": (
        setting("output_temperature", NAN),
        "output_temperature = nan: expected a finite number >= 0",
    ),
    "a negative output temperature": (setting("output_temperature", -1), "output_temperature = -1"),
    "a string output temperature": (
        setting("output_temperature", "hot"),
        "output_temperature = 'hot'",
    ),
    "zero bits": (setting("num_bits", 0), "num_bits = 0: expected an integer in 1..8"),
    "string bits": (setting("num_bits", "4"), "num_bits = '4'"),
    "another image size": (setting("image_shape", [16, 16, 1]), "image_shape = [16, 16, 1]"),
    "a broken image shape": (setting("image_shape", "8x8"), "image_shape = '8x8'"),
    "no run config": (setting("hvae_config", None), "hvae_config = None"),
    "an unknown key": (setting("exec", "os.system"), "has an unknown key 'exec'"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_keras_config_is_refused_on_load(sampler_file, tmp_path, case) -> None:
    import keras

    change, fragment = TAMPERED[case]
    path = tampered(sampler_file, tmp_path / "sampler.keras", change)
    with pytest.raises(ConfigError) as caught:
        keras.saving.load_model(path)  # safe mode stays on
    line = caught.value.one_line()
    assert fragment in line and "\n" not in line, line
    assert "export the run again" in line


def test_an_untampered_copy_loads_and_samples(sampler_file, tmp_path) -> None:
    """The tampering itself is no error: the same rewrite with a good seed loads."""
    import keras

    path = tampered(sampler_file, tmp_path / "sampler.keras", setting("seed", 7))
    sampler = keras.saving.load_model(path)
    assert sampler.seed == 7
    levels = keras.ops.convert_to_numpy(sampler(np.ones(2, "float32")))
    assert levels.shape == (2, 8, 8, 1) and levels.max() <= 15


# --- 3. hvae export --force: staged, swapped in, links not followed --------------------------


def fake_writes(monkeypatch, fail_on: str | None = None) -> None:
    """In place of the real (slow) build and save: each entry as a folder (a SavedModel) or a
    file (.keras) holding 'new'; ``fail_on`` an entry: write part of it, then a full disk."""
    from hvae_core import export

    def write(exported, fmt, path: Path) -> None:
        if fmt == "savedmodel":
            path.mkdir()
            (path / "saved_model.pb").write_text("new")
        else:
            path.write_text("new")
        if exported.name == fail_on:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(export, "write_exported", write)
    monkeypatch.setattr(export, "copy_weights", lambda *args: None)
    for cls in (export.Sampler, export.Encoder):
        monkeypatch.setattr(cls, "build", lambda self, input_shape=None: None)


def earlier_export(folder: Path, fmt: str) -> dict[str, str]:
    """An earlier export of ``fmt`` in ``folder``; returns its files and their contents."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("sampler", "encoder"):
        if fmt == "savedmodel":
            (folder / name).mkdir()
            (folder / name / "saved_model.pb").write_text(f"old {name}")
        else:
            (folder / f"{name}.keras").write_text(f"old {name}")
    return contents(folder)


def contents(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): p.read_text() if p.is_file() else "<dir>"
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("fmt", ["keras", "savedmodel"])
def test_a_failed_forced_export_leaves_the_earlier_one(loaded, tmp_path, monkeypatch, fmt) -> None:
    fake_writes(monkeypatch, fail_on="encoder")
    folder = tmp_path / "out"
    before = earlier_export(folder, fmt)
    result = run("export", "RUN", "--format", fmt, "--out", str(folder), "--force")
    assert_one_line_error(result, f"could not write {folder}: No space left on device", 1)
    assert contents(folder) == before  # nothing removed, nothing half-written, no staging


@pytest.mark.parametrize("fmt", ["keras", "savedmodel"])
def test_a_forced_export_replaces_the_earlier_one(loaded, tmp_path, monkeypatch, fmt) -> None:
    fake_writes(monkeypatch)
    folder = tmp_path / "out"
    earlier_export(folder, fmt)
    result = run("export", "RUN", "--format", fmt, "--out", str(folder), "--force")
    assert result.exit_code == 0, result.output
    suffix = ".keras" if fmt == "keras" else ""
    after = contents(folder)
    if fmt == "keras":
        assert after == {"encoder.keras": "new", "sampler.keras": "new"}
    else:
        assert after == {
            "encoder": "<dir>",
            "encoder/saved_model.pb": "new",
            "sampler": "<dir>",
            "sampler/saved_model.pb": "new",
        }
    assert f"{folder / 'sampler'}{suffix}" in result.stdout


def test_force_replaces_a_symlinked_entry_without_touching_what_it_points_at(
    loaded, tmp_path, monkeypatch
) -> None:
    fake_writes(monkeypatch)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    folder = tmp_path / "out"
    earlier_export(folder, "savedmodel")
    shutil.rmtree(folder / "sampler")
    (folder / "sampler").symlink_to(elsewhere, target_is_directory=True)
    result = run("export", "RUN", "--format", "savedmodel", "--out", str(folder), "--force")
    assert result.exit_code == 0, result.output
    assert not (folder / "sampler").is_symlink()
    assert (folder / "sampler" / "saved_model.pb").read_text() == "new"
    assert contents(elsewhere) == {"precious.txt": "keep me"}


def test_a_failed_portable_export_leaves_the_earlier_one(loaded, tmp_path, monkeypatch) -> None:
    pytest.importorskip("tf2onnx")
    from hvae_core import export_portable

    def fail(model, signature, path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(export_portable, "_write_onnx", fail)
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("sampler.onnx", "encoder.onnx", "export.json"):
        (folder / name).write_text("old")
    before = contents(folder)
    result = run("export", "RUN", "--format", "onnx", "--out", str(folder), "--force")
    assert_one_line_error(result, "No space left on device", 1)
    assert contents(folder) == before


def entry(path: Path, kind: str) -> None:
    """``path`` made as a 'file' or a 'folder' holding 'new', or a 'link' to a folder."""
    if kind == "file":
        path.write_text("new")
    elif kind == "folder":
        path.mkdir()
        (path / "inside").write_text("new")
    else:
        path.symlink_to(path.parent / "pointed-at", target_is_directory=True)


@pytest.mark.parametrize("old", ["file", "folder", "link"])
@pytest.mark.parametrize("new", ["file", "folder"])
def test_replace_entry_puts_the_new_entry_in_place(tmp_path, old, new) -> None:
    (tmp_path / "pointed-at").mkdir()
    (tmp_path / "pointed-at" / "keep").write_text("kept")
    (tmp_path / "staging").mkdir()
    target, staged = tmp_path / "target", tmp_path / "staging" / "target"
    entry(target, old)
    entry(staged, new)
    replace_entry(staged, target)
    assert not target.is_symlink()
    assert (target.read_text() if new == "file" else (target / "inside").read_text()) == "new"
    assert (tmp_path / "pointed-at" / "keep").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pointed-at", "staging", "target"]


def test_replace_entry_puts_the_old_folder_back_when_the_move_fails(tmp_path, monkeypatch) -> None:
    target = tmp_path / "sampler"
    target.mkdir()
    (target / "old").write_text("old")
    staged = tmp_path / "new"
    staged.mkdir()
    real_replace = os.replace

    def full_disk(src, dst):
        if Path(src) == staged:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        replace_entry(staged, target)
    assert (target / "old").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "sampler"]


def test_export_model_refuses_a_bad_output_temperature(model, tmp_path) -> None:
    from hvae_core.export import export_model

    for bad in (NAN, -1.0, "1", True):
        with pytest.raises(HvaeError, match="output_temperature must be a finite number >= 0"):
            export_model(model, "keras", tmp_path / "x", output_temperature=bad)
    assert not (tmp_path / "x").exists()


# --- what hvae export prints -----------------------------------------------------------------


@pytest.mark.slow  # two fresh processes that import TensorFlow: about 60 s on 2 cores
@pytest.mark.parametrize(
    "args", [["--backend", "jax"], ["--format", "onnx"]], ids=["keras-on-jax", "onnx"]
)
def test_export_prints_nothing_but_what_it_wrote(run_dir, tmp_path, args) -> None:
    """Keras' saving imports TensorFlow on JAX too (its native lines printed after the
    backend's filter), and Keras' ONNX shim makes NumPy warn as it loads."""
    if args[-1] == "onnx":
        pytest.importorskip("tf2onnx")
    from test_startup_noise import NOISE, hvae

    code, output = hvae("export", str(run_dir), "--out", str(tmp_path / "x"), *args)
    assert code == 0, output[-3000:]
    assert output.startswith("wrote ") and len(output.strip().splitlines()) == 1, output
    assert NOISE.findall(output) == [], output
