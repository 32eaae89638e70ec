"""The trained-model surfaces under hostile input (issue #34): ``hvae_core.load`` and the
:class:`~hvae_core.trained.TrainedModel` methods, the checkpoint a run loads from, and the
commands that load a run. Every case works, or ends as one clear error naming the problem."""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hvae_plugins.datasets.digits import digits_images
from test_hostile_input import assert_one_line_error

from hvae_core import cli as cli_module
from hvae_core.cli import cli
from hvae_core.config import resolve_config
from hvae_core.errors import HvaeError, InputError
from hvae_core.run import files as rundir


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def run_dir(untrained_tiny_run: Path) -> Path:
    return untrained_tiny_run  # read only: tests that change a run copy it first


@pytest.fixture(scope="module")
def model(run_dir):
    import hvae_core

    return hvae_core.load(run_dir)


@pytest.fixture
def never_loaded(monkeypatch) -> None:
    """Fail the test if a command gets as far as loading the run's model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_module, "_load", refuse)


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


def rewrite_checkpoint(run_dir: Path, change_arrays=None, change_meta=None) -> None:
    path = run_dir / rundir.CHECKPOINT
    arrays, meta = rundir.load_checkpoint(path)
    if change_arrays is not None:
        change_arrays(arrays)
    if change_meta is not None:
        change_meta(meta)
    rundir.save_checkpoint(path, arrays, meta)


# --- the Python API -------------------------------------------------------------------------

IMAGES = digits_images()[:3]
NAN = float("nan")

# (call, what it must equal, or the error it must end in: a fragment of its one line)
API_CASES = {
    # A path or a string where images belong is refused by its type, never iterated.
    "encode a file name": (lambda m, r: m.encode("img.png"), "images must be an array"),
    "encode a Path": (lambda m, r: m.encode(Path("img.png")), "got a PosixPath ('img.png')"),
    "elbo a string": (lambda m, r: m.elbo("x"), "got a str ('x')"),
    "elbo a dict": (lambda m, r: m.elbo({"a": IMAGES}), "got a dict"),
    "elbo bytes": (lambda m, r: m.elbo(b"\x00"), "got a bytes"),
    "elbo batches of strings": (lambda m, r: m.elbo(s for s in ["a"]), "got a str ('a')"),
    "encode None": (lambda m, r: m.encode(None), "images must be an array of pixel levels"),
    "elbo an int": (lambda m, r: m.elbo(5), "got an int (5)"),
    "reconstruct an int": (lambda m, r: m.reconstruct(5), "got an int (5)"),
    "interpolate a file name": (lambda m, r: m.interpolate("a.png", IMAGES[0]), "got a str"),
    # Empty or one-shot iterables where an array belongs.
    "elbo an empty iterator": (lambda m, r: m.elbo(iter([])), "no images to evaluate"),
    "encode an iterator": (lambda m, r: m.encode(iter([])), "got a list_iterator"),
    "reconstruct a generator": (lambda m, r: m.reconstruct(x for x in []), "got a generator"),
    "bound of an iterator": (lambda m, r: m.log_likelihood(iter([]), 2), "got a list_iterator"),
    "encode a ragged list": (lambda m, r: m.encode([[1], [1, 2]]), "images must be an array"),
    # Temperatures: any real number, a sequence of them, nothing else.
    "numpy float32 temperature": (
        lambda m, r: m.sample(2, np.float32(0.5), seed=0),
        lambda m, r: m.sample(2, 0.5, seed=0),
    ),
    "0-d array temperature": (
        lambda m, r: m.sample(2, np.array(0.5), seed=0),
        lambda m, r: m.sample(2, 0.5, seed=0),
    ),
    "Decimal temperature": (
        lambda m, r: m.sample(2, Decimal("0.5"), seed=0),
        lambda m, r: m.sample(2, 0.5, seed=0),
    ),
    "numpy temperatures per layer": (
        lambda m, r: m.sample(2, np.full(4, 0.5, np.float32), seed=0),
        lambda m, r: m.sample(2, 0.5, seed=0),
    ),
    "None temperature": (lambda m, r: m.sample(2, None), "temperature must be a number, got None"),
    "string temperature": (lambda m, r: m.sample(2, "hot"), "got 'hot'"),
    "bool temperature": (lambda m, r: m.sample(2, True), "temperature must be a number, got True"),
    "dict temperature": (lambda m, r: m.sample(2, {"a": 1}), "got {'a': 1}"),
    "NaN Decimal temperature": (lambda m, r: m.sample(2, Decimal("NaN")), "finite number >= 0"),
    "reconstruct string temperature": (
        lambda m, r: m.reconstruct(IMAGES, temperature="hot"),
        "temperature must be a number, got 'hot'",
    ),
    # latent_layers: an integer in range, never coerced.
    "latent_layers 1.5": (
        lambda m, r: m.reconstruct(IMAGES, latent_layers=1.5),
        "latent_layers must be an integer in 0..4 (or None: all), got 1.5",
    ),
    "latent_layers '2'": (lambda m, r: m.reconstruct(IMAGES, latent_layers="2"), "got '2'"),
    "latent_layers True": (lambda m, r: m.reconstruct(IMAGES, latent_layers=True), "got True"),
    "latent_layers nan": (lambda m, r: m.reconstruct(IMAGES, latent_layers=NAN), "got nan"),
    "latent_layers 5": (lambda m, r: m.reconstruct(IMAGES, latent_layers=5), "got 5"),
    "latent_layers numpy int": (
        lambda m, r: m.reconstruct(IMAGES, latent_layers=np.int64(2), seed=0),
        lambda m, r: m.reconstruct(IMAGES, latent_layers=2, seed=0),
    ),
    # load: a run directory, named by a path.
    "load None": (lambda m, r: _load(None), "run_dir must be the path of a run directory"),
    "load an int": (lambda m, r: _load(123), "got an int (123)"),
    "load an empty path": (lambda m, r: _load(""), "run_dir is empty"),
    "load a checkpoint of another type": (lambda m, r: _load(r, checkpoint=5), "checkpoint must"),
    "load the run's config.yaml": (
        lambda m, r: _load(r / "config.yaml"),
        "is the run's config.yaml, not its run directory",
    ),
    "load an over-long path": (lambda m, r: _load("x" * 300), "File name too long"),
    "load an over-long checkpoint": (
        lambda m, r: _load(r, checkpoint="x" * 300),
        "checkpoint 'xxxx",
    ),
    "load jit as a string": (lambda m, r: _load(r, jit="no"), "jit must be True, False or None"),
    "load verbose as None": (lambda m, r: _load(r, verbose=None), "verbose must be True or False"),
    "load a backend of another type": (lambda m, r: _load(r, backend=5), "got an int (5)"),
    # Work beyond the limits (drawn and held at once; K forward passes per image).
    "sample beyond the limit": (lambda m, r: m.sample(10**9), "n = 1,000,000,000: at most 100,000"),
    "draw noise beyond the limit": (lambda m, r: m.draw_noise(10**9), "at most 100,000 images"),
    "bound beyond the limit": (
        lambda m, r: m.log_likelihood(IMAGES, 10**9),
        "num_samples = 1,000,000,000: at most 10,000 draws per call",
    ),
    "load the run's checkpoint": (
        lambda m, r: _load(r / rundir.CHECKPOINT),
        "is a file, not a run directory",
    ),
}


def _load(*args, **kwargs):
    import hvae_core

    return hvae_core.load(*args, **kwargs)


@pytest.mark.parametrize("case", list(API_CASES))
def test_the_api_works_or_fails_in_one_clear_line(model, run_dir, case) -> None:
    call, expected = API_CASES[case]
    if callable(expected):
        np.testing.assert_array_equal(call(model, run_dir), expected(model, run_dir))
        return
    with pytest.raises(HvaeError) as caught:
        call(model, run_dir)
    error = caught.value
    line = error.one_line()
    assert expected in line, line
    assert "\n" not in line and len(line) < 400, line
    if case.startswith("load") or "beyond" in case:
        assert error.hint, line
    if not case.startswith("load"):  # what a caller handed a method: a ValueError too
        assert isinstance(error, InputError), line


# --- the checkpoint -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_a_checkpoint_array_of_another_float_width_is_refused(run_dir, tmp_path, dtype) -> None:
    copy = copy_run(run_dir, tmp_path)
    arrays, _ = rundir.load_checkpoint(copy / rundir.CHECKPOINT)
    name = next(k for k in sorted(arrays) if k.startswith("ema/"))

    def narrow(arrays):
        arrays[name] = arrays[name].astype(dtype)

    rewrite_checkpoint(copy, narrow)
    wanted = np.dtype(dtype).name
    with pytest.raises(HvaeError, match=f"{name}: dtype {wanted} in the checkpoint, float32 in"):
        _load(copy)


def test_a_mixed_precision_model_takes_float32_weights_only() -> None:
    """Under mixed_bfloat16 the variables are float32 master weights (the layers compute in
    bfloat16): a float32 checkpoint fits them, a float16 one does not."""
    import keras

    from hvae_core.model.hvae import HVAE
    from hvae_core.model.weights import assign_saved

    cfg = resolve_config("tiny", overrides=["model.precision=mixed_bfloat16"])
    hvae = HVAE(cfg, (8, 8, 1), 4, seed=0)
    hvae.build_weights()
    assert hvae.compute_dtype == "bfloat16"
    saved = {
        f"model/{i:05d}": keras.ops.convert_to_numpy(v.value) for i, v in enumerate(hvae.variables)
    }
    assert {a.dtype for a in saved.values()} == {np.dtype("float32")}
    assign_saved(saved, "model", hvae.variables)
    saved["model/00000"] = saved["model/00000"].astype(np.float16)
    with pytest.raises(ValueError, match="model/00000: dtype float16 in the checkpoint, float32"):
        assign_saved(saved, "model", hvae.variables)


def test_a_checkpoint_of_another_image_shape_says_so(run_dir, tmp_path) -> None:
    copy = copy_run(run_dir, tmp_path)

    def bigger(meta):
        meta["image_shape"] = [16, 16, 1]

    rewrite_checkpoint(copy, change_meta=bigger)
    with pytest.raises(HvaeError) as caught:
        _load(copy)
    line = caught.value.one_line()
    assert "records 16x16x1 images; the run's config.yaml describes 8x8 images" in line, line
    assert "dataset" not in line and "(hint: " in line


# --- the commands ---------------------------------------------------------------------------


def test_evaluate_json_of_a_nan_checkpoint_is_strict_json_with_a_warning(run_dir, tmp_path) -> None:
    copy = copy_run(run_dir, tmp_path)

    def poison(arrays):
        for name in sorted(arrays):
            if name.startswith(("model/", "ema/")) and arrays[name].dtype.kind == "f":
                arrays[name] = np.full_like(arrays[name], np.nan)

    rewrite_checkpoint(copy, poison)
    result = run("evaluate", str(copy), "--json", "--quiet")
    assert result.exit_code == 0, result.output

    def refuse(constant: str):
        raise AssertionError(f"not strict JSON: {constant}")

    row = json.loads(result.stdout.strip().splitlines()[-1], parse_constant=refuse)
    assert row["bpd"] is None and row["images"] > 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, result.stderr
    assert "not finite" in warnings[0] and "bpd" in warnings[0], warnings[0]


def test_analyze_refuses_fewer_than_two_images(tmp_path, never_loaded) -> None:
    line = assert_one_line_error(run("analyze", str(tmp_path), "--images", "1"), "--images 1", 1)
    assert "2 or more" in line


def write_refused(tmp_path: Path) -> list[Path]:
    """Folders no file can be created in, as this user: /sys (not even root may), and a
    read-only folder (root writes into those)."""
    folders = [Path("/sys")] if sys.platform.startswith("linux") and Path("/sys").is_dir() else []
    if os.geteuid() != 0:
        read_only = tmp_path / "read-only"
        read_only.mkdir()
        read_only.chmod(0o555)
        folders.append(read_only)
    if not folders:
        pytest.skip("no folder refuses this user's writes here (root, no /sys)")
    return folders


def test_sample_checks_every_output_is_writable_before_loading(tmp_path, never_loaded) -> None:
    for folder in write_refused(tmp_path):
        out = tmp_path / "ok.png"
        result = run("sample", str(tmp_path), "--out", str(out), "--npz", str(folder / "x.npz"))
        assert_one_line_error(result, f"cannot write {folder / 'x.npz'}", 1)
        assert not out.exists()
        assert not (folder / "x.npz").exists()
        result = run("sample", str(tmp_path), "--out", str(folder / "grid.png"))
        assert_one_line_error(result, f"cannot write {folder / 'grid.png'}", 1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "read-only") == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["sample", "--n", "100001"], "--n 100,001: at most 100,000 images"),
        (["sample", "--n", "100000000"], "--n 100,000,000: at most 100,000 images"),
        (["evaluate", "--iw-samples", "20000"], "--iw-samples 20,000: at most 10,000"),
    ],
)
def test_work_beyond_the_limits_is_refused_before_loading(tmp_path, never_loaded, args, fragment):
    command, *flags = args
    assert_one_line_error(run(command, str(tmp_path), *flags), fragment, 1)


def test_sample_from_images_refuses_more_draws_than_the_limit(run_dir, tmp_path, monkeypatch):
    from hvae_core.trained import TrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(TrainedModel, "reconstruct", refuse)
    source, out = tmp_path / "two.npz", tmp_path / "grid.png"
    np.savez(source, images=IMAGES[:2])
    result = run("sample", str(run_dir), "--from", str(source), "--n", "50001", "--out", str(out))
    line = assert_one_line_error(result, "--n 50,001 draws of 2 images: at most 100,000", 1)
    assert "--seed" in line
    assert not out.exists()


@pytest.mark.parametrize("command", ["export", "analyze"])
def test_an_empty_out_is_refused(tmp_path, never_loaded, monkeypatch, command) -> None:
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run(command, str(tmp_path / "run"), "--out", ""), "--out is empty", 1)
    assert list(tmp_path.iterdir()) == []


# --- outputs that cannot be written, names that are too long ---------------------------------

LONG = "x" * 300  # longer than any file system's longest name (255 bytes)


@pytest.mark.parametrize(
    "args",
    [
        ["export", "RUN", "--out", LONG],
        ["export", "RUN", "--out", f"sub/{LONG}"],
        ["analyze", "RUN", "--out", LONG],
        ["sample", "RUN", "--out", f"{LONG}.png"],
        ["sample", "RUN", "--out", f"sub/{LONG}.png"],
        ["analyze", "RUN", "--out", f"sub/{LONG}/figures"],
        ["sample", "RUN", "--out", "ok.png", "--npz", f"{LONG}.npz"],
        ["sample", "RUN", "--from", f"{LONG}.npz", "--out", "ok.png"],
        ["interpolate", "RUN", LONG, "b.png", "--out", "ok.png"],
    ],
)
def test_an_over_long_name_is_one_line_before_loading(tmp_path, never_loaded, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    line = assert_one_line_error(run(*args), "File name too long", 1)
    assert "characters)" in line and len(line) < 400, line  # the name, cut to be read
    assert list(tmp_path.iterdir()) == []


def test_export_and_analyze_check_their_folder_is_writable_before_loading(
    tmp_path, never_loaded
) -> None:
    for folder in write_refused(tmp_path):
        for command in ("export", "analyze"):
            result = run(command, str(tmp_path / "run"), "--out", str(folder / "new"))
            assert_one_line_error(result, f"cannot create the folder {folder / 'new'}", 1)
            result = run(command, str(tmp_path / "run"), "--out", str(folder))
            assert_one_line_error(result, f"cannot write into {folder}", 1)
        assert not (folder / "new").exists()


def test_an_output_folder_under_a_file_is_one_line(tmp_path, never_loaded) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    for command in ("export", "analyze"):
        result = run(command, str(tmp_path / "run"), "--out", str(file / "a" / "b"))
        assert_one_line_error(result, f"{file} is a file", 1)
    result = run("sample", str(tmp_path / "run"), "--out", str(file / "grid.png"))
    assert_one_line_error(result, f"cannot create the folder {file}: {file} is a file", 1)
    assert file.read_text() == "x"


def test_an_output_folder_that_is_a_broken_link_says_so(tmp_path, never_loaded) -> None:
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    for command in ("export", "analyze"):
        result = run(command, str(tmp_path / "run"), "--out", str(link))
        assert_one_line_error(result, f"is a link to {tmp_path / 'gone'}, which does not exist", 1)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_analyze_refuses_a_non_finite_temperature_before_loading(tmp_path, never_loaded, value):
    # click's FloatRange let NaN through: the figures were half written when the model refused.
    result = run("analyze", str(tmp_path), "--temperature", value)
    assert_one_line_error(result, f"'{value}' is not a finite number", 2)


def test_a_failed_check_leaves_no_folder_behind(tmp_path, never_loaded) -> None:
    """The writability check makes nothing: a command refused later leaves no empty folder."""
    # never_loaded refuses at the load, after the output checks passed.
    with pytest.raises(AssertionError, match="the model was loaded"):
        CliRunner().invoke(
            cli, ["export", "RUN", "--out", str(tmp_path / "a" / "b")], catch_exceptions=False
        )
    assert list(tmp_path.iterdir()) == []


# --- analyze and evaluate on splits too small ------------------------------------------------


@pytest.mark.parametrize(("split", "count"), [("one", "1 image;"), ("none", "0 images;")])
def test_analyze_refuses_a_split_of_fewer_than_two_images(
    run_dir, model, tmp_path, monkeypatch, split, count
) -> None:
    from hvae_core.data.arrays import InMemoryDataset

    images = np.asarray(IMAGES, np.uint8)
    dataset = InMemoryDataset({"val": images, "one": images[:1], "none": images[:0]}, 4)
    monkeypatch.setattr(cli_module, "_load", lambda *args, **kwargs: model)
    monkeypatch.setattr(cli_module, "_dataset", lambda *args: dataset)
    out = tmp_path / "analysis"
    line = assert_one_line_error(
        run("analyze", str(run_dir), "--out", str(out), "--split", split), count, 1
    )
    assert "2 or more" in line and "splits: val, one, none" in line
    assert not out.exists()


def test_evaluate_refuses_an_empty_split(model, monkeypatch) -> None:
    from hvae_core.data.arrays import InMemoryDataset

    dataset = InMemoryDataset({"test": np.zeros((0, 8, 8, 1), np.uint8), "val": IMAGES}, 4)
    monkeypatch.setattr(cli_module, "_load", lambda *args, **kwargs: model)
    monkeypatch.setattr(cli_module, "_dataset", lambda *args: dataset)
    line = assert_one_line_error(run("evaluate", "RUN"), "split 'test' of dataset digits", 1)
    assert "holds no images" in line and "batch" not in line, line


# --- a config.yaml or dataset at another bit depth than the checkpoint ------------------------


def test_a_config_at_another_bit_depth_is_refused(run_dir, tmp_path) -> None:
    copy = copy_run(run_dir, tmp_path)
    config = copy / "config.yaml"
    text = config.read_text()
    assert "  num_bits: null\n" in text
    config.write_text(text.replace("  num_bits: null\n", "  num_bits: 2\n"))
    with (
        warnings.catch_warnings(record=True) as caught_warnings,
        pytest.raises(HvaeError) as caught,
    ):
        warnings.simplefilter("always")
        _load(copy)
    # Not "loading it as config.yaml says": it is not loaded at all.
    assert [str(w.message) for w in caught_warnings] == []
    line = caught.value.one_line()
    assert "records 4-bit images; the run's config.yaml sets data.num_bits to 2" in line, line
    assert_one_line_error(run("evaluate", str(copy), "--quiet"), "data.num_bits to 2", 1)


def test_a_dataset_at_another_bit_depth_is_refused(run_dir, tmp_path) -> None:
    """The checkpoint trained on 3 bits (of a dataset that has 4): its images would be scored
    at 4 bits by a 3-bit model."""
    copy = copy_run(run_dir, tmp_path)

    def three_bits(meta):
        meta["num_bits"] = 3

    rewrite_checkpoint(copy, change_meta=three_bits)
    result = run("evaluate", str(copy), "--quiet")
    assert_one_line_error(result, "dataset digits gives 4-bit images; the run's model was", 1)


class RecordedBar:
    """Stands in for the rich progress bar: records where it was moved to."""

    def __init__(self) -> None:
        self.at: list[float] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_task(self, name: str, total: float) -> int:
        self.total = total
        self.at.append(0)
        return 0

    def advance(self, task: int, by: float) -> None:
        self.at.append(self.at[-1] + by)

    def update(self, task: int, completed: float) -> None:
        self.at.append(completed)


def test_evaluate_moves_its_bar_within_an_importance_sampling_batch(model, monkeypatch) -> None:
    from hvae_core.data.arrays import InMemoryDataset

    dataset = InMemoryDataset({"test": np.asarray(IMAGES, np.uint8)}, 4)
    bar = RecordedBar()
    monkeypatch.setattr(cli_module, "_load", lambda *args, **kwargs: model)
    monkeypatch.setattr(cli_module, "_dataset", lambda *args: dataset)
    monkeypatch.setattr(cli_module, "_progress", lambda *args: bar)
    result = run("evaluate", "RUN", "--iw-samples", "4", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    # The ELBO's pass: 2 then 1 image. The bound's: 2 images x 4 draws in 4 calls of 2 draws,
    # then 1 x 4 in 2 calls: the bar moves after each call, not once per batch.
    assert bar.at == [0, 2, 3, 3.5, 4, 4.5, 5, 5.5, 6], bar.at
    assert bar.total == 6
