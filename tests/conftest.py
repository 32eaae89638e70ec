"""Shared fixtures: a known plugin registry and throw-away plugin distributions."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The in-process tests run on TensorFlow (a process has one Keras backend), and so do the
# subprocesses that do not choose one: explicit, since a run without it would choose JAX.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from hvae_core import plugins  # noqa: E402
from hvae_core.backends import compile_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hvae-example-plugins"
FIRST_PARTY_ENTRY_POINTS = "datasets,flows,attention,regularizers,trackers"


def pytest_configure(config: pytest.Config) -> None:
    """One compilation cache for the whole test session, shared by its workers and every
    process they start (through $HVAE_CACHE_DIR), and never the user's own: the tests compile
    the same tiny models again and again, in many processes."""
    if not hasattr(config, "workerinput"):  # not an xdist worker, whose controller did this
        folder = tempfile.mkdtemp(prefix="hvae-test-cache-")
        config.stash[SESSION_CACHE] = folder
        os.environ[compile_cache.CACHE_DIR_ENV] = folder
        os.environ.pop(compile_cache.ENABLE_ENV, None)
    # This process's own backend (the in-process tests'), before any test module starts it.
    compile_cache.configure(os.environ["KERAS_BACKEND"])


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = config.stash.get(SESSION_CACHE, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


SESSION_CACHE = pytest.StashKey[str]()


@pytest.fixture(autouse=True)
def known_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test sees only the core and hvae's own plugins, whatever else is installed."""
    monkeypatch.setenv(plugins.ALLOW_ENV, FIRST_PARTY_ENTRY_POINTS)
    plugins.reset_registry()
    yield
    plugins.reset_registry()


def write_distribution(
    root: Path,
    name: str,
    version: str,
    entry_points: dict[str, str],
    modules: dict[str, str] | None = None,
) -> Path:
    """A distribution 'installed' under ``root`` (dist-info metadata plus module files)."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[hvae]\n{lines}")
    for module, source in (modules or {}).items():
        path = root / (module.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root


@pytest.fixture
def install_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Put a throw-away plugin distribution on sys.path and allow it to load."""
    allowed = [FIRST_PARTY_ENTRY_POINTS]
    created: list[str] = []

    def install(
        name: str, version: str, entry_points: dict[str, str], modules: dict[str, str] | None = None
    ) -> Path:
        root = write_distribution(tmp_path / name, name, version, entry_points, modules)
        monkeypatch.syspath_prepend(str(root))
        created.extend(m.split(".")[0] for m in modules or {})
        allowed.append(name)
        monkeypatch.setenv(plugins.ALLOW_ENV, ",".join(allowed))
        importlib.invalidate_caches()
        plugins.reset_registry()
        return root

    yield install
    for module in created:
        for loaded in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            del sys.modules[loaded]


def example_distribution(root: Path) -> Path:
    """The example plugin package made importable from ``root`` with its entry-point metadata."""
    return write_distribution(
        root, "hvae-example-plugins", "0.1.0", {"example": "hvae_example_plugins"}
    )


@pytest.fixture(scope="session")
def untrained_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with an untrained tiny model's checkpoint (8x8x1, 4 bits, 4 latent
    layers), made once per worker: for tests that only read a run (copy it to change it)."""
    from hvae_core.config import resolve_config

    cfg = resolve_config("tiny", overrides=["run.jit=false"])
    trainer = trainer_with_run(cfg, tmp_path_factory.mktemp("untrained") / "run")
    trainer.save()
    return trainer.run_dir


def trainer_with_run(config, folder: Path):
    """A Trainer of ``config`` writing to a new run directory ``folder`` (made, config written),
    as ``hvae train`` would begin it, without the save-dir naming or the lock."""
    from hvae_core.run import RunDirectory
    from hvae_core.training.trainer import Trainer

    folder.mkdir(parents=True)
    run = RunDirectory(folder)
    run.write_config(config)
    return Trainer(config, run, quiet=True)
