"""CIFAR-10 from the official python release, with VDVAE's splits.

Files (https://www.cs.toronto.edu/~kriz/cifar.html, "CIFAR-10 python version"): either the
archive ``cifar-10-python.tar.gz`` or its extracted folder ``cifar-10-batches-py/`` holding
``data_batch_1`` ... ``data_batch_5`` and ``test_batch``. The data folder may hold either, or be
``cifar-10-batches-py/`` itself. Each batch is a pickled dict whose ``b"data"`` is a uint8 array
of 10,000 rows of 3,072 values in CHW order (1,024 red, then green, then blue, row-major).

Splits, exactly VDVAE's (``data.py`` of openai/vdvae):

* the 50,000 training images are stacked in batch order (1..5) and split by
  ``sklearn.model_selection.train_test_split(trX, test_size=5000, random_state=11172018)``;
  ``train`` is its first result (45,000 images, in the order it returns them), ``val`` its
  second (5,000);
* ``test`` is the official ``test_batch`` (10,000 images), in file order.

The batches are pickles, and unpickling runs whatever a pickle asks for: they are read with
:mod:`.safe_pickle`, which admits only what pickled plain data and numpy arrays need (as Python 2
wrote the release, and as Python 3 writes re-packaged copies with protocols 0 to 5).
"""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from hvae_core.api import HvaeError, InMemoryDataset, resolve_data_dir

from ._files import bad_file, missing_files
from .safe_pickle import RefusedGlobal, loads_numpy_only

VAL_SIZE = 5000
SPLIT_SEED = 11172018
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
OBTAIN = (
    "download the CIFAR-10 python version (cifar-10-python.tar.gz) from "
    "https://www.cs.toronto.edu/~kriz/cifar.html and put it (or its extracted "
    "cifar-10-batches-py/) in the data folder"
)
EXPECTED = (ARCHIVE, f"{FOLDER}/ with {', '.join(TRAIN_BATCHES)}, {TEST_BATCH}")


def load_cifar10(options: Any, data: Any) -> InMemoryDataset:
    folder = resolve_data_dir(data.data_dir, "cifar10", path=options.path, obtain=OBTAIN)
    batches = read_batches(folder)
    train = np.concatenate([rows_to_nhwc(batches[name]) for name in TRAIN_BATCHES])
    test = rows_to_nhwc(batches[TEST_BATCH])
    train_idx, val_idx = split_indices(len(train))
    return InMemoryDataset(
        {"train": train[train_idx], "val": train[val_idx], "test": test}, num_bits=8
    )


def split_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """VDVAE's split of ``n`` stacked training images as index arrays.

    ``train_test_split`` draws one permutation from ``n`` and ``random_state`` alone and applies
    it to every array it is given, so splitting ``arange(n)`` and indexing gives exactly what
    ``train_test_split(trX, ...)`` gives, without copying the images twice.
    """
    from sklearn.model_selection import train_test_split

    if n <= VAL_SIZE:
        raise HvaeError(
            f"CIFAR-10 has {n} training images, too few to hold out {VAL_SIZE} for validation",
            hint=OBTAIN,
        )
    train_idx, val_idx = train_test_split(np.arange(n), test_size=VAL_SIZE, random_state=SPLIT_SEED)
    return train_idx, val_idx


def rows_to_nhwc(rows: np.ndarray) -> np.ndarray:
    """(N, 3072) CHW rows as a contiguous uint8 (N, 32, 32, 3) array."""
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def read_batches(folder: Path) -> dict[str, np.ndarray]:
    """The ``data`` rows of every batch, from the extracted folder or the archive."""
    wanted = (*TRAIN_BATCHES, TEST_BATCH)
    for candidate in (folder / FOLDER, folder):
        if all((candidate / name).is_file() for name in wanted):
            return {
                name: parse_batch(read_bytes(candidate / name), candidate / name) for name in wanted
            }
    archive = folder / ARCHIVE
    if archive.is_file():
        return read_archive(archive)
    partial = [c / n for c in (folder / FOLDER, folder) for n in wanted if (c / n).is_file()]
    problem = ""
    if partial:
        have = {p.name for p in partial}
        problem = "missing " + ", ".join(n for n in wanted if n not in have)
    raise missing_files("CIFAR-10", folder, EXPECTED, OBTAIN, problem)


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise bad_file(path, exc.strerror or str(exc), OBTAIN) from None


def read_archive(archive: Path) -> dict[str, np.ndarray]:
    wanted = {f"{FOLDER}/{name}": name for name in (*TRAIN_BATCHES, TEST_BATCH)}
    found: dict[str, np.ndarray] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:  # one pass: a gzip stream is cheapest read in order
                name = wanted.get(member.name.removeprefix("./"))
                if name is None or not member.isfile():
                    continue
                f = tar.extractfile(member)
                assert f is not None
                found[name] = parse_batch(f.read(), archive, member=member.name)
    except HvaeError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise bad_file(archive, f"{type(exc).__name__}: {exc}", OBTAIN) from None
    missing = [wanted_name for wanted_name in wanted.values() if wanted_name not in found]
    if missing:
        raise bad_file(archive, f"the archive lacks {FOLDER}/{', '.join(missing)}", OBTAIN)
    return found


def parse_batch(raw: bytes, path: Path, member: str | None = None) -> np.ndarray:
    """The uint8 (N, 3072) rows of one pickled batch, checked."""
    where = f"{path} (member {member})" if member else str(path)
    try:
        batch = loads_numpy_only(raw)
    except RefusedGlobal as exc:
        raise HvaeError(
            f"{where} is not a CIFAR-10 batch: the pickle asks to call {exc.module}.{exc.name}, "
            "which could run code; refused, nothing was executed",
            hint=f"delete the file and get the official release; {OBTAIN}",
        ) from None
    except Exception as exc:  # a truncated or garbled pickle raises almost anything
        raise HvaeError(
            f"{where} is unreadable or malformed: {type(exc).__name__}: {exc}",
            hint=f"the file may be truncated; {OBTAIN}",
        ) from None
    rows = batch.get(b"data") if isinstance(batch, dict) else None
    if not isinstance(rows, np.ndarray):
        raise HvaeError(
            f"{where} is malformed: expected a dict with a numpy array under b'data'",
            hint=OBTAIN,
        )
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3072:
        raise HvaeError(
            f"{where} is malformed: expected uint8 rows of 3072 values, got {rows.dtype} "
            f"{rows.shape}",
            hint=OBTAIN,
        )
    labels = batch.get(b"labels")
    if labels is not None and len(labels) != len(rows):
        raise HvaeError(
            f"{where} is malformed: {len(rows)} images but {len(labels)} labels", hint=OBTAIN
        )
    return rows
