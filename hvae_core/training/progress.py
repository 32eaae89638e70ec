"""What a training run tells the person watching it: progress bars, or log lines with --quiet."""

from __future__ import annotations

import sys
import time
from typing import Any


class Reporter:
    def __init__(self, quiet: bool, silent: bool = False) -> None:
        # silent: a data-parallel run's other processes; process 0 speaks for all of them.
        self.quiet = quiet or silent
        self.silent = silent
        self.progress: Any = None
        self.task: Any = None
        self._last_log = 0.0

    def info(self, message: str) -> None:
        if self.silent:
            return
        print(message, file=sys.stderr if self.quiet else sys.stdout, flush=True)

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int) -> None:
        self.epoch, self.epochs, self.total = epoch, epochs, total
        if self.quiet:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done, stats="")

    def step(self, done: int, metrics: dict[str, float], skips: int, step_seconds: float) -> None:
        stats = (
            f"loss {metrics['loss']:.3f}  bpd {metrics['elbo_bpd']:.3f}  "
            f"|g| {metrics['grad_norm']:.2f}  skips {skips}  {step_seconds * 1000:.0f} ms"
        )
        if self.progress is not None:
            self.progress.update(self.task, completed=done, stats=stats)
        elif time.monotonic() - self._last_log > 30:  # --quiet: a line every 30 s at most
            self._last_log = time.monotonic()
            self.info(f"epoch {self.epoch} step {done}/{self.total}: {stats}")

    def end_epoch(self, row: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        val = row.get("val_bpd")
        self.info(
            f"epoch {row['epoch']}: train {row['train_bpd']:.4f} bpd"
            + (f", val {val:.4f} bpd" if val is not None else "")
            + f" (kl {row['kl_bpd']:.4f}), lr {row['lr']:.2e}, beta {row['beta']:.3g}, "
            f"max |g| {row['grad_norm_max']:.1f} ({row['grad_norm_unit']}), "
            f"{row['skipped_updates']} skipped, "
            f"{row['seconds']:.1f} s"
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
