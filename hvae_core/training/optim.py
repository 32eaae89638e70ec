"""The optimizer: Keras' own, by name, with decoupled weight decay and a schedule plugin."""

from __future__ import annotations

from typing import Any

import keras

from hvae_core.plugins import PluginRegistry, get_registry

OPTIMIZERS = {
    "adamax": keras.optimizers.Adamax,
    "adamw": keras.optimizers.AdamW,
    "adam": keras.optimizers.Adam,
}


def make_optimizer(
    config: Any, steps_per_epoch: int, registry: PluginRegistry | None = None
) -> Any:
    """Keras' optimizer of ``config`` with its learning-rate schedule plugin (``registry``;
    None: the installed plugins, as :class:`~hvae_core.model.hvae.HVAE` takes them)."""
    training = config.training
    registry = registry or get_registry()
    schedule = registry.get("lr-schedule", training.scheduler).create(
        config.options("lr-schedule"), training, steps_per_epoch
    )
    # Keras applies weight decay decoupled from the gradient step (as AdamW) for all three.
    return OPTIMIZERS[training.optimizer](
        learning_rate=schedule,
        beta_1=training.adam_beta1,
        beta_2=training.adam_beta2,
        epsilon=1e-8,
        weight_decay=training.weight_decay or None,
    )
