"""File plumbing shared by the dataset loaders: atomic caches, manifests, clear errors."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hvae_core.api import HvaeError


def missing_files(
    dataset: str, folder: Path, expected: Sequence[str], obtain: str, problem: str = ""
) -> HvaeError:
    """The one error for absent dataset files: where we looked, what we need, where to get it."""
    detail = f" ({problem})" if problem else ""
    return HvaeError(
        f"{dataset} files not found in {folder}{detail}; expected {' or '.join(expected)}",
        hint=f"{obtain}; hvae never downloads anything",
    )


def bad_file(path: Path, problem: str, obtain: str) -> HvaeError:
    """The one error for a dataset file that exists but cannot be used."""
    return HvaeError(
        f"{path} is unreadable or malformed: {problem}",
        hint=f"the file may be truncated or from another release; {obtain}",
    )


def writable_dir(folder: Path, what: str, option: str) -> Path:
    """``folder``, created if needed; an error naming ``option`` if it cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hvae-probe-"):
            pass
    except OSError as exc:
        raise HvaeError(
            f"cannot write the {what} in {folder}: {exc.strerror or exc}",
            hint=f"set {option} to a writable folder",
        ) from None
    return folder


@contextlib.contextmanager
def atomic_npy(path: Path, shape: tuple[int, ...]) -> Iterator[np.memmap]:
    """A new uint8 ``.npy`` of ``shape`` to fill through a memory map, published atomically.

    It is written under a temporary name in the same folder and renamed over ``path`` only when
    the block completes: a killed conversion never leaves a half-written cache behind, and the
    data never needs to fit in memory.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        yield out
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is absent or unreadable (a cache then rebuilds)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def open_npy(path: Path, obtain: str) -> np.memmap:
    """A read-only memory map of a ``.npy`` file; errors name the file."""
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise bad_file(path, str(exc), obtain) from None
    if not isinstance(images, np.memmap):  # np.load maps every plain .npy; be sure
        raise bad_file(path, "not a plain .npy array", obtain)
    return images


def check_nhwc(images: np.ndarray, path: Path, size: int, channels: int, obtain: str) -> None:
    want = f"uint8 (N, {size}, {size}, {channels})"
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, channels):
        extra = ""
        if images.ndim == 4 and images.shape[1:] == (channels, size, size):
            extra = " (channels first; hvae wants channels last, NHWC)"
        raise bad_file(path, f"expected {want}, got {images.dtype} {images.shape}{extra}", obtain)
