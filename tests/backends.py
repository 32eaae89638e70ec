"""Running a snippet under another Keras backend: the backend is fixed per process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

BACKENDS = ("tensorflow", "jax", "torch")


def require_backend(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"the {name} backend is not installed")


def run_on_backend(
    backend: str,
    script: str,
    inputs: dict[str, np.ndarray],
    workdir: Path,
    timeout: int = 600,
) -> dict[str, np.ndarray]:
    """Run ``script`` with KERAS_BACKEND=backend. It finds ``inputs`` (a dict of arrays) in the
    variable ``inputs`` and must store its results in the dict ``outputs``."""
    require_backend(backend)
    workdir.mkdir(parents=True, exist_ok=True)
    src, dst = workdir / f"in_{backend}.npz", workdir / f"out_{backend}.npz"
    np.savez(src, **inputs)
    program = (
        "import numpy as np\n"
        f"inputs = dict(np.load({str(src)!r}))\n"
        "outputs = {}\n"
        + textwrap.dedent(script)
        + f"\nnp.savez({str(dst)!r}, **{{k: np.asarray(v) for k, v in outputs.items()}})\n"
    )
    env = dict(os.environ, KERAS_BACKEND=backend)
    done = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{backend} run failed:\n{done.stderr[-4000:]}"
    return dict(np.load(dst))


def run_hvae(*args: str, backend: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """``python -m hvae_core ARGS`` in a fresh process on ``backend``; it must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "hvae_core", *args],
        env=dict(os.environ, KERAS_BACKEND=backend),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"hvae {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return done
