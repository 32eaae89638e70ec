"""A run directory's life: created once and never reused, resumed under fixed rules, opened
again to load the trained model.

The files and their formats are :mod:`hvae_core.run.files`'s; this module says what may
happen to them. Nothing here imports a Keras backend.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hvae_core.errors import HvaeError, RunWarning
from hvae_core.run import checkpoint as checkpoint_meta
from hvae_core.run import files as rundir
from hvae_core.run import lock as runlock
from hvae_core.run.checkpoint import RESUMABLE_SECTIONS  # noqa: F401 - named in docs

Warn = Callable[[str], None]


@dataclass
class Checkpoint:
    """A checkpoint as read once: its arrays and its validated metadata."""

    path: Path
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


class RunDirectory:
    r"""One run's directory and every read and write of it (the files are
    :mod:`hvae_core.run.files`'s).

    A new run is *planned* before anything is built (:meth:`planned`: the save directory is
    checked, nothing is created) and *begun* once the run's parts are assembled (:meth:`begin`:
    created, locked, config written), so a run that fails while setting up leaves no trace. A
    resumed run is :meth:`open`\ ed, locked (:meth:`writing`) and its checkpoint read once
    (:meth:`read_checkpoint`) before anything is built.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self._path = None if path is None else Path(path)
        self._save_root: Path | None = None

    @property
    def path(self) -> Path:
        if self._path is None:
            raise RuntimeError("the run directory is planned, not yet begun")
        return self._path

    @classmethod
    def planned(cls, save_dir: str | os.PathLike[str]) -> RunDirectory:
        """A new run under ``save_dir``, not yet created: what stops a new run there (not a
        folder, not writable) is one line now, before any model is built."""
        run = cls(None)
        run._save_root = rundir.prepare_save_dir(save_dir)
        return run

    def begin(self, config: Any, warn: Warn | None = None) -> RunDirectory:
        """Create the planned run: a new directory under the save directory named after the
        dataset and the time (an existing one is never reused), locked by this process (see
        :meth:`unlock`) and holding ``config``. When that cannot be written, nothing is left."""
        if self._save_root is None:
            raise RuntimeError("only a planned run directory can begin")
        self._path = rundir.create_run_dir(self._save_root, config.data.dataset)
        self._save_root = None
        try:
            runlock.acquire(self.lock_path, warn or _warn)
            self.write_config(config)
        except BaseException:
            self.unlock()
            with contextlib.suppress(OSError):  # empty here: failed writes remove their files
                self.path.rmdir()
            raise
        return self

    @classmethod
    def create(
        cls, save_dir: str | os.PathLike[str], config: Any, warn: Warn | None = None
    ) -> RunDirectory:
        """:meth:`planned` and :meth:`begin` at once."""
        return cls.planned(save_dir).begin(config, warn)

    def lock(self, warn: Warn | None = None) -> None:
        """Become the one process that writes this run (one line naming the holder when
        another one is), and remove what interrupted writes left behind."""
        runlock.acquire(self.lock_path, warn or _warn)
        runlock.remove_stale_temporaries(self.path)

    def unlock(self) -> None:
        runlock.release(self.lock_path)

    @contextlib.contextmanager
    def writing(self, warn: Warn | None = None) -> Iterator[RunDirectory]:
        """Hold the run's lock (:meth:`lock`) for the ``with`` block, whatever ends it."""
        self.lock(warn)
        try:
            yield self
        finally:
            self.unlock()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> RunDirectory:
        """An existing run directory; one line of error when ``path`` is not one."""
        run = cls(path)
        if run.path.is_file():
            # The likeliest mistake: a file of the run (its config.yaml, its checkpoint) given
            # for the run itself; "does not exist" would send the user looking elsewhere.
            what = (
                f"is the run's {run.path.name}, not its run directory"
                if run.path.name == rundir.CONFIG
                else "is a file, not a run directory"
            )
            in_a_run = (run.path.parent / rundir.CONFIG).is_file()
            raise HvaeError(
                f"{run.path} {what}",
                hint=f"give the run directory that holds it: {run.path.parent}"
                if in_a_run
                else "give a directory that 'hvae train' created",
            )
        if not run.path.is_dir():
            raise HvaeError(
                f"{run.path} is not a run directory (it does not exist)",
                hint="give a directory that 'hvae train' created",
            )
        if not (run.path / rundir.CONFIG).is_file():
            raise HvaeError(
                f"{run.path} is not a run directory (no {rundir.CONFIG})",
                hint="give a directory that 'hvae train' created",
            )
        return run

    @property
    def lock_path(self) -> Path:
        return self.path / runlock.LOCK

    @property
    def checkpoint_path(self) -> Path:
        return self.path / rundir.CHECKPOINT

    # -- the config ---------------------------------------------------------------------------

    def config(self, registry: Any = None, *, trackers: bool = True) -> Any:
        """The run's resolved config, as it trained (see ``load_run_config``)."""
        from hvae_core.config import load_run_config

        return load_run_config(self.path / rundir.CONFIG, registry, trackers=trackers)

    def write_config(self, config: Any) -> None:
        rundir.write_config(self.path, config)

    def resume_config(
        self,
        config: str | None,
        overrides: Sequence[str],
        flags: Mapping[str, Any],
    ) -> Any:
        """The config a resume continues with: the run's own, where ``config`` (a preset or
        file), ``flags`` and ``overrides`` may change the sections in
        :data:`RESUMABLE_SECTIONS` but not the model or the data (the rule the checkpoint's
        fingerprint checks: :func:`hvae_core.run.checkpoint.model_and_data_changes`)."""
        from hvae_core.config import load_config_source, merge, resolve_config

        stored = self.config()
        if config is None and not overrides and not any(v is not None for v in flags.values()):
            return stored
        raw = stored.to_dict()
        if config is not None:
            merge(raw, load_config_source(config))
        updated = resolve_config(None, flags, overrides, base=raw)
        changed = checkpoint_meta.model_and_data_changes(
            checkpoint_meta.fingerprinted_sections(stored),
            checkpoint_meta.fingerprinted_sections(updated),
        )
        if changed:
            raise HvaeError(
                f"{self.path} was trained with another model or data config "
                f"(differs in {', '.join(changed[:5])})",
                hint="resume without those options, or start a new run",
            )
        return updated

    # -- the checkpoint -----------------------------------------------------------------------

    def checkpoint_meta(self, checkpoint: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """The metadata of the run's checkpoint (or of ``checkpoint``), without its arrays."""
        path = Path(checkpoint) if checkpoint is not None else self.checkpoint_path
        return rundir.read_checkpoint_meta(path)

    def read_checkpoint(
        self, config: Any = None, checkpoint: str | os.PathLike[str] | None = None
    ) -> Checkpoint:
        """The run's checkpoint (or ``checkpoint``), read and validated once. With ``config``
        (a resume), one line when it would train another model or data than the checkpoint's
        (before any model is built)."""
        path = Path(checkpoint) if checkpoint is not None else self.checkpoint_path
        arrays, meta = rundir.load_checkpoint(path)
        if config is not None:
            checkpoint_meta.refuse_other_config(meta, config, path)
        return Checkpoint(path, arrays, meta)

    def save_checkpoint(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        rundir.save_checkpoint(self.checkpoint_path, arrays, meta)

    # -- metrics and pictures ---------------------------------------------------------------

    def append_metrics(self, row: dict[str, Any]) -> None:
        rundir.append_metrics(self.path, row)

    def read_metrics(self) -> list[dict[str, Any]]:
        return rundir.read_metrics(self.path)

    def truncate_metrics(self, epochs: int) -> None:
        """Keep the rows of the first ``epochs`` epochs (a resumed run rewrites later ones)."""
        rundir.truncate_metrics(self.path, epochs)

    def save_images(
        self, grids: Mapping[str, tuple[np.ndarray, int | None]]
    ) -> dict[str, np.ndarray]:
        """Image grids as PNGs in the run, by file stem -> (uint8 NHWC images, columns or
        None); returns each grid's pixels (what trackers are shown)."""
        from hvae_core import figures

        pixels = {}
        for stem, (images, columns) in grids.items():
            png, pixels[stem] = figures.grid_png(images, columns)
            rundir.atomic_write_bytes(self.path / f"{stem}.png", png)
        return pixels

    def plot_metrics(self) -> None:
        """loss.png and grad_norm.png from the run's metrics.jsonl."""
        from hvae_core import figures

        for name, png in figures.metric_plots(self.read_metrics()).items():
            rundir.atomic_write_bytes(self.path / name, png)


def _warn(message: str) -> None:
    warnings.warn(message, RunWarning, stacklevel=3)


def is_run_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies in a run directory (a folder holding a run's config): such files
    belong to the run and are never overwritten by other commands."""
    folder = Path(path).resolve().parent
    return (folder / rundir.CONFIG).is_file() or (folder / rundir.CHECKPOINT).is_file()
