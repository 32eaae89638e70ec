"""The core and the light commands import no Keras backend: the CLI answers at once."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("tensorflow", "jax", "torch", "keras")

PROBE = """
import sys
{body}
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
print("HEAVY:" + ",".join(heavy))
"""

CLI_BODY = """
from hvae_core.cli import main
try:
    main({args!r})
except SystemExit:
    pass
"""


def heavy_modules_after(body: str) -> list[str]:
    code = PROBE.format(body=body, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    [line] = [x for x in done.stdout.splitlines() if x.startswith("HEAVY:")]
    return [m for m in line.removeprefix("HEAVY:").split(",") if m]


def test_import_hvae_core_loads_no_backend() -> None:
    body = "import hvae_core, hvae_core.api, hvae_core.config, hvae_core.plugins"
    assert heavy_modules_after(body) == []


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["plugins", "list"],
        ["plugins", "list", "--json"],
        ["config", "show"],
        ["plugins", "show", "lr-schedule", "cosd"],
        ["plugins", "show", "tracker", "tensorboard"],
    ],
)
def test_light_commands_load_no_backend(args) -> None:
    assert heavy_modules_after(CLI_BODY.format(args=args)) == []


SEEDED_BODY = """
import os
os.environ["KERAS_BACKEND"] = {backend!r}
import keras
from hvae_core.backends.select import set_random_seed

def draws():
    set_random_seed(7)
    layer = keras.layers.Dense(3)
    layer.build((None, 2))
    return (
        keras.ops.convert_to_numpy(keras.random.normal((4,))).tolist(),
        keras.ops.convert_to_numpy(layer.kernel).tolist(),
    )

first, again = draws(), draws()
set_random_seed(8)
other = keras.ops.convert_to_numpy(keras.random.normal((4,))).tolist()
print("SAME:", first == again, "DIFFERENT:", first[0] != other)
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_seeding_a_jax_or_torch_run_is_repeatable_and_does_not_import_tensorflow(backend) -> None:
    code = PROBE.format(body=SEEDED_BODY.format(backend=backend), heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "SAME: True DIFFERENT: True" in done.stdout
    [line] = [x for x in done.stdout.splitlines() if x.startswith("HEAVY:")]
    assert not any(m.split(".")[0] == "tensorflow" for m in line.split(":")[1].split(","))
