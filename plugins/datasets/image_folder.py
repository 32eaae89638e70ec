"""Any folder tree of PNG/JPEG images (FFHQ, your own photos), as square RGB images.

Files: every ``.png``, ``.jpg`` and ``.jpeg`` (any case) under the folder, recursively, following
symbolic links but reading each real folder once (a link back up the tree is skipped); hidden
files and folders (names starting with ".") are skipped. Images are decoded with Pillow, turned
upright by their EXIF orientation, converted to RGB (grey, palette and alpha images included;
alpha is dropped; 16-bit images keep each value's high byte, ``value >> 8``: 32768 becomes 128),
their shorter side resized to ``dataset.image_size`` (Lanczos), then centre-cropped to a square.
An unreadable file is an error naming it.

Splits: the files are sorted by relative path; ``idx = np.random.RandomState(split_seed)
.permutation(N)`` assigns them: ``val`` is ``idx[-n_val:]``, ``test`` the ``n_test`` before it
(only when ``n_test > 0``), ``train`` the rest, each in permutation order. ``n_val`` is
``val_count``, else ``round(N * val_fraction)`` (at least 1); ``n_test`` likewise. VDVAE's
FFHQ-256 split is this procedure with ``split_seed: 5, val_count: 7000`` over its 70,000 images
(the same images only if they come in the same order as VDVAE's ``ffhq-256.npy``).

Cache (``dataset.cache``, on by default): decoding and resizing 70,000 large PNGs takes long,
so the first use writes all images, resized, to one uint8 NHWC ``.npy`` (under a temporary
name, then renamed) with a JSON manifest beside it listing every file's relative path and byte
size, the image size and the preprocessing. Later runs memory-map it while the manifest matches
the folder; any added, removed or resized file rebuilds it. The cache lives in
``.hvae-cache/`` inside the image folder, or in ``dataset.cache_dir`` (there named after the
folder too, so several folders can share it). Without the cache, images are decoded into memory
on every run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from hvae_core.api import HvaeError, ImageArray, InMemoryDataset, LazyImages, resolve_data_dir

from ._files import (
    atomic_npy,
    missing_files,
    open_npy,
    read_json,
    writable_dir,
    write_json_atomic,
)

log = logging.getLogger(__name__)

EXTENSIONS = frozenset({".png", ".jpg", ".jpeg"})
CACHE_FORMAT = "hvae-image-folder-cache"
CACHE_VERSION = 2  # 2: 16-bit grey scaled by its high byte (1 clipped it at 255)
PREPROCESS = (
    "exif-transpose, 16-bit to 8 by the high byte, RGB, shorter side to size (Lanczos), centre crop"
)
OBTAIN = "point dataset.path (or --data-dir) at a folder of PNG or JPEG images"
# Pillow's modes for 16-bit grey PNGs ("I" is how older Pillow opens them).
SIXTEEN_BIT_GREY = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
DECODE_WINDOW = 256  # images decoded ahead of the writer: bounds memory while threads work


def load_image_folder(options: Any, data: Any) -> InMemoryDataset:
    folder = resolve_data_dir(data.data_dir, "image-folder", path=options.path, obtain=OBTAIN)
    files = list_images(folder)
    if not files:
        raise missing_files(
            "image-folder",
            folder,
            ["PNG or JPEG images (.png, .jpg, .jpeg), in any subfolder"],
            OBTAIN,
        )
    n = len(files)
    n_val, n_test = split_counts(n, options)
    size = options.image_size
    if options.cache:
        images: ImageArray = cached_images(folder, files, size, options.cache_dir)
    else:
        images = np.empty((n, size, size, 3), dtype=np.uint8)
        decode_into(images, [folder / rel for rel, _ in files], size)
    idx = np.random.RandomState(options.split_seed).permutation(n)
    held = n_val + n_test
    splits: dict[str, ImageArray] = {
        "train": LazyImages(images, idx[: n - held]),
        "val": LazyImages(images, idx[n - n_val :]),
    }
    if n_test:
        splits["test"] = LazyImages(images, idx[n - held : n - n_val])
    return InMemoryDataset(splits, num_bits=8)


def split_counts(n: int, options: Any) -> tuple[int, int]:
    """(validation, test) image counts for ``n`` images, checked against ``n``."""

    def count(explicit: int | None, fraction: float) -> int:
        if explicit is not None:
            return explicit
        return max(1, round(n * fraction)) if fraction > 0 else 0

    n_val = count(options.val_count, options.val_fraction)
    n_test = count(options.test_count, options.test_fraction)
    if n_val < 1:
        raise HvaeError(
            "image-folder needs at least one validation image",
            hint="set dataset.val_fraction > 0 or dataset.val_count >= 1",
        )
    if n_val + n_test >= n:
        raise HvaeError(
            f"image-folder has {n} images: holding out {n_val} for validation and {n_test} for "
            "test leaves none for training",
            hint="lower dataset.val_count/test_count (or the fractions), or add images",
        )
    return n_val, n_test


def list_images(folder: Path) -> list[tuple[str, int]]:
    """(relative POSIX path, byte size) of every image under ``folder``, sorted by path.

    Symbolic links are followed, but every real folder is read once: a link back up the tree
    (a loop) or to a folder already read is skipped, as is a link that cannot be resolved.
    Folders are walked in name order, so which path names a folder reached twice does not
    depend on the file system.
    """
    found: list[tuple[str, int]] = []
    visited: set[tuple[int, int]] = set()

    def walk(directory: Path, prefix: str) -> None:
        identity = real_folder(directory)
        if identity in visited:
            log.info("skipping %s: a link to a folder already read (or a loop)", directory)
            return
        visited.add(identity)
        for entry in sorted_entries(directory):
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    walk(Path(entry.path), f"{prefix}{entry.name}/")
                elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in EXTENSIONS:
                    found.append((prefix + entry.name, entry.stat().st_size))
            except OSError as exc:  # e.g. a link to itself: ELOOP before anything is read
                log.info("skipping %s: %s", entry.path, exc.strerror or exc)

    walk(folder, "")
    return sorted(found)


def real_folder(directory: Path) -> tuple[int, int]:
    """What identifies a folder however it is reached: (device, inode) of its target."""
    info = directory.stat()
    return info.st_dev, info.st_ino


def sorted_entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as exc:
        raise HvaeError(
            f"cannot list image folder {directory}: {exc.strerror or exc}",
            hint="make the folder readable, or move it out of the image folder",
        ) from None


def decode(path: Path, size: int) -> np.ndarray:
    """One image as uint8 (size, size, 3): upright, RGB, shorter side resized, centre-cropped."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            image = eight_bit(ImageOps.exif_transpose(opened)).convert("RGB")
        w, h = image.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise HvaeError(
            f"cannot read image {path}: {type(exc).__name__}: {exc}",
            hint="replace or delete the file (image-folder reads PNG and JPEG with Pillow)",
        ) from None


def eight_bit(image: Any) -> Any:
    """A 16-bit grey image as 8-bit grey, keeping each value's high byte (``value >> 8``).

    Pillow's own ``convert`` clips 16-bit grey at 255 (mid-grey 32768 would become white),
    while it reads 16-bit colour PNGs by their high byte: the same rule for grey keeps both
    alike. Other modes pass through unchanged.
    """
    from PIL import Image

    if image.mode not in SIXTEEN_BIT_GREY:
        return image
    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    return Image.fromarray((values >> 8).astype(np.uint8), mode="L")


def decode_into(out: np.ndarray, paths: list[Path], size: int) -> None:
    """Decode ``paths`` into ``out`` in order, on a thread pool (Pillow releases the GIL)."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hvae-decode") as pool:
        for start in range(0, len(paths), DECODE_WINDOW):
            window = paths[start : start + DECODE_WINDOW]
            for i, image in enumerate(pool.map(lambda p: decode(p, size), window)):
                out[start + i] = image


def cache_location(folder: Path, size: int, cache_dir: str | None) -> tuple[Path, Path]:
    if cache_dir is None:
        where, stem = folder / ".hvae-cache", f"image-folder-{size}"
    else:
        resolved = str(folder.resolve())
        tag = hashlib.sha1(resolved.encode()).hexdigest()[:10]
        where = Path(cache_dir).expanduser()
        stem = f"image-folder-{folder.resolve().name}-{tag}-{size}"
    return where / f"{stem}.npy", where / f"{stem}.json"


def cached_images(
    folder: Path, files: list[tuple[str, int]], size: int, cache_dir: str | None
) -> np.memmap:
    """The resized images from the cache, building it first when it is absent or stale."""
    npy_path, manifest_path = cache_location(folder, size, cache_dir)
    manifest = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "image_size": size,
        "preprocess": PREPROCESS,
        "files": [list(f) for f in files],
    }
    shape = (len(files), size, size, 3)
    if read_json(manifest_path) == manifest and npy_path.is_file():
        images = open_npy(npy_path, OBTAIN)
        if images.shape == shape and images.dtype == np.uint8:
            return images
    writable_dir(npy_path.parent, "image-folder cache", "dataset.cache_dir (or dataset.cache)")
    manifest_path.unlink(missing_ok=True)  # a stale manifest must never vouch for a new file
    log.info("decoding %d images from %s once into %s", len(files), folder, npy_path)
    with atomic_npy(npy_path, shape) as out:
        decode_into(out, [folder / rel for rel, _ in files], size)
    write_json_atomic(manifest_path, manifest)
    return open_npy(npy_path, OBTAIN)
