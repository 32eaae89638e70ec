"""A run directory under stress: two writers, stale files, hostile checkpoint metadata, an
edited config, a full or read-only disk, a model too big to build, bad seeds (issue #17).

Most cases stop before any model is built; the ones that need a model share one trainer."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import trainer_with_run
from safetensors.numpy import save_file
from test_hostile_input import assert_one_line_error

from hvae_core import cli as cli_module
from hvae_core.cli import cli
from hvae_core.config import resolve_config
from hvae_core.errors import HvaeError, InputError, RunWarning
from hvae_core.run import RunDirectory
from hvae_core.run import checkpoint as checkpoint_meta
from hvae_core.run import files as rundir
from hvae_core.run import lock as runlock

FAST = ["run.jit=false", "training.batch_size=64"]


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def never_built(monkeypatch):
    """Fail the test if a command gets as far as building a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(cli_module, "_assemble", refuse)


def config_only_run(tmp_path: Path, name: str = "run") -> Path:
    """A run directory that holds its config and nothing else yet."""
    path = tmp_path / name
    path.mkdir()
    rundir.write_config(path, resolve_config("tiny", {"epochs": 1}, FAST))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- 1. one writer per run --------------------------------------------------------------------


@pytest.fixture
def live_pid():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_trainer_on_a_run_stops_at_once_naming_the_holder(
    tmp_path, live_pid, never_built
) -> None:
    run_dir = config_only_run(tmp_path)
    lock = run_dir / runlock.LOCK
    lock.write_text(f"{live_pid} {socket.gethostname()}\n")
    before = snapshot(run_dir)
    line = assert_one_line_error(
        run("train", "--resume", str(run_dir)), f"is in use by process {live_pid}", code=1
    )
    assert str(lock) in line
    assert snapshot(run_dir) == before  # the holder's lock and files untouched


def test_a_lock_from_another_host_is_never_taken_over(tmp_path, never_built) -> None:
    run_dir = config_only_run(tmp_path)
    (run_dir / runlock.LOCK).write_text(f"{dead_pid()} some-other-host\n")
    assert_one_line_error(
        run("train", "--resume", str(run_dir)), "on some-other-host (lock file", code=1
    )


def test_a_stale_lock_and_stale_temporary_files_are_cleared_on_resume(
    tmp_path, never_built
) -> None:
    run_dir = config_only_run(tmp_path)
    pid = dead_pid()
    (run_dir / runlock.LOCK).write_text(f"{pid} {socket.gethostname()}\n")
    stale = [run_dir / ".checkpoint.safetensors.k2j3h4.tmp", run_dir / ".metrics.jsonl.x1.tmp"]
    for path in stale:
        path.write_bytes(b"torn")
    result = run("train", "--resume", str(run_dir))
    # Taken over with a warning; then the run has no checkpoint to resume, before any model.
    warning, error = result.stderr.strip().splitlines()
    assert warning.startswith("warning: taking over the lock of process ") and str(pid) in warning
    assert error.startswith(f"error: no checkpoint at {run_dir / rundir.CHECKPOINT}")
    assert "(hint: " in error and result.exit_code == 1
    assert not any(p.exists() for p in stale)
    assert not (run_dir / runlock.LOCK).exists()  # released on the error


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_a_lock_held_by_a_killed_but_unreaped_process_is_taken_over(tmp_path) -> None:
    # Right after `kill -9` the trainer is a zombie until its parent waits for it: it answers
    # signal 0 but holds nothing any more.
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        process.kill()
        stat = Path(f"/proc/{process.pid}/stat")
        while stat.read_text().rpartition(")")[2].split()[0] != "Z":
            pass
        run_dir = RunDirectory(config_only_run(tmp_path))
        run_dir.lock_path.write_text(f"{process.pid} {socket.gethostname()}\n")
        warnings = []
        run_dir.lock(warnings.append)
        assert len(warnings) == 1 and f"process {process.pid}" in warnings[0]
        assert run_dir.lock_path.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
        run_dir.unlock()
    finally:
        process.wait()


def test_the_lock_is_released_on_errors_and_ctrl_c(tmp_path) -> None:
    run_dir = RunDirectory(config_only_run(tmp_path))
    for exc in (HvaeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), run_dir.writing():
            assert run_dir.lock_path.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
            raise exc
        assert not run_dir.lock_path.exists()


def test_one_process_cannot_take_a_run_it_already_writes_twice(tmp_path) -> None:
    run_dir = RunDirectory(config_only_run(tmp_path))
    with run_dir.writing():
        with pytest.raises(HvaeError, match=f"in use by process {os.getpid()}"):
            run_dir.lock()
        assert run_dir.lock_path.exists()  # the failed attempt does not release it


def test_an_empty_lock_file_is_held_not_taken_over(tmp_path) -> None:
    # Between a writer creating the file and writing its line, it is empty.
    run_dir = RunDirectory(config_only_run(tmp_path))
    run_dir.lock_path.touch()
    with pytest.raises(HvaeError, match="names no process"):
        run_dir.lock()
    assert run_dir.lock_path.exists()


# --- 3. checkpoint metadata: a schema, one line each ---------------------------------------


def good_meta() -> dict:
    return {
        "position": {
            "epoch": 1,
            "batch": 3,
            "step": 26,
            "consecutive_skips": 0,
            "best_val": None,
            "bad_epochs": 0,
            "epoch_seconds": 1.5,
            "sums": {"loss": 1.0, "count": 3},
        },
        "num_bits": 4,
        "image_shape": [8, 8, 1],
        "hvae_version": "0.1.0",
        "plugins": [{"kind": "dataset", "name": "digits", "package": "hvae", "version": "0.1"}],
    }


def with_position(**changes) -> dict:
    meta = good_meta()
    meta["position"].update(changes)
    return meta


def without(field: str) -> dict:
    meta = good_meta()
    del meta[field]
    return meta


def checkpoint_with(path: Path, hvae: str | None) -> Path:
    metadata = {"hvae": hvae} if hvae is not None else None
    save_file({"model/00000": np.zeros(2, np.float32)}, str(path), metadata=metadata)
    return path


BAD_META = [
    ("", "not JSON"),
    ("[]", "expected a JSON object, got list"),
    ('"text"', "expected a JSON object, got str"),
    ("{}", "no field position"),
    ("[" * 100_000, "not JSON"),
    (json.dumps({**good_meta(), "extra": 1}), "unknown field extra"),
    (json.dumps(without("image_shape")), "no field image_shape"),
    (json.dumps({**good_meta(), "position": []}), "position must be an object"),
    (json.dumps({**good_meta(), "num_bits": "4"}), 'num_bits must be an integer in 1..16, got "4"'),
    (json.dumps({**good_meta(), "image_shape": [8, 8]}), "image_shape must be a list of 3"),
    (json.dumps({**good_meta(), "plugins": [{"kind": 1}]}), "plugins must be a list of"),
    (json.dumps(with_position(epoch=-1)), "position.epoch must be an integer >= 0, got -1"),
    (json.dumps(with_position(step=-5)), "position.step must be an integer >= 0, got -5"),
    (json.dumps(with_position(batch=True)), "position.batch must be an integer >= 0, got true"),
    (json.dumps(with_position(epoch=1.5)), "position.epoch must be an integer >= 0, got 1.5"),
    (json.dumps(with_position(sums={"loss": "x"})), "position.sums must be an object of numbers"),
    (json.dumps(with_position(surprise=1)), "unknown field position.surprise"),
    (json.dumps({**good_meta(), "position": {"epoch": 1}}), "no field position.batch"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD_META)
def test_bad_checkpoint_metadata_is_one_line(tmp_path, text, fragment) -> None:
    path = checkpoint_with(tmp_path / "c.safetensors", text)
    with pytest.raises(HvaeError) as err:
        rundir.read_checkpoint_meta(path)
    assert "has invalid metadata" in err.value.message and fragment in err.value.message
    assert "\n" not in err.value.one_line() and err.value.hint


def test_a_checkpoint_without_hvae_metadata_is_one_line(tmp_path) -> None:
    path = checkpoint_with(tmp_path / "c.safetensors", None)
    with pytest.raises(HvaeError, match="invalid metadata: no hvae entry"):
        rundir.load_checkpoint(path)


def test_good_metadata_and_metadata_of_older_versions_pass() -> None:
    where = Path("c.safetensors")
    assert checkpoint_meta.validate(good_meta(), where) == good_meta()
    old = without("plugins")
    del old["hvae_version"]  # written before runs recorded their plugins
    assert checkpoint_meta.validate(old, where) == old


def test_a_batch_position_past_the_epoch_is_one_line() -> None:
    where = Path("c.safetensors")
    checkpoint_meta.check_position(with_position(batch=23), where, 23)  # at its end
    with pytest.raises(HvaeError, match="stands at batch 24 of an epoch, which now has 23"):
        checkpoint_meta.check_position(with_position(batch=24), where, 23)


def test_resume_with_bad_metadata_answers_before_building_the_model(tmp_path, never_built) -> None:
    run_dir = config_only_run(tmp_path)
    checkpoint_with(run_dir / rundir.CHECKPOINT, json.dumps(with_position(epoch=-1)))
    assert_one_line_error(
        run("train", "--resume", str(run_dir)), "position.epoch must be an integer >= 0", code=1
    )
    assert_one_line_error(run("sample", str(run_dir)), "has invalid metadata", code=1)


# --- 6. a missing checkpoint: before the model is built ---------------------------------------


def test_resume_of_a_run_with_no_checkpoint_answers_before_building_the_model(
    tmp_path, never_built
) -> None:
    run_dir = config_only_run(tmp_path)
    before = snapshot(run_dir)
    assert_one_line_error(run("train", "--resume", str(run_dir)), "no checkpoint at", code=1)
    assert snapshot(run_dir) == before


# --- 7. where a new run cannot be written ----------------------------------------------------


@pytest.mark.parametrize(
    "target", ["file", "file/sub", "set:file", "set:file/sub/deeper"], ids=lambda t: t
)
def test_a_save_dir_that_is_a_file_is_one_line(tmp_path, never_built, target) -> None:
    (tmp_path / "file").write_text("not a folder")
    path = str(tmp_path / target.removeprefix("set:"))
    option = (
        ["--set", f"run.save_dir={path}"] if target.startswith("set:") else ["--save-dir", path]
    )
    # click checks --save-dir itself when the path exists; either way it is one line.
    result = run("train", "--config", "tiny", *option)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and "Traceback" not in result.output
    assert "(hint: " in lines[0] and ("is a file" in lines[0] or "is a directory" in lines[0])
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders"
)
def test_a_read_only_save_dir_is_one_line(tmp_path, never_built) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("chmod has no effect here")
        assert_one_line_error(
            run("train", "--config", "tiny", "--save-dir", str(folder)),
            "cannot create the run directory under",
            code=1,
        )
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_new_run_whose_first_write_fails_leaves_no_directory(tmp_path, monkeypatch, code):
    def fail(*args):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(rundir.os, "fsync", fail)
    cfg = resolve_config("tiny", overrides=FAST)
    with pytest.raises(HvaeError) as err:
        RunDirectory.create(tmp_path / "runs", cfg)
    assert err.value.message.startswith("could not write ")
    assert os.strerror(code) in err.value.message and err.value.hint
    assert list((tmp_path / "runs").iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_creating_the_run_directory_on_a_full_or_read_only_disk_is_one_line(
    tmp_path, monkeypatch, code
) -> None:
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.parent == tmp_path / "runs":
            raise OSError(code, os.strerror(code))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(HvaeError, match=f"cannot create the run directory.*{os.strerror(code)}"):
        RunDirectory.create(tmp_path / "runs", resolve_config("tiny", overrides=FAST))


# --- 9. seeds of the Python API ---------------------------------------------------------------


def test_analyze_refuses_a_seed_out_of_range_before_loading(tmp_path) -> None:
    assert_one_line_error(
        run("analyze", str(tmp_path), "--seed", "-1"), "-1 is not in the range 0<=x<=4294967295"
    )


# --- what needs a model: one trainer, shared ------------------------------------------------


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """A trainer of the tiny preset and its run directory, checkpointed before any step."""

    cfg = resolve_config("tiny", {"epochs": 1}, FAST)
    trainer = trainer_with_run(cfg, tmp_path_factory.mktemp("runs") / "run")
    trainer.save()
    return trainer


def copy_run(trainer, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(trainer.run_dir, copy)
    return copy


def rewrite_checkpoint(run_dir: Path, arrays=None, meta=None) -> None:
    path = run_dir / rundir.CHECKPOINT
    old_arrays, old_meta = rundir.load_checkpoint(path)
    rundir.save_checkpoint(path, arrays or old_arrays, meta or old_meta)


def edit_activation(run_dir: Path) -> None:
    """Edit config.yaml as a user might: another activation keeps every weight's shape."""
    config = run_dir / "config.yaml"
    text = config.read_text()
    assert "  b_act: silu\n" in text
    config.write_text(text.replace("  b_act: silu\n", "  b_act: relu\n"))


def restore_from(trainer, run_dir: Path) -> None:
    saved = trainer.run
    trainer.run = RunDirectory(run_dir)
    try:
        trainer.restore(trainer.run.read_checkpoint(trainer.config))
    finally:
        trainer.run = saved


def test_a_checkpoint_records_the_fingerprint_of_its_model_and_data(trainer) -> None:
    meta = rundir.read_checkpoint_meta(trainer.run_dir / rundir.CHECKPOINT)
    sections = meta["fingerprint_config"]
    assert meta["fingerprint"] == checkpoint_meta.fingerprint(sections)
    assert {"model", "data"} <= set(sections) and "training" not in sections


def test_resume_after_editing_the_model_in_config_yaml_is_refused(
    trainer, tmp_path, never_built
) -> None:
    run_dir = copy_run(trainer, tmp_path)
    edit_activation(run_dir)
    before = snapshot(run_dir)
    line = assert_one_line_error(
        run("train", "--resume", str(run_dir)), "trained with another model or data config", code=1
    )
    assert "(differs in model.b_act)" in line
    assert snapshot(run_dir) == before
    edited = RunDirectory(run_dir).config()
    with pytest.raises(HvaeError, match=r"differs in model\.b_act"):  # what restore() checks
        checkpoint_meta.refuse_other_config(trainer_meta(run_dir), edited, run_dir)


def trainer_meta(run_dir: Path) -> dict:
    return rundir.read_checkpoint_meta(run_dir / rundir.CHECKPOINT)


def test_a_training_option_may_still_change_on_resume(trainer, tmp_path) -> None:
    run_dir = copy_run(trainer, tmp_path)
    cfg = RunDirectory(run_dir).resume_config(None, ["training.learning_rate=0.001"], {})
    assert RunDirectory(run_dir).read_checkpoint(cfg).meta["fingerprint"]


def test_a_resume_reads_the_checkpoint_once(trainer, tmp_path, monkeypatch) -> None:
    """The checkpoint is read (arrays and metadata) and validated once per resume, before the
    model is built, and the trainer restores from that one read."""
    run_dir = copy_run(trainer, tmp_path)
    reads, parses = [], []
    real_read, real_parse = rundir._read_checkpoint, checkpoint_meta.parse

    def counted_read(path, arrays):
        reads.append((Path(path).name, arrays))
        return real_read(path, arrays)

    def counted_parse(text, path):
        parses.append(Path(path).name)
        return real_parse(text, path)

    monkeypatch.setattr(rundir, "_read_checkpoint", counted_read)
    monkeypatch.setattr(checkpoint_meta, "parse", counted_parse)
    result = run("train", "--resume", str(run_dir), "--quiet")
    assert result.exit_code == 0, result.output
    assert reads == [(rundir.CHECKPOINT, True)]
    assert parses == [rundir.CHECKPOINT]
    assert rundir.read_metrics(run_dir)[-1]["epoch"] == 1


def test_a_checkpoint_without_a_fingerprint_still_resumes(trainer, tmp_path) -> None:
    run_dir = copy_run(trainer, tmp_path)
    _, meta = rundir.load_checkpoint(run_dir / rundir.CHECKPOINT)
    old = {k: v for k, v in meta.items() if not k.startswith("fingerprint")}
    rewrite_checkpoint(run_dir, meta=old)
    edit_activation(run_dir)
    restore_from(trainer, run_dir)  # nothing to compare with: as before fingerprints


@pytest.mark.slow  # loads the model: 8 s on 2 cores
def test_loading_a_run_whose_config_was_edited_warns(trainer, tmp_path) -> None:
    import hvae_core

    run_dir = copy_run(trainer, tmp_path)
    edit_activation(run_dir)
    with pytest.warns(RunWarning, match=r"differs from the config .* \(in model\.b_act\)"):
        model = hvae_core.load(run_dir, backend="tensorflow")
    assert model.epoch == 0


def test_a_batch_position_past_the_epoch_is_refused_on_restore(trainer, tmp_path) -> None:
    run_dir = copy_run(trainer, tmp_path)
    _, meta = rundir.load_checkpoint(run_dir / rundir.CHECKPOINT)
    meta["position"]["batch"] = trainer.steps_per_epoch + 1
    rewrite_checkpoint(run_dir, meta=meta)
    with pytest.raises(HvaeError, match="stands at batch 24 of an epoch, which now has 23"):
        restore_from(trainer, run_dir)


def test_checkpoint_arrays_of_the_wrong_dtype_are_one_line(trainer, tmp_path) -> None:
    run_dir = copy_run(trainer, tmp_path)
    arrays, _ = rundir.load_checkpoint(run_dir / rundir.CHECKPOINT)
    name = next(k for k in sorted(arrays) if k.startswith("model/") and arrays[k].dtype.kind == "f")
    arrays[name] = arrays[name].astype(np.int32)
    rewrite_checkpoint(run_dir, arrays=arrays)
    with pytest.raises(HvaeError, match=f"{name}: dtype int32 in the checkpoint, float32 in"):
        restore_from(trainer, run_dir)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_checkpoint_write_keeps_the_old_one_byte_for_byte(
    trainer, tmp_path, monkeypatch, code
) -> None:
    run_dir = copy_run(trainer, tmp_path)
    before = snapshot(run_dir)

    def fail(*args):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(rundir.os, "fsync", fail)
    saved = trainer.run
    trainer.run = RunDirectory(run_dir)
    try:
        with pytest.raises(HvaeError, match=f"could not write .*{os.strerror(code)}"):
            trainer.save()
    finally:
        trainer.run = saved
    assert snapshot(run_dir) == before  # and no temporary file is left beside it
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(before)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True, "3"])
def test_sample_refuses_a_seed_out_of_range(trainer, seed) -> None:
    from hvae_core.trained import TrainedModel

    model = TrainedModel(trainer.model, trainer.config, RunDirectory(trainer.run_dir), {}, None)
    with pytest.raises(InputError, match=r"seed must be an integer in 0\.\.2\*\*32 - 1"):
        model.sample(2, seed=seed)


def test_a_model_too_big_for_memory_at_start_is_one_line(tmp_path, monkeypatch) -> None:
    from hvae_core.model.hvae import HVAE

    class ResourceExhaustedError(Exception):  # what TensorFlow raises, by name
        pass

    def exhausted(self):
        raise ResourceExhaustedError("OOM when allocating tensor with shape [4096, 4096]")

    monkeypatch.setattr(HVAE, "build_weights", exhausted)
    line = assert_one_line_error(
        run("train", "--config", "tiny", "--save-dir", str(tmp_path / "runs"), "--set", FAST[0]),
        "out of memory building the model (ResourceExhaustedError)",
        code=1,
    )
    assert "model.*_width" in line
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []
