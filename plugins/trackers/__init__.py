"""First-party experiment trackers. Light: the writer is imported only when a run uses one, so
listing plugins loads neither it nor a backend."""

from __future__ import annotations

from dataclasses import dataclass

from hvae_core import hookimpl, option


@dataclass
class TensorBoardOptions:
    images: bool = option(True, "also write the sample and reconstruction grids as images")
    layer_scalars: bool = option(
        True,
        "list-valued metrics (e.g. a KL per latent layer) also as one scalar per element, "
        "KEY/00, KEY/01, ... (the histogram KEY is always written)",
    )


@hookimpl
def register_trackers(register):  # noqa: ANN001 - the hook's register callable
    register(
        "tensorboard",
        "hvae_plugins.trackers.tensorboard:TensorBoardTracker",
        options=TensorBoardOptions,
        summary="TensorBoard event files in RUN_DIR/tensorboard: metrics, per-layer values, "
        "images, config",
    )
