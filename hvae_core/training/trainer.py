"""A training run: epochs of compiled steps, validation with EMA weights, checkpoints, outputs.

Everything here is backend-neutral; the backend lives in the engine
(:func:`hvae_core.backends.engine.make_engine`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hvae_core import __version__
from hvae_core.backends.select import set_random_seed
from hvae_core.errors import HvaeError, Interrupted
from hvae_core.run import checkpoint as checkpoint_meta
from hvae_core.run import files as rundir
from hvae_core.run import plugins_used
from hvae_core.training.progress import Reporter

SUM_KEYS = ("loss", "elbo_bpd", "recon_bpd", "kl_bpd")
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
    def __init__(
        self, config: Any, run_dir: Path | None = None, quiet: bool = False, registry: Any = None
    ) -> None:
        from hvae_core.backends.engine import make_engine, setup_parallel
        from hvae_core.backends.parallel import batch_groups, check_batch, launch_from_env
        from hvae_core.data import BatchStream, batch_transform, open_dataset
        from hvae_core.model.hvae import HVAE
        from hvae_core.plugins import get_registry
        from hvae_core.training.optim import make_optimizer

        setup_started = time.monotonic()
        self.config = config
        self.run_dir: Path = run_dir  # type: ignore[assignment]  # set before fit() or save()
        registry = registry or get_registry()
        self.plugins = plugins_used(config, registry)
        training = config.training
        # First: the distributed engine must be up before any weight exists.
        self.parallel = setup_parallel(
            config.run.devices, launch_from_env(), config.run.connect_timeout
        )
        self.reporter = Reporter(quiet, silent=not self.parallel.is_chief)
        # Only process 0 writes, and only when the run is kept (run.save).
        self.writes = self.parallel.is_chief and config.run.save
        # Trackers go with the writing: loaded now, before the model is built, so that one
        # whose package is missing stops the run at once; started by fit(), on the run dir.
        tracker_specs = [registry.get("tracker", name) for name in config.run.trackers]
        self._tracker_factories = [(s, s.load()) for s in tracker_specs if self.writes]
        self.trackers: list[tuple[Any, Any]] = []  # (spec, tracker) of those still working
        self._new_images: dict[str, np.ndarray] = {}  # grids written since the last epoch row
        self.rows: list[dict[str, Any]] = []  # this session's epochs, kept or not
        self.regularizer = None
        if training.regularizer is not None:
            spec = registry.get("regularizer", training.regularizer)
            self.regularizer = spec.create(config.options("regularizer"), training)
        check_batch(
            training.batch_size,
            training.batch_size_div,
            batch_groups(self.regularizer),
            self.parallel.replicas,
        )
        self.dataset = open_dataset(config, registry)
        train = self.dataset.load("train")
        self.val = self.dataset.load("val")
        self.stream = BatchStream(
            train,
            training.batch_size,
            shuffle=True,
            seed=training.seed,
            flip=config.data.random_flip,
            transform=batch_transform(self.dataset),
        )
        self.steps_per_epoch = len(self.stream)
        if self.steps_per_epoch == 0:
            raise HvaeError(
                f"the training split has {len(train)} images, fewer than one batch of "
                f"{training.batch_size}",
                hint="lower --batch-size",
            )
        set_random_seed(training.seed)  # the same seed, the same initial weights
        building = out_of_memory_is_one_line(BUILD_OOM_HINT, "building the model")
        with self.parallel.scope(), building:
            self.model = HVAE(
                config,
                self.dataset.image_shape,
                self.dataset.num_bits,
                registry=registry,
                seed=training.seed,
            )
            self.model.build_weights()
            optimizer = make_optimizer(config, self.steps_per_epoch, registry)
            self.engine = make_engine(
                self.model, optimizer, config, self.regularizer, self.parallel
            )
        self.beta_schedule = registry.get("beta-schedule", training.beta_schedule).create(
            config.options("beta-schedule"), training, self.steps_per_epoch
        )
        self.position = Position()
        self._pending: tuple[dict[str, Any], int] | None = None  # a dispatched step's metrics
        self._last_finish = time.monotonic()
        self._last_norm = math.nan
        self._last_images = time.monotonic()
        # Where a run's wall time goes, printed when it ends.
        self.phase_seconds = dict.fromkeys(PHASES, 0.0)
        self.phase_seconds["set-up"] = time.monotonic() - setup_started

    # -- state ------------------------------------------------------------------------------

    def save(self) -> None:
        self._record_pending()  # the position counts every dispatched step: so must the sums
        with self._timed("checkpoints"):
            self._save()

    def _save(self) -> None:
        state = self.engine.state()  # every process: reading a distributed state may need all
        if not self.writes:
            return
        rundir.save_checkpoint(
            self.run_dir / rundir.CHECKPOINT,
            state,
            {
                "position": asdict(self.position),
                "num_bits": self.dataset.num_bits,
                "image_shape": list(self.dataset.image_shape),
                "hvae_version": __version__,
                "plugins": [asdict(use) for use in self.plugins],
                **checkpoint_meta.fingerprint_fields(self.config),
            },
        )
        self._last_save = time.monotonic()

    def restore(self) -> None:
        path = self.run_dir / rundir.CHECKPOINT
        arrays, meta = rundir.load_checkpoint(path, self.steps_per_epoch)
        checkpoint_meta.refuse_other_config(meta, self.config, path)
        try:
            self.engine.load_state(arrays)
        except ValueError as exc:
            raise HvaeError(
                f"checkpoint in {self.run_dir} does not fit this model: {exc}",
                hint="was config.yaml edited after the run started?",
            ) from None
        self.position = Position(**meta["position"])
        if self.writes:
            rundir.truncate_metrics(self.run_dir, self.position.epoch)

    # -- the run ----------------------------------------------------------------------------

    def summary(self) -> str:
        import keras

        backend = keras.backend.backend()
        device = _device_name(backend)
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
        return rundir.read_metrics(self.run_dir) if self.writes else self.rows

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
        self._accumulate(metrics)
        pos = self.position
        pos.consecutive_skips = pos.consecutive_skips + 1 if metrics["skipped"] > 0 else 0
        self._last_norm = metrics["grad_norm"]
        self.reporter.step(done, metrics, int(pos.sums.get("skipped", 0)), step_seconds)

    def _stopped_learning(self) -> bool:
        limit = self.config.training.max_consecutive_skips
        return 0 < limit <= self.position.consecutive_skips

    def _accumulate(self, metrics: dict[str, float]) -> None:
        sums = self.position.sums
        finite = all(math.isfinite(metrics[k]) for k in SUM_KEYS)
        if finite:
            for key, value in metrics.items():
                if key not in ("grad_norm", "skipped"):
                    sums[key] = sums.get(key, 0.0) + value
            sums["count"] = sums.get("count", 0) + 1
        norm = metrics["grad_norm"]
        if math.isfinite(norm):
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + norm
            sums["grad_norm_max"] = max(sums.get("grad_norm_max", 0.0), norm)
            sums["norm_count"] = sums.get("norm_count", 0) + 1
        sums["skipped"] = sums.get("skipped", 0) + int(metrics["skipped"] > 0)

    def _finish_epoch(self, epoch: int, seconds: float, beta: float) -> dict[str, Any]:
        pos, sums = self.position, self.position.sums
        count = max(sums.get("count", 0), 1)
        with self._timed("evaluation"):
            val = self.evaluate(self.val)
        row: dict[str, Any] = {
            "epoch": epoch,
            "step": pos.step,
            "train_bpd": sums.get("elbo_bpd", math.nan) / count,
            "val_bpd": val.get("elbo_bpd"),
            "kl_bpd": sums.get("kl_bpd", math.nan) / count,
            "recon_bpd": sums.get("recon_bpd", math.nan) / count,
            "val_kl_bpd": val.get("kl_bpd"),
            "val_recon_bpd": val.get("recon_bpd"),
            "val_kl_layers_bpd": val.get("kl_layers_bpd"),
            # By resolution, as JSON keys (strings): the row trackers get is what the file holds.
            "val_kl_scales_bpd": {str(r): kl for r, kl in val.get("kl_scales_bpd", {}).items()}
            or None,
            "active_units": val.get("active_units"),
            "active_units_total": val.get("active_units_total"),
            "latent_dims_total": val.get("latent_dims_total"),
            "active_layers": val.get("active_layers"),
            "lr": self.engine.learning_rate,
            "beta": beta,
            "grad_norm_max": sums.get("grad_norm_max", math.nan),
            "grad_norm_mean": sums.get("grad_norm", math.nan) / max(sums.get("norm_count", 0), 1),
            "grad_norm_unit": self.config.training.grad_norm_unit,
            "skipped_updates": int(sums.get("skipped", 0)),
            "seconds": seconds,
        }
        for key in sums:
            if (
                key not in row
                and key not in SUM_KEYS
                and key not in ("count", "norm_count", "grad_norm", "grad_norm_max", "skipped")
            ):
                row[key] = sums[key] / count  # a regularizer's named terms
        pos.epoch, pos.batch, pos.sums, pos.epoch_seconds = epoch, 0, {}, 0.0
        self.rows.append(row)
        if self.writes:
            rundir.append_metrics(self.run_dir, row)
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
            if phase != "trackers" or self._tracker_factories
        )
        return f"time: {parts}"

    # -- experiment trackers (chief only; see hvae_core.interfaces.Tracker) -------------------

    def _start_trackers(self) -> None:
        options = self.config.options("tracker")
        config, first_epoch = self.config.to_dict(), self.position.epoch + 1
        self.trackers = []
        with self._timed("trackers"):
            for spec, factory in self._tracker_factories:
                try:
                    tracker = factory(options[spec.name], self.config.run, run_dir=self.run_dir)
                except HvaeError:
                    raise
                except Exception as exc:
                    raise HvaeError(
                        f"tracker '{spec.name}' ({spec.package}) could not start: {_one_line(exc)}",
                        hint=f"run without it, or fix the package {spec.package}",
                    ) from exc
                self.trackers.append((spec, tracker))
                self._call_tracker(spec, tracker, "start", copy.deepcopy(config), first_epoch)

    def _log_to_trackers(self, row: dict[str, Any]) -> None:
        images, self._new_images = self._new_images, {}
        if not self.trackers:
            return
        with self._timed("trackers"):
            clean = rundir.json_row(row)
            for spec, tracker in list(self.trackers):
                self._call_tracker(spec, tracker, "log_epoch", copy.deepcopy(clean), dict(images))

    def _close_trackers(self) -> None:
        with self._timed("trackers"):
            for spec, tracker in list(self.trackers):
                self._call_tracker(spec, tracker, "close")
        self.trackers = []

    def _call_tracker(self, spec: Any, tracker: Any, method: str, *args: Any) -> None:
        """A tracker is an observer: its failure costs its own records, never the run."""
        try:
            getattr(tracker, method)(*args)
        except Exception as exc:
            self.trackers = [(s, t) for s, t in self.trackers if t is not tracker]
            self.reporter.warn(
                f"tracker '{spec.name}' ({spec.package}) failed in {method}: {_one_line(exc)}; "
                "it is off for the rest of this run (metrics.jsonl has every epoch)"
            )

    def _write_outputs(self) -> None:
        if self.config.run.save:  # on every process: sampling may be collective
            self.write_images()
        if self.writes:
            rundir.plot_metrics(self.run_dir)
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
        grids = {
            "samples": rundir.save_grid(to_uint8(samples, bits), self.run_dir / "samples.png"),
            "reconstructions": rundir.save_grid(
                np.concatenate([to_uint8(originals, bits), to_uint8(recon, bits)]),
                self.run_dir / "reconstructions.png",
                columns=len(originals),
            ),
        }
        for grid in grids.values():
            grid.flags.writeable = False  # one array for every tracker: none may change it
        self._new_images = grids


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _flows_note(model: Any) -> str:
    """The start-up line's flow parameter count, when there are flows: the reference found
    that they can outgrow the rest of the model."""
    count = model.num_flow_params()
    return f" (flows {count:,})" if count else ""


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure of any backend (TensorFlow's ResourceExhaustedError, JAX's
    RESOURCE_EXHAUSTED, torch's OutOfMemoryError), told apart by name and message only so
    that no backend is imported here."""
    name, text = type(exc).__name__, str(exc)
    return (
        isinstance(exc, MemoryError)
        or name in ("ResourceExhaustedError", "OutOfMemoryError")
        or "RESOURCE_EXHAUSTED" in text
        or "out of memory" in text.lower()
    )


BUILD_OOM_HINT = (
    "make the model smaller (model.*_width, model.*_num_blocks) or give it a device with "
    "more memory"
)


def out_of_memory_error(exc: BaseException, where: str, hint: str) -> HvaeError:
    """The one line for a backend's allocation failure ``where`` (see
    :func:`is_out_of_memory`)."""
    return HvaeError(f"out of memory {where} ({type(exc).__name__})", hint=hint)


@contextlib.contextmanager
def out_of_memory_is_one_line(hint: str, doing: str) -> Iterator[None]:
    """Turn an allocation failure of the block into :func:`out_of_memory_error`."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory_error(exc, doing, hint) from None


def to_uint8(levels: np.ndarray, bits: int) -> np.ndarray:
    """Levels of a ``bits``-bit image as 8-bit pixels, for viewing."""
    levels = np.asarray(levels).astype(np.float64)
    return np.rint(levels * 255.0 / (2**bits - 1)).astype(np.uint8)


def _device_name(backend: str) -> str:
    try:
        if backend == "jax":
            import jax

            return str(jax.devices()[0].platform).upper()
        if backend == "tensorflow":
            import tensorflow as tf

            return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        import torch

        return "GPU" if torch.cuda.is_available() else "CPU"
    except Exception:  # the device name is informative only
        return "unknown device"
