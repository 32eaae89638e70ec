"""What every backend's engine shares: the step's maths stated once, state in and out.

One train step, compiled once per run on each backend:
  1. images (uint8) -> [-1, 1]; ``batch_size_div`` micro-batches, gradients averaged;
  2. the global gradient norm, on the ``grad_norm_unit`` scale; the update is skipped
     (weights, optimizer state and EMA untouched) when it is not finite or reaches
     ``gradient_skipnorm``;
  3. otherwise gradients are clipped by ``gradient_clipnorm / norm``, the optimizer applies them
     and the EMA of the weights moves.
The backend modules (``engine_jax``, ``engine_tensorflow``, ``engine_torch``) only say how to
differentiate and compile this.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

from hvae_core.backends.conv_gradients import canonical_conv_gradients
from hvae_core.backends.parallel import Launch, Parallel
from hvae_core.backends.select import BACKENDS
from hvae_core.errors import HvaeError
from hvae_core.model.pixels import to_unit_range
from hvae_core.model.repeat import Scan, loop_with

NOISE_STREAM_STRIDE = 1_000_003  # between the seeds of neighbouring replicas' noise streams


def replica_seed_state(state: np.ndarray, replica: int) -> np.ndarray:
    """A Keras ``SeedGenerator`` state for ``replica``, from replica 0's ``state`` (or a stack
    of such states, one row per block of a run)."""
    state = np.array(state, copy=True)
    offset = (state[..., 0].astype(np.int64) + NOISE_STREAM_STRIDE * replica) % 2**31
    state[..., 0] = offset.astype(state.dtype)
    return state


def noise_seed_variables(model: Any) -> list[Any]:
    """The state variables of every ``keras.random.SeedGenerator`` in ``model``."""
    return model.noise_seed_variables


def to_numpy(values: Any) -> Any:
    """Backend tensors, or any nesting of them, as numpy arrays."""
    return keras.tree.map_structure(lambda v: np.asarray(keras.ops.convert_to_numpy(v)), values)


def global_norm(grads: list[Any]) -> Any:
    return ops.sqrt(sum(ops.sum(ops.square(ops.cast(g, "float32"))) for g in grads))


def norm_scale(unit: str) -> float:
    """What turns the norm of the loss's gradient (the loss is in bits per dimension) into a
    norm on the ``unit`` scale: the nats loss is ln 2 times the bits loss, and so is its
    gradient."""
    if unit not in ("nats", "bits"):
        raise ValueError(f"unknown gradient norm unit {unit!r}")
    return math.log(2.0) if unit == "nats" else 1.0


def skip_and_scale(norm: Any, loss: Any, clipnorm: float, skipnorm: Any) -> tuple[Any, Any]:
    """Whether to skip this update, and the factor that clips the gradients: VDVAE's rule on a
    ``norm`` already on the thresholds' scale (skip when it is not finite or reaches
    ``skipnorm``). ``skipnorm`` may be a traced scalar, so that turning skipping on mid-run
    does not recompile the step."""
    finite = ops.logical_and(ops.isfinite(norm), ops.isfinite(loss))
    skip = ops.logical_or(ops.logical_not(finite), ops.logical_and(skipnorm > 0, norm >= skipnorm))
    scale = ops.minimum(1.0, clipnorm / (norm + 1e-6)) if clipnorm > 0 else ops.ones(())
    # A non-finite norm would poison the clipped gradients even in the branch not taken.
    scale = ops.where(finite, scale, ops.zeros(()))
    return skip, scale


def clip_and_skip(
    grads: list[Any], loss: Any, training: Any, skipnorm: Any
) -> tuple[Any, Any, Any]:
    """The step's gradient rule, shared by every engine: the global norm of ``grads`` (the
    gradients of the bits loss) on the ``training.grad_norm_unit`` scale, which is what is
    reported as ``grad_norm``; whether to skip the update; the factor that clips ``grads``."""
    norm = global_norm(grads) * norm_scale(training.grad_norm_unit)
    skip, scale = skip_and_scale(norm, loss, training.gradient_clipnorm, skipnorm)
    return norm, skip, scale


class Engine:
    """Runs the compiled train and eval steps of one model and owns the training state."""

    def __init__(
        self,
        model: Any,
        optimizer: Any,
        config: Any,
        regularizer: Any = None,
        parallel: Parallel | None = None,
    ) -> None:
        self.model = model
        self.parallel = parallel or Parallel()
        self.optimizer = optimizer
        self.training = config.training
        self.jit = config.run.jit
        self.remat = config.run.remat_blocks
        self.torch_compile = config.run.torch_compile and config.run.jit
        # Set by an engine whose steps XLA compiles for a CPU (see conv_gradients).
        self.cpu_compiled = False
        self.regularizer = regularizer
        self.num_bits = model.num_bits
        self.div = self.training.batch_size_div
        self.trainable = list(model.trainable_variables)
        self.optimizer.build(self.trainable)
        self.ema = (
            [
                # A copy: the EMA must not share a buffer with the weight (JAX donates them).
                keras.Variable(
                    keras.ops.convert_to_numpy(v.value), trainable=False, name=f"ema_{i}"
                )
                for i, v in enumerate(self.trainable)
            ]
            if self.training.use_ema
            else []
        )
        self.ema_rate = self.training.ema_rate
        self.ema_targets = self.trainable if self.ema else []

    # -- compiled steps: provided by the backend ---------------------------------------------

    def dispatch_step(
        self, images: np.ndarray, beta: float, skipnorm: float | None = None
    ) -> dict[str, Any]:
        """Start one update on the global batch ``images`` and return its metrics as device
        values, without waiting for them: the host can prepare the next batch while the device
        works (:meth:`fetch` reads them). ``skipnorm`` overrides
        ``training.gradient_skipnorm`` for this step (0: no skipping on the norm)."""
        raise NotImplementedError

    def train_step(
        self, images: np.ndarray, beta: float, skipnorm: float | None = None
    ) -> dict[str, float]:
        """One update, waited for: its metrics as floats."""
        return self.fetch(self.dispatch_step(images, beta, skipnorm))

    def fetch(self, metrics: dict[str, Any]) -> dict[str, float]:
        """A dispatched step's metrics as floats (waits for the step to finish)."""
        return self.to_floats(metrics)

    def block_loop(self) -> Scan | None:
        """How runs of repeated blocks loop inside this engine's steps: a compiled loop where
        the step is compiled (one loop body per distinct block), None for a Python loop."""
        return None

    def skipnorm(self, override: float | None) -> float:
        return self.training.gradient_skipnorm if override is None else float(override)

    def eval_step(self, images: np.ndarray) -> dict[str, Any]:
        """The model's :meth:`evaluation_terms` of ``images`` with the current variables (swap
        in the EMA first if wanted), as numpy values: sums over the batch."""
        raise NotImplementedError

    def evaluation_terms(self, images: Any) -> dict[str, Any]:
        """What the compiled evaluation step computes: the model's own evaluation method, so
        that a new statistic changes the model, not the three engines."""
        x = to_unit_range(images, self.num_bits)
        layout = canonical_conv_gradients() if self.cpu_compiled else contextlib.nullcontext()
        with loop_with(self.block_loop()), layout:
            return self.model.evaluation_terms(x)

    def sync(self) -> None:
        """Write the engine's state back into the Keras variables (JAX keeps it apart)."""

    def run_compiled(self, key: Any, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` (a computation of the model on its current variables: sampling,
        reconstruction) as this engine runs it best; ``key`` names ``fn`` with everything it
        closes over (an engine may compile ``fn`` once per key and reuse it). Here: eagerly,
        with the engine's loop for repeated blocks."""
        with loop_with(self.block_loop()):
            return fn(*args)

    # -- shared ------------------------------------------------------------------------------

    def accumulate(self, chunks: Any, compute: Any) -> tuple[list[Any], dict[str, Any]]:
        """Gradients and loss terms averaged over the ``batch_size_div`` micro-batches;
        ``compute(chunk)`` returns one micro-batch's (gradients, terms)."""
        grads: list[Any] | None = None
        terms: dict[str, Any] = {}
        for chunk in chunks:
            chunk_grads, chunk_terms = compute(chunk)
            grads = (
                list(chunk_grads)
                if grads is None
                else [a + b for a, b in zip(grads, chunk_grads, strict=True)]
            )
            for key, value in chunk_terms.items():
                terms[key] = terms.get(key, 0.0) + value / self.div
        assert grads is not None
        return [g / self.div for g in grads], terms

    def loss_terms(self, images: Any, beta: Any, training: bool) -> dict[str, Any]:
        """Loss and metrics of ``images`` (uint8), averaged over ``batch_size_div`` chunks."""
        x = to_unit_range(images, self.num_bits)
        # Only training batches went through the regularizer's transform_batch.
        groups = int(getattr(self.regularizer, "noise_groups", 1)) if training else 1
        layout = canonical_conv_gradients() if self.cpu_compiled else contextlib.nullcontext()
        with loop_with(self.block_loop()), layout:
            result = self.model.losses_for(
                x,
                beta=beta,
                training=training,
                regularizer=self.regularizer if training else None,
                noise_groups=groups,
            )
        return {k: v for k, v in result.items() if k not in ("outputs", "kl_layers_bpd")}

    @contextlib.contextmanager
    def noise_kept(self) -> Iterator[None]:
        """What runs in the block (samples for the run's figures) leaves the training's noise
        streams where they were: otherwise when figures are written, which may depend on the
        clock, would change the noise every later step draws."""
        self.sync()
        seeds = noise_seed_variables(self.model)
        saved = [np.array(keras.ops.convert_to_numpy(v.value), copy=True) for v in seeds]
        try:
            yield
        finally:
            self.sync()
            self.restore_noise(seeds, saved)
            self.after_external_change()

    def restore_noise(self, seeds: list[Any], saved: list[np.ndarray]) -> None:
        """Give the noise seed variables ``seeds`` the values ``saved`` read from them."""
        for v, value in zip(seeds, saved, strict=True):
            v.assign(value)

    def swap_ema(self) -> None:
        """Exchange the model's weights and their EMA (call again to swap back)."""
        self.sync()
        for v, e in zip(self.trainable, self.ema, strict=True):
            # A copy: on TensorFlow ``v.value`` reads the variable lazily, and would see the
            # EMA it is about to be given.
            w = keras.ops.convert_to_numpy(v.value)
            v.assign(e.value)
            e.assign(w)
        self.after_external_change()

    def after_external_change(self) -> None:
        """Variables were assigned outside the engine (restore, EMA swap)."""

    def state(self) -> dict[str, np.ndarray]:
        """Every array of the training state, by a stable name."""
        self.sync()
        arrays = {}
        for i, v in enumerate(self.model.variables):
            arrays[f"model/{i:05d}"] = keras.ops.convert_to_numpy(v.value)
        for i, v in enumerate(self.ema):
            arrays[f"ema/{i:05d}"] = keras.ops.convert_to_numpy(v.value)
        for i, v in enumerate(self.optimizer.variables):
            arrays[f"optimizer/{i:05d}"] = keras.ops.convert_to_numpy(v.value)
        return arrays

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore from ``state()``'s arrays; a checkpoint written before repeated blocks were
        stacked (one set of weights per block) is converted to this model's layout."""
        from hvae_core.model.weights import assign_saved, in_model_layout

        arrays = in_model_layout(arrays, self.model, self.optimizer, bool(self.ema))
        assign_saved(arrays, "model", self.model.variables)
        assign_saved(arrays, "ema", self.ema)
        assign_saved(arrays, "optimizer", self.optimizer.variables)
        if self.parallel.replicas > 1:
            self.decorrelate_noise()
        self.after_external_change()

    def decorrelate_noise(self) -> None:
        """Give each data-parallel replica its own latent noise stream.

        Where replicas run copies of the model (torch, tensorflow), each copy's seed state
        would equal replica 0's, and every replica would draw the same noise for different
        images. Replica r's seeds are replica 0's offset by r; a checkpoint holds replica 0's,
        so a restore re-derives the rest. JAX draws one global batch's noise and needs none.
        """

    @property
    def learning_rate(self) -> float:
        self.sync()
        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

    @staticmethod
    def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
        return {k: float(keras.ops.convert_to_numpy(v)) for k, v in metrics.items()}


class Runner:
    """Computations of a model on its own variables (sampling, scoring), run as the backend
    runs them best: what a loaded, trained model uses. No optimizer, no EMA, one device; the
    noise seeds advance as they would eagerly. The backend modules compile; this base runs
    eagerly (a backend without an engine module, such as OpenVINO, uses it as it is)."""

    def __init__(self, model: Any, jit: bool = True) -> None:
        self.model, self.jit = model, jit

    def block_loop(self) -> Scan | None:
        return None

    def run(self, key: Any, fn: Any, *args: Any) -> Any:
        """``fn(*args)``; ``key`` names ``fn`` with everything it closes over (a backend
        compiles ``fn`` once per key and input shapes)."""
        with loop_with(self.block_loop()):
            return fn(*args)


def make_runner(model: Any, jit: bool = True) -> Runner:
    """The :class:`Runner` of the active Keras backend."""
    if keras.backend.backend() not in BACKENDS:
        return Runner(model, jit)
    return backend_module().RUNNER(model, jit)


def make_engine(
    model: Any,
    optimizer: Any,
    config: Any,
    regularizer: Any = None,
    parallel: Parallel | None = None,
) -> Engine:
    """The engine of the active Keras backend."""
    cls = backend_module().ENGINE
    return cls(model, optimizer, config, regularizer, parallel)


def backend_module() -> Any:
    """The engine module of the active Keras backend."""
    import importlib

    backend = keras.backend.backend()
    if backend not in BACKENDS:
        raise ValueError(f"unsupported Keras backend {backend}")
    return importlib.import_module(f"hvae_core.backends.engine_{backend}")


def setup_parallel(devices: int, launch: Launch, timeout: int) -> Parallel:
    """Start the active backend's distributed engine (before any weight is created)."""
    return backend_module().setup_parallel(devices, launch, timeout)


def device_name() -> str:
    """The device the active backend computes on, for the start-up line ("CPU", "GPU")."""
    try:
        return backend_module().device_name()
    except Exception:  # the device name is informative only
        return "unknown device"


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure of the host or of the active backend."""
    if isinstance(exc, MemoryError):
        return True
    try:
        return bool(backend_module().is_out_of_memory(exc))
    except ValueError:  # no supported backend is active
        return False


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
