"""The XLA flags hvae sets for GPU runs: added only where the user set none, and parsed by the
installed jaxlib and TensorFlow (XLA aborts a process on a flag it does not know)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hvae_core.backends import select as backend

FLAG = backend.GPU_XLA_FLAGS[0].split("=", 1)[0]


def test_the_defaults_join_the_users_own_flags(monkeypatch) -> None:
    monkeypatch.delenv(backend.NO_XLA_DEFAULTS, raising=False)
    assert backend.with_gpu_xla_flags("") == " ".join(backend.GPU_XLA_FLAGS)
    mine = "--xla_dump_to=/tmp/x"
    assert backend.with_gpu_xla_flags(mine).split() == [mine, *backend.GPU_XLA_FLAGS]


def test_a_flag_the_user_set_keeps_the_users_value(monkeypatch) -> None:
    monkeypatch.delenv(backend.NO_XLA_DEFAULTS, raising=False)
    mine = f"{FLAG}=false"
    assert backend.with_gpu_xla_flags(mine) == mine


def test_hvae_xla_defaults_0_leaves_xla_flags_alone(monkeypatch) -> None:
    monkeypatch.setenv(backend.NO_XLA_DEFAULTS, "0")
    assert backend.with_gpu_xla_flags("") == ""


SELECT = """
import os
from hvae_core.backends import select as backend
backend.nvidia_gpu_present = lambda: {gpu}
backend.select_backend({name!r})
print(os.environ.get("XLA_FLAGS", "<unset>"))
"""


@pytest.mark.parametrize(
    ("name", "gpu", "expect_flag"),
    [
        ("jax", True, True),
        ("tensorflow", True, True),
        ("torch", True, False),
        ("jax", False, False),
    ],
)
def test_select_backend_sets_the_flags_for_xla_backends_on_a_gpu_machine(
    name, gpu, expect_flag
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", backend.NO_XLA_DEFAULTS)}
    code = SELECT.format(gpu=gpu, name=name)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert (FLAG in done.stdout) is expect_flag, done.stdout


COMPILE = {
    "jax": "import jax, jax.numpy as jnp; print(jax.jit(lambda x: x + 1)(jnp.ones(2)))",
    "tensorflow": "import tensorflow as tf; "
    "print(tf.function(jit_compile=True)(lambda x: x + 1)(tf.ones(2)).numpy())",
}


def compiles_with(name: str, xla_flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": xla_flags, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-c", COMPILE[name]], capture_output=True, text=True, env=env, timeout=300
    )


# TensorFlow's import makes its case slow; its XLA parses the same flag table as jaxlib's.
@pytest.mark.parametrize("name", ["jax", pytest.param("tensorflow", marks=pytest.mark.slow)])
def test_the_installed_xla_knows_every_default_flag(name) -> None:
    pytest.importorskip(name)
    # The same check fails on a flag XLA does not know: it would catch a flag a release dropped.
    assert compiles_with(name, "--xla_gpu_no_such_flag_hvae=true").returncode != 0
    done = compiles_with(name, " ".join(backend.GPU_XLA_FLAGS))
    assert done.returncode == 0, done.stderr[-2000:]
