"""Downsampled ImageNet (32x32 and 64x64), memory-mapped, with VDVAE's splits.

Two forms of the files are read; the folder of one resolution holds one of them:

* **VDVAE's .npy files**: ``imagenet32-train.npy`` and ``imagenet32-valid.npy`` (for 64x64:
  ``imagenet64-train.npy``, ``imagenet64-valid.npy``), uint8 NHWC arrays. They are
  memory-mapped (``np.load(mmap_mode="r")``), never read whole.
* **The npz release** (Chrabaszcz et al. 2017, https://image-net.org, "Downsampled ImageNet"):
  ``train_data_batch_1.npz`` ... ``train_data_batch_10.npz`` and ``val_data.npz``, in the folder
  or in its direct subfolders (as the zips unpack: ``Imagenet32_train_npz/``,
  ``Imagenet32_val_npz/``, ...). Each holds ``data``: uint8 rows of a flattened CHW image.
  Compressed archive members cannot be memory-mapped, so the first use converts them once,
  batch by batch and a chunk of rows at a time, to ``hvae-imagenet32-train.npy`` and
  ``hvae-imagenet32-test.npy`` (NHWC) in ``dataset.cache_dir`` (default: the data folder),
  each written under a temporary name and renamed into place, plus ``hvae-imagenet32.json``
  recording the source files (names and byte sizes). Later runs memory-map the cache while the
  sources match; if the npz files are deleted, the cache alone is used.

Splits, as in VDVAE (``data.py`` of openai/vdvae): with ``idx = np.random.RandomState(42)
.permutation(N)`` over the N training images (the same permutation as VDVAE's
``np.random.seed(42); np.random.permutation(N)``), ``train`` is ``trX[idx[:-5000]]`` and ``val``
is ``trX[idx[-5000:]]``, in that order; ``test`` is the official validation set. The training
splits are :class:`hvae_core.data.LazyImages` views (index arrays into the memory map): a
16 GB ImageNet64 never has to fit in memory.

The split is a function of the array order, so it is VDVAE's exact split with VDVAE's own
.npy files. Those were made from the earlier van den Oord et al. (2016) downsampling; the npz
release is a different downsampling with its own order: same procedure, different images.
"""

from __future__ import annotations

import logging
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hvae_core.api import HvaeError, InMemoryDataset, LazyImages, resolve_data_dir

from ._files import (
    atomic_npy,
    bad_file,
    check_nhwc,
    missing_files,
    open_npy,
    read_json,
    writable_dir,
    write_json_atomic,
)

log = logging.getLogger(__name__)

VAL_SIZE = 5000
SPLIT_SEED = 42
TRAIN_NPZ = tuple(f"train_data_batch_{i}.npz" for i in range(1, 11))
VAL_NPZ = "val_data.npz"
CACHE_FORMAT = "hvae-imagenet-npz-cache"
CACHE_VERSION = 1
CHUNK_BYTES = 64 << 20  # rows are copied from an archive member this many bytes at a time


def obtain(size: int) -> str:
    zips = (
        "Imagenet32_train_npz.zip and Imagenet32_val_npz.zip"
        if size == 32
        else "Imagenet64_train_part1_npz.zip, Imagenet64_train_part2_npz.zip and "
        "Imagenet64_val_npz.zip"
    )
    return (
        f"download {zips} (Downsampled ImageNet {size}x{size}) from https://image-net.org "
        f"(needs an ImageNet account) and unzip them in the data folder, or put VDVAE's "
        f"imagenet{size}-train.npy and imagenet{size}-valid.npy there"
    )


def load_imagenet32(options: Any, data: Any) -> InMemoryDataset:
    return load_imagenet(options, data, 32)


def load_imagenet64(options: Any, data: Any) -> InMemoryDataset:
    return load_imagenet(options, data, 64)


def load_imagenet(options: Any, data: Any, size: int) -> InMemoryDataset:
    name = f"imagenet{size}"
    folder = resolve_data_dir(data.data_dir, name, path=options.path, obtain=obtain(size))
    train, test = open_arrays(folder, size, options.cache_dir)
    idx = split_permutation(len(train), name)
    return InMemoryDataset(
        {
            "train": LazyImages(train, idx[:-VAL_SIZE]),
            "val": LazyImages(train, idx[-VAL_SIZE:]),
            "test": test,
        },
        num_bits=8,
    )


def split_permutation(n: int, name: str = "imagenet") -> np.ndarray:
    """VDVAE's train/val permutation of ``n`` training images."""
    if n <= VAL_SIZE:
        raise HvaeError(
            f"{name} has {n} training images, too few to hold out {VAL_SIZE} for validation",
            hint="check that the data folder holds the whole training set",
        )
    return np.random.RandomState(SPLIT_SEED).permutation(n)


def open_arrays(folder: Path, size: int, cache_dir: str | None) -> tuple[np.memmap, np.memmap]:
    """Memory maps of the training and the official validation images, NHWC."""
    how = obtain(size)
    npy = [folder / f"imagenet{size}-train.npy", folder / f"imagenet{size}-valid.npy"]
    if any(p.is_file() for p in npy):
        missing = [p.name for p in npy if not p.is_file()]
        if missing:
            raise missing_files(
                f"ImageNet {size}x{size}",
                folder,
                [" and ".join(p.name for p in npy)],
                how,
                f"missing {', '.join(missing)}",
            )
        arrays = [open_npy(p, how) for p in npy]
        for p, arr in zip(npy, arrays, strict=True):
            check_nhwc(arr, p, size, 3, how)
        return arrays[0], arrays[1]

    cache = Path(cache_dir).expanduser() if cache_dir else folder
    sources = find_npz(folder, size)
    if sources is not None:
        return cached_arrays(sources, cache, size)
    reused = reuse_cache(cache, size, None)
    if reused is not None:
        return reused
    expected = [
        f"{npy[0].name} and {npy[1].name}",
        f"{TRAIN_NPZ[0]} ... {TRAIN_NPZ[-1]} and {VAL_NPZ} (here or in a subfolder)",
    ]
    raise missing_files(f"ImageNet {size}x{size}", folder, expected, how)


# ---- the npz release


def _read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from an open ``.npy`` stream, leaving it at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def npz_data_header(path: Path, how: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of the ``data`` array, read from its header only."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("data.npy") as f:
            return _read_npy_header(f)
    except KeyError:
        raise bad_file(path, "it has no array named 'data'", how) from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as exc:
        raise bad_file(path, f"{type(exc).__name__}: {exc}", how) from None


def find_npz(folder: Path, size: int) -> dict[str, list[Path]] | None:
    """The npz files of ``size`` in ``folder`` or its direct subfolders (None: none at all).

    Subfolders may hold both resolutions side by side: files are told apart by their row
    length (3 * size * size), read from the array headers.
    """
    how = obtain(size)
    places = [folder, *sorted(p for p in folder.iterdir() if p.is_dir() and p.name[0] != ".")]
    names = (*TRAIN_NPZ, VAL_NPZ)
    found: dict[str, list[Path]] = {n: [p / n for p in places if (p / n).is_file()] for n in names}
    if not any(found.values()):
        return None
    row = 3 * size * size
    chosen: dict[str, Path] = {}
    other_sizes: set[int] = set()
    for name, paths in found.items():
        fitting = []
        for path in paths:
            shape, _, _ = npz_data_header(path, how)
            if len(shape) == 2 and shape[1] == row:
                fitting.append(path)
            elif len(shape) == 2:
                other_sizes.add(shape[1])
            else:
                raise bad_file(
                    path, f"expected 'data' rows of {row} values, got shape {shape}", how
                )
        if len(fitting) > 1:
            raise HvaeError(
                f"{name} for {size}x{size} found twice: {fitting[0]} and {fitting[1]}",
                hint="keep one copy, or point dataset.path at one release's folder",
            )
        if fitting:
            chosen[name] = fitting[0]
    missing = [n for n in names if n not in chosen]
    if missing:
        problem = f"missing {', '.join(missing)}"
        if other_sizes:
            sides = ", ".join(
                f"{int(round((r / 3) ** 0.5))}x{int(round((r / 3) ** 0.5))}"
                for r in sorted(other_sizes)
            )
            problem += f" for {size}x{size} (rows of {row} values); found {sides} images"
        raise missing_files(
            f"ImageNet {size}x{size}",
            folder,
            [f"{TRAIN_NPZ[0]} ... {TRAIN_NPZ[-1]} and {VAL_NPZ} of the {size}x{size} release"],
            how,
            problem,
        )
    return {"train": [chosen[n] for n in TRAIN_NPZ], "test": [chosen[VAL_NPZ]]}


def iter_npz_rows(path: Path, size: int, how: str) -> Iterator[np.ndarray]:
    """The ``data`` rows of one npz file as uint8 (k, size, size, 3) chunks, in order.

    Read straight from the archive member after its header, a few tens of MB at a time, so
    converting a 1.5 GB ImageNet64 batch never holds it whole in memory.
    """
    row = 3 * size * size
    try:
        with zipfile.ZipFile(path) as zf, zf.open("data.npy") as f:
            shape, fortran, dtype = _read_npy_header(f)
            if dtype != np.uint8 or len(shape) != 2 or shape[1] != row:
                raise bad_file(path, f"expected uint8 rows of {row}, got {dtype} {shape}", how)
            if fortran:
                raise bad_file(path, "'data' is stored in Fortran order", how)
            left = shape[0]
            per_chunk = max(1, CHUNK_BYTES // row)
            while left:
                k = min(per_chunk, left)
                buf = f.read(k * row)
                if len(buf) != k * row:
                    raise bad_file(path, f"'data' ends {left - len(buf) // row} rows early", how)
                chunk = np.frombuffer(buf, dtype=np.uint8).reshape(k, 3, size, size)
                yield chunk.transpose(0, 2, 3, 1)
                left -= k
    except HvaeError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as exc:
        raise bad_file(path, f"{type(exc).__name__}: {exc}", how) from None


# ---- the cache of the npz release


def cache_paths(cache: Path, size: int) -> tuple[Path, Path, Path]:
    stem = f"hvae-imagenet{size}"
    return cache / f"{stem}-train.npy", cache / f"{stem}-test.npy", cache / f"{stem}.json"


def describe_sources(sources: dict[str, list[Path]]) -> dict[str, list[list[Any]]]:
    return {split: [[p.name, p.stat().st_size] for p in paths] for split, paths in sources.items()}


def reuse_cache(
    cache: Path, size: int, sources: dict[str, list[list[Any]]] | None
) -> tuple[np.memmap, np.memmap] | None:
    """The cached arrays if the manifest matches (``sources`` None: any sources), else None."""
    train_path, test_path, manifest_path = cache_paths(cache, size)
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        return None
    if manifest.get("version") != CACHE_VERSION or manifest.get("image_size") != size:
        return None
    if sources is not None and manifest.get("sources") != sources:
        return None
    if not (train_path.is_file() and test_path.is_file()):
        return None
    how = obtain(size)
    arrays = (open_npy(train_path, how), open_npy(test_path, how))
    shapes = manifest.get("shapes", {})
    if [list(a.shape) for a in arrays] != [shapes.get("train"), shapes.get("test")]:
        return None
    return arrays


def cached_arrays(
    sources: dict[str, list[Path]], cache: Path, size: int
) -> tuple[np.memmap, np.memmap]:
    described = describe_sources(sources)
    reused = reuse_cache(cache, size, described)
    if reused is not None:
        return reused
    how = obtain(size)
    writable_dir(cache, f"ImageNet {size}x{size} cache", "dataset.cache_dir")
    train_path, test_path, manifest_path = cache_paths(cache, size)
    manifest_path.unlink(missing_ok=True)  # a stale manifest must never vouch for new files
    shapes: dict[str, list[int]] = {}
    for split, out_path in (("train", train_path), ("test", test_path)):
        n = sum(npz_data_header(p, how)[0][0] for p in sources[split])
        log.info("converting %d ImageNet %dx%d images once to %s", n, size, size, out_path)
        with atomic_npy(out_path, (n, size, size, 3)) as out:
            pos = 0
            for path in sources[split]:
                for chunk in iter_npz_rows(path, size, how):
                    out[pos : pos + len(chunk)] = chunk
                    pos += len(chunk)
        shapes[split] = [n, size, size, 3]
    write_json_atomic(
        manifest_path,
        {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "image_size": size,
            "sources": described,
            "shapes": shapes,
        },
    )
    arrays = reuse_cache(cache, size, described)
    assert arrays is not None
    return arrays
