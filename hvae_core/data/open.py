"""The configured dataset, opened at the configured bit depth."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvae_core.data import sources
from hvae_core.data.arrays import BitDepthReduced
from hvae_core.errors import ConfigError
from hvae_core.interfaces import Dataset

if TYPE_CHECKING:
    from hvae_core.config import Config
    from hvae_core.plugins import PluginRegistry


def open_dataset(config: Config, registry: PluginRegistry | None = None) -> Dataset:
    """The configured dataset: its plugin's factory called with its options and ``config.data``.

    A dataset the config had to open to learn its image size (see
    :func:`hvae_core.data.sources.image_size`) is not opened again. Applies ``data.num_bits``
    (fewer bits than the dataset's; more is an error), so the result's ``num_bits`` is the
    effective bit depth.
    """
    from hvae_core.plugins import get_registry

    registry = registry or get_registry()
    name = config.data.dataset
    spec = registry.get("dataset", name)
    options = config.options("dataset")
    dataset = sources.take_opened(options) or sources.create_dataset(spec, options, config.data)
    sources.check_image_size(dataset, spec, config)
    wanted = config.data.num_bits
    if wanted is None or wanted == dataset.num_bits:
        return dataset
    if wanted > dataset.num_bits:
        raise ConfigError(
            f"data.num_bits: {wanted} is more than the {dataset.num_bits} bits of dataset '{name}'",
            hint=f"use data.num_bits <= {dataset.num_bits}, or leave it unset",
        )
    return BitDepthReduced(dataset, wanted)
