"""Opening a dataset plugin: its factory called, its result checked against the
:class:`~hvae_core.interfaces.Dataset` contract, and the image size a config needs.

Below the config (``hvae_core.config`` imports this module, never the other way round). A dataset
opened only to learn its image size (an ``image_size`` option left null) is kept here, keyed by
its options object, so that :func:`hvae_core.data.open_dataset` with that config takes it
instead of reading the files again; it is released with the options.
"""

from __future__ import annotations

import weakref
from typing import Any

from hvae_core.errors import ConfigError, PluginError
from hvae_core.interfaces import Dataset

# id(options) -> the dataset opened with them to learn their image size (see the module doc).
_OPENED_FOR_SIZE: dict[int, Dataset] = {}


def image_size(spec: Any, options: Any, data: Any) -> int:
    """The image size of the dataset ``spec`` with ``options``: declared by the options or the
    registration, or else read from the opened dataset's images (kept for ``take_opened``)."""
    size = _image_size(spec, options)
    if size is not None:
        return size
    dataset, size = _size_from_data(spec, options, data)
    key = id(options)
    _OPENED_FOR_SIZE[key] = dataset
    weakref.finalize(options, _OPENED_FOR_SIZE.pop, key, None)
    return size


def take_opened(options: Any) -> Dataset | None:
    """The dataset :func:`image_size` opened with ``options``, once; None if it opened none."""
    return _OPENED_FOR_SIZE.pop(id(options), None)


def create_dataset(spec: Any, options: Any, data: Any) -> Dataset:
    """A dataset plugin's factory called with ``options`` and ``data``; the result checked
    against the :class:`Dataset` contract (not yet against a configured image size)."""
    dataset = spec.create(options, data)
    _check_dataset(dataset, _described(spec))
    return dataset


def _described(spec: Any) -> str:
    return f"dataset '{spec.name}' from package {spec.package}"


def _check_dataset(dataset: Any, what: str) -> None:
    hint = "the factory must return an object satisfying hvae_core.interfaces.Dataset"
    if not isinstance(dataset, Dataset):
        raise PluginError(f"{what} returned {type(dataset).__name__}, not a Dataset", hint=hint)
    shape = tuple(dataset.image_shape)
    if len(shape) != 3 or shape[2] < 1:
        raise PluginError(f"{what} has images of shape {shape}; expected (H, W, C)", hint=hint)
    if not 1 <= dataset.num_bits <= 8:
        raise PluginError(f"{what} says num_bits {dataset.num_bits}; expected 1..8", hint=hint)
    missing = [s for s in ("train", "val") if s not in dataset.splits]
    if missing:
        raise PluginError(f"{what} has no split {', '.join(missing)}", hint=hint)


def check_image_size(dataset: Dataset, spec: Any, config: Any) -> None:
    """The dataset's images against the config's image size: a user's ``dataset.image_size``
    that its files contradict is a config error; a registered size that does not hold, the
    plugin's."""
    size = config.image_size
    height, width, _ = tuple(dataset.image_shape)
    if (height, width) == (size, size):
        return
    what = _described(spec)
    if getattr(config.options("dataset"), "image_size", None) == size:
        raise ConfigError(
            f"{what} has {height}x{width} images but dataset.image_size is {size}",
            hint=f"set dataset.image_size: {height}, or null to take the size from the data",
        )
    raise PluginError(
        f"{what} has {height}x{width} images; its registered image_size says {size}x{size}",
        hint="the factory must return images of the size the plugin registers",
    )


def _image_size(spec: Any, options: Any) -> int | None:
    """The image size the dataset's options or registration declare; None when its
    ``image_size`` option is left null for the images to say."""
    size = getattr(options, "image_size", None) or spec.info.get("image_size")
    if size is None:
        if hasattr(options, "image_size"):
            return None
        raise ConfigError(
            f"dataset '{spec.name}' ({spec.package}) declares no image_size",
            hint="its plugin must register image_size=N, or have an option image_size "
            "(null: taken from its images)",
        )
    _check_power_of_two(size, f"dataset.image_size: got {size}")
    return int(size)


def _check_power_of_two(size: int, what: str) -> None:
    if size < 1 or size & (size - 1):
        raise ConfigError(
            f"{what}, expected a power of two (scales halve down to 1x1)",
            hint="e.g. 32 or 64; pad or resize the images to such a size",
        )


def _size_from_data(spec: Any, options: Any, data: Any) -> tuple[Any, int]:
    """(the opened dataset, its image size), for a dataset whose ``image_size`` option is null.

    This is the one case where resolving a config opens a dataset. The size goes into the
    option, so a run's ``config.yaml`` records it and a trained model is rebuilt without the data.
    """
    dataset = create_dataset(spec, options, data)
    height, width, _ = tuple(dataset.image_shape)
    what = f"dataset '{spec.name}' ({spec.package}) has {height}x{width} images"
    if height != width:
        raise ConfigError(
            f"{what}; hvae models square images",
            hint="crop or pad the images to a square whose side is a power of two",
        )
    _check_power_of_two(height, what)
    options.image_size = height
    return dataset, height
