"""The train step on PyTorch: autograd on the Keras variables' tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from keras import ops

from hvae_core.training.engine import Engine, global_norm, skip_and_scale


class TorchEngine(Engine):
    def train_step(self, images: np.ndarray, beta: float) -> dict[str, float]:
        images = ops.convert_to_tensor(images)
        params = [v.value for v in self.trainable]

        def compute(chunk: Any) -> tuple[list, dict]:
            terms = self.loss_terms(chunk, beta, training=True)
            grads = torch.autograd.grad(terms["loss"], params, allow_unused=True)
            return [
                torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)
            ], {k: v.detach() for k, v in terms.items()}

        chunks = torch.chunk(images, self.div) if self.div > 1 else [images]
        grads, terms = self.accumulate(chunks, compute)
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
