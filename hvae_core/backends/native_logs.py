"""What the backends' native libraries may print: hidden by default, all of it with --verbose.

TensorFlow and jaxlib log from C++ straight to file descriptor 2, in absl's format::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1796097350.526645   14490 port.cc:153] oneDNN custom operations are on. ...
    E0000 00:00:1796097406.934646   14490 cuda_platform.cc:52] failed call to cuInit: ...

None of it is about the run, and to a newcomer it reads as errors. Two things silence it, and
both are needed:

- ``TF_CPP_MIN_LOG_LEVEL=3``, read by TensorFlow's and jaxlib's logging when they start: no
  INFO, WARNING or ERROR lines (the cuInit failure of a machine without a GPU, XLA's slow
  compile alarm). FATAL messages still print, and failures reach Python as exceptions, whose
  tracebacks are untouched. Set only where the user has not set it.
- Lines written while a library's shared object loads, before its logging has read any
  setting (the ``absl::InitializeLog()`` banner and the oneDNN and CUDA-driver notices above,
  once per copy of absl that TensorFlow loads): no variable reaches them. While the backend is
  imported, file descriptor 2 goes through a filter process that drops lines in absl's log
  format and passes everything else on. A separate process, so that what a crashing import
  writes last still gets out.

Python's own warnings and loggers are left alone: they are how libraries and hvae say
something that matters.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

from hvae_core.errors import HvaeError

LOG_LEVEL_ENV = "HVAE_LOG_LEVEL"
QUIET, VERBOSE = "quiet", "verbose"

# Read by the native libraries when they load: set before the backend is imported.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "3"}

# A line of native logging, as the filter process drops it: absl's (and glog's) format
# (before absl::InitializeLog() its date and time read "0000 00:00:<seconds since 1970>"), the
# date-stamped format of TensorFlow before 2.16, and absl's banner. FATAL lines are kept.
NATIVE_LOG_LINE = (
    rb"[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] "
    rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] [^ \]]+:\d+\] "
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
)

# The filter process: standard library only, started with -I -S so that it starts fast and
# reads nothing of the user's environment.
_FILTER = f"""
import re, sys
noise = re.compile({NATIVE_LOG_LINE!r})
source, sink = sys.stdin.buffer.raw, sys.stdout.buffer
pending = b""
while chunk := source.read(65536):
    *lines, pending = (pending + chunk).split(b"\\n")
    kept = b"".join(line + b"\\n" for line in lines if not noise.match(line))
    if kept:
        sink.write(kept)
        sink.flush()
if pending and not noise.match(pending):
    sink.write(pending)
    sink.flush()
"""


def log_level(verbose: bool = False) -> str:
    """``verbose`` (the --verbose flag) if asked for, else $HVAE_LOG_LEVEL, else ``quiet``."""
    if verbose:
        return VERBOSE
    value = os.environ.get(LOG_LEVEL_ENV, "").strip().lower()
    if value in ("", QUIET):
        return QUIET
    if value == VERBOSE:
        return VERBOSE
    raise HvaeError(
        f"${LOG_LEVEL_ENV}={os.environ[LOG_LEVEL_ENV]!r}: expected {QUIET} or {VERBOSE}",
        hint=f"unset it, or set {LOG_LEVEL_ENV}={VERBOSE} to see everything the libraries log",
    )


def quiet_native_logs() -> None:
    """Set the variables that keep the native libraries' logging quiet, where the user has not
    set them. Must happen before the backend is imported: each library reads them once."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def native_log_filter() -> Iterator[None]:
    """While the block runs, lines in absl's log format written to file descriptor 2 (by any
    code in this process) are dropped; everything else gets through, in order.

    Does nothing where file descriptors cannot be redirected this way (not POSIX, stderr
    closed) or the filter process cannot start: the lines then show, nothing else changes.
    """
    child = _start_filter() if os.name == "posix" else None
    if child is None:
        yield
        return
    process, saved, write_end = child
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # closes this process's last write end: the filter reads to the end
        os.close(saved)
        # A process started in the block holds the pipe as its stderr for as long as it lives;
        # the filter then stays to serve it, and this process does not wait for that.
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


def _start_filter() -> tuple[subprocess.Popen[bytes], int, int] | None:
    """The filter process, the saved stderr it writes to and the pipe's write end; None if
    stderr is closed or the process cannot start."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        return None
    try:
        read_end, write_end = os.pipe()
    except OSError:
        os.close(saved)
        return None
    try:
        # Its own session: a Ctrl-C at the terminal interrupts the import, not the filter, which
        # then still passes on the traceback. close_fds: the filter must not hold the pipe's
        # write end, or it would never see the end of its input.
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _FILTER],
            stdin=read_end,
            stdout=saved,
            stderr=saved,
            close_fds=True,
            start_new_session=True,
        )
    except OSError:
        os.close(write_end)
        os.close(saved)
        return None
    finally:
        os.close(read_end)
    return process, saved, write_end
