"""Data parallelism, backend-neutral: how many replicas, which process writes, batch layout.

The backend modules (``engine_jax``, ``engine_tensorflow``, ``engine_torch``) each provide
``setup_parallel(devices, timeout) -> Parallel``, which starts the backend's own distributed
engine (``keras.distribution`` on JAX, ``tf.distribute`` on TensorFlow, ``torch.distributed``
on torch); everything that does not depend on the backend lives here.

Every process reads the same global batch (the same seeded shuffle) and each replica takes its
part of it, so the sequence of global batches, and with it a resume, does not depend on the
number of devices.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hvae_core.errors import ConfigError, HvaeError

# Multi-host launch settings: per process, so they come from flags or the environment and are
# never stored in a run's config.yaml.
COORDINATOR_ENV = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
NUM_PROCESSES_ENV = "KERAS_DISTRIBUTION_NUM_PROCESSES"
PROCESS_ID_ENV = "KERAS_DISTRIBUTION_PROCESS_ID"


@dataclass(frozen=True)
class Parallel:
    """The data-parallel layout of a run."""

    replicas: int = 1  # devices that each take a slice of the global batch, over all processes
    process_index: int = 0
    num_processes: int = 1
    strategy: Any = None  # the backend's distribution object, if any
    shutdown: Any = None  # leaves the process group at the end of the run

    def close(self) -> None:
        """Leave the distributed run together with the other processes."""
        if self.shutdown is not None:
            self.shutdown()

    @property
    def is_chief(self) -> bool:
        """Process 0 alone writes the run directory, metrics and checkpoints."""
        return self.process_index == 0

    @property
    def active(self) -> bool:
        return self.replicas > 1 or self.num_processes > 1

    def scope(self) -> Any:
        """Where weights must be created (a ``tf.distribute`` strategy's scope)."""
        scope = getattr(self.strategy, "scope", None)
        return scope() if scope is not None else contextlib.nullcontext()

    def describe(self) -> str:
        if not self.active:
            return "1 device"
        hosts = f" in {self.num_processes} processes" if self.num_processes > 1 else ""
        return f"{self.replicas} devices (data parallel{hosts})"


class Relaunch(Exception):
    """This backend runs one process per device: :meth:`run` starts ``processes`` of them
    with the backend's own launcher (torch: torchrun), each running ``python ARGS``."""

    def __init__(self, processes: int, launcher: Callable[[int, list[str]], int]) -> None:
        super().__init__(f"relaunch as {processes} processes")
        self.processes = processes
        self._launcher = launcher

    def run(self, args: list[str]) -> int:
        """Run ``python ARGS`` in every process (after the caller released what it holds, such
        as the run's lock: the processes take it); their exit status."""
        return self._launcher(self.processes, args)


@dataclass(frozen=True)
class Launch:
    """Multi-host settings of this process, from flags or the environment."""

    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


def chief_from_env(environ: dict[str, str] | None = None) -> bool:
    """Whether this process will be process 0, the one that writes the run directory, as the
    environment says before any backend starts (a multi-host launch's process id, torchrun's
    rank)."""
    env = os.environ if environ is None else environ
    rank = env.get("RANK", "0").strip() or "0"
    return launch_from_env(env).process_id == 0 and rank == "0"


def launch_from_env(environ: dict[str, str] | None = None) -> Launch:
    """The multi-host settings in the environment (``KERAS_DISTRIBUTION_*``, which Keras'
    ``keras.distribution.initialize`` reads too); one process when they are absent."""
    env = os.environ if environ is None else environ
    count = env.get(NUM_PROCESSES_ENV)
    try:
        num_processes = int(count) if count else 1
        process_id = int(env.get(PROCESS_ID_ENV) or 0)
    except ValueError:
        raise ConfigError(
            f"{NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} must be integers",
            hint="set them to the number of processes and this process's index",
        ) from None
    coordinator = env.get(COORDINATOR_ENV) or None
    if num_processes > 1:
        if coordinator is None:
            raise ConfigError(
                f"{num_processes} processes but no coordinator address",
                hint="give --coordinator HOST:PORT (the address of process 0)",
            )
        if not 0 <= process_id < num_processes:
            raise ConfigError(
                f"process id {process_id} is not in 0..{num_processes - 1}",
                hint="give each process a distinct --process-id",
            )
    return Launch(coordinator.split(",")[0] if coordinator else None, num_processes, process_id)


def batch_groups(regularizer: Any) -> int:
    """How many equal, row-matched parts each micro-batch has (e.g. images and their
    augmentations): a replica must get the same rows of every part."""
    noise = int(getattr(regularizer, "noise_groups", 1))
    return int(getattr(regularizer, "batch_groups", noise))


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Block until ``host:port`` accepts connections, or fail in one line after ``timeout``
    seconds (some engines abort the whole process when their coordinator is unreachable)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"coordinator address {address!r} is not HOST:PORT", hint="e.g. 10.0.0.1:1234"
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise HvaeError(
                    f"could not join the run: coordinator {address} unreachable after "
                    f"{timeout:g} s ({exc.strerror or exc})",
                    hint="start process 0 first, check the address and port, "
                    "or raise run.connect_timeout",
                ) from None
            time.sleep(0.5)


def check_devices(requested: int, visible: int, what: str) -> int:
    """The number of local devices to use: ``requested`` (0: all ``visible``)."""
    if requested < 0:
        raise ConfigError(f"--devices must be 0 (all) or positive, got {requested}")
    if requested == 0:
        return max(visible, 1)
    if requested > visible:
        raise HvaeError(
            f"--devices {requested} but only {visible} {what} visible",
            hint="lower --devices, or check CUDA_VISIBLE_DEVICES / the device list",
        )
    return requested


def check_batch(batch_size: int, div: int, groups: int, replicas: int) -> None:
    """Every replica must get whole micro-batches, and whole noise groups in each."""
    if replicas <= 1:
        return
    unit = div * groups * replicas
    if batch_size % unit:
        parts = f"{replicas} devices"
        if div > 1:
            parts += f" x batch_size_div {div}"
        if groups > 1:
            parts += f" x {groups} noise groups"
        raise ConfigError(
            f"training.batch_size {batch_size} does not split evenly over {parts} ({unit})",
            hint=f"use a global batch size that is a multiple of {unit}, or change --devices",
        )


def replica_slice(
    images: np.ndarray, replica: int, replicas: int, div: int = 1, groups: int = 1
) -> np.ndarray:
    """The part of a global batch that ``replica`` computes.

    The global batch is ``div`` micro-batches of ``groups`` equal parts (images sharing their
    latent noise, e.g. originals then augmentations); a replica takes the same share of every
    part, so that its own micro-batches keep that layout.
    """
    if replicas == 1:
        return images
    n = len(images)
    parts = images.reshape(div, groups, replicas, n // (div * groups * replicas), *images.shape[1:])
    return parts[:, :, replica].reshape(n // replicas, *images.shape[1:])
