"""Datasets and the input pipeline.

- :mod:`.arrays`: image arrays and in-memory datasets that dataset plugins build on, and the
  data directory a plugin reads from;
- :mod:`.sources`: a dataset plugin opened and checked against the contract, and the image
  size a config needs (below the config: ``hvae_core.config`` imports it);
- :mod:`.open`: the configured dataset at the configured bit depth;
- :mod:`.pipeline`: batches drawn epoch by epoch (shuffle, flips, batch transforms, prefetch).

No Keras backend is imported here.
"""

from hvae_core.data.arrays import (
    DATA_DIR_ENV,
    BitDepthReduced,
    ImageArray,
    InMemoryDataset,
    LazyImages,
    resolve_data_dir,
)
from hvae_core.data.open import open_dataset  # noqa: I001 - after sources, which it imports
from hvae_core.data.pipeline import (
    EVAL_SEED,
    BatchStream,
    BatchTransform,
    batch_transform,
    evaluation_batches,
)
from hvae_core.data.sources import create_dataset

__all__ = [
    "DATA_DIR_ENV",
    "EVAL_SEED",
    "BatchStream",
    "BatchTransform",
    "BitDepthReduced",
    "ImageArray",
    "InMemoryDataset",
    "LazyImages",
    "batch_transform",
    "create_dataset",
    "evaluation_batches",
    "open_dataset",
    "resolve_data_dir",
]
