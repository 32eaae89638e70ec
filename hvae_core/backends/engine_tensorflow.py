"""The train step on TensorFlow: GradientTape inside one tf.function (XLA when ``jit``).

The step's latent noise is drawn inside it by a stateless random op from a key handed in (see
:func:`hvae_core.backends.engine.noise_seed`); under a ``tf.distribute`` strategy each replica
gets its own key, as it gets its own share of the batch."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import tensorflow as tf

from hvae_core.backends.engine import Engine, Runner, clip_and_skip, refuse_now, to_numpy
from hvae_core.backends.parallel import (
    Launch,
    Parallel,
    batch_groups,
    check_devices,
    replica_slice,
)
from hvae_core.errors import HvaeError


def setup_parallel(devices: int, launch: Launch, timeout: int) -> Parallel:
    """Data parallelism through ``tf.distribute``: ``MultiWorkerMirroredStrategy`` when
    ``TF_CONFIG`` describes a cluster, else ``MirroredStrategy`` over this machine's GPUs (on a
    CPU-only machine, ``--devices N`` splits the CPU into N logical devices)."""
    if os.environ.get("TF_CONFIG"):
        return _multi_worker(timeout)
    if launch.multi_process:
        raise HvaeError(
            "on the tensorflow backend, several processes are described by TF_CONFIG",
            hint="set TF_CONFIG on every worker instead of --coordinator/--num-processes",
        )
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        count = check_devices(devices, len(gpus), "GPUs are") if devices else len(gpus)
        names = [f"/gpu:{i}" for i in range(count)]
    else:
        count = check_devices(devices, os.cpu_count() or 1, "CPU cores are") if devices else 1
        if count > 1:
            cpu = tf.config.list_physical_devices("CPU")[0]
            configured = tf.config.get_logical_device_configuration(cpu) or []
            try:
                if len(configured) < count:
                    tf.config.set_logical_device_configuration(
                        cpu, [tf.config.LogicalDeviceConfiguration()] * count
                    )
            except RuntimeError:
                raise HvaeError(
                    "TensorFlow's devices were set up before the run started",
                    hint="start a new process for a data-parallel run",
                ) from None
        names = [f"/cpu:{i}" for i in range(count)]
    if count == 1:
        return Parallel()
    strategy = tf.distribute.MirroredStrategy(names)
    return Parallel(replicas=count, strategy=strategy)


def _multi_worker(timeout: int) -> Parallel:
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        resolver = strategy.cluster_resolver
        workers = len(resolver.cluster_spec().as_dict().get("worker", [])) or 1
        index = int(resolver.task_id or 0)
    except (ValueError, KeyError, tf.errors.OpError) as exc:
        raise HvaeError(
            f"TF_CONFIG does not describe a usable cluster: {exc}".splitlines()[0],
            hint="see the README's multi-machine section",
        ) from None
    return Parallel(
        replicas=strategy.num_replicas_in_sync,
        process_index=index,
        num_processes=workers,
        strategy=strategy,
    )


def _scan(step: Any, init: Any, xs: Any, length: int) -> tuple[Any, Any]:
    """``jax.lax.scan`` on TensorFlow: a ``tf.while_loop`` reading ``xs`` from and writing the
    per-step outputs to ``TensorArray``s. (``keras.ops.scan`` on TensorFlow only accepts
    per-step outputs shaped like the carry.)"""
    first = tf.nest.map_structure(lambda x: x[0], xs)
    # The outputs' structure and dtypes, from a trace of the step that is then dropped.
    _, spec = (
        tf.function(step, autograph=False).get_concrete_function(init, first).structured_outputs
    )
    xs_arrays = [
        tf.TensorArray(x.dtype, size=length, element_shape=x.shape[1:]).unstack(x)
        for x in tf.nest.flatten(xs)
    ]
    ys_arrays = [
        tf.TensorArray(y.dtype, size=length, element_shape=y.shape) for y in tf.nest.flatten(spec)
    ]

    def body(i: Any, carry: Any, ys: list) -> tuple:
        x = tf.nest.pack_sequence_as(xs, [a.read(i) for a in xs_arrays])
        carry, y = step(carry, x)
        return i + 1, carry, [a.write(i, v) for a, v in zip(ys, tf.nest.flatten(y), strict=True)]

    _, carry, ys_arrays = tf.while_loop(
        lambda i, *_: i < length,
        body,
        (tf.constant(0), init, ys_arrays),
        maximum_iterations=length,
        parallel_iterations=1,
    )
    return carry, tf.nest.pack_sequence_as(spec, [a.stack() for a in ys_arrays])


def block_loop(jit: bool) -> Any:
    """How runs of repeated blocks loop in compiled TensorFlow code: a ``tf.while_loop`` on a
    GPU; unrolled where XLA compiles for a CPU, whose XLA runs the convolutions of a loop body
    several times slower than straight-line code (cifar10 block layout at width 128, batch 4:
    1.84 s a step as loops, 0.83 s unrolled, against 0.76 s for a plain stack of the blocks),
    at some compile time (140 s against 71 s; the plain stack's 261 s)."""
    return _scan if jit and tf.config.list_physical_devices("GPU") else None


class TensorFlowEngine(Engine):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.strategy = self.parallel.strategy
        self.cpu_compiled = self.jit and not tf.config.list_physical_devices("GPU")
        if self.strategy is None:
            self._train = tf.function(self._train_impl, jit_compile=self.jit, autograph=False)
        else:
            # XLA compiles what each replica computes; the all-reduces and the update run
            # around it (XLA cannot span the strategy's devices).
            self._replica_grads = tf.function(
                self._gradients, jit_compile=self.jit, autograph=False
            )
            self._train = tf.function(self._train_distributed, autograph=False)
            self.groups = batch_groups(self.regularizer)
        # Evaluation sees a last, smaller batch: one trace serves every batch size.
        # Under a strategy, XLA could not reach the mirrored variables' other copies.
        # No function here goes through autograph: hvae's control flow is explicit (tf.cond,
        # tf.while_loop), conversion only costs tracing time, and in a long-lived process (a
        # test session) its converted code once called a property's conversion as a function.
        self._eval = tf.function(
            self._eval_impl,
            jit_compile=self.jit and self.parallel.strategy is None,
            reduce_retracing=True,
            autograph=False,
        )

    def block_loop(self) -> Any:
        return block_loop(self.jit)

    def runner_jit(self) -> bool:
        # Under a strategy, XLA could not reach the mirrored variables' other copies.
        return self.jit and self.parallel.strategy is None

    def _train_impl(self, images: Any, beta: Any, skipnorm: Any, key: Any) -> dict[str, Any]:
        grads, terms = self._gradients(images, beta, key)
        norm, skip, scale = clip_and_skip(grads, terms["loss"], self.training, skipnorm)

        def apply() -> Any:
            self.optimizer.apply([g * tf.cast(scale, g.dtype) for g in grads], self.trainable)
            for e, v in zip(self.ema, self.ema_targets, strict=True):
                e.assign(self.ema_rate * e + (1.0 - self.ema_rate) * v)
            return tf.constant(0.0)

        tf.cond(skip, lambda: tf.constant(1.0), apply)
        terms["grad_norm"] = norm
        terms["skipped"] = tf.cast(skip, tf.float32)
        return terms

    def _gradients(self, images: Any, beta: Any, key: Any) -> tuple[list, dict]:
        """One replica's mean gradients and terms over its micro-batches, for the noise that
        ``key`` draws."""
        noise = _normal(key, (*self.noise_rows(images.shape[0]), self.latent_dims))

        def compute(chunk: Any, chunk_noise: Any) -> tuple[list, dict]:
            with tf.GradientTape() as tape:
                terms = self.loss_terms(chunk, beta, True, chunk_noise)
            grads = tape.gradient(terms["loss"], self.trainable)
            return [
                tf.zeros_like(v) if g is None else g
                for g, v in zip(grads, self.trainable, strict=True)
            ], terms

        return self._accumulate(images, noise, compute)

    def _train_distributed(
        self, images: Any, beta: Any, skipnorm: Any, keys: Any
    ) -> dict[str, Any]:
        """The step under a ``tf.distribute`` strategy.

        Each replica all-reduces its gradients to the global mean, so that every replica takes
        the same skip decision on the global norm. Keras' optimizer sums gradients over the
        replicas itself, so it is given mean / replicas. A skipped update cannot sit in a
        ``tf.cond`` (the optimizer synchronises the replicas), so it is applied with zero
        gradients and then undone from a copy of the state.
        """
        state = [*self.trainable, *self.optimizer.variables, *self.ema]
        before = [tf.identity(v.value) for v in state]

        def replica(images: Any, key: Any) -> tuple:
            grads, terms = self._replica_grads(images, beta, key)
            context = tf.distribute.get_replica_context()
            n = context.num_replicas_in_sync
            grads = context.all_reduce("SUM", [g / n for g in grads])
            terms = context.all_reduce("MEAN", terms)
            norm, skip, scale = clip_and_skip(grads, terms["loss"], self.training, skipnorm)
            self.optimizer.apply(
                [tf.where(skip, tf.zeros_like(g), g * tf.cast(scale / n, g.dtype)) for g in grads],
                self.trainable,
            )
            terms["grad_norm"] = norm
            terms["skipped"] = tf.cast(skip, tf.float32)
            return terms

        per_replica = self.strategy.run(replica, args=(images, keys))
        terms = {k: self.strategy.experimental_local_results(v)[0] for k, v in per_replica.items()}
        for e, v in zip(self.ema, self.ema_targets, strict=True):
            e.assign(self.ema_rate * e + (1.0 - self.ema_rate) * v)
        skip = terms["skipped"] > 0
        for v, old in zip(state, before, strict=True):
            v.assign(tf.where(skip, old, v.value))
        return terms

    def _accumulate(self, images: Any, noise: Any, compute: Any) -> tuple[list, dict]:
        """Mean gradients and terms over the ``batch_size_div`` micro-batches.

        The first micro-batch runs on its own (it fixes which terms there are); the rest run in
        a ``tf.while_loop`` whose body holds one micro-batch's activations at a time, where an
        unrolled loop would keep them all alive.
        """
        if self.div == 1:
            return compute(images, noise[0])
        chunks = tf.reshape(images, (self.div, -1, *images.shape[1:]))
        grads, terms = compute(chunks[0], noise[0])

        def body(i: Any, grads: list, terms: dict) -> tuple:
            chunk_grads, chunk_terms = compute(chunks[i], noise[i])
            return (
                i + 1,
                [a + b for a, b in zip(grads, chunk_grads, strict=True)],
                {k: terms[k] + chunk_terms[k] for k in terms},
            )

        _, grads, terms = tf.while_loop(
            lambda i, *_: i < self.div,
            body,
            (tf.constant(1), grads, terms),
            # XLA needs the bound when a loop inside (a run of blocks) is differentiated.
            maximum_iterations=self.div - 1,
            parallel_iterations=1,
        )
        return [g / self.div for g in grads], {k: v / self.div for k, v in terms.items()}

    def _eval_impl(self, images: Any, key: Any) -> dict[str, Any]:
        return self.evaluation_terms(images, _normal(key, (tf.shape(images)[0], self.latent_dims)))

    def dispatch_step(
        self,
        images: np.ndarray,
        beta: float,
        skipnorm: float | None = None,
        step: int | None = None,
    ) -> dict[str, Any]:
        step = self.advance(step)
        if self.strategy is None:
            batch = tf.convert_to_tensor(images)
            keys = _key(self.step_noise_seed(step))
        else:
            n = self.parallel.replicas

            def share(context: Any) -> Any:
                replica = context.replica_id_in_sync_group
                return tf.convert_to_tensor(
                    replica_slice(images, replica, n, self.div, self.groups)
                )

            def key(context: Any) -> Any:
                # By the global replica index, as the batch's share: every replica its own.
                return _key(self.step_noise_seed(step, context.replica_id_in_sync_group))

            batch = self.strategy.experimental_distribute_values_from_function(share)
            keys = self.strategy.experimental_distribute_values_from_function(key)
        scalars = (tf.constant(beta, tf.float32), tf.constant(self.skipnorm(skipnorm), tf.float32))
        return self._train(batch, *scalars, keys)

    def eval_step(self, images: np.ndarray) -> dict[str, Any]:
        return to_numpy(self._eval(tf.convert_to_tensor(images), _key(self.eval_noise_seed())))


def _key(words: np.ndarray) -> Any:
    """Two uint32 key words as the int64 seed a stateless random op takes."""
    return tf.constant(np.asarray(words, np.int64))


def _normal(key: Any, shape: Any) -> Any:
    """Standard normals from a key (:func:`_key`) by a stateless op: no random state."""
    return tf.random.stateless_normal(shape, seed=key, dtype=tf.float32)


class TensorFlowRunner(Runner):
    """One ``tf.function`` per key (XLA when ``jit``), traced again for new input shapes."""

    def __init__(self, model: Any, jit: bool = True) -> None:
        super().__init__(model, jit)
        self._compiled: dict[Any, Any] = {}

    def block_loop(self) -> Any:
        return block_loop(self.jit)

    def run(self, key: Any, fn: Any, *args: Any) -> Any:
        compiled = self._compiled.get(key)
        if compiled is None:
            run = functools.partial(super().run, key, fn)
            compiled = tf.function(run, jit_compile=self.jit, autograph=False)
            self._compiled[key] = compiled
        return compiled(*tf.nest.map_structure(tf.convert_to_tensor, args))


ENGINE = TensorFlowEngine
RUNNER = TensorFlowRunner


def device_name() -> str:
    """What the start-up line calls the device a run computes on."""
    return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"


def is_out_of_memory(exc: BaseException) -> bool:
    """TensorFlow's allocation failure (a ResourceExhaustedError, or XLA's status text)."""
    return type(exc).__name__ == "ResourceExhaustedError" or "RESOURCE_EXHAUSTED" in str(exc)


def refuse_unless(checks: list[tuple[Any, str]]) -> None:
    """See :func:`hvae_core.backends.engine.refuse_unless`. Traced, an assertion op per
    check: a ``tf.function`` runs every such op, so an exported SavedModel refuses the call
    with the message (an InvalidArgumentError) instead of computing from the bad input."""
    if tf.executing_eagerly():
        refuse_now(checks)
        return
    for holds, message in checks:
        if isinstance(holds, bool | np.bool_):  # known while tracing
            refuse_now([(holds, message)])
        else:
            tf.debugging.Assert(holds, [message])
