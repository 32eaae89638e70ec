"""The train step on JAX: Keras' stateless API under one ``jax.jit``.

The training state (weights, non-trainable variables, optimizer variables, EMA) lives in JAX
arrays between steps and is written back into the Keras variables only when something outside
the step needs them (:meth:`sync`). The step's latent noise is drawn inside the jitted step from
a key handed in (see :func:`hvae_core.backends.engine.noise_seed`): one draw for the global
batch, which XLA shards with it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from hvae_core.backends.engine import Engine, Runner, clip_and_skip, refuse_now, to_numpy
from hvae_core.backends.parallel import Launch, Parallel, check_devices, wait_for_coordinator
from hvae_core.errors import HvaeError


def setup_parallel(devices: int, launch: Launch, timeout: int) -> Parallel:
    """Data parallelism through ``keras.distribution.DataParallel``: the weights replicated on
    a device mesh, the batch sharded along it; XLA's partitioner inserts the gradient
    all-reduce, so the step is the single-device step, sharded."""
    if launch.multi_process:
        # CPU processes talk through gloo; accelerators bring their own collectives.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if launch.process_id != 0:  # process 0 hosts the coordinator service
            wait_for_coordinator(launch.coordinator, timeout)
        # What keras.distribution.initialize does, with a bound on the wait for the others.
        try:
            jax.distributed.initialize(
                coordinator_address=launch.coordinator,
                num_processes=launch.num_processes,
                process_id=launch.process_id,
                initialization_timeout=timeout,
            )
        except Exception as exc:  # an unreachable coordinator, a missing process
            raise HvaeError(
                f"could not join the {launch.num_processes} processes at {launch.coordinator} "
                f"within {timeout} s: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                hint="start every process with the same --coordinator and --num-processes, "
                "or raise run.connect_timeout",
            ) from None
    local = jax.local_devices()
    accelerators = [d for d in local if d.platform != "cpu"]
    visible = accelerators or local
    what = f"{visible[0].platform.upper()} devices are"
    count = check_devices(devices, len(visible), what) if devices else len(accelerators) or 1
    if count == 1 and not launch.multi_process:
        return Parallel()
    platform = visible[0].platform
    mesh_devices = [
        d
        for p in range(jax.process_count())
        for d in [d for d in jax.devices(platform) if d.process_index == p][:count]
    ]
    mesh = keras.distribution.DeviceMesh(
        shape=(len(mesh_devices),), axis_names=["batch"], devices=mesh_devices
    )
    distribution = keras.distribution.DataParallel(device_mesh=mesh)
    keras.distribution.set_distribution(distribution)
    return Parallel(
        replicas=len(mesh_devices),
        process_index=jax.process_index(),
        num_processes=jax.process_count(),
        strategy=distribution,
        shutdown=jax.distributed.shutdown if launch.multi_process else None,
    )


def _scan(step: Any, init: Any, xs: Any, length: int) -> tuple[Any, Any]:
    return jax.lax.scan(step, init, xs, length=length)


def _scan_remat(step: Any, init: Any, xs: Any, length: int) -> tuple[Any, Any]:
    # Only the carry is kept per block; the backward pass recomputes the rest.
    return jax.lax.scan(jax.checkpoint(step), init, xs, length=length)


def stateless_jit(trainable: list, non_trainable: list, fn: Any) -> Any:
    """``fn(*args)``, a computation of a model on its variables, as one jitted function of
    the variables' values: ``(tv, ntv, *args) -> (out, new ntv)``."""

    def impl(tv: list, ntv: list, *args: Any) -> tuple[Any, list]:
        mapping = list(zip(trainable, tv, strict=True))
        mapping += list(zip(non_trainable, ntv, strict=True))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            out = fn(*args)
        return out, [scope.get_current_value(v) for v in non_trainable]

    return jax.jit(impl)


class JaxEngine(Engine):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.non_trainable = list(self.model.non_trainable_variables)
        self.cpu_compiled = self.jit and jax.default_backend() == "cpu"
        self._read_state()
        self._train = jax.jit(self._train_impl, donate_argnums=0) if self.jit else self._train_impl
        self._eval = jax.jit(self._eval_impl) if self.jit else self._eval_impl

    def block_loop(self) -> Any:
        if not self.jit:
            return None
        return _scan_remat if self.remat else _scan

    def _put(self, images: np.ndarray) -> Any:
        """The global batch as one array: sharded over the mesh when it divides evenly (an
        evaluation's last batch may not: it is then replicated). Every process holds the
        whole global batch and gives each of its devices that device's part."""
        distribution = self.parallel.strategy
        if distribution is None:
            return jnp.asarray(images)
        from jax.sharding import NamedSharding, PartitionSpec

        mesh = distribution.device_mesh.backend_mesh
        spec = PartitionSpec("batch") if len(images) % self.parallel.replicas == 0 else None
        sharding = NamedSharding(mesh, spec if spec is not None else PartitionSpec())
        return jax.make_array_from_callback(images.shape, sharding, lambda index: images[index])

    def _read_state(self) -> None:
        self.state_arrays = (
            [v.value for v in self.trainable],
            [v.value for v in self.non_trainable],
            [v.value for v in self.optimizer.variables],
            [v.value for v in self.ema],
        )

    def sync(self) -> None:
        groups = (self.trainable, self.non_trainable, self.optimizer.variables, self.ema)
        for variables, values in zip(groups, self.state_arrays, strict=True):
            for v, value in zip(variables, values, strict=True):
                v.assign(value)

    def after_external_change(self) -> None:
        self._read_state()

    def swap_ema(self) -> None:
        # The state's weights and EMA are lists of arrays in the same order: exchanging the
        # lists is the swap, without a round trip through the Keras variables (which cost a
        # third of the default job's evaluation time).
        tv, ntv, ov, ema = self.state_arrays
        if ema:
            self.state_arrays = (ema, ntv, ov, tv)

    def _loss(self, tv: list, ntv: list, images: Any, beta: Any, training: bool, noise: Any) -> Any:
        mapping = list(zip(self.trainable, tv, strict=True))
        mapping += list(zip(self.non_trainable, ntv, strict=True))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            terms = self.loss_terms(images, beta, training, noise)
        new_ntv = [scope.get_current_value(v) for v in self.non_trainable]
        return terms["loss"], (terms, new_ntv)

    def _gradients(self, tv: list, ntv: list, images: Any, beta: Any, key: Any) -> tuple:
        """Mean gradients and terms over the ``batch_size_div`` micro-batches.

        The micro-batches run in a ``lax.scan``: one compiled body, so only one micro-batch's
        activations are alive at a time (an unrolled loop would keep them all).
        """
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        noise = _normal(key, (*self.noise_rows(images.shape[0]), self.latent_dims))
        if self.div == 1:
            (_, (terms, ntv)), grads = grad_fn(tv, ntv, images, beta, True, noise[0])
            return grads, terms, ntv

        def body(carry: tuple, xs: Any) -> tuple:
            states, total = carry
            chunk, chunk_noise = xs
            (_, (terms, states)), grads = grad_fn(tv, states, chunk, beta, True, chunk_noise)
            return (states, [t + g for t, g in zip(total, grads, strict=True)]), terms

        chunks = images.reshape((self.div, -1, *images.shape[1:]))
        zeros = [jnp.zeros_like(w) for w in tv]
        (ntv, total), terms = jax.lax.scan(body, (ntv, zeros), (chunks, noise))
        grads = [g / self.div for g in total]
        return grads, {k: jnp.mean(v, axis=0) for k, v in terms.items()}, ntv

    def _train_impl(
        self, state: tuple, images: Any, beta: Any, skipnorm: Any, key: Any
    ) -> tuple[tuple, dict]:
        tv, ntv, ov, ema = state
        grads, terms, ntv = self._gradients(tv, ntv, images, beta, key)
        norm, skip, scale = clip_and_skip(grads, terms["loss"], self.training, skipnorm)
        new_tv, new_ov = self.optimizer.stateless_apply(
            ov, [g * scale.astype(g.dtype) for g in grads], tv
        )
        rate = self.ema_rate
        new_ema = [
            rate * e + (1.0 - rate) * w for e, w in zip(ema, new_tv if ema else [], strict=True)
        ]

        def keep_if_skipped(old: list, new: list) -> list:
            return [jnp.where(skip, o, n) for o, n in zip(old, new, strict=True)]

        state = (
            keep_if_skipped(tv, new_tv),
            ntv,
            keep_if_skipped(ov, new_ov),
            keep_if_skipped(ema, new_ema),
        )
        terms["grad_norm"] = norm
        terms["skipped"] = skip.astype(jnp.float32)
        return state, terms

    def _eval_impl(self, tv: list, ntv: list, images: Any, key: Any) -> tuple[dict, list]:
        mapping = list(zip(self.trainable, tv, strict=True))
        mapping += list(zip(self.non_trainable, ntv, strict=True))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            noise = _normal(key, (images.shape[0], self.latent_dims))
            terms = self.evaluation_terms(images, noise)
        return terms, [scope.get_current_value(v) for v in self.non_trainable]

    def run_compiled(self, key: Any, fn: Any, *args: Any) -> Any:
        # On the live state arrays (the EMA's, while they are swapped in), not the Keras
        # variables, which the engine updates only when it syncs.
        tv, ntv, ov, ema = self.state_arrays
        out, ntv = self.runner.run_on(tv, ntv, key, fn, *args)
        self.state_arrays = (tv, ntv, ov, ema)
        return out

    def dispatch_step(
        self,
        images: np.ndarray,
        beta: float,
        skipnorm: float | None = None,
        step: int | None = None,
    ) -> dict[str, Any]:
        key = self.step_noise_seed(self.advance(step))  # one draw for the global batch
        self.state_arrays, terms = self._train(
            self.state_arrays,
            self._put(images),
            np.float32(beta),
            np.float32(self.skipnorm(skipnorm)),
            key,
        )
        return terms

    def eval_step(self, images: np.ndarray) -> dict[str, Any]:
        tv, ntv, ov, ema = self.state_arrays
        terms, ntv = self._eval(tv, ntv, self._put(images), self.eval_noise_seed())
        self.state_arrays = (tv, ntv, ov, ema)
        return to_numpy(terms)


def _normal(key: Any, shape: tuple[int, ...]) -> Any:
    """Standard normals from two uint32 key words (:func:`noise_seed`), inside a jitted step."""
    return jax.random.normal(jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32)), shape)


class JaxRunner(Runner):
    """Jitted on the Keras variables' current values, or on a training engine's state arrays:
    one compile per key and input shapes (eager JAX would compile every operation on its
    own)."""

    def __init__(self, model: Any, jit: bool = True) -> None:
        super().__init__(model, jit)
        self._compiled: dict[Any, Any] = {}

    def block_loop(self) -> Any:
        return _scan if self.jit else None

    def run(self, key: Any, fn: Any, *args: Any) -> Any:
        trainable = list(self.model.trainable_variables)
        non_trainable = list(self.model.non_trainable_variables)
        out, ntv = self.run_on(
            [v.value for v in trainable], [v.value for v in non_trainable], key, fn, *args
        )
        for v, value in zip(non_trainable, ntv, strict=True):
            v.assign(value)
        return out

    def run_on(self, tv: list, ntv: list, key: Any, fn: Any, *args: Any) -> tuple[Any, list]:
        """``fn(*args)`` with the model's trainable and non-trainable variables holding ``tv``
        and ``ntv``: its output and the non-trainable values after it."""
        trainable = list(self.model.trainable_variables)
        non_trainable = list(self.model.non_trainable_variables)
        if not self.jit:
            mapping = list(zip(trainable, tv, strict=True))
            mapping += list(zip(non_trainable, ntv, strict=True))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                out = super().run(key, fn, *args)
            return out, [scope.get_current_value(v) for v in non_trainable]
        jitted = self._compiled.get(key)
        if jitted is None:
            run = functools.partial(super().run, key, fn)
            jitted = self._compiled[key] = stateless_jit(trainable, non_trainable, run)
        return jitted(tv, ntv, *args)


ENGINE = JaxEngine
RUNNER = JaxRunner


def device_name() -> str:
    """What the start-up line calls the device a run computes on."""
    return str(jax.devices()[0].platform).upper()


def is_out_of_memory(exc: BaseException) -> bool:
    """XLA's allocation failure, as JAX raises it."""
    return "RESOURCE_EXHAUSTED" in str(exc)


def refuse_unless(checks: list[tuple[Any, str]]) -> None:
    """See :func:`hvae_core.backends.engine.refuse_unless`. Traced (jit, Keras' predict), a
    host callback per check: its InputError fails the compiled call when it runs."""
    if not any(isinstance(holds, jax.core.Tracer) for holds, _ in checks):
        refuse_now(checks)
        return
    for holds, message in checks:
        jax.debug.callback(functools.partial(_refuse, message), holds)


def _refuse(message: str, holds: Any) -> None:
    refuse_now([(holds, message)])
