"""A training run: epochs of compiled steps, validation with EMA weights, checkpoints, outputs.

Everything here is backend-neutral; the backend lives in the engine
(:func:`hvae_core.backends.engine.make_engine`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hvae_core.errors import HvaeError, Interrupted
from hvae_core.model.pixels import to_uint8
from hvae_core.run import RunDirectory
from hvae_core.run import checkpoint as checkpoint_meta
from hvae_core.run.directory import Checkpoint
from hvae_core.run.files import json_row
from hvae_core.training.metrics import accumulate, epoch_row
from hvae_core.training.progress import Reporter
from hvae_core.training.trackers import Trackers

PHASES = ("set-up", "train steps", "evaluation", "images and plots", "checkpoints", "trackers")
NUM_SAMPLES = 64
SAMPLE_TEMPERATURE = 0.8


@dataclass
class Position:
    """Where a run stands; saved in every checkpoint so that a resume continues exactly."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the epoch in progress
    step: int = 0  # batches done in the whole run
    consecutive_skips: int = 0
    best_val: float | None = None
    bad_epochs: int = 0
    epoch_seconds: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)  # running sums of this epoch


class Trainer:
    """The training loop of a run assembled by :func:`hvae_core.training.setup.assemble`
    (``parts``; a config is assembled here), writing to ``run`` (None: nothing is written,
    as on every process but the chief, or with ``run.save`` false)."""

    def __init__(
        self,
        parts: Any,
        run: RunDirectory | None = None,
        *,
        quiet: bool = False,
        registry: Any = None,
    ) -> None:
        from hvae_core.training.setup import Parts, assemble

        if not isinstance(parts, Parts):
            parts = assemble(parts, registry)
        self.parts = parts
        self.config = config = parts.config
        self.run = run
        self.plugins = parts.plugins
        self.parallel = parts.parallel
        self.reporter = Reporter(quiet, silent=not self.parallel.is_chief)
        self.writes = self.parallel.is_chief and run is not None
        self.trackers = Trackers(parts.tracker_factories if self.writes else [], self.reporter.warn)
        self._new_images: dict[str, np.ndarray] = {}  # grids written since the last epoch row
        self.rows: list[dict[str, Any]] = []  # this session's epochs, kept or not
        self.regularizer = parts.regularizer
        self.dataset, self.val, self.stream = parts.dataset, parts.val, parts.stream
        self.steps_per_epoch = parts.steps_per_epoch
        self.model, self.engine = parts.model, parts.engine
        self.beta_schedule = parts.beta_schedule
        self.position = Position()
        self._pending: tuple[dict[str, Any], int] | None = None  # a dispatched step's metrics
        self._last_finish = time.monotonic()
        self._last_norm = math.nan
        self._last_images = time.monotonic()
        # Where a run's wall time goes, printed when it ends.
        self.phase_seconds = dict.fromkeys(PHASES, 0.0)
        self.phase_seconds["set-up"] = parts.setup_seconds
        del config

    @property
    def run_dir(self) -> Path | None:
        """The run directory's path (None where this trainer writes none)."""
        return self.run.path if self.run is not None else None

    # -- state ------------------------------------------------------------------------------

    def save(self) -> None:
        self._record_pending()  # the position counts every dispatched step: so must the sums
        with self._timed("checkpoints"):
            self._save()

    def _save(self) -> None:
        state = self.engine.state()  # every process: reading a distributed state may need all
        if not self.writes:
            return
        self.run.save_checkpoint(
            state,
            checkpoint_meta.metadata(
                asdict(self.position),
                self.dataset.num_bits,
                self.dataset.image_shape,
                self.plugins,
                self.config,
            ),
        )
        self._last_save = time.monotonic()

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint`` (read and checked once, by
        :meth:`RunDirectory.read_checkpoint`): weights, optimizer, EMA and position."""
        checkpoint_meta.check_position(checkpoint.meta, checkpoint.path, self.steps_per_epoch)
        try:
            self.engine.load_state(checkpoint.arrays)
        except ValueError as exc:
            raise HvaeError(
                f"checkpoint {checkpoint.path} does not fit this model: {exc}",
                hint="was config.yaml edited after the run started?",
            ) from None
        self.position = Position(**checkpoint.meta["position"])
        if self.writes:
            self.run.truncate_metrics(self.position.epoch)

    def init_from(self, checkpoint: Checkpoint) -> None:
        """Start this new run from the weights of another run's ``checkpoint`` (its EMA too;
        a fresh optimizer and position): fine-tuning. Its model config must be this run's
        (the data may differ)."""
        stored = checkpoint.meta.get("fingerprint_config") or {}
        ours = checkpoint_meta.fingerprinted_sections(self.config)
        changed = checkpoint_meta.model_and_data_changes(
            {"model": stored.get("model") or {}}, {"model": ours["model"]}
        )
        if changed:
            raise HvaeError(
                f"--init-from: {checkpoint.path} holds another model (differs in "
                f"{', '.join(changed[:5])})",
                hint="train with that run's model config (--config RUN_DIR/config.yaml)",
            )
        try:
            self.engine.load_weights(checkpoint.arrays)
        except ValueError as exc:
            raise HvaeError(
                f"--init-from: {checkpoint.path} does not fit this model: {exc}",
                hint="train with that run's model config (--config RUN_DIR/config.yaml)",
            ) from None

    # -- the run ----------------------------------------------------------------------------

    def summary(self) -> str:
        import keras

        from hvae_core.backends.engine import device_name

        backend = keras.backend.backend()
        device = device_name()
        return (
            f"hvae: backend {backend} on {device}, {self.parallel.describe()}; "
            f"{self.model.count_params():,} parameters{_flows_note(self.model)}, "
            f"{self.model.num_latent_layers} latent layers ({self.model.num_latent_dims:,} "
            "dims); dataset "
            f"{self.config.data.dataset} ({len(self.stream) * self.stream.batch_size:,} "
            f"train images/epoch, {self.dataset.num_bits} bits); "
            + (f"run dir {self.run_dir}" if self.config.run.save else "nothing saved (run.save)")
        )

    def fit(self) -> list[dict[str, Any]]:
        training = self.config.training
        self.reporter.info(self.summary())
        self._last_save = time.monotonic()
        try:
            self._start_trackers()
            while self.position.epoch < training.epochs:
                row = self._epoch()
                if row is None:
                    break
        except Exception as exc:
            from hvae_core.backends.engine import is_out_of_memory, out_of_memory_error

            if not is_out_of_memory(exc):
                raise
            self.reporter.close()
            raise out_of_memory_error(
                exc,
                f"in the train step at batch size {training.batch_size}",
                "lower --batch-size, or raise training.batch_size_div to accumulate "
                "gradients over smaller micro-batches",
            ) from None
        except KeyboardInterrupt:
            self.reporter.close()
            if not self.config.run.save:
                raise Interrupted("interrupted; nothing was kept (run.save is false)") from None
            self.save()
            self.write_outputs()  # what the run looks like where it stopped
            raise Interrupted(
                "interrupted; the run was checkpointed",
                hint=f"continue with: hvae train --resume {self.run_dir}",
            ) from None
        finally:
            self.reporter.close()
            self._close_trackers()
        self.reporter.info(self.time_summary())
        return self.run.read_metrics() if self.writes else self.rows

    def _epoch(self) -> dict[str, Any] | None:
        training, pos = self.config.training, self.position
        epoch = pos.epoch + 1
        self.reporter.start_epoch(epoch, training.epochs, self.steps_per_epoch, pos.batch)
        started = time.monotonic() - pos.epoch_seconds
        self._last_finish = time.monotonic()
        beta = float(self.beta_schedule(pos.step))
        batches = self.stream.epoch(pos.epoch, start_batch=pos.batch)
        loop_started, saving = time.monotonic(), self.phase_seconds["checkpoints"]
        try:
            for images in batches:
                if self.regularizer is not None:
                    rng = np.random.default_rng([training.seed, pos.epoch, pos.batch])
                    images = self.regularizer.transform_batch(images, rng)
                beta = float(self.beta_schedule(pos.step))
                metrics = self.engine.dispatch_step(
                    images, beta, self._skipnorm(pos.step), step=pos.step
                )
                pos.batch += 1
                pos.step += 1
                # The previous step's metrics are read only now that this step is queued: the
                # device never waits for the host between steps.
                self._record_pending()
                self._pending = (metrics, pos.batch)
                if self._stopped_learning():
                    skips, norm = pos.consecutive_skips, self._last_norm
                    pos.epoch_seconds = time.monotonic() - started
                    self.save()  # with the step still in flight: the position counts it
                    raise HvaeError(
                        f"{skips} updates in a row were skipped (gradient "
                        f"norm {norm:.3g}, threshold "
                        f"{training.gradient_skipnorm:g}, in {training.grad_norm_unit}): the "
                        "model has stopped learning",
                        hint="raise training.gradient_skipnorm (or set it to 0) and resume "
                        "with --resume --set training.gradient_skipnorm=...",
                    )
                minutes = training.checkpoint_minutes
                if minutes > 0 and time.monotonic() - self._last_save > minutes * 60:
                    pos.epoch_seconds = time.monotonic() - started
                    self.save()
            self._record_pending()
        finally:
            # The steps' time, without the checkpoints written between them.
            self.phase_seconds["train steps"] += (
                time.monotonic() - loop_started - (self.phase_seconds["checkpoints"] - saving)
            )
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        row = self._finish_epoch(epoch, time.monotonic() - started, beta)
        stop = False
        if training.early_stopping and row["val_bpd"] is not None:
            if pos.best_val is None or row["val_bpd"] < pos.best_val:
                pos.best_val, pos.bad_epochs = row["val_bpd"], 0
            else:
                pos.bad_epochs += 1
                stop = pos.bad_epochs >= training.early_stopping
        last = stop or pos.epoch >= training.epochs
        # Between epochs only what is due: images and plots on their cadence, checkpoints on
        # checkpoint_minutes (metrics.jsonl has every epoch; a resume truncates it to the
        # checkpoint's epoch). After the last epoch, everything.
        if last or self._due(self._last_images, self.config.run.images_minutes):
            self.write_outputs()
        self._log_to_trackers(row)
        if last or self._due(self._last_save, training.checkpoint_minutes):
            self.save()
        if stop:
            self.reporter.info(f"early stopping: no val improvement in {pos.bad_epochs} epochs")
            return None
        return row

    def _skipnorm(self, step: int) -> float:
        """The skip threshold at ``step``: off (0) during ``skipnorm_warmup_epochs``."""
        training = self.config.training
        warm = step >= training.skipnorm_warmup_epochs * self.steps_per_epoch
        return training.gradient_skipnorm if warm else 0.0

    def _record_pending(self) -> None:
        """Fold the last dispatched step's metrics into the epoch's sums and the progress line
        (waits for that step)."""
        if self._pending is None:
            return
        pending, done = self._pending
        metrics = self.engine.fetch(pending)
        self._pending = None  # only now: an interrupt while waiting must not lose the step
        now = time.monotonic()
        # Steps overlap with the host's work: the time between two finished steps is a step.
        step_seconds = now - self._last_finish
        self._last_finish = now
        accumulate(self.position.sums, metrics)
        pos = self.position
        pos.consecutive_skips = pos.consecutive_skips + 1 if metrics["skipped"] > 0 else 0
        self._last_norm = metrics["grad_norm"]
        self.reporter.step(done, metrics, int(pos.sums.get("skipped", 0)), step_seconds)

    def _stopped_learning(self) -> bool:
        limit = self.config.training.max_consecutive_skips
        return 0 < limit <= self.position.consecutive_skips

    def _finish_epoch(self, epoch: int, seconds: float, beta: float) -> dict[str, Any]:
        pos, sums = self.position, self.position.sums
        with self._timed("evaluation"):
            val = self.evaluate(self.val)
        row = epoch_row(
            sums,
            val,
            epoch=epoch,
            step=pos.step,
            lr=self.engine.learning_rate,
            beta=beta,
            grad_norm_unit=self.config.training.grad_norm_unit,
            seconds=seconds,
        )
        pos.epoch, pos.batch, pos.sums, pos.epoch_seconds = epoch, 0, {}, 0.0
        self.rows.append(row)
        if self.writes:
            self.run.append_metrics(row)
        self.reporter.end_epoch(row)
        return row

    def _due(self, since: float, minutes: float) -> bool:
        """Whether work on a ``minutes`` cadence is due. Every process of a multi-process run
        takes part in it (sampling and reading a distributed state may be collective), so
        there it is every epoch: the processes' clocks could disagree."""
        if minutes <= 0 or self.parallel.num_processes > 1:
            return True
        return time.monotonic() - since >= minutes * 60

    def write_outputs(self) -> None:
        """The sample and reconstruction grids and the metric plots."""
        with self._timed("images and plots"):
            self._write_outputs()

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.phase_seconds[phase] += time.monotonic() - started

    def time_summary(self) -> str:
        """One line: where this session's wall time went."""
        parts = ", ".join(
            f"{s:.1f} s {phase}"
            for phase, s in self.phase_seconds.items()
            if phase != "trackers" or self.trackers.factories
        )
        return f"time: {parts}"

    # -- experiment trackers (chief only; see hvae_core.interfaces.Tracker) -------------------

    def _start_trackers(self) -> None:
        with self._timed("trackers"):
            self.trackers.start(
                self.config.options("tracker"),
                self.config.to_dict(),
                self.config.run,
                self.run_dir,
                self.position.epoch + 1,
            )

    def _log_to_trackers(self, row: dict[str, Any]) -> None:
        images, self._new_images = self._new_images, {}
        if not self.trackers.active:
            return
        with self._timed("trackers"):
            self.trackers.log_epoch(json_row(row), images)

    def _close_trackers(self) -> None:
        with self._timed("trackers"):
            self.trackers.close()

    def _write_outputs(self) -> None:
        if self.config.run.save:  # on every process: sampling may be collective
            self.write_images()
        if self.writes:
            self.run.plot_metrics()
        self._last_images = time.monotonic()

    # -- evaluation and images (EMA weights) --------------------------------------------------

    def with_ema(self, fn: Any) -> Any:
        use = bool(self.engine.ema)
        if use:
            self.engine.swap_ema()
        try:
            return fn()
        finally:
            if use:
                self.engine.swap_ema()

    def eval_batches(self, images: Any, batch_size: int | None = None) -> Any:
        from hvae_core.data import evaluation_batches

        return evaluation_batches(
            images, batch_size or self.config.training.batch_size, self.dataset
        )

    def evaluate(self, images: Any, batch_size: int | None = None) -> dict[str, Any]:
        """``images`` (uint8 NHWC) scored with the EMA weights: the negative ELBO's parts, the
        KL of every layer and scale and the active units (see
        :func:`hvae_core.model.evaluation.summarise`)."""
        from hvae_core.model.evaluation import add_terms, summarise

        if len(images) == 0:
            return {}

        def run() -> dict[str, Any]:
            totals: dict[str, Any] = {}
            for batch in self.eval_batches(images, batch_size):
                add_terms(totals, self.engine.eval_step(batch))
            return summarise(totals, self.model.latent_resolutions)

        return self.with_ema(run)

    def inference(self) -> Any:
        """The model as :func:`hvae_core.load` gives it, on the engine's live state: the
        figures are computed exactly as ``hvae sample`` and ``TrainedModel`` compute them,
        through the same runner (call it within :meth:`with_ema` for the EMA weights)."""
        from hvae_core.trained import TrainedModel

        return TrainedModel(
            self.model,
            self.config,
            None,
            {"position": asdict(self.position)},
            self.engine.live_runner(),
        )

    def sample(
        self,
        n: int,
        temperature: Any,
        output_temperature: float = 1.0,
        seed: int | None = None,
    ) -> np.ndarray:
        """``n`` samples from the EMA model as uint8 levels of the dataset's bit depth, for
        the noise ``seed`` draws (default: the training seed, so every epoch's figure shows
        the same draw)."""
        seed = self.config.training.seed if seed is None else seed

        def run() -> np.ndarray:
            return self.inference().sample(n, temperature, output_temperature, seed=seed)

        return self.with_ema(run)

    def write_images(self) -> None:
        """Samples and reconstructions; every process computes them (a distributed model
        runs its ops on all processes), the chief saves them. Their noise comes from the
        training seed: the same draw every time, and no training noise is touched."""
        bits = self.dataset.num_bits
        samples = self.sample(NUM_SAMPLES, SAMPLE_TEMPERATURE)
        originals = next(iter(self.eval_batches(self.val[:8])))

        def run() -> np.ndarray:
            return self.inference().reconstruct(originals, seed=self.config.training.seed)

        recon = self.with_ema(run)
        if not self.writes:
            return
        grids = self.run.save_images(
            {
                "samples": (to_uint8(samples, bits), None),
                "reconstructions": (
                    np.concatenate([to_uint8(originals, bits), to_uint8(recon, bits)]),
                    len(originals),
                ),
            }
        )
        for grid in grids.values():
            grid.flags.writeable = False  # one array for every tracker: none may change it
        self._new_images = grids


def _flows_note(model: Any) -> str:
    """The start-up line's flow parameter count, when there are flows: the reference found
    that they can outgrow the rest of the model."""
    count = model.num_flow_params()
    return f" (flows {count:,})" if count else ""
