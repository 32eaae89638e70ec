"""Experiment trackers: the core's contract with them, and the first-party TensorBoard tracker,
whose event files are read back with TensorBoard's own reader."""

from __future__ import annotations

import inspect
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from tracking import StrictTracker, config_text, events, one_line_error, run, scalars

from hvae_core.config import resolve_config
from hvae_core.errors import HvaeError
from hvae_core.interfaces import Tracker
from hvae_core.plugins import get_registry
from hvae_core.run import RunDirectory
from hvae_core.testing import temporary_plugin
from hvae_core.training.trainer import Trainer


def png_pixels(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded)))


# --- configuration and command line ---------------------------------------------------------


def test_trackers_are_chosen_by_name_with_options_per_tracker() -> None:
    plain = resolve_config("tiny")
    assert plain.run.trackers == [] and "tracker" not in plain.to_dict()
    cfg = resolve_config("tiny", {"tracker": ["tensorboard"]}, ["tracker.tensorboard.images=false"])
    assert cfg.run.trackers == ["tensorboard"]
    assert cfg.to_dict()["tracker"] == {"tensorboard": {"images": False, "layer_scalars": True}}
    assert cfg.options("tracker")["tensorboard"].images is False
    # The resolved config loads back unchanged.
    assert resolve_config(base=cfg.to_dict()).to_dict() == cfg.to_dict()
    shown = yaml.safe_load(run("config", "show", "--tracker", "tensorboard").stdout)
    assert shown["run"]["trackers"] == ["tensorboard"] and "tensorboard" in shown["tracker"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--tracker", "nope"], "unknown tracker 'nope'"),
        (["--tracker", "tensorboard", "--tracker", "tensorboard"], "tensorboard listed twice"),
        (["--set", "tracker.tensorboard.images=false"], "for tracker 'tensorboard', which is not"),
        (["--tracker", "tensorboard", "--set", "tracker.tensorboard.nope=1"], "unknown key"),
        (["--set", "model.z_width.x=1"], "expected section.key=value"),
    ],
)
def test_tracker_mistakes_are_one_line(args, fragment) -> None:
    one_line_error(run("config", "show", *args), fragment)


def test_a_trained_model_loads_without_the_runs_trackers_installed(tmp_path) -> None:
    from hvae_core.config import load_run_config

    registry = get_registry()
    with temporary_plugin(registry, "tracker", "gone", StrictTracker):
        cfg = resolve_config("tiny", {"tracker": ["gone", "tensorboard"]})
        (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    with pytest.raises(HvaeError, match="unknown tracker 'gone'"):  # resuming needs it
        load_run_config(tmp_path / "config.yaml")
    loaded = load_run_config(tmp_path / "config.yaml", trackers=False)  # what load() reads
    assert loaded.run.trackers == [] and loaded.options("tracker") == {}
    assert loaded.to_dict()["model"] == cfg.to_dict()["model"]


def test_no_save_with_a_tracker_is_refused(tmp_path) -> None:
    result = run("train", "--no-save", "--tracker", "tensorboard", "--save-dir", str(tmp_path))
    one_line_error(result, "run.trackers: tensorboard chosen, but run.save is false")


def test_a_missing_tensorboardx_stops_the_run_before_it_starts(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # what an absent package gives
    monkeypatch.delitem(sys.modules, "hvae_plugins.trackers.tensorboard", raising=False)
    save_dir = tmp_path / "runs"
    result = run(
        *("train", "--config", "tiny", "--tracker", "tensorboard", "--quiet"),
        *("--save-dir", str(save_dir), "--set", "run.jit=false"),
    )
    one_line_error(result, "needs the package tensorboardX")
    assert "(hint: pip install tensorboardX)" in result.stderr
    assert not save_dir.exists()  # before any run directory was made


# --- the core's side (a run calling trackers: test_training.py's cadence test) -------------


def test_the_test_double_has_the_protocols_signatures() -> None:
    for name in ("start", "log_epoch", "close"):
        ours, theirs = (inspect.signature(getattr(c, name)) for c in (StrictTracker, Tracker))
        assert [(p.name, p.kind) for p in ours.parameters.values()] == [
            (p.name, p.kind) for p in theirs.parameters.values()
        ]
        assert all(p.default is p.empty for p in ours.parameters.values())
    assert isinstance(StrictTracker([]), Tracker)


# --- the TensorBoard tracker, called directly ------------------------------------------------


def tensorboard_tracker(run_dir: Path, *overrides: str) -> tuple[Any, Any]:
    cfg = resolve_config("tiny", {"tracker": ["tensorboard"]}, overrides)
    factory = get_registry().get("tracker", "tensorboard").load()
    return factory(cfg.options("tracker")["tensorboard"], cfg.run, run_dir=run_dir), cfg


def test_tensorboard_writes_scalars_layers_images_and_the_config(tmp_path) -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (17, 33, 1), dtype=np.uint8)
    color = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
    kl = [0.5, 0.25, 0.0, 1.5]
    tracker, cfg = tensorboard_tracker(tmp_path)
    tracker.start(cfg.to_dict(), 1)
    tracker.log_epoch(
        {
            "epoch": 1,
            "step": 23,
            "train_bpd": 3.5,
            "val_bpd": None,  # non-finite
            "lr": 2e-3,
            "grad_norm_unit": "nats",
            "skipped_updates": 0,
            "val_kl_layers_bpd": kl,
            "flag": True,
        },
        {"samples": gray, "reconstructions": color},
    )
    tracker.log_epoch({"epoch": 2, "step": 46, "train_bpd": 3.25, "val_bpd": 3.0}, {})
    tracker.close()

    reader = events(tmp_path / "tensorboard")
    tags = reader.Tags()
    assert scalars(reader, "train_bpd") == {1: 3.5, 2: 3.25}
    assert scalars(reader, "val_bpd") == {2: 3.0}
    assert scalars(reader, "step") == {1: 23, 2: 46}
    assert scalars(reader, "lr") == {1: pytest.approx(2e-3)}
    assert scalars(reader, "skipped_updates") == {1: 0}
    assert not {"epoch", "grad_norm_unit", "flag"} & set(tags["scalars"])
    for i, value in enumerate(kl):
        assert scalars(reader, f"val_kl_layers_bpd/{i:02d}") == {1: value}
    [histogram] = reader.Histograms("val_kl_layers_bpd")
    assert histogram.step == 1
    h = histogram.histogram_value
    assert (h.min, h.max, list(h.bucket_limit), list(h.bucket)) == (0, 4, [1, 2, 3, 4], kl)
    [samples] = reader.Images("samples")
    [recons] = reader.Images("reconstructions")
    assert samples.step == recons.step == 1
    pixels = png_pixels(samples.encoded_image_string)
    assert pixels.shape[:2] == (17, 33)
    for channel in range(pixels.shape[-1]):  # grayscale may come back as RGB
        np.testing.assert_array_equal(pixels[..., channel], gray[..., 0])
    np.testing.assert_array_equal(png_pixels(recons.encoded_image_string)[..., :3], color)
    assert config_text(reader) == {0: cfg.to_dict()}


def test_tensorboard_options_and_a_resume_that_goes_back(tmp_path) -> None:
    tracker, cfg = tensorboard_tracker(
        tmp_path, "tracker.tensorboard.images=false", "tracker.tensorboard.layer_scalars=false"
    )
    tracker.start(cfg.to_dict(), 1)
    for epoch in (1, 2, 3):
        grid = np.zeros((4, 4, 1), np.uint8)
        tracker.log_epoch({"epoch": epoch, "val_bpd": 9.0, "kl": [1.0, 2.0]}, {"samples": grid})
    tracker.close()  # then the run resumes from its checkpoint of epoch 1
    again, _ = tensorboard_tracker(tmp_path)
    again.start(cfg.to_dict(), 2)
    again.log_epoch({"epoch": 2, "val_bpd": 7.0}, {})
    again.close()

    reader = events(tmp_path / "tensorboard")
    assert scalars(reader, "val_bpd") == {1: 9.0, 2: 7.0}  # the first session's 2 and 3: gone
    assert reader.Tags()["images"] == [] and "kl/00" not in reader.Tags()["scalars"]
    assert [h.step for h in reader.Histograms("kl")] == [1]


TENSORBOARD_ON_JAX = """
import os, sys
os.environ["KERAS_BACKEND"] = "jax"
from pathlib import Path
import numpy as np
from hvae_core.config import resolve_config
from hvae_core.plugins import get_registry
cfg = resolve_config("tiny", {"tracker": ["tensorboard"]})
make = get_registry().get("tracker", "tensorboard").load()
tracker = make(cfg.options("tracker")["tensorboard"], cfg.run, run_dir=Path(sys.argv[1]))
tracker.start(cfg.to_dict(), 1)
tracker.log_epoch({"epoch": 1, "val_bpd": 1.5}, {"samples": np.zeros((4, 4, 3), np.uint8)})
tracker.close()
print("TENSORFLOW:", "tensorflow" in sys.modules)
"""


def test_tensorboard_imports_no_tensorflow(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", TENSORBOARD_ON_JAX, str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "TENSORFLOW: False" in done.stdout
    assert any((tmp_path / "tensorboard").iterdir())


def test_a_tracker_that_cannot_start_is_one_clear_error(tmp_path) -> None:
    def broken(options, run, *, run_dir):  # noqa: ANN001, ANN202
        raise OSError("no space left")

    expected = r"tracker 'broken' \(tests\) could not start: OSError: no space left"
    with (
        temporary_plugin(get_registry(), "tracker", "broken", broken),
        pytest.raises(HvaeError, match=expected),
    ):
        cfg = resolve_config("tiny", {"epochs": 0, "tracker": ["broken"]}, ["run.jit=false"])
        trainer = Trainer(cfg, RunDirectory(tmp_path), quiet=True)
        trainer.fit()
