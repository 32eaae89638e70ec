"""The ``example-csv`` tracker: every epoch's numbers as one row of a CSV file in the run
directory. What a tracker must do is :class:`hvae_core.interfaces.Tracker`; this class has the
three methods and needs no import from hvae at all."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np


class CsvTracker:
    def __init__(self, options: Any, run: Any, *, run_dir: Path) -> None:
        self.path = Path(run_dir) / options.file
        self.columns: list[str] = []

    def start(self, config: dict[str, Any], first_epoch: int) -> None:
        if not self.path.exists():
            return
        # A resumed run went back to its checkpoint: rows of first_epoch and later are void.
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            kept = [row for row in reader if int(row["epoch"]) < first_epoch]
            self.columns = list(reader.fieldnames or [])
        if not self.columns:  # an empty file: the next row writes the header
            self.path.unlink()
            return
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(kept)

    def log_epoch(self, row: dict[str, Any], images: dict[str, np.ndarray]) -> None:
        numbers = {k: v for k, v in row.items() if v is None or isinstance(v, int | float)}
        new = not self.columns
        if new:  # the first row's keys are the columns; keys that come later are left out
            self.columns = list(numbers)
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, self.columns, restval="", extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(numbers)

    def close(self) -> None:
        pass  # every row is written and closed as it comes
