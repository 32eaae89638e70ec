"""The train step on TensorFlow: GradientTape inside one tf.function (XLA when ``jit``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow as tf

from hvae_core.errors import HvaeError
from hvae_core.training.engine import Engine, global_norm, skip_and_scale
from hvae_core.training.parallel import Launch, Parallel, check_devices


def setup_parallel(devices: int, launch: Launch, timeout: int) -> Parallel:
    """One device. Data parallelism on TensorFlow (``tf.distribute.MirroredStrategy``) is not
    in this version: asking for it is a clear error, never a silent single-device run."""
    gpus = tf.config.list_physical_devices("GPU")
    visible = len(gpus) or 1
    what = "GPUs are" if gpus else "CPU devices are"
    count = check_devices(devices, visible, what) if devices else 1
    if count > 1 or launch.multi_process or os.environ.get("TF_CONFIG"):
        raise HvaeError(
            "data-parallel training is not available on the tensorflow backend yet",
            hint="use --backend jax or --backend torch for several devices, or --devices 1",
        )
    return Parallel()


class TensorFlowEngine(Engine):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._train = tf.function(self._train_impl, jit_compile=self.jit)
        # Evaluation sees a last, smaller batch: one trace serves every batch size.
        self._eval = tf.function(self._eval_impl, jit_compile=self.jit, reduce_retracing=True)

    def _train_impl(self, images: Any, beta: Any) -> dict[str, Any]:
        def compute(chunk: Any) -> tuple[list, dict]:
            with tf.GradientTape() as tape:
                terms = self.loss_terms(chunk, beta, training=True)
            grads = tape.gradient(terms["loss"], self.trainable)
            return [
                tf.zeros_like(v) if g is None else g
                for g, v in zip(grads, self.trainable, strict=True)
            ], terms

        grads, terms = self._accumulate(images, compute)
        norm = global_norm(grads)
        skip, scale = skip_and_scale(
            norm, terms["loss"], self.training.gradient_clipnorm, self.training.gradient_skipnorm
        )

        def apply() -> Any:
            self.optimizer.apply([g * tf.cast(scale, g.dtype) for g in grads], self.trainable)
            for e, v in zip(self.ema, self.ema_targets, strict=True):
                e.assign(self.ema_rate * e + (1.0 - self.ema_rate) * v)
            return tf.constant(0.0)

        tf.cond(skip, lambda: tf.constant(1.0), apply)
        terms["grad_norm"] = norm
        terms["skipped"] = tf.cast(skip, tf.float32)
        return terms

    def _accumulate(self, images: Any, compute: Any) -> tuple[list, dict]:
        """Mean gradients and terms over the ``batch_size_div`` micro-batches.

        The first micro-batch runs on its own (it fixes which terms there are); the rest run in
        a ``tf.while_loop`` whose body holds one micro-batch's activations at a time, where an
        unrolled loop would keep them all alive.
        """
        if self.div == 1:
            return compute(images)
        chunks = tf.reshape(images, (self.div, -1, *images.shape[1:]))
        grads, terms = compute(chunks[0])

        def body(i: Any, grads: list, terms: dict) -> tuple:
            chunk_grads, chunk_terms = compute(chunks[i])
            return (
                i + 1,
                [a + b for a, b in zip(grads, chunk_grads, strict=True)],
                {k: terms[k] + chunk_terms[k] for k in terms},
            )

        _, grads, terms = tf.while_loop(
            lambda i, *_: i < self.div,
            body,
            (tf.constant(1), grads, terms),
            parallel_iterations=1,
        )
        return [g / self.div for g in grads], {k: v / self.div for k, v in terms.items()}

    def _eval_impl(self, images: Any) -> dict[str, Any]:
        return self.loss_terms(images, 1.0, training=False)

    def train_step(self, images: np.ndarray, beta: float) -> dict[str, float]:
        return self.to_floats(
            self._train(tf.convert_to_tensor(images), tf.constant(beta, tf.float32))
        )

    def eval_step(self, images: np.ndarray) -> dict[str, float]:
        return self.to_floats(self._eval(tf.convert_to_tensor(images)))
