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
    assert heavy_modules_after("import hvae_core, hvae_core.config, hvae_core.plugins") == []


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["plugins", "list"],
        ["plugins", "list", "--json"],
        ["config", "show"],
        ["plugins", "show", "lr-schedule", "cosd"],
    ],
)
def test_light_commands_load_no_backend(args) -> None:
    assert heavy_modules_after(CLI_BODY.format(args=args)) == []
