"""Choosing the Keras backend: only here, and only when a command needs one."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Literal, get_args

from hvae_core.backends import compile_cache
from hvae_core.backends.native_logs import native_log_filter
from hvae_core.errors import HvaeError

# The one list of the Keras backends hvae runs on (each has an engine module beside this one).
Backend = Literal["tensorflow", "jax", "torch"]
BACKENDS: tuple[str, ...] = get_args(Backend)
BACKEND_MODULES = {name: name for name in BACKENDS}  # the library each one imports
EXTRA = {"tensorflow": "hvae", "jax": "hvae[jax]", "torch": "hvae[torch]"}
# Keras backends that run a trained model but cannot train one (no gradients): hvae_core.load
# takes them, eagerly, through the plain Runner.
INFERENCE_BACKENDS = {"openvino": "openvino"}
INFERENCE_EXTRA = {"openvino": "hvae[export]"}
# Their native libraries log through absl, some of it while they load (backends.native_logs).
ABSL_LOGGING = ("tensorflow", "jax")
# XLA flags set for GPU runs unless $XLA_FLAGS already names them. Only flags NVIDIA's own JAX
# containers set by default: XLA aborts the process on a flag it does not know, so each must be
# one a current jaxlib and TensorFlow parse (tests/test_backend_env.py checks both).
GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)
NO_XLA_DEFAULTS = "HVAE_XLA_DEFAULTS"  # "0": leave $XLA_FLAGS exactly as the user set it
NVIDIA_GPUS = "/proc/driver/nvidia/gpus"


def default_backend() -> str:
    """The backend of a run that names none (and no $KERAS_BACKEND): JAX when it is installed.
    On a CPU its compiled step is the fastest of the three (the default job: 103 s on JAX,
    173 s on TensorFlow, 405 s on PyTorch, 2 cores), and its compile the shortest."""
    return "jax" if importlib.util.find_spec("jax") is not None else "tensorflow"


def select_backend(
    name: str,
    gpus: str | None = None,
    compile_cache_on: bool = True,
    warn: Callable[[str], None] | None = None,
    inference: bool = False,
) -> None:
    """Make ``name`` Keras' backend, on the GPUs ``gpus`` ("0,1"; None: all), with its
    persistent compilation cache unless ``compile_cache_on`` is false (``compile_cache``;
    ``warn`` reports a cache it cannot use). Must happen before Keras is first imported.
    ``inference``: the model will only be run, so an inference-only backend will do."""
    modules = {**BACKEND_MODULES, **(INFERENCE_BACKENDS if inference else {})}
    if name not in modules:
        if name in INFERENCE_BACKENDS:
            raise HvaeError(
                f"the {name} backend runs trained models only",
                hint="train on " + ", ".join(BACKENDS) + f"; load the run with backend='{name}'",
            )
        raise HvaeError(f"unknown backend '{name}'", hint=f"choose {', '.join(modules)}")
    if gpus is not None:
        choose_gpus(gpus)
    if "keras" in sys.modules:
        current = sys.modules["keras"].backend.backend()
        if current != name:
            raise HvaeError(
                f"Keras is already running on the {current} backend; cannot switch to {name}",
                hint="start a new process (or set KERAS_BACKEND before importing keras)",
            )
        compile_cache.configure(name, compile_cache_on, warn)  # applies where it still can
        return
    if importlib.util.find_spec(modules[name]) is None:
        extra = {**EXTRA, **INFERENCE_EXTRA}[name]
        raise HvaeError(f"the {name} backend is not installed", hint=f"pip install '{extra}'")
    os.environ["KERAS_BACKEND"] = name
    compile_cache.configure(name, compile_cache_on, warn)
    if name in ABSL_LOGGING and nvidia_gpu_present():
        os.environ["XLA_FLAGS"] = with_gpu_xla_flags(os.environ.get("XLA_FLAGS", ""))


def nvidia_gpu_present() -> bool:
    """Whether this machine has an NVIDIA driver with at least one GPU (without importing CUDA)."""
    try:
        return any(os.scandir(NVIDIA_GPUS))
    except OSError:
        return False


def with_gpu_xla_flags(xla_flags: str) -> str:
    """``xla_flags`` plus each of ``GPU_XLA_FLAGS`` it does not set itself; unchanged when
    $HVAE_XLA_DEFAULTS is 0."""
    if os.environ.get(NO_XLA_DEFAULTS, "1").strip() == "0":
        return xla_flags
    named = {f.split("=", 1)[0] for f in xla_flags.split()}
    added = [f for f in GPU_XLA_FLAGS if f.split("=", 1)[0] not in named]
    return " ".join([xla_flags.strip(), *added]).strip()


def import_backend(quiet_logs: bool = True) -> None:
    """Import Keras, and with it the backend ``select_backend`` chose. ``quiet_logs``: drop the
    log lines the backend's native libraries print as they load (``native_logs``)."""
    if "keras" in sys.modules:
        return
    filtered = quiet_logs and os.environ.get("KERAS_BACKEND", "tensorflow") in ABSL_LOGGING
    with native_log_filter() if filtered else contextlib.nullcontext():
        importlib.import_module("keras")


def import_tensorflow_quietly(quiet_logs: bool = True) -> None:
    """Import TensorFlow, where it is installed and not yet imported, with its native log
    lines dropped as :func:`import_backend` drops them. For a JAX or PyTorch process that is
    about to import it anyway: Keras' saving looks for TensorFlow wherever it is installed (a
    tensor-shape check in ``serialize_keras_object``), and its loading lines would print."""
    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return
    with native_log_filter() if quiet_logs else contextlib.nullcontext():
        importlib.import_module("tensorflow")


def choose_gpus(gpus: str) -> None:
    """Let the backend see only the GPUs ``gpus`` (indices, "0,1"): CUDA_VISIBLE_DEVICES, which
    each framework reads once, when it starts."""
    started = [m for m in BACKEND_MODULES.values() if m in sys.modules]
    if started and os.environ.get("CUDA_VISIBLE_DEVICES") != gpus:
        raise HvaeError(
            f"cannot choose GPUs {gpus}: {started[0]} has already started with its own",
            hint="start a new process (or set CUDA_VISIBLE_DEVICES before it starts)",
        )
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus


def set_random_seed(seed: int) -> None:
    """Seed Python, NumPy, Keras and the running backend, as ``keras.utils.set_random_seed`` does.

    Keras' own function also seeds TensorFlow whenever it is installed, which imports it (about
    5 s and 700 MB) into jax and torch runs that never use it; those get the rest without it.
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        keras.utils.set_random_seed(seed)
        return
    import random

    import numpy as np

    # No public API resets Keras' global seed state without the TensorFlow import above.
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils

    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)
    if keras.backend.backend() == "torch":
        import torch

        torch.manual_seed(seed)
