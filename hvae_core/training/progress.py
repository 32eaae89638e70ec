"""What a training run tells the person watching it: progress bars, or log lines with --quiet."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console, ConsoleOptions
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

from hvae_core.model.evaluation import usage_line

SEPARATOR = "  "  # between a step's figures


class Reporter:
    def __init__(self, quiet: bool, silent: bool = False, console: Console | None = None) -> None:
        # silent: a data-parallel run's other processes; process 0 speaks for all of them.
        self.quiet = quiet or silent
        self.silent = silent
        self.console = console  # None: rich's own console, on stdout
        self.progress: Progress | None = None
        self.task: Any = None
        self._last_log = 0.0

    def info(self, message: str) -> None:
        if self.silent:
            return
        print(message, file=sys.stderr if self.quiet else sys.stdout, flush=True)

    def warn(self, message: str) -> None:
        """One line on stderr, between progress bars (never inside one)."""
        if self.silent:
            return
        print(f"warning: {message}", file=sys.stderr, flush=True)

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int) -> None:
        self.epoch, self.epochs, self.total = epoch, epochs, total
        if self.quiet:
            return
        self.progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}", table_column=_kept()),
            BarColumn(bar_width=30),
            MofNCompleteColumn(table_column=_kept()),
            TimeElapsedColumn(table_column=_kept()),
            EtaColumn(table_column=_kept()),
            FiguresColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done, figures=())

    def step(self, done: int, metrics: dict[str, float], skips: int, step_seconds: float) -> None:
        figures = (  # the most telling first: a narrow terminal shows only the first ones
            f"bpd {metrics['elbo_bpd']:.3f}",
            f"loss {metrics['loss']:.3f}",
            f"|g| {metrics['grad_norm']:.2f}",
            f"skips {skips}",
            f"{step_seconds * 1000:.0f} ms",
        )
        if self.progress is not None:
            self.progress.update(self.task, completed=done, figures=figures)
        elif time.monotonic() - self._last_log > 30:  # --quiet: a line every 30 s at most
            self._last_log = time.monotonic()
            self.info(f"epoch {self.epoch} step {done}/{self.total}: {SEPARATOR.join(figures)}")

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
            + (f"; {usage_line(row)}" if row.get("active_units") is not None else "")
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _kept() -> Column:
    # When the line is longer than the terminal is wide, rich shortens the columns that may
    # wrap (here the bar and the figures) and only then cuts every column, which turned the
    # times into "0:00:…": these columns are the ones that must stay whole.
    return Column(no_wrap=True)


class EtaColumn(TimeRemainingColumn):
    """The epoch's estimated time left, labelled: beside the elapsed time, a bare duration
    could be either."""

    def render(self, task: Task) -> Text:
        return Text.assemble("eta ", super().render(task))


class FiguresColumn(ProgressColumn):
    """The last step's figures (the task's ``figures``, most telling first): as many as fit."""

    def render(self, task: Task) -> Figures:
        return Figures(task.fields.get("figures", ()))


class Figures:
    """Whole fields, from the first, as many as fit the width given: never a cut field."""

    def __init__(self, fields: Sequence[str]) -> None:
        self.fields = tuple(fields)

    def fitting(self, width: int) -> str:
        shown = ""
        for field in self.fields:
            longer = f"{shown}{SEPARATOR}{field}" if shown else field
            if len(longer) > width:
                break
            shown = longer
        return shown

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        # No wider than the fields that fit: the line ends there instead of in blanks.
        return Measurement(0, len(self.fitting(options.max_width)))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Text]:
        yield Text(self.fitting(options.max_width), no_wrap=True, overflow="crop")
