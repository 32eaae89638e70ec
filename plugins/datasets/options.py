"""Options of the first-party datasets. Light (dataclasses only): read whenever plugins are listed.

Every dataset that reads files has ``path``; the folder it reads is, in order, ``dataset.path``,
``data.data_dir`` (``--data-dir``), then ``$HVAE_DATA_DIR``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hvae_core.api import ConfigError, option

PATH_HELP = "folder of the dataset files (default: data.data_dir, then $HVAE_DATA_DIR)"


@dataclass
class Cifar10Options:
    path: str | None = option(
        None,
        "folder holding cifar-10-python.tar.gz or cifar-10-batches-py/, or that folder itself "
        "(default: data.data_dir, then $HVAE_DATA_DIR)",
    )


@dataclass
class ImageNetOptions:
    path: str | None = option(
        None,
        "folder holding imagenetNN-train.npy/-valid.npy, or the npz batches (train_data_batch_*"
        ".npz, val_data.npz) in it or its subfolders (default: data.data_dir, then "
        "$HVAE_DATA_DIR)",
    )
    cache_dir: str | None = option(
        None,
        "where the npz batches are converted once to memory-mappable .npy files (default: the "
        "data folder)",
    )


@dataclass
class MnistOptions:
    path: str | None = option(None, PATH_HELP)
    image_size: int = option(
        32, "image size (a power of two): 28x28 digits are zero-padded to it, or resized"
    )
    resize: bool = option(False, "resize the digits to image_size with Pillow instead of padding")
    binarize: bool = option(
        False,
        "dynamic binarisation: 1-bit images, each pixel drawn from Bernoulli(level/255) afresh "
        "whenever a batch is drawn",
    )


@dataclass
class ImageFolderOptions:
    path: str | None = option(
        None,
        "folder of PNG/JPEG images, searched recursively (default: data.data_dir, then "
        "$HVAE_DATA_DIR)",
    )
    image_size: int = option(
        64, "image size (a power of two): shorter side resized to it, then centre-cropped"
    )
    val_fraction: float = option(0.05, "fraction of the images held out for validation")
    test_fraction: float = option(0.0, "fraction held out for test (0: no test split)")
    val_count: int | None = option(None, "validation images, a count (overrides val_fraction)")
    test_count: int | None = option(None, "test images, a count (overrides test_fraction)")
    split_seed: int = option(
        0, "seed of the permutation (np.random.RandomState) that assigns images to splits"
    )
    cache: bool = option(
        True, "decode once and keep the resized images in one memory-mapped .npy (reused)"
    )
    cache_dir: str | None = option(
        None, "where the cache is written (default: .hvae-cache inside the image folder)"
    )

    def validate(self, section: str) -> None:
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{section}.{name}: expected a number in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"{section}.val_fraction + {section}.test_fraction must be < 1 (no training "
                f"images left), got {self.val_fraction} + {self.test_fraction}"
            )
        for name in ("val_count", "test_count"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{section}.{name}: expected a count >= 0, got {value}")
