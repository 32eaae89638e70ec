"""Runs of structurally identical layers, applied as one loop over their stacked weights.

VDVAE stacks 11 to 40 identical blocks per resolution. Applied one by one, each block is its own
piece of the compiled graph, and compile time grows with depth; as one loop over weights stacked
along a leading axis, a compiler sees one loop body per distinct block shape, and the optimizer
one variable per stacked weight instead of one per block.

The maths is the blocks' own: every block is still built with its own initializers (the same
initial values as when it stood alone), takes its own row of every per-layer input (its noise,
its temperature), and is applied to the carry in order. How the loop runs is the engine's
business (:func:`loop_with`): a compiled loop (``jax.lax.scan``, a ``tf.while_loop``) where the
step is compiled, an unrolled Python loop otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

Scan = Callable[[Callable[[Any, Any], tuple[Any, Any]], Any, Any, int], tuple[Any, Any]]
"""``scan(step, init, xs, length) -> (carry, ys)`` with ``jax.lax.scan``'s meaning: ``xs`` and
``ys`` are nested structures of tensors whose leading axis is ``length``."""


class _Loop(threading.local):
    """The loop of the running thread's repeated layers. A thread-local, not a ContextVar:
    torch.compile's Dynamo cannot trace a ContextVar (its step would skip or break the graph
    at every ``loop_with`` and every read), and reads and writes a thread-local's attributes."""

    scan: Scan | None = None


_loop = _Loop()


def current_loop() -> Scan | None:
    """The ``scan`` of the innermost :func:`loop_with` of this thread (None: a Python loop)."""
    return _loop.scan


@contextlib.contextmanager
def loop_with(scan: Scan | None) -> Iterator[None]:
    """Run repeated layers with ``scan`` inside this block (None: an unrolled Python loop)."""
    outer, _loop.scan = _loop.scan, scan
    try:
        yield
    finally:
        _loop.scan = outer


def unrolled_scan(step: Any, init: Any, xs: Any, length: int) -> tuple[Any, Any]:
    """:data:`Scan` as a Python loop: what runs eagerly, and on backends that do not compile."""
    leaves = keras.tree.flatten(xs)
    sliced = [ops.unstack(x, axis=0) if length > 1 else [x[0]] for x in leaves]
    carry, outputs = init, []
    for i in range(length):
        carry, y = step(carry, keras.tree.pack_sequence_as(xs, [s[i] for s in sliced]))
        outputs.append(y)
    if not keras.tree.flatten(outputs[0]):
        return carry, outputs[0]
    stacked = [
        ops.stack(parts, axis=0) for parts in zip(*map(keras.tree.flatten, outputs), strict=True)
    ]
    return carry, keras.tree.pack_sequence_as(outputs[0], stacked)


def shape_scan(step: Any, init: Any, xs: Any, length: int) -> tuple[Any, Any]:
    """:data:`Scan` for a symbolic pass, which needs shapes only: one step, its outputs
    repeated ``length`` times. A run's carry keeps its shape from step to step, so this is
    what the whole loop would give, at the cost of tracing one block instead of all."""
    first = keras.tree.map_structure(lambda x: x[0], xs)
    carry, y = step(init, first)
    # ops.tile, not ops.repeat: Keras' repeat fails on torch's shape-only "meta" tensors.
    return carry, keras.tree.map_structure(
        lambda v: ops.tile(ops.expand_dims(v, 0), (length,) + (1,) * len(v.shape)), y
    )


class Untracked:
    """Holds layers out of Keras' sight (Keras tracks layers in lists, tuples and dicts): the
    weights of a run's layers live stacked in the run, not in the layers."""

    def __init__(self, layers: Sequence[Any]) -> None:
        self.layers = list(layers)


class RepeatedLayers(keras.layers.Layer):
    """``layers`` (identical in structure) applied in sequence with their weights stacked.

    Each layer maps ``(carry, *shared, **kwargs)`` to the next carry, or to a tuple whose first
    element is the next carry and whose rest are per-layer outputs; :meth:`call` returns the
    final carry and those outputs stacked along a new leading axis (one entry per layer).
    ``per_layer`` passes a keyword argument that differs between layers, as a tensor with one
    row per layer.

    The run is built from the shapes of ``(carry, *shared)``: every layer is built on its own
    (so it draws its own initial weights), then its weights are stacked, one variable per
    weight of the first layer (the template the loop applies). The individual layers keep
    their initial weights only: the run's variables are the live ones.
    """

    def __init__(self, layers: Sequence[Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Per-layer inputs keep their dtypes (a latent layer's noise stays float32); the
        # carry and shared inputs arrive in the compute dtype already.
        self._convert_input_args = False
        if not layers:
            raise ValueError("a run of repeated layers needs at least one layer")
        self._members = Untracked(layers)

    @property
    def members(self) -> list[Any]:
        return self._members.layers

    @property
    def template(self) -> Any:
        return self._members.layers[0]

    def __len__(self) -> int:
        return len(self._members.layers)

    def build(self, input_shape: Any) -> None:
        inputs = [keras.KerasTensor((None, *tuple(s)[1:])) for s in input_shape]
        template = self.template
        order: list[int] = []
        if not template.built:
            # One symbolic call (a traced pass: seconds per block on TensorFlow and torch),
            # recording which of its layers it builds, in which order and from which shapes...
            with _recording_builds(template, order):
                template(*inputs)
        for layer in self.members[1:]:
            # ...which every other member repeats by shape alone: its initializers draw in the
            # order the call would have drawn them, so its initial weights are the same.
            if layer.built:
                continue
            if order:
                _build_as(layer, template, order)
            else:  # the template was built before: no record to repeat
                layer(*inputs)
        signature = _signature(template)
        for layer in self.members[1:]:
            if _signature(layer) != signature:
                raise ValueError(
                    f"layers '{template.name}' and '{layer.name}' of one run differ in their "
                    "weights; a run needs layers of identical structure"
                )
        trainable = _indexed(template, template.trainable_variables)
        state = _indexed(template, template.non_trainable_variables)
        self._trainable_slots = [self._stack(template, i, v) for i, v in trainable]
        self._state_slots = [self._stack(template, i, v) for i, v in state]
        self._positions = [i for i, _ in trainable + state]

    def stacked_variables(self) -> list[tuple[Any, int]]:
        """Each stacked variable with the position, in every member's ``variables``, of the
        weight it stacks (row ``k`` is member ``k``'s)."""
        return list(zip(self._trainable_slots + self._state_slots, self._positions, strict=True))

    def _stack(self, template: Any, index: int, variable: Any) -> Any:
        values = np.stack(
            [ops.convert_to_numpy(layer.variables[index].value) for layer in self.members]
        )
        prefix = f"{template.path}/"
        path = variable.path
        relative = path[len(prefix) :] if path.startswith(prefix) else path
        return self.add_weight(
            shape=values.shape,
            initializer=_Values(values),
            dtype=variable.dtype,
            trainable=variable.trainable,
            autocast=False,  # the template's own variables decide about autocasting
            aggregation=getattr(variable, "aggregation", "none"),
            name=relative.replace("/", "-"),  # "/" is Keras' separator, "." torch's
        )

    def call(
        self,
        inputs: Sequence[Any],
        per_layer: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        carry, *shared = inputs
        per_layer = per_layer or {}
        template = self.template

        def step(carry: Any, xs: Any) -> tuple[Any, Any]:
            weights, states, extra = xs
            out, new_states = template.stateless_call(
                list(weights), list(states), carry, *shared, **kwargs, **extra
            )
            if isinstance(out, tuple):
                return out[0], (tuple(out[1:]), new_states)
            return out, ((), new_states)

        xs = (
            [v.value for v in self._trainable_slots],
            [v.value for v in self._state_slots],
            per_layer,
        )
        scan = current_loop() if len(self) > 1 else None
        carry, (outputs, new_states) = (scan or unrolled_scan)(step, carry, xs, len(self))
        for v, value in zip(self._state_slots, new_states, strict=True):
            v.assign(value)
        return carry, outputs


@contextlib.contextmanager
def _recording_builds(layer: Any, order: list[int]) -> Iterator[None]:
    """Append to ``order`` the position (in ``layer._flatten_layers()``) of each of its layers
    whose ``build`` runs inside this block, as it starts."""
    layers = layer._flatten_layers()
    originals = [sub.build for sub in layers]

    def recorder(position: int, build: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(build)  # Keras reads build's signature to know what to pass
        def record(*args: Any, **kwargs: Any) -> None:
            order.append(position)
            build(*args, **kwargs)

        return record

    # Set on the instance as Keras sets its own build wrapper (no tracking of a function).
    for position, (sub, build) in enumerate(zip(layers, originals, strict=True)):
        object.__setattr__(sub, "build", recorder(position, build))
    try:
        yield
    finally:
        for sub, build in zip(layers, originals, strict=True):
            object.__setattr__(sub, "build", build)


def _build_as(layer: Any, template: Any, order: list[int]) -> None:
    """Build ``layer`` as ``template`` was built: the same layers, in the same ``order``, from
    the shapes Keras recorded for each (a layer built inside another's build is built there)."""
    ours, theirs = layer._flatten_layers(), template._flatten_layers()
    if [type(a) for a in ours] != [type(b) for b in theirs]:
        raise ValueError(
            f"layers '{template.name}' and '{layer.name}' of one run differ in their "
            "sublayers; a run needs layers of identical structure"
        )
    for position in order:
        sub = ours[position]
        if not sub.built:
            sub.build(**theirs[position]._build_shapes_dict)


def _indexed(layer: Any, variables: list[Any]) -> list[tuple[int, Any]]:
    positions = {id(v): i for i, v in enumerate(layer.variables)}
    return [(positions[id(v)], v) for v in variables]


def _signature(layer: Any) -> list[tuple[Any, ...]]:
    return [(tuple(v.shape), v.dtype, v.trainable) for v in layer.variables]


class _Values(keras.initializers.Initializer):
    """The stacked initial values of the run's layers."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def __call__(self, shape: Any, dtype: Any = None) -> Any:
        return ops.convert_to_tensor(self.values, dtype=dtype)
