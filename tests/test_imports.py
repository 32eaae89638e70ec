"""The core and the light commands import no Keras backend: the CLI answers at once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("tensorflow", "jax", "torch", "keras")

PROBE = """
import sys
from pathlib import Path
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


LOADED_BODY = """
import sys
import hvae_core.trained

def probe(*args, **kwargs):
    print("KERAS_BEFORE_LOAD:" + str("keras" in sys.modules))
    raise SystemExit(0)

hvae_core.trained.load = probe
from hvae_core.cli import main
try:
    main({args!r})
except SystemExit:
    pass
"""


@pytest.mark.parametrize("command", ["sample", "evaluate", "analyze", "export", "interpolate"])
def test_commands_that_load_a_run_choose_its_backend_before_keras_starts(command, tmp_path):
    # Keras fixes its backend when first imported: a command that imported it before
    # hvae_core.load (as `hvae sample` did, through model.pixels) ran on TensorFlow and
    # refused `--backend jax`.
    png = tmp_path / "a.png"
    png.write_bytes(b"")  # the command checks it exists before loading; reads it after
    extra = {
        "sample": ["--out", str(tmp_path / "s.png")],
        "export": ["--out", str(tmp_path)],
        "interpolate": [str(png), str(png)],
    }
    args = [command, str(tmp_path), *extra.get(command, [])]
    code = PROBE.format(body=LOADED_BODY.format(args=args), heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "KERAS_BEFORE_LOAD:False" in done.stdout, done.stdout + done.stderr[-2000:]


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


# --- the layering of the core -----------------------------------------------------------------

CORE = Path(__file__).resolve().parents[1] / "hvae_core"
BACKEND_LIBRARIES = ("tensorflow", "jax", "jaxlib", "torch")


def _core_modules() -> dict[str, Path]:
    modules = {}
    for path in CORE.rglob("*.py"):
        parts = list(path.relative_to(CORE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in ``path``, at any depth, but those only a type
    checker runs (``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for sub in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def test_the_core_imports_no_backend_library_outside_backends() -> None:
    outside = [
        f"{path.relative_to(CORE.parent)} imports {module}"
        for name, path in _core_modules().items()
        if not name.startswith("hvae_core.backends.")
        for module, _ in _imports(path)
        if module.split(".")[0] in BACKEND_LIBRARIES
    ]
    assert outside == []


def test_the_core_has_no_import_circles() -> None:
    """Lazy imports inside functions count too: a circle dodged by importing late is still
    two rooms that need each other."""
    modules = _core_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for module, names in _imports(path):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            if len(targets) < len(names) and module in modules:
                targets.append(module)  # names the package re-exports
            if not names and module in modules:
                targets.append(module)
            graph[name].update(t for t in targets if t != name)
    circles = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                circles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert circles == []
