"""Assembling a run's parts from its config: the data-parallel set-up, the dataset and its
batch stream, the model, its optimizer and compiled engine, the schedules, the regularizer and
the trackers' factories.

``hvae train`` builds its :class:`~hvae_core.training.trainer.Trainer` from :func:`assemble`;
the benchmarks call :func:`assemble` or, without a dataset, :func:`build_engine`. The Keras
backend must be selected and imported before (``hvae_core.backends.select``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hvae_core.errors import HvaeError

BUILD_OOM_HINT = (
    "make the model smaller (model.*_width, model.*_num_blocks) or give it a device with "
    "more memory"
)


@dataclass
class Parts:
    """What a training run is made of (see :func:`assemble`)."""

    config: Any
    parallel: Any  # hvae_core.backends.parallel.Parallel
    dataset: Any  # the opened dataset, at the configured bit depth
    train: Any  # its training split (an image array)
    val: Any  # its validation split
    stream: Any  # hvae_core.data.BatchStream over ``train``
    model: Any  # hvae_core.model.hvae.HVAE, built
    engine: Any  # the backend's Engine: compiled steps, state, EMA
    regularizer: Any  # the regularizer plugin's instance, or None
    beta_schedule: Any  # step -> beta
    plugins: list[Any]  # hvae_core.run.PluginUse of each selected plugin
    # (spec, factory) of each tracker; empty where this process does not write the run.
    tracker_factories: list[tuple[Any, Any]] = field(default_factory=list)
    setup_seconds: float = 0.0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.stream)


def build_engine(
    config: Any,
    image_shape: tuple[int, int, int],
    num_bits: int,
    *,
    steps_per_epoch: int,
    parallel: Any = None,
    regularizer: Any = None,
    registry: Any = None,
) -> Any:
    """The model of ``config`` for images of ``image_shape`` and ``num_bits``, built with the
    run's seed, its optimizer and the backend's compiled engine (``engine.model``), inside the
    data-parallel scope (``parallel``; None: one device). An allocation failure while
    building is one line."""
    import contextlib

    from hvae_core.backends import engine as engines
    from hvae_core.backends.select import set_random_seed
    from hvae_core.model.hvae import HVAE
    from hvae_core.training.optim import make_optimizer

    seed = config.training.seed
    set_random_seed(seed)  # the same seed, the same initial weights
    building = engines.out_of_memory_is_one_line(BUILD_OOM_HINT, "building the model")
    scope = parallel.scope() if parallel is not None else contextlib.nullcontext()
    with scope, building:
        model = HVAE(config, image_shape, num_bits, registry=registry, seed=seed)
        model.build_weights()
        optimizer = make_optimizer(config, steps_per_epoch, registry)
        return engines.make_engine(model, optimizer, config, regularizer, parallel)


def assemble(config: Any, registry: Any = None) -> Parts:
    """Every part of a training run of ``config``, in the order that lets each fail early: the
    distributed engine first (before any weight exists), then the trackers' packages (a missing
    one stops the run before the model is built), the regularizer, the batch size's checks,
    the dataset, and the model."""
    from hvae_core.backends.engine import setup_parallel
    from hvae_core.backends.parallel import batch_groups, check_batch, launch_from_env
    from hvae_core.data import BatchStream, batch_transform, open_dataset
    from hvae_core.plugins import get_registry
    from hvae_core.run import plugins_used

    started = time.monotonic()
    registry = registry or get_registry()
    training = config.training
    plugins = plugins_used(config, registry)
    parallel = setup_parallel(config.run.devices, launch_from_env(), config.run.connect_timeout)
    # Trackers go with the writing: only process 0 of a kept run loads them.
    writes = parallel.is_chief and config.run.save
    specs = [registry.get("tracker", name) for name in config.run.trackers] if writes else []
    tracker_factories = [(spec, spec.load()) for spec in specs]
    regularizer = None
    if training.regularizer is not None:
        spec = registry.get("regularizer", training.regularizer)
        regularizer = spec.create(config.options("regularizer"), training)
    check_batch(
        training.batch_size, training.batch_size_div, batch_groups(regularizer), parallel.replicas
    )
    dataset = open_dataset(config, registry)
    train, val = dataset.load("train"), dataset.load("val")
    stream = BatchStream(
        train,
        training.batch_size,
        shuffle=True,
        seed=training.seed,
        flip=config.data.random_flip,
        transform=batch_transform(dataset),
    )
    if len(stream) == 0:
        raise HvaeError(
            f"the training split has {len(train)} images, fewer than one batch of "
            f"{training.batch_size}",
            hint="lower --batch-size",
        )
    engine = build_engine(
        config,
        dataset.image_shape,
        dataset.num_bits,
        parallel=parallel,
        steps_per_epoch=len(stream),
        regularizer=regularizer,
        registry=registry,
    )
    beta_schedule = registry.get("beta-schedule", training.beta_schedule).create(
        config.options("beta-schedule"), training, len(stream)
    )
    return Parts(
        config=config,
        parallel=parallel,
        dataset=dataset,
        train=train,
        val=val,
        stream=stream,
        model=engine.model,
        engine=engine,
        regularizer=regularizer,
        beta_schedule=beta_schedule,
        plugins=plugins,
        tracker_factories=tracker_factories,
        setup_seconds=time.monotonic() - started,
    )
