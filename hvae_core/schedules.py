"""The core's learning-rate and beta schedules (plugins of kinds ``lr-schedule``/``beta-schedule``).

Learning-rate schedules are Keras' own ``LearningRateSchedule`` objects, evaluated inside the
compiled step; beta schedules are plain functions of the step, evaluated on the host and fed to
the step as a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hvae_core.options import option


@dataclass
class WarmupOptions:
    warmup_steps: int | None = option(
        None, "warm-up length in optimizer steps; overrides training.lr_warmup_epochs"
    )

    def validate(self, section: str) -> None:
        from hvae_core.errors import ConfigError

        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"{section}.warmup_steps: expected >= 0, got {self.warmup_steps}")


def _warmup_steps(options: WarmupOptions, training: Any, steps_per_epoch: int) -> int:
    if options.warmup_steps is not None:
        return options.warmup_steps
    return round(training.lr_warmup_epochs * steps_per_epoch)


def constant_lr(options: Any, training: Any, steps_per_epoch: int) -> float:
    """The learning rate, unchanged for the whole run."""
    return float(training.learning_rate)


def linear_warmup_lr(options: WarmupOptions, training: Any, steps_per_epoch: int) -> Any:
    """Linear from 0 to the learning rate over the warm-up, then constant (VDVAE's schedule)."""
    import keras

    warmup = _warmup_steps(options, training, steps_per_epoch)
    if warmup == 0:
        return float(training.learning_rate)
    # alpha=1 makes the "decay" a constant: Keras' own warm-up then the peak rate.
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=1,
        alpha=1.0,
        warmup_target=float(training.learning_rate),
        warmup_steps=warmup,
    )


def cosine_decay_lr(options: WarmupOptions, training: Any, steps_per_epoch: int) -> Any:
    """Linear warm-up to the learning rate, then cosine decay to learning_rate_end at the end."""
    import keras

    warmup = _warmup_steps(options, training, steps_per_epoch)
    total = training.epochs * steps_per_epoch
    decay_steps = max(total - warmup, 1)
    peak = float(training.learning_rate)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak,
        decay_steps=decay_steps,
        alpha=float(training.learning_rate_end) / peak,
        warmup_target=peak if warmup else None,
        warmup_steps=warmup,
    )


@dataclass(frozen=True)
class BetaSchedule:
    """beta(step): constant, linear warm-up, or cyclic, from the training options."""

    beta: float
    warmup_epochs: float
    steps_per_epoch: int
    cycles: int = 0  # 0: a single warm-up, then constant

    def __call__(self, step: int) -> float:
        if self.warmup_epochs <= 0:
            return self.beta
        epoch = step / self.steps_per_epoch
        if self.cycles == 0:
            return self.beta * min(1.0, epoch / self.warmup_epochs)
        if epoch >= self.cycles * self.warmup_epochs:
            return self.beta
        # Each cycle rises from 0 over its first half and holds beta over its second half.
        position = math.fmod(epoch, self.warmup_epochs) / self.warmup_epochs
        return self.beta * min(1.0, 2.0 * position)


def constant_beta(options: Any, training: Any, steps_per_epoch: int) -> BetaSchedule:
    """beta for the whole run."""
    return BetaSchedule(float(training.beta), 0.0, steps_per_epoch)


def linear_warmup_beta(options: Any, training: Any, steps_per_epoch: int) -> BetaSchedule:
    """beta rises linearly from 0 over beta_warmup_epochs, then stays."""
    return BetaSchedule(float(training.beta), training.beta_warmup_epochs, steps_per_epoch)


def cyclic_beta(options: Any, training: Any, steps_per_epoch: int) -> BetaSchedule:
    """number_cycles cycles of beta_warmup_epochs each (rise over half, hold over half)."""
    return BetaSchedule(
        float(training.beta), training.beta_warmup_epochs, steps_per_epoch, training.number_cycles
    )
