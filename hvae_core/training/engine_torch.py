"""The train step on PyTorch: autograd on the Keras variables' tensors; DDP across processes.

Data parallelism is one process per device (``torchrun``, or ``hvae train --devices N``, which
starts torchrun itself), joined by ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), with the
loss computed through ``DistributedDataParallel`` so that its reducer averages the gradients.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from keras import ops

from hvae_core.errors import HvaeError
from hvae_core.training.engine import (
    Engine,
    Runner,
    clip_and_skip,
    noise_seed_variables,
    replica_seed_state,
    to_numpy,
)
from hvae_core.training.parallel import (
    Launch,
    Parallel,
    Relaunch,
    batch_groups,
    check_devices,
    replica_slice,
)


def setup_parallel(devices: int, launch: Launch, timeout: int) -> Parallel:
    """One process per replica. Outside torchrun, more than one device means: start torchrun."""
    cuda = torch.cuda.is_available()
    visible = torch.cuda.device_count() if cuda else os.cpu_count() or 1
    what = "CUDA devices are" if cuda else "CPU cores are"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        count = check_devices(devices, visible, what) if devices else (visible if cuda else 1)
        if count > 1:
            raise Relaunch(count)
        return Parallel()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if devices and devices != per_node:
        raise HvaeError(
            f"--devices {devices} but torchrun started {per_node} processes on this machine",
            hint="give torchrun --nproc-per-node the same number, or leave out --devices",
        )
    check_devices(per_node, visible, what)
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
    except Exception as exc:  # a rendezvous that cannot complete, an unreachable master
        raise HvaeError(
            f"could not join the {world} torch.distributed processes: {exc}".splitlines()[0],
            hint="check MASTER_ADDR/MASTER_PORT and that every process was started",
        ) from None
    return Parallel(
        replicas=world,
        process_index=dist.get_rank(),
        num_processes=world,
        shutdown=dist.destroy_process_group,
    )


class _LossModule(torch.nn.Module):
    """The loss as a module's forward, so that DDP sees the forward and backward it syncs."""

    def __init__(self, engine: TorchEngine) -> None:
        super().__init__()
        self.model = engine.model
        self._engine = [engine]  # not a submodule: its variables are the model's

    def forward(self, images: Any, beta: Any) -> dict[str, Any]:
        return self._engine[0].loss_terms(images, beta, training=True)


class TorchEngine(Engine):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params = [v.value for v in self.trainable]
        self.module: Any = _LossModule(self)
        self.groups = batch_groups(self.regularizer)
        if self.parallel.replicas > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Construction broadcasts process 0's weights, so every replica starts equal.
            self.module = DistributedDataParallel(
                self.module, broadcast_buffers=False, find_unused_parameters=True
            )
            self.decorrelate_noise()

    def decorrelate_noise(self) -> None:
        rank = self.parallel.process_index  # one process per replica
        for v in noise_seed_variables(self.model):
            v.assign(replica_seed_state(ops.convert_to_numpy(v.value), rank))

    def dispatch_step(
        self, images: np.ndarray, beta: float, skipnorm: float | None = None
    ) -> dict[str, Any]:
        replicas = self.parallel.replicas
        local = replica_slice(images, self.parallel.process_index, replicas, self.div, self.groups)
        chunks = torch.chunk(ops.convert_to_tensor(local), self.div)
        for p in self.params:
            p.grad = None
        totals: dict[str, Any] = {}
        for i, chunk in enumerate(chunks):
            # DDP all-reduces on the last micro-batch's backward only.
            last = i == len(chunks) - 1
            sync = contextlib.nullcontext() if last or replicas == 1 else self.module.no_sync()
            with sync:
                terms = self.module(chunk, beta)
                (terms["loss"] / self.div).backward()
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value.detach() / self.div
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        if replicas > 1:  # the reported terms, and the skip test on the loss, are global
            keys = sorted(totals)
            stacked = torch.stack([totals[k].float() for k in keys])
            dist.all_reduce(stacked)
            totals = {k: stacked[j] / replicas for j, k in enumerate(keys)}
        norm, skip, scale = clip_and_skip(
            grads, totals["loss"], self.training, self.skipnorm(skipnorm)
        )
        if not bool(skip):
            with torch.no_grad():
                self.optimizer.apply([g * scale for g in grads], self.trainable)
                for e, v in zip(self.ema, self.ema_targets, strict=True):
                    e.assign(self.ema_rate * e.value + (1.0 - self.ema_rate) * v.value)
        for p in self.params:
            p.grad = None
        totals["grad_norm"] = norm
        totals["skipped"] = skip.float()
        return totals

    def eval_step(self, images: np.ndarray) -> dict[str, Any]:
        # Every process scores the whole batch: evaluation is cheap next to training, and
        # every process then reports the same figures.
        with torch.no_grad():
            return to_numpy(self.evaluation_terms(ops.convert_to_tensor(images)))


class TorchRunner(Runner):
    """Eager, without autograd's bookkeeping."""

    def run(self, key: Any, fn: Any, *args: Any) -> Any:
        with torch.no_grad():
            return super().run(key, fn, *args)


ENGINE = TorchEngine
RUNNER = TorchRunner
