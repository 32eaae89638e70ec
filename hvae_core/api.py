"""What a plugin package may use from hvae: every name here is public and stays.

A plugin imports only from ``hvae_core`` and ``hvae_core.api``; everything else in hvae_core
may change without notice. Importing this module is light (no Keras, no backend), because a
plugin package's registration module imports it whenever plugins are listed. The helpers for
model code (:func:`torch_default_init`, :func:`gaussian_kl`, :func:`sum_per_example`) need
Keras: they are imported on first use, by the implementation modules that run in a model.

Registration (light)::

    from hvae_core.api import hookimpl, option, per_scale

Contracts: :class:`Dataset`, :class:`PosteriorFlow`, :class:`Attention`, :class:`Regularizer`,
:class:`Tracker`, :data:`BlockFactory`, :data:`LrScheduleFactory`, :data:`BetaScheduleFactory`
(what each kind's registered factory is called with and must return),
:class:`ModelOutputs` and :class:`LayerStats` (what a regularizer's ``loss_terms`` receives),
and :data:`CORE_METRICS` (names a regularizer's loss terms must not take).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from hvae_core.data.arrays import ImageArray, InMemoryDataset, LazyImages, resolve_data_dir
from hvae_core.errors import ConfigError, HvaeError, PluginError
from hvae_core.hookspecs import Register, hookimpl
from hvae_core.interfaces import (
    CORE_METRICS,
    Attention,
    BetaScheduleFactory,
    BlockFactory,
    Dataset,
    LayerStats,
    LrScheduleFactory,
    ModelOutputs,
    PosteriorFlow,
    Regularizer,
    Tensor,
    Tracker,
)
from hvae_core.model.layout import Scale, scales
from hvae_core.options import NoOptions, option, per_scale

if TYPE_CHECKING:
    from hvae_core.model.blocks import torch_default_init
    from hvae_core.model.distributions import gaussian_kl, sum_per_example

# Loaded on first use: they import Keras, which a plugin's registration module must not.
_LAZY = {
    "torch_default_init": "hvae_core.model.blocks",
    "gaussian_kl": "hvae_core.model.distributions",
    "sum_per_example": "hvae_core.model.distributions",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hvae_core.api' has no attribute {name!r}")


__all__ = [
    "CORE_METRICS",
    "Attention",
    "BetaScheduleFactory",
    "BlockFactory",
    "ConfigError",
    "Dataset",
    "HvaeError",
    "ImageArray",
    "InMemoryDataset",
    "LayerStats",
    "LazyImages",
    "LrScheduleFactory",
    "ModelOutputs",
    "NoOptions",
    "PluginError",
    "PosteriorFlow",
    "Register",
    "Regularizer",
    "Scale",
    "Tensor",
    "gaussian_kl",
    "hookimpl",
    "option",
    "per_scale",
    "resolve_data_dir",
    "scales",
    "sum_per_example",
    "torch_default_init",
    "Tracker",
]
