"""Nothing on screen but hvae: the backends' native log lines are hidden unless asked for."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from hvae_core.backends import native_logs as logs
from hvae_core.cli import cli
from hvae_core.errors import HvaeError

HVAE = [sys.executable, "-m", "hvae_core"]

# What TensorFlow, absl and XLA print when they log; hvae prints none of it.
NOISE = re.compile(
    r"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+"
    r"|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] "
    r"|absl::InitializeLog|oneDNN|cuda|cuInit|cpu_feature_guard|slow_operation_alarm|slow compile",
    re.IGNORECASE | re.MULTILINE,
)


def hvae(*args: str, timeout: int = 300, **env: str) -> tuple[int, str]:
    """``hvae ARGS`` in a fresh process with the user's logging settings cleared: its exit status
    and everything it printed (stdout, then stderr)."""
    cleared = ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", logs.LOG_LEVEL_ENV)
    clean = {k: v for k, v in os.environ.items() if k not in cleared}
    done = subprocess.run(
        [*HVAE, *args],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def test_the_default_job_prints_nothing_but_hvae(tmp_path) -> None:
    """The default job (default backend, model, dataset and schedule) for 2 epochs, progress
    bars and run directory included."""
    code, output = hvae("train", "--epochs", "2", "--save-dir", str(tmp_path))
    assert code == 0, output[-3000:]
    assert "done: " in output and "hvae: backend jax" in output
    [run_dir] = list(tmp_path.iterdir())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["train_bpd"] < rows[0]["train_bpd"]  # and it learns
    assert NOISE.findall(output) == [], output


@pytest.mark.parametrize("verbose", [False, True])
def test_tensorflow_logs_show_only_with_verbose(verbose) -> None:
    """TensorFlow logs as it loads (absl's banner, oneDNN and CUDA-driver notices) on every
    import on a CPU machine: hidden by default, all there with --verbose."""
    pytest.importorskip("tensorflow")
    flags = ["--verbose"] if verbose else []
    code, output = hvae(
        *("train", "--backend", "tensorflow", "--config", "tiny", "--epochs", "0", "--no-save"),
        *flags,
    )
    assert code == 0, output[-3000:]
    assert "hvae: backend tensorflow" in output
    if verbose:
        assert NOISE.findall(output), output
    else:
        assert NOISE.findall(output) == [], output


FILTERED = """
import os, sys, warnings
from hvae_core.backends.native_logs import native_log_filter

print("before", file=sys.stderr, flush=True)
with native_log_filter():
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written "
                b"to STDERR\\n")
    os.write(2, b"I0000 00:00:1796097350.526645   14490 port.cc:153] oneDNN custom operations"
                b"\\nE1201 04:07:09.817569   16534 cuda_platform.cc:52] failed call to cuInit\\n")
    os.write(2, b"2024-01-01 12:00:00.123456: W tensorflow/tsl/cpu_feature_guard.cc:182] AVX\\n")
    os.write(2, b"a line of its own\\n")
    warnings.warn("a warning that matters")
    print("python's stderr", file=sys.stderr)
    if sys.argv[1:] == ["crash"]:
        os.write(2, b"F1201 04:07:09.817569   16534 flags.cc:234] Unknown flag\\nno newline")
        os.abort()
print("after", file=sys.stderr)
"""


def run_filtered(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", FILTERED, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_filter_drops_native_log_lines_and_passes_everything_else_in_order() -> None:
    done = run_filtered()
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "before"
    assert lines[1] == "a line of its own"
    assert "UserWarning: a warning that matters" in lines[2]
    assert lines[-2:] == ["python's stderr", "after"]
    assert NOISE.findall(done.stderr) == [], done.stderr


def test_what_a_crashing_process_wrote_last_still_gets_out() -> None:
    """A FATAL line and the rest of a process that aborts inside the filter: a native library
    that dies while it loads must not die silently."""
    done = run_filtered("crash")
    assert done.returncode != 0
    assert "F1201 04:07:09.817569   16534 flags.cc:234] Unknown flag" in done.stderr
    assert done.stderr.endswith("no newline"), done.stderr
    assert "a warning that matters" in done.stderr


def test_log_level_is_the_flag_then_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(logs.LOG_LEVEL_ENV, raising=False)
    assert logs.log_level() == logs.QUIET
    assert logs.log_level(verbose=True) == logs.VERBOSE
    monkeypatch.setenv(logs.LOG_LEVEL_ENV, " Verbose ")
    assert logs.log_level() == logs.VERBOSE
    monkeypatch.setenv(logs.LOG_LEVEL_ENV, "quiet")
    assert logs.log_level() == logs.QUIET
    assert logs.log_level(verbose=True) == logs.VERBOSE  # the flag wins
    monkeypatch.setenv(logs.LOG_LEVEL_ENV, "loud")
    with pytest.raises(HvaeError, match="expected quiet or verbose"):
        logs.log_level()


def test_quiet_logging_keeps_the_users_own_setting(monkeypatch) -> None:
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    logs.quiet_native_logs()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    logs.quiet_native_logs()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"


def test_a_bad_log_level_is_one_line_before_any_backend_starts(monkeypatch) -> None:
    monkeypatch.setenv(logs.LOG_LEVEL_ENV, "loud")
    result = CliRunner().invoke(cli, ["train", "--config", "tiny", "--no-save"])
    assert result.exit_code == 1, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: $HVAE_LOG_LEVEL='loud': expected quiet or verbose")
