"""The ``tensorboard`` tracker: event files in ``RUN_DIR/tensorboard``, one step per epoch.

Written with tensorboardX, which needs neither TensorFlow nor TensorBoard. The alternatives
import TensorFlow, which hvae always has installed: TensorBoard's own writer goes through
``tensorboard.compat.tf``, which is the real TensorFlow when it is importable, and
``torch.utils.tensorboard`` builds on it (3.6 s and 4.5 s against tensorboardX's 0.2 s, or
1.1 s where it imports torch, which it does whenever torch is installed).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hvae_core import HvaeError

from .rows import number_lists, scalars

try:
    from tensorboardX import SummaryWriter
except ImportError as exc:
    raise HvaeError(
        "the tensorboard tracker needs the package tensorboardX, which is not installed",
        hint="pip install tensorboardX",
    ) from exc

FOLDER = "tensorboard"
FLUSH_SECONDS = 5  # an epoch's records reach the disk (and a watching TensorBoard) this soon


class TensorBoardTracker:
    """Every numeric metric as a scalar, list-valued ones (a value per latent layer) as a
    histogram over the element index plus a scalar per element, the image grids, and the
    resolved config as text, all at global step = epoch."""

    def __init__(self, options: Any, run: Any, *, run_dir: Path) -> None:
        self.options = options
        self.logdir = Path(run_dir) / FOLDER
        self.writer: Any = None

    def start(self, config: dict[str, Any], first_epoch: int) -> None:
        # A resumed run appends a new event file to the same folder; purge_step makes
        # TensorBoard drop what an earlier session logged for first_epoch and later, as the
        # run itself went back to its checkpoint.
        # tensorboardX names a file by the second it was made, and would truncate an earlier
        # session's file of the same second: the nanoseconds keep the names apart, in order.
        self.writer = SummaryWriter(
            str(self.logdir),
            purge_step=first_epoch,
            flush_secs=FLUSH_SECONDS,
            filename_suffix=f".{time.time_ns()}",
        )
        text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
        # Indented four spaces: TensorBoard renders text as Markdown, and this keeps the YAML
        # a code block.
        code = "\n".join("    " + line for line in text.splitlines())
        self.writer.add_text("config", code, global_step=first_epoch - 1)

    def log_epoch(self, row: dict[str, Any], images: dict[str, np.ndarray]) -> None:
        epoch = int(row["epoch"])
        for key, value in scalars(row, layer_scalars=self.options.layer_scalars).items():
            self.writer.add_scalar(key, value, epoch)
        for key, values in number_lists(row).items():
            if all(v is not None for v in values):
                self._histogram(key, values, epoch)
        if self.options.images:
            for name, grid in images.items():
                self.writer.add_image(name, np.asarray(grid), epoch, dataformats="HWC")

    def _histogram(self, key: str, values: list[float], epoch: int) -> None:
        # Element i is the bucket [i, i + 1) and its value the bucket's height, so the
        # histograms tab shows the profile over the layers, epoch after epoch.
        heights = np.asarray(values, dtype=np.float64)
        self.writer.add_histogram_raw(
            key,
            min=0.0,
            max=float(len(values)),
            num=len(values),
            sum=float(heights.sum()),
            sum_squares=float((heights**2).sum()),
            bucket_limits=[float(i + 1) for i in range(len(values))],
            bucket_counts=heights.tolist(),
            global_step=epoch,
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
