"""A run's experiment trackers (see :class:`hvae_core.interfaces.Tracker`): started, shown every
epoch's row and images, and closed; each one's failure isolated from the run."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from hvae_core.errors import HvaeError


class Trackers:
    """The trackers of one training session, from their plugins' ``(spec, factory)`` pairs.
    A tracker is an observer: its failure costs its own records (one warning through
    ``warn``), never the run."""

    def __init__(self, factories: list[tuple[Any, Any]], warn: Any) -> None:
        self.factories = factories
        self.active: list[tuple[Any, Any]] = []  # (spec, tracker) of those still working
        self._warn = warn

    def start(
        self,
        options: dict[str, Any],
        config: dict[str, Any],
        run: Any,
        run_dir: Path,
        first_epoch: int,
    ) -> None:
        """Make and start every tracker; a factory that fails stops the run with one line."""
        self.active = []
        for spec, factory in self.factories:
            try:
                tracker = factory(options[spec.name], run, run_dir=run_dir)
            except HvaeError:
                raise
            except Exception as exc:
                raise HvaeError(
                    f"tracker '{spec.name}' ({spec.package}) could not start: {one_line(exc)}",
                    hint=f"run without it, or fix the package {spec.package}",
                ) from exc
            self.active.append((spec, tracker))
            self._call(spec, tracker, "start", copy.deepcopy(config), first_epoch)

    def log_epoch(self, row: dict[str, Any], images: dict[str, Any]) -> None:
        for spec, tracker in list(self.active):
            self._call(spec, tracker, "log_epoch", copy.deepcopy(row), dict(images))

    def close(self) -> None:
        for spec, tracker in list(self.active):
            self._call(spec, tracker, "close")
        self.active = []

    def _call(self, spec: Any, tracker: Any, method: str, *args: Any) -> None:
        try:
            getattr(tracker, method)(*args)
        except Exception as exc:
            self.active = [(s, t) for s, t in self.active if t is not tracker]
            self._warn(
                f"tracker '{spec.name}' ({spec.package}) failed in {method}: {one_line(exc)}; "
                "it is off for the rest of this run (metrics.jsonl has every epoch)"
            )


def one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())
