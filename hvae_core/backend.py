"""Choosing the Keras backend: only here, and only when a command needs one."""

from __future__ import annotations

import importlib.util
import os
import sys

from hvae_core.errors import HvaeError

BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
EXTRA = {"tensorflow": "hvae", "jax": "hvae[jax]", "torch": "hvae[torch]"}


def select_backend(name: str) -> None:
    """Make ``name`` Keras' backend. Must happen before Keras is first imported."""
    if name not in BACKEND_MODULES:
        raise HvaeError(f"unknown backend '{name}'", hint=f"choose {', '.join(BACKEND_MODULES)}")
    if "keras" in sys.modules:
        current = sys.modules["keras"].backend.backend()
        if current != name:
            raise HvaeError(
                f"Keras is already running on the {current} backend; cannot switch to {name}",
                hint="start a new process (or set KERAS_BACKEND before importing keras)",
            )
        return
    if importlib.util.find_spec(BACKEND_MODULES[name]) is None:
        raise HvaeError(f"the {name} backend is not installed", hint=f"pip install '{EXTRA[name]}'")
    os.environ["KERAS_BACKEND"] = name
    # TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notices) is not for our users.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
