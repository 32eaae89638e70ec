"""The core's learning-rate and beta schedules against their closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hvae_core.config import resolve_config
from hvae_core.plugins import get_registry

STEPS_PER_EPOCH = 10


def make(kind: str, name: str, *overrides: str, steps_per_epoch: int = STEPS_PER_EPOCH):
    section = "scheduler" if kind == "lr-schedule" else "beta_schedule"
    cfg = resolve_config(overrides=[f"training.{section}={name}", *overrides])
    factory = get_registry().get(kind, name).load()
    return factory(cfg.options(kind), cfg.training, steps_per_epoch)


def lr_at(schedule, step: int) -> float:
    if isinstance(schedule, float):
        return schedule
    import keras

    return float(keras.ops.convert_to_numpy(schedule(step)))


def test_constant_lr() -> None:
    schedule = make("lr-schedule", "constant", "training.learning_rate=0.003")
    assert [lr_at(schedule, s) for s in (0, 5, 500)] == [0.003] * 3


def test_linear_warmup_lr_in_epochs_and_steps() -> None:
    schedule = make(
        "lr-schedule",
        "linear-warmup",
        "training.learning_rate=0.002",
        "training.lr_warmup_epochs=2",
    )  # 20 steps
    for step in (0, 5, 10, 19, 20, 21, 1000):
        expected = 0.002 * min(1.0, step / 20)
        assert lr_at(schedule, step) == pytest.approx(expected, rel=1e-5, abs=1e-9)
    # VDVAE's CIFAR-10 setup: 100 warm-up steps, whatever the epoch length.
    schedule = make(
        "lr-schedule",
        "linear-warmup",
        "training.learning_rate=0.0002",
        "lr_schedule.warmup_steps=100",
    )
    assert lr_at(schedule, 50) == pytest.approx(0.0001, rel=1e-5)
    assert lr_at(schedule, 100) == pytest.approx(0.0002, rel=1e-5)


def test_cosine_decay_lr() -> None:
    peak, end, warmup, total = 0.002, 0.0001, 10, 5 * STEPS_PER_EPOCH
    schedule = make(
        "lr-schedule",
        "cosd",
        f"training.learning_rate={peak}",
        f"training.learning_rate_end={end}",
        "training.lr_warmup_epochs=1",
        "training.epochs=5",
    )
    for step in range(0, total + 1, 3):
        if step < warmup:
            expected = peak * step / warmup
        else:
            progress = (step - warmup) / (total - warmup)
            expected = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_at(schedule, step) == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert lr_at(schedule, total) == pytest.approx(end, rel=1e-4)


def test_cosine_decay_without_warmup_starts_at_the_peak() -> None:
    schedule = make(
        "lr-schedule", "cosd", "training.learning_rate=0.001", "training.lr_warmup_epochs=0"
    )
    assert lr_at(schedule, 0) == pytest.approx(0.001, rel=1e-6)


def test_constant_and_linear_warmup_beta() -> None:
    constant = make(
        "beta-schedule", "constant", "training.beta=0.5", "training.beta_warmup_epochs=3"
    )
    assert {constant(s) for s in (0, 7, 100)} == {0.5}
    warm = make(
        "beta-schedule", "linear-warmup", "training.beta=2.0", "training.beta_warmup_epochs=2"
    )
    steps = np.arange(0, 50)
    np.testing.assert_allclose([warm(int(s)) for s in steps], 2.0 * np.minimum(1, steps / 20))
    off = make("beta-schedule", "linear-warmup", "training.beta=1.0")
    assert off(0) == 1.0


def test_cyclic_beta_follows_the_reference_example() -> None:
    # beta_warmup_epochs=5, number_cycles=3: 2.5 epochs rising, 2.5 holding, three times,
    # then beta for good after 15 epochs.
    cyclic = make(
        "beta-schedule",
        "cyclic",
        "training.beta=1.0",
        "training.beta_warmup_epochs=5",
        "training.number_cycles=3",
        steps_per_epoch=100,
    )
    at_epoch = {
        e: cyclic(round(e * 100))
        for e in (0, 1.25, 2.5, 4.9, 5, 6.25, 10, 11.25, 14.9, 15, 16, 100)
    }
    expected = {
        0: 0.0,
        1.25: 0.5,
        2.5: 1.0,
        4.9: 1.0,
        5: 0.0,
        6.25: 0.5,
        10: 0.0,
        11.25: 0.5,
        14.9: 1.0,
        15: 1.0,
        16: 1.0,
        100: 1.0,
    }
    assert at_epoch == pytest.approx(expected)


def test_cyclic_beta_shorthand_from_the_reference_option() -> None:
    cfg = resolve_config(
        overrides=[
            "training.cyclic_beta=true",
            "training.beta_warmup_epochs=2",
            "training.number_cycles=2",
        ]
    )
    schedule = (
        get_registry()
        .get("beta-schedule", cfg.training.beta_schedule)
        .load()(cfg.options("beta-schedule"), cfg.training, STEPS_PER_EPOCH)
    )
    assert schedule(20) == 0.0 and schedule(5) == 0.5 and schedule(40) == 1.0
