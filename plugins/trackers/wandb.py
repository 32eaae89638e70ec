"""The ``wandb`` tracker: one Weights & Biases run per hvae run, step = epoch.

Through ``wandb.init``, ``run.log`` and ``run.finish``. W&B's own environment variables and
settings files apply (``WANDB_MODE``, ``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_DIR``, ...);
an option set in ``tracker.wandb`` is passed to ``wandb.init`` and so wins over them, as
W&B's arguments do. W&B's files go to ``RUN_DIR/wandb`` unless ``WANDB_DIR`` says otherwise,
and the run's id is kept in ``RUN_DIR/wandb/hvae-run-id``, so that ``hvae train --resume``
continues the same W&B run (``resume="allow"``).

It never asks a question: online, without credentials (``wandb login``, ``WANDB_API_KEY``),
the run stops before it trains, with one line. Unless their variables say otherwise, W&B
prints nothing (``WANDB_SILENT``: hvae prints its own lines) and does not capture the
terminal (``WANDB_CONSOLE=off``: the progress bars would flood the run's logs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from hvae_core import HvaeError

from .rows import scalars

try:
    import wandb
except ImportError as exc:
    raise HvaeError(
        "the wandb tracker needs the package wandb, which is not installed",
        hint='pip install "hvae[wandb]"',
    ) from exc

FOLDER = "wandb"
ID_FILE = "hvae-run-id"
DEFAULT_PROJECT = "hvae"
OFFLINE_MODES = ("offline", "dryrun", "disabled")
# The tracker's own defaults of W&B settings, each applied only where its variable is unset.
QUIET = {"WANDB_SILENT": ("silent", True), "WANDB_CONSOLE": ("console", "off")}


def _pixels(grid: np.ndarray) -> np.ndarray:
    grid = np.asarray(grid)
    return grid[..., 0] if grid.ndim == 3 and grid.shape[-1] == 1 else grid


class WandbTracker:
    """The resolved config as the run's config; every number of the metrics row at step =
    epoch (list elements as ``KEY/00``, ...), with ``epoch`` the charts' x axis; the image
    grids as ``wandb.Image``."""

    def __init__(self, options: Any, run: Any, *, run_dir: Path) -> None:
        self.options = options
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / FOLDER
        id_path = self.folder / ID_FILE
        run_id = id_path.read_text().strip() if id_path.is_file() else None

        settings = {key: value for env, (key, value) in QUIET.items() if env not in os.environ}
        if options.mode is not None:
            settings["mode"] = options.mode
        # The global settings (W&B's variables and files, then these) decide the mode, which
        # the check of credentials reads.
        mode = wandb.setup(wandb.Settings(**settings)).settings.mode
        if mode not in OFFLINE_MODES and not wandb.login(prompt=False, verify=False):
            raise HvaeError(
                "the wandb tracker is online but W&B has no credentials",
                hint="run `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline "
                "and upload later with `wandb sync`",
            )
        self.folder.mkdir(exist_ok=True)
        self.run = wandb.init(
            project=options.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            entity=options.entity,
            name=options.run_name or os.environ.get("WANDB_NAME") or self.run_dir.name,
            id=run_id,
            resume="allow",
            dir=None if os.environ.get("WANDB_DIR") else str(self.run_dir),
            settings=wandb.Settings(**settings),
        )
        id_path.write_text(self.run.id + "\n")
        self.run.define_metric("epoch", hidden=True)
        self.run.define_metric("*", step_metric="epoch")

    def start(self, config: dict[str, Any], first_epoch: int) -> None:
        # A resume may change training settings: the config shows this session's.
        self.run.config.update(config, allow_val_change=True)

    def log_epoch(self, row: dict[str, Any], images: dict[str, np.ndarray]) -> None:
        epoch = int(row["epoch"])
        data: dict[str, Any] = {"epoch": epoch}
        data.update(scalars(row, layer_scalars=self.options.layer_scalars))
        if self.options.images:
            for name, grid in images.items():
                data[name] = wandb.Image(_pixels(grid))
        # W&B ignores a step below the one it is at (a resume that went back to an earlier
        # checkpoint, against a server that has later epochs): such an epoch goes to the next
        # step instead, and the charts, whose x axis is epoch, still put it in its place.
        step = epoch if epoch >= self.run.step else self.run.step + 1
        self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()
