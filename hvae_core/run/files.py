"""The run directory: resolved config, metrics, atomic checkpoints, plots and image grids.

Layout (users and scripts depend on it)::

    RUN_DIR/config.yaml          the fully resolved config
    RUN_DIR/metrics.jsonl        one JSON object per epoch
    RUN_DIR/checkpoint.safetensors   the latest training state (arrays + JSON metadata)
    RUN_DIR/samples.png, reconstructions.png, loss.png, grad_norm.png
    RUN_DIR/...                  whatever the run's experiment trackers write there
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from hvae_core.errors import HvaeError
from hvae_core.run import checkpoint as checkpoint_meta

CHECKPOINT = "checkpoint.safetensors"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"


def create_run_dir(save_dir: str | os.PathLike[str], stem: str) -> Path:
    """A new directory under ``save_dir`` (checked by :func:`prepare_save_dir`); an existing
    one is never reused."""
    root = Path(save_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise save_dir_error(root, exc) from None
    base = f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    for attempt in range(1000):
        path = root / (base if attempt == 0 else f"{base}-{attempt}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise save_dir_error(root, exc) from None
        return path
    raise HvaeError(
        f"could not create a new run directory under {root}",
        hint="remove old run directories or choose another --save-dir",
    )


def prepare_save_dir(save_dir: str | os.PathLike[str]) -> Path:
    """``save_dir`` once it is known that a new run can be created there (it is a folder, or
    can be made one, and is writable): what stops a new run there is one line before any
    model is built. Creates nothing: a run that stops while setting up leaves no trace."""
    root = Path(save_dir)
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise save_dir_error(root, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise save_dir_error(root, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))
    return root


def save_dir_error(root: Path, exc: OSError) -> HvaeError:
    """One line for a save directory that cannot hold a new run."""
    if isinstance(exc, FileExistsError | NotADirectoryError):
        blocker = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), root)
        return HvaeError(
            f"cannot create the run directory under {root}: {blocker} is a file",
            hint="give --save-dir (run.save_dir) a folder, or a path where one can be created",
        )
    return HvaeError(
        f"cannot create the run directory under {root}: {exc.strerror or exc}",
        hint=_write_hint(exc, " (--save-dir)"),
    )


def write_error(path: Path, exc: OSError) -> HvaeError:
    """One line for a file that could not be written (full or read-only disk, ...)."""
    return HvaeError(f"could not write {path}: {exc.strerror or exc}", hint=_write_hint(exc))


def _write_hint(exc: OSError, option: str = "") -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free some disk space or choose another location{option}, then try again"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"choose a writable location{option}, or fix the folder's permissions"
    return "check the folder and the disk, then try again"


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()  # what open() would give; mkstemp's files are private (0600)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, then rename over ``path``:
    a crash leaves either the old file or the new one, never a torn one. An OSError (a full or
    read-only disk) is one line of :class:`HvaeError`."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        _write_and_replace(fd, tmp, path, data)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise


def _write_and_replace(fd: int, tmp: str, path: Path, data: bytes) -> None:
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)


def replace_entry(new: Path, target: Path) -> None:
    """Move ``new`` (a file or a folder in ``target``'s folder) to ``target``, replacing what
    is there without following it: a symlink is replaced as a link (what it points at is left
    alone), and an earlier folder is moved aside, then removed only once ``new`` is in its
    place (put back if that move fails). A file over a file or a link is one atomic rename."""
    if not os.path.lexists(target):
        os.replace(new, target)
        return
    if not new.is_dir() and (target.is_symlink() or not target.is_dir()):
        os.replace(new, target)
        return
    # rename() cannot put a folder over a file or a non-empty folder, nor a file over a folder.
    aside = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(target, aside)  # moves a symlink itself, never what it points at
    try:
        os.replace(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    if aside.is_symlink() or not aside.is_dir():
        aside.unlink()
    else:
        shutil.rmtree(aside)


def write_config(run_dir: Path, config: Any) -> None:
    atomic_write_bytes(run_dir / CONFIG, config.to_yaml().encode())


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row as ``metrics.jsonl`` holds it: non-finite numbers (in lists too) as None."""
    return {k: _json_value(v) for k, v in row.items()}


def _json_value(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    clean = json_row(row)
    try:
        with open(run_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise write_error(run_dir / METRICS, exc) from None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash: everything before it stands
    return rows


def truncate_metrics(run_dir: Path, epochs: int) -> None:
    """Keep the rows of the first ``epochs`` epochs (a resumed run rewrites later ones)."""
    rows = [r for r in read_metrics(run_dir) if r.get("epoch", 0) <= epochs]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write_bytes(run_dir / METRICS, text.encode())


def save_checkpoint(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Arrays in safetensors (no pickle: opening one cannot run code) plus JSON metadata."""
    from safetensors.numpy import save

    # np.array, not np.ascontiguousarray: the latter turns scalars (step counters) into 1-d.
    contiguous = {k: np.array(v, order="C") for k, v in arrays.items()}
    data = save(contiguous, metadata={"hvae": json.dumps(meta)})
    atomic_write_bytes(path, data)


def load_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A checkpoint's arrays and its validated metadata (see :mod:`hvae_core.run.checkpoint`)."""
    return _read_checkpoint(path, arrays=True)  # its metadata validated on reading


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's validated metadata alone (its arrays are not read)."""
    return _read_checkpoint(path, arrays=False)[1]


def _read_checkpoint(path: Path, arrays: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from safetensors import safe_open

    if not path.is_file():
        raise HvaeError(
            f"no checkpoint at {path}",
            hint="the run has not finished a checkpoint yet; start a new run",
        )
    try:
        with safe_open(str(path), framework="numpy") as f:
            text = (f.metadata() or {}).get("hvae")
            values = {k: f.get_tensor(k) for k in f.keys()} if arrays else {}  # noqa: SIM118
    except Exception as exc:
        raise HvaeError(
            f"checkpoint {path} is truncated or corrupt ({type(exc).__name__})",
            hint="resume from an intact copy or start a new run",
        ) from None
    return values, checkpoint_meta.parse(text, path)
