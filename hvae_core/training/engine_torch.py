"""The train step on PyTorch: autograd on the Keras variables' tensors."""

from __future__ import annotations

import numpy as np
import torch
from keras import ops

from hvae_core.training.engine import Engine, global_norm, skip_and_scale


class TorchEngine(Engine):
    def train_step(self, images: np.ndarray, beta: float) -> dict[str, float]:
        images = ops.convert_to_tensor(images)
        params = [v.value for v in self.trainable]
        grads, terms = None, {}
        for chunk in torch.chunk(images, self.div) if self.div > 1 else [images]:
            chunk_terms = self.loss_terms(chunk, beta, training=True)
            chunk_grads = torch.autograd.grad(chunk_terms["loss"], params, allow_unused=True)
            chunk_grads = [
                torch.zeros_like(p) if g is None else g
                for g, p in zip(chunk_grads, params, strict=True)
            ]
            grads = (
                chunk_grads
                if grads is None
                else [a + b for a, b in zip(grads, chunk_grads, strict=True)]
            )
            for key, value in chunk_terms.items():
                terms[key] = terms.get(key, 0.0) + value.detach() / self.div
        grads = [g / self.div for g in grads]
        norm = global_norm(grads)
        skip, scale = skip_and_scale(
            norm, terms["loss"], self.training.gradient_clipnorm, self.training.gradient_skipnorm
        )
        if not bool(skip):
            with torch.no_grad():
                self.optimizer.apply([g * scale for g in grads], self.trainable)
                for e, v in zip(self.ema, self.ema_targets, strict=True):
                    e.assign(self.ema_rate * e.value + (1.0 - self.ema_rate) * v.value)
        terms["grad_norm"] = norm
        terms["skipped"] = skip.float()
        return self.to_floats(terms)

    def eval_step(self, images: np.ndarray) -> dict[str, float]:
        with torch.no_grad():
            return self.to_floats(self.loss_terms(ops.convert_to_tensor(images), 1.0, False))
