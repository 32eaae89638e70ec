"""First-party dataset plugins. Light: the loaders are imported only when a dataset is used."""

from __future__ import annotations

from hvae_core import hookimpl


@hookimpl
def register_datasets(register):  # noqa: ANN001 - the hook's register callable
    register(
        "digits",
        "hvae_plugins.datasets.digits:load_digits_dataset",
        summary="scikit-learn's 8x8 handwritten digits (1,797 images, shipped, offline)",
        image_size=8,
    )
