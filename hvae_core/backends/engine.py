"""What every backend's engine shares: the step's maths stated once, state in and out.

One train step, compiled once per run on each backend:
  1. images (uint8) -> [-1, 1]; ``batch_size_div`` micro-batches, gradients averaged;
  2. the global gradient norm, on the ``grad_norm_unit`` scale; the update is skipped
     (weights, optimizer state and EMA untouched) when it is not finite or reaches
     ``gradient_skipnorm``;
  3. otherwise gradients are clipped by ``gradient_clipnorm / norm``, the optimizer applies them
     and the EMA of the weights moves.
The backend modules (``engine_jax``, ``engine_tensorflow``, ``engine_torch``) only say how to
differentiate and compile this, and how to draw the step's latent noise.

The noise is an input of the model's passes (see :meth:`HVAE.noise_shapes`). A step draws it
from a key derived from (training seed, purpose, global step, replica) alone
(:func:`noise_seed`), so the engines keep no random state: a resumed run draws exactly the noise
the uninterrupted run drew, and the figures written between steps cannot disturb it. One step
draws one array of (micro-batches, rows, latent dims) standard normals; :func:`latent_noise`
cuts a micro-batch's rows into the layers' eps.
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
from hvae_core.errors import HvaeError, InputError
from hvae_core.model.pixels import to_unit_range
from hvae_core.model.repeat import Scan, loop_with

NOISE_TRAIN, NOISE_EVAL = 0, 1  # the purposes a step's noise is drawn for


def noise_seed(seed: int, purpose: int, step: int, part: int = 0) -> np.ndarray:
    """Two uint32 words that key the noise of one step: derived from the training ``seed``,
    the ``purpose`` (:data:`NOISE_TRAIN`, :data:`NOISE_EVAL`), the global ``step`` and the
    ``part`` (a replica, an evaluation batch) alone, so a step's noise needs no stored state."""
    words = np.random.SeedSequence([int(seed), int(purpose), int(step), int(part)])
    return words.generate_state(2, dtype=np.uint32)


def latent_noise(model: Any, flat: Any, groups: int = 1) -> list[Any]:
    """A micro-batch's latent eps from ``flat``, (rows, latent dims) standard normals: per
    layer, top first, its R * R * z_width columns as (rows, R, R, z_width); with ``groups`` >
    1 the micro-batch is that many copies of the rows (parts of a batch that share noise)."""
    eps, start = [], 0
    for _, r, _, z in model.noise_shapes(None).latents:
        part = ops.reshape(flat[:, start : start + r * r * z], (-1, r, r, z))
        eps.append(ops.concatenate([part] * groups, axis=0) if groups > 1 else part)
        start += r * r * z
    return eps


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
        # The pixel levels' table as a backend tensor, where a backend's tracer needs it made
        # outside the step (see from_levels; None: each step makes its own).
        self.level_table: Any = None
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
        self.seed = int(self.training.seed)
        # The global step whose noise the next train step draws (the trainer says which it
        # is; by itself it counts), and evaluation batches since it: they key the noise.
        self.step, self.eval_part = 0, 0
        self.noise_groups = int(getattr(regularizer, "noise_groups", 1))
        self.latent_dims = int(model.num_latent_dims)
        # The one inference path: the trainer's figures run as a loaded model's do.
        self.runner = make_runner(model, self.runner_jit())

    # -- compiled steps: provided by the backend ---------------------------------------------

    def dispatch_step(
        self,
        images: np.ndarray,
        beta: float,
        skipnorm: float | None = None,
        step: int | None = None,
    ) -> dict[str, Any]:
        """Start one update on the global batch ``images`` and return its metrics as device
        values, without waiting for them: the host can prepare the next batch while the device
        works (:meth:`fetch` reads them). ``skipnorm`` overrides
        ``training.gradient_skipnorm`` for this step (0: no skipping on the norm). ``step``:
        the global step, which keys the step's noise (None: the one after the last)."""
        raise NotImplementedError

    def train_step(
        self,
        images: np.ndarray,
        beta: float,
        skipnorm: float | None = None,
        step: int | None = None,
    ) -> dict[str, float]:
        """One update, waited for: its metrics as floats."""
        return self.fetch(self.dispatch_step(images, beta, skipnorm, step))

    def advance(self, step: int | None) -> int:
        """The global step a train step draws its noise for (see :meth:`dispatch_step`)."""
        step = self.step if step is None else int(step)
        self.step, self.eval_part = step + 1, 0
        return step

    def step_noise_seed(self, step: int, part: int = 0) -> np.ndarray:
        return noise_seed(self.seed, NOISE_TRAIN, step, part)

    def eval_noise_seed(self) -> np.ndarray:
        """The key of the next evaluation batch's noise: by the train steps done and the
        batches evaluated since, so an evaluation repeats itself in a resumed run."""
        self.eval_part += 1
        return noise_seed(self.seed, NOISE_EVAL, self.step, self.eval_part - 1)

    def noise_rows(self, batch: int) -> tuple[int, int]:
        """(micro-batches, rows of noise each) for a train step on ``batch`` images (one
        replica's or the global batch, as the engine draws it)."""
        return self.div, batch // self.div // self.noise_groups

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

    def evaluation_terms(self, images: Any, flat_noise: Any) -> dict[str, Any]:
        """What the compiled evaluation step computes: the model's own evaluation method, so
        that a new statistic changes the model, not the three engines. ``flat_noise``: (batch,
        latent dims) standard normals."""
        x = to_unit_range(images, self.num_bits, self.level_table)
        layout = canonical_conv_gradients() if self.cpu_compiled else contextlib.nullcontext()
        with loop_with(self.block_loop()), layout:
            return self.model.evaluation_terms(x, noise=latent_noise(self.model, flat_noise))

    def sync(self) -> None:
        """Write the engine's state back into the Keras variables (JAX keeps it apart)."""

    def runner_jit(self) -> bool:
        """Whether the engine's runner compiles (the figures' passes)."""
        return self.jit

    def run_compiled(self, key: Any, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` (a computation of the model on its current variables: sampling,
        reconstruction, with its noise among ``args``) through the :class:`Runner` a loaded
        model uses; ``key`` names ``fn`` with everything it closes over (the runner compiles
        ``fn`` once per key and input shapes)."""
        self.sync()
        return self.runner.run(key, fn, *args)

    def live_runner(self) -> Any:
        """A runner (``run(key, fn, *args)``) on this engine's live state: what a
        :class:`~hvae_core.trained.TrainedModel` built on the training model runs through."""
        return _LiveRunner(self)

    # -- shared ------------------------------------------------------------------------------

    def loss_terms(self, images: Any, beta: Any, training: bool, flat_noise: Any) -> dict[str, Any]:
        """Loss and metrics of one micro-batch ``images`` (uint8) for ``flat_noise``, (rows,
        latent dims) standard normals: on a training batch, each of its ``noise_groups`` parts
        takes the same rows (only training batches went through the regularizer's
        ``transform_batch``)."""
        x = to_unit_range(images, self.num_bits, self.level_table)
        groups = self.noise_groups if training else 1
        noise = latent_noise(self.model, flat_noise, groups)
        layout = canonical_conv_gradients() if self.cpu_compiled else contextlib.nullcontext()
        with loop_with(self.block_loop()), layout:
            result = self.model.losses_for(
                x,
                beta=beta,
                training=training,
                regularizer=self.regularizer if training else None,
                noise=noise,
            )
        return {k: v for k, v in result.items() if k not in ("outputs", "kl_layers_bpd")}

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
        self.after_external_change()

    def load_weights(self, arrays: dict[str, np.ndarray]) -> None:
        """Start from another run's weights (``state()``'s arrays, or a checkpoint's): the
        model's, and the EMA's where the engine keeps one (the checkpoint's EMA, else its
        weights). The optimizer starts afresh: what fine-tuning from a trained or imported
        model needs."""
        from hvae_core.model.weights import assign_saved, in_model_layout

        has_ema = any(k.startswith("ema/") for k in arrays)
        arrays = in_model_layout(arrays, self.model, None, has_ema)
        assign_saved(arrays, "model", self.model.variables)
        if self.ema:
            if has_ema:
                assign_saved(arrays, "ema", self.ema)
            else:
                for v, e in zip(self.trainable, self.ema, strict=True):
                    e.assign(v.value)
        self.after_external_change()

    @property
    def learning_rate(self) -> float:
        self.sync()
        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

    @staticmethod
    def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
        return {k: float(keras.ops.convert_to_numpy(v)) for k, v in metrics.items()}


class Runner:
    """Computations of a model (sampling, scoring), run as the backend runs them best: what a
    loaded, trained model uses, and what the trainer's figures use on the live weights. No
    optimizer, no EMA, one device, no random state: every computation takes its noise as an
    input. The backend modules compile; this base runs eagerly (a backend without an engine
    module, such as OpenVINO, uses it as it is)."""

    def __init__(self, model: Any, jit: bool = True) -> None:
        self.model, self.jit = model, jit

    def block_loop(self) -> Scan | None:
        return None

    def run(self, key: Any, fn: Any, *args: Any) -> Any:
        """``fn(*args)``; ``key`` names ``fn`` with everything it closes over (a backend
        compiles ``fn`` once per key and input shapes)."""
        with loop_with(self.block_loop()):
            return fn(*args)


class _LiveRunner:
    """:meth:`Engine.run_compiled` in the form of a :class:`Runner`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(self, key: Any, fn: Any, *args: Any) -> Any:
        return self.engine.run_compiled(key, fn, *args)


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


def refuse_unless(checks: list[tuple[Any, str]]) -> None:
    """Fail a call whose inputs break a rule. ``checks``: (a scalar boolean tensor or bool,
    the one line to fail with). With concrete values an :class:`InputError` names the first
    rule broken; while a graph is traced the values are not known yet, so the active backend
    puts the check into the graph and the call fails when it runs (TensorFlow: an assertion
    op, which a SavedModel keeps; JAX: a host callback)."""
    backend = keras.backend.backend()
    if backend in BACKENDS:
        backend_module().refuse_unless(checks)
    else:  # an inference-only backend (OpenVINO) runs eagerly
        refuse_now(checks)


def refuse_now(checks: list[tuple[Any, str]]) -> None:
    """:func:`refuse_unless` for concrete values."""
    for holds, message in checks:
        if not bool(np.asarray(ops.convert_to_numpy(holds))):
            raise InputError(message)
