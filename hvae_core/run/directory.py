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
from pathlib import Path
from typing import Any

from hvae_core.errors import HvaeError, RunWarning
from hvae_core.run import checkpoint as checkpoint_meta
from hvae_core.run import files as rundir
from hvae_core.run import lock as runlock
from hvae_core.run.checkpoint import RESUMABLE_SECTIONS

Warn = Callable[[str], None]


class RunDirectory:
    """One run's directory (see :mod:`hvae_core.run.files` for its files)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def create(
        cls, save_dir: str | os.PathLike[str], config: Any, warn: Warn | None = None
    ) -> RunDirectory:
        """A new directory under ``save_dir`` named after the dataset and the time (an
        existing directory is never reused), locked by this process (see :meth:`unlock`) and
        holding ``config``. When that cannot be written, nothing is left behind."""
        run = cls(rundir.create_run_dir(save_dir, config.data.dataset))
        try:
            runlock.acquire(run.lock_path, warn or _warn)
            run.write_config(config)
        except BaseException:
            run.unlock()
            with contextlib.suppress(OSError):  # empty here: failed writes remove their files
                run.path.rmdir()
            raise
        return run

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
        :data:`RESUMABLE_SECTIONS` but not the model or the data."""
        from hvae_core.config import changed_keys, load_config_source, merge, resolve_config

        stored = self.config()
        if config is None and not overrides and not any(v is not None for v in flags.values()):
            return stored
        raw = stored.to_dict()
        if config is not None:
            merge(raw, load_config_source(config))
        updated = resolve_config(None, flags, overrides, base=raw)
        prefixes = tuple(f"{section}." for section in RESUMABLE_SECTIONS)
        changed = changed_keys(stored.to_dict(), updated.to_dict())
        changed = [k for k in changed if not k.startswith(prefixes)]
        if changed:
            raise HvaeError(
                f"{self.path} was trained with another model or data config "
                f"(differs in {', '.join(changed[:5])})",
                hint="resume without those options, or start a new run",
            )
        return updated

    def checkpoint_meta(self, checkpoint: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """The metadata of the run's checkpoint (or of ``checkpoint``), without its arrays."""
        path = Path(checkpoint) if checkpoint is not None else self.checkpoint_path
        return rundir.read_checkpoint_meta(path)

    def resumable_meta(self, config: Any) -> dict[str, Any]:
        """The checkpoint's metadata when ``config`` may continue it: one line, before any
        model is built, when the checkpoint is missing or invalid or was trained with another
        model or data config."""
        meta = self.checkpoint_meta()
        checkpoint_meta.refuse_other_config(meta, config, self.checkpoint_path)
        return meta


def _warn(message: str) -> None:
    warnings.warn(message, RunWarning, stacklevel=3)


def is_run_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies in a run directory (a folder holding a run's config): such files
    belong to the run and are never overwritten by other commands."""
    folder = Path(path).resolve().parent
    return (folder / rundir.CONFIG).is_file() or (folder / rundir.CHECKPOINT).is_file()
