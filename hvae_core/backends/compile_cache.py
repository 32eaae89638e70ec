"""Persistent compilation caches: a step compiled once on a machine is loaded by every later
process that compiles the same program (a second run, a resume, evaluate, sample, analyze).

hvae uses each backend's own cache and only chooses where it lives and turns it on, before the
backend starts (``configure``, called by ``select.select_backend``):

- JAX: its persistent compilation cache (``jax_compilation_cache_dir``), with the minimum
  compile time and entry size lowered to 0 so that hvae's compiles are all cached. Its key
  hashes the lowered program (StableHLO), the compile options, the XLA flags, the devices and
  the jax and jaxlib versions.
- TensorFlow: XLA's persistent cache of ``tf.function(jit_compile=True)`` clusters
  (``TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=...``). Its key fingerprints the cluster's
  graph and signature, and on loading it checks the stored HLO against the one it would
  compile (strict signature checks); the TensorFlow version is not in its key, so it is in
  the folder's name.
- torch: Inductor's own caches (``TORCHINDUCTOR_CACHE_DIR``); only ``run.torch_compile`` uses
  them.

Each backend caches under ``<cache dir>/<backend>/<backend versions>/``: a backend upgrade
starts an empty folder and never reads an executable another version wrote. hvae's own version
is not in the path: hvae changes the compiled code only through the program it hands the
backend, which every key above hashes.

A cache that cannot be written turns itself off for the process, and an unreadable entry is
removed before the backend can read it (TensorFlow would fail the run on it): either way one
warning line, and the step compiles as it would without a cache.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hvae_core.errors import RunWarning

CACHE_DIR_ENV = "HVAE_CACHE_DIR"  # the folder of hvae's caches (default: the user cache dir)
ENABLE_ENV = "HVAE_COMPILE_CACHE"  # "0": no persistent compilation cache
OFF_VALUES = ("0", "false", "no", "off")
BACKENDS = ("jax", "tensorflow", "torch")
TF_CACHE_FLAG = "--tf_xla_persistent_cache_directory"
# Entries are checked once, then recorded by size and time in this file in the folder.
CHECKED = "checked.json"

_configured: dict[str, Path | None] = {}  # backend -> its folder in use (None: off), per process


class CompileCacheWarning(RunWarning):
    """The compilation cache could not be used as it is (the run goes on, compiling)."""


@dataclass(frozen=True)
class State:
    """Whether the cache is on, and why (for ``hvae cache info``)."""

    enabled: bool
    reason: str


def cache_root() -> Path:
    """$HVAE_CACHE_DIR, else ``hvae`` in the platform's user cache folder ($XDG_CACHE_HOME or
    ~/.cache on Linux, ~/Library/Caches on macOS, %LOCALAPPDATA% on Windows)."""
    explicit = os.environ.get(CACHE_DIR_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "hvae" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "hvae"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hvae"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def version_tag(backend: str) -> str:
    """The versions that make a backend's executables: the name of its cache's subfolder."""
    names = {"jax": ("jax", "jaxlib"), "tensorflow": ("tensorflow",), "torch": ("torch",)}
    return "-".join(f"{name}{_version(name)}" for name in names[backend])


def backend_folder(backend: str) -> Path:
    """Where ``backend`` caches its compiled code for the installed versions."""
    return cache_root() / backend / version_tag(backend)


def state(config_enabled: bool = True) -> State:
    """On, unless $HVAE_COMPILE_CACHE or ``run.compile_cache`` turns it off."""
    value = os.environ.get(ENABLE_ENV, "").strip().lower()
    if value in OFF_VALUES:
        return State(False, f"${ENABLE_ENV}={os.environ[ENABLE_ENV].strip()}")
    if not config_enabled:
        return State(False, "run.compile_cache is false")
    if value:
        return State(True, f"${ENABLE_ENV}={os.environ[ENABLE_ENV].strip()}")
    return State(
        True, f"the default; ${ENABLE_ENV}=0, or a run's run.compile_cache: false, turns it off"
    )


def _default_warn(message: str) -> None:
    warnings.warn(message, CompileCacheWarning, stacklevel=3)


def configure(
    backend: str, enabled: bool = True, warn: Callable[[str], None] | None = None
) -> Path | None:
    """Turn ``backend``'s persistent compilation cache on (unless ``enabled`` is false or the
    environment turns it off), before the backend starts; the folder in use, or None.

    Never raises: a folder that cannot be written leaves the cache off, and unreadable
    entries are removed, each with one warning (``warn``; default: a ``CompileCacheWarning``).
    Once per process and backend: the backends read these settings once, when they start.
    """
    if backend in _configured:
        return _configured[backend]
    warn = warn or _default_warn
    folder: Path | None = None
    if backend in BACKENDS and state(enabled).enabled:
        folder = backend_folder(backend)
        problem = _writable(folder)
        if problem is not None:
            warn(f"compile cache off: cannot write {folder} ({problem}); compiling without it")
            folder = None
        else:
            removed, problem = _remove_unreadable(backend, folder)
            if problem is not None:
                warn(
                    f"compile cache off: cannot remove an unreadable entry of {folder} "
                    f"({problem}); compiling without it"
                )
                folder = None
            elif removed:
                warn(
                    f"compile cache: removed {removed} unreadable "
                    f"entr{'y' if removed == 1 else 'ies'} from {folder}; compiling "
                    f"{'it' if removed == 1 else 'them'} again"
                )
    if folder is not None:
        _apply(backend, folder)
    _configured[backend] = folder
    return folder


def _writable(folder: Path) -> str | None:
    """None when files can be created in ``folder`` (made if missing), else why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def _apply(backend: str, folder: Path) -> None:
    """The backend's own settings, in the environment (read when it starts; inherited by the
    processes it launches) and, where it has already started, in its config."""
    if backend == "jax":
        settings = {
            "JAX_COMPILATION_CACHE_DIR": str(folder),
            # JAX caches only compiles over 1 s by default; hvae's smaller ones pay too.
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        }
        for name, value in settings.items():
            os.environ.setdefault(name, value)
        if "jax" in sys.modules:  # started already (a notebook, the tests): its config
            update = sys.modules["jax"].config.update
            update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
            for name, kind in (("min_compile_time_secs", float), ("min_entry_size_bytes", int)):
                value = os.environ[f"JAX_PERSISTENT_CACHE_{name.upper()}"]
                update(f"jax_persistent_cache_{name}", kind(value))
    elif backend == "tensorflow":
        flags = os.environ.get("TF_XLA_FLAGS", "")
        if not any(f.split("=", 1)[0] == TF_CACHE_FLAG for f in flags.split()):
            os.environ["TF_XLA_FLAGS"] = f"{flags} {TF_CACHE_FLAG}={folder}".strip()
    elif backend == "torch":
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))


def entry_files(backend: str, folder: Path) -> list[Path]:
    """The cache entries of ``backend`` in ``folder`` (one per compiled program)."""
    if not folder.is_dir():
        return []
    if backend == "jax":
        return sorted(folder.glob("*-cache"))
    if backend == "tensorflow":
        return sorted(folder.glob("*.pb"))
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _remove_unreadable(backend: str, folder: Path) -> tuple[int, str | None]:
    """Remove the entries the backend could not read: how many, and why that failed if it
    did. Entries are checked once; the record of checked ones is best effort."""
    if backend == "torch":  # Inductor checks its own entries and recompiles
        return 0, None
    record = folder / CHECKED
    try:
        checked = json.loads(record.read_text())
        if not isinstance(checked, dict):
            checked = {}
    except (OSError, ValueError):
        checked = {}
    seen: dict[str, list[int]] = {}
    removed = 0
    for path in entry_files(backend, folder):
        try:
            info = path.stat()
        except OSError:  # removed meanwhile by another process
            continue
        mark = [info.st_size, info.st_mtime_ns]
        if checked.get(path.name) == mark:
            seen[path.name] = mark
            continue
        if _readable(backend, path):
            seen[path.name] = mark
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            return removed, exc.strerror or type(exc).__name__
        removed += 1
    if seen != checked:
        try:
            temp = folder / f".{CHECKED}.{os.getpid()}"
            temp.write_text(json.dumps(seen))
            os.replace(temp, record)
        except OSError:
            pass
    return removed, None


def _readable(backend: str, path: Path) -> bool:
    """Whether an entry is whole: a JAX entry decompresses; a TensorFlow entry is a protobuf
    whose fields all end within the file and that holds its key, HLO and executable."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if backend == "jax":
        return _jax_entry_whole(data)
    return _tf_entry_whole(data)


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _jax_entry_whole(data: bytes) -> bool:
    if data[:4] == ZSTD_MAGIC:  # JAX compresses with zstd where it is installed
        try:
            import zstandard
        except ImportError:
            return True  # nothing here can check it; JAX itself warns if it cannot read it
        try:
            return len(zstandard.ZstdDecompressor().decompress(data)) > 4
        except zstandard.ZstdError:
            return False
    try:
        return len(zlib.decompress(data)) > 4  # 4 bytes of compile time, then the executable
    except zlib.error:
        return False


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


# tensorflow.XlaSerializedCacheEntry: key = 1, hlo_module = 2, executable = 3 (bytes).
TF_ENTRY_FIELDS = {1, 2, 3}


def _tf_entry_whole(data: bytes) -> bool:
    fields = set()
    pos = 0
    try:
        while pos < len(data):
            tag, pos = _varint(data, pos)
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 1:
                pos += 8
            elif wire == 2:
                length, pos = _varint(data, pos)
                pos += length
            elif wire == 5:
                pos += 4
            else:
                return False
            if pos > len(data):
                return False
            fields.add(number)
    except ValueError:
        return False
    return fields >= TF_ENTRY_FIELDS


@dataclass(frozen=True)
class Usage:
    """One backend's cache on disk, over every version folder."""

    backend: str
    folder: Path
    bytes: int
    entries: int
    versions: list[str]


def usage(backend: str) -> Usage:
    """Size and entry count of ``backend``'s cache (every version folder)."""
    top = cache_root() / backend
    versions = sorted(p.name for p in top.iterdir() if p.is_dir()) if top.is_dir() else []
    size = entries = 0
    for version in versions:
        folder = top / version
        entries += len(entry_files(backend, folder))
        for path in folder.rglob("*"):
            try:
                if path.is_file():
                    size += path.stat().st_size
            except OSError:
                pass
    return Usage(backend, top, size, entries, versions)


def clear(backend: str | None = None) -> list[Path]:
    """Remove the cache of ``backend`` (None: every backend's); the folders removed."""
    removed = []
    for name in [backend] if backend else BACKENDS:
        folder = cache_root() / name
        if folder.exists():
            shutil.rmtree(folder)
            removed.append(folder)
    return removed
