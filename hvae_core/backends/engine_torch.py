"""The train step on PyTorch: autograd on the Keras variables' tensors; DDP across processes.

Data parallelism is one process per device (``torchrun``, or ``hvae train --devices N``, which
starts torchrun itself), joined by ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), with the
loss computed through ``DistributedDataParallel`` so that its reducer averages the gradients.

With ``run.torch_compile`` the loss's forward and backward go through ``torch.compile``. The
step's latent noise is drawn before it, outside the compiled region, by a ``torch.Generator``
seeded from (training seed, step, rank) (see :func:`hvae_core.backends.engine.noise_seed`),
and handed in as an input: the compiled loss holds no random op, and compiled and eager steps
compute the same numbers.
"""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from keras import ops

from hvae_core.backends.engine import Engine, Runner, clip_and_skip, refuse_now, to_numpy
from hvae_core.backends.parallel import (
    Launch,
    Parallel,
    Relaunch,
    batch_groups,
    check_devices,
    replica_slice,
)
from hvae_core.errors import HvaeError
from hvae_core.model.pixels import level_table


def setup_parallel(devices: int, launch: Launch, timeout: int) -> Parallel:
    """One process per replica. Outside torchrun, more than one device means: start torchrun."""
    cuda = torch.cuda.is_available()
    visible = torch.cuda.device_count() if cuda else os.cpu_count() or 1
    what = "CUDA devices are" if cuda else "CPU cores are"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        count = check_devices(devices, visible, what) if devices else (visible if cuda else 1)
        if count > 1:
            raise Relaunch(count, torchrun)
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

    def forward(self, images: Any, beta: Any, noise: Any) -> dict[str, Any]:
        return self._engine[0].loss_terms(images, beta, True, noise)


class TorchEngine(Engine):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params = [v.value for v in self.trainable]
        # Made here, not in the compiled loss: a NumPy table made inside it breaks the graph.
        self.level_table = ops.convert_to_tensor(level_table(self.num_bits))
        self.module: Any = _LossModule(self)
        self.groups = batch_groups(self.regularizer)
        if self.parallel.replicas > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Construction broadcasts process 0's weights, so every replica starts equal.
            self.module = DistributedDataParallel(
                self.module, broadcast_buffers=False, find_unused_parameters=True
            )
        # torch.compile is tried on the first micro-batch (see first_compiled).
        self.compile_pending = bool(self.torch_compile)
        self.compiled: Any = None

    def draw(self, words: np.ndarray, shape: tuple[int, ...], device: Any) -> Any:
        """Standard normals from two key words (:func:`noise_seed`), drawn eagerly on
        ``device`` by a generator of their own: no random state, and nothing Dynamo traces."""
        generator = torch.Generator(device=device)
        generator.manual_seed(int(words[0]) << 32 | int(words[1]))
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

    def dispatch_step(
        self,
        images: np.ndarray,
        beta: float,
        skipnorm: float | None = None,
        step: int | None = None,
    ) -> dict[str, Any]:
        replicas = self.parallel.replicas
        rank = self.parallel.process_index  # one process per replica: its own noise
        local = replica_slice(images, rank, replicas, self.div, self.groups)
        batch = ops.convert_to_tensor(local)
        chunks = torch.chunk(batch, self.div)
        words = self.step_noise_seed(self.advance(step), rank)
        noise = self.draw(words, (*self.noise_rows(len(local)), self.latent_dims), batch.device)
        for p in self.params:
            p.grad = None
        totals: dict[str, Any] = {}
        for i, chunk in enumerate(chunks):
            # DDP all-reduces on the last micro-batch's backward only.
            last = i == len(chunks) - 1
            sync = contextlib.nullcontext() if last or replicas == 1 else self.module.no_sync()
            with sync:
                terms = self.micro_batch(chunk, beta, noise[i])
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

    def micro_batch(self, chunk: Any, beta: float, noise: Any) -> dict[str, Any]:
        """The loss terms of one micro-batch for its ``noise`` (rows, latent dims), whose
        gradients (over ``batch_size_div``) are added to the parameters' ``.grad``: compiled
        where ``run.torch_compile`` asks for it."""
        if self.compile_pending:
            return self.first_compiled(chunk, beta, noise)
        if self.compiled is not None:
            # A tensor, not a float: Dynamo specializes on floats and would recompile the step
            # for every new beta of a warm-up.
            beta_tensor = torch.tensor(beta, dtype=torch.float32)
            return self.backward(self.compiled, chunk, beta_tensor, noise)
        return self.backward(self.module, chunk, beta, noise)

    def backward(self, module: Any, chunk: Any, beta: Any, noise: Any) -> dict[str, Any]:
        terms = module(chunk, beta, noise)
        (terms["loss"] / self.div).backward()
        return terms

    def first_compiled(self, chunk: Any, beta: float, noise: Any) -> dict[str, Any]:
        """The first micro-batch through ``torch.compile``; where compiling fails, one warning
        line, and this micro-batch and every later one run eagerly from the same state (the
        noise is an input: a failed attempt consumed none)."""
        self.compile_pending = False
        try:
            self.compiled = torch.compile(self.module)
            return self.micro_batch(chunk, beta, noise)
        except Exception as exc:  # Dynamo's and Inductor's errors have no common base class
            self.compiled = None
            for p in self.params:  # the first micro-batch of the run: nothing else to keep
                p.grad = None
            reason = (str(exc).strip().splitlines() or [""])[0][:200]
            print(
                f"warning: torch.compile failed ({type(exc).__name__}: {reason}); "
                "the train step runs eagerly",
                file=sys.stderr,
                flush=True,
            )
            return self.micro_batch(chunk, beta, noise)

    def eval_step(self, images: np.ndarray) -> dict[str, Any]:
        # Every process scores the whole batch with the same noise: evaluation is cheap next
        # to training, and every process then reports the same figures.
        batch = ops.convert_to_tensor(images)
        noise = self.draw(self.eval_noise_seed(), (len(images), self.latent_dims), batch.device)
        with torch.no_grad():
            return to_numpy(self.evaluation_terms(batch, noise))


class TorchRunner(Runner):
    """Eager, without autograd's bookkeeping."""

    def run(self, key: Any, fn: Any, *args: Any) -> Any:
        with torch.no_grad():
            return super().run(key, fn, *args)


ENGINE = TorchEngine
RUNNER = TorchRunner


def device_name() -> str:
    """What the start-up line calls the device a run computes on."""
    return "GPU" if torch.cuda.is_available() else "CPU"


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's allocation failure (its OutOfMemoryError, or the allocator's message)."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def torchrun(processes: int, args: list[str]) -> int:
    """``python ARGS`` in ``processes`` processes on this machine, under torchrun."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={processes}", *args]
    return subprocess.run(command, check=False).returncode


def refuse_unless(checks: list[tuple[Any, str]]) -> None:
    """See :func:`hvae_core.backends.engine.refuse_unless`. PyTorch runs eagerly; Keras'
    symbolic pass (output shapes) runs on the meta device, whose tensors hold no values."""
    if any(isinstance(holds, torch.Tensor) and holds.device.type == "meta" for holds, _ in checks):
        return
    refuse_now(checks)
