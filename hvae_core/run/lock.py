"""One writer per run directory: a lock file holding the writer's pid and host.

``hvae train`` (a new run, or ``--resume``) holds it while it may write the run's files; two
writers would interleave their epochs in ``metrics.jsonl`` and overwrite each other's
checkpoints. Readers (evaluate, sample, analyze, export) do not take it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path

from hvae_core.errors import HvaeError

LOCK = ".hvae.lock"


def _owner_line() -> str:
    return f"{os.getpid()} {socket.gethostname()}\n"


def _read_owner(path: Path) -> tuple[int, str] | None:
    """The (pid, host) a lock file names; None when it names none (empty or garbled: a
    writer between creating it and writing its line, or a file cut short by a crash)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit():
        return None
    return int(parts[0]), parts[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except (OverflowError, ValueError):  # not a pid this system can have
        return False
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has exited but is not yet reaped (Linux): a killed trainer whose parent
    has not waited for it still answers signal 0, but holds nothing any more."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS), or the process is gone
        return False
    # "pid (command) state ...": the command may hold spaces and parentheses.
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _create(path: Path) -> bool:
    """Create the lock file naming this process; False when it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        raise HvaeError(
            f"could not lock the run directory {path.parent}: {exc.strerror or exc}",
            hint="check that the folder exists and is writable",
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_owner_line())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise HvaeError(
            f"could not lock the run directory {path.parent}: {exc.strerror or exc}",
            hint="free some disk space, or check that the folder is writable",
        ) from None
    return True


def _take_over_stale(path: Path, owner: tuple[int, str]) -> bool:
    """Remove a lock whose process is gone, unless another process took it over first
    (renaming is atomic: whoever renames it owns what it moved)."""
    moved = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return True  # another process removed it: try to create it again
    if _read_owner(moved) == owner:
        moved.unlink(missing_ok=True)
        return True
    # A fresh lock was created in between and this process moved it: give it back.
    with contextlib.suppress(OSError):
        os.rename(moved, path)
    return False


def acquire(path: Path, warn: Callable[[str], None]) -> None:
    """Take the lock at ``path`` (see :func:`run_lock`)."""
    host = socket.gethostname()
    for _ in range(3):  # each retry follows a stale lock being removed
        if _create(path):
            return
        owner = _read_owner(path)
        if owner is None and path.exists():
            raise HvaeError(
                f"{path.parent} is locked ({path} names no process)",
                hint=f"if no 'hvae train' is running on this run, delete {path}",
            )
        if owner is None:
            continue  # released between the two looks
        pid, holder = owner
        if holder != host or _alive(pid):
            where = "" if holder == host else f" on {holder}"
            raise HvaeError(
                f"{path.parent} is in use by process {pid}{where} (lock file {path})",
                hint="wait for that training to finish or stop it; if it no longer runs, "
                f"delete {path}",
            )
        if _take_over_stale(path, owner):
            warn(f"taking over the lock of process {pid}, which no longer runs ({path})")
    raise HvaeError(
        f"could not lock {path.parent}: other processes keep taking its lock",
        hint="make sure only one 'hvae train' works on this run",
    )


def release(path: Path) -> None:
    """Remove the lock at ``path`` if this process holds it."""
    if _read_owner(path) == (os.getpid(), socket.gethostname()):
        with contextlib.suppress(OSError):
            path.unlink()


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the ``.*.tmp`` files an interrupted atomic write left in ``run_dir`` (a SIGKILL
    while a checkpoint was written); call only while holding the lock, when no write of
    this run can be in progress. Returns what was removed."""
    removed = []
    for path in Path(run_dir).glob(".*.tmp"):
        if path.is_file() and not path.is_symlink():
            try:
                path.unlink()
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise HvaeError(
                        f"could not remove the stale temporary file {path}: {exc.strerror}",
                        hint="delete it by hand",
                    ) from None
            else:
                removed.append(path)
    return removed
