"""First-party experiment trackers. Light: a tracker's package (tensorboardX, mlflow, wandb) is
imported only when a run uses it, so listing plugins loads none of them, nor a backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hvae_core import hookimpl, option


@dataclass
class TensorBoardOptions:
    images: bool = option(True, "also write the sample and reconstruction grids as images")
    layer_scalars: bool = option(
        True,
        "list-valued metrics (e.g. a KL per latent layer) also as one scalar per element, "
        "KEY/00, KEY/01, ... (the histogram KEY is always written)",
    )


LAYER_SCALARS_HELP = (
    "list-valued metrics (e.g. a KL per latent layer) as one metric per element, KEY/00, "
    "KEY/01, ... (false: left out)"
)


@dataclass
class MlflowOptions:
    tracking_uri: str | None = option(
        None,
        "where the MLflow run goes: a tracking URI (http://HOST:5000, sqlite:///PATH.db, "
        "databricks, ...); null: $MLFLOW_TRACKING_URI, else a store of the run's own in "
        "RUN_DIR/mlflow (mlflow.db, artifacts/)",
    )
    experiment: str | None = option(
        None, "the MLflow experiment; null: $MLFLOW_EXPERIMENT_NAME, else hvae"
    )
    run_name: str | None = option(None, "the MLflow run's name; null: the run directory's name")
    images: bool = option(
        True, "also log the sample and reconstruction grids as images (PNG), step = epoch"
    )
    layer_scalars: bool = option(True, LAYER_SCALARS_HELP)


@dataclass
class WandbOptions:
    project: str | None = option(None, "the W&B project; null: $WANDB_PROJECT, else hvae")
    entity: str | None = option(
        None, "the W&B entity (user or team); null: $WANDB_ENTITY, else your default entity"
    )
    run_name: str | None = option(
        None, "the W&B run's name; null: $WANDB_NAME, else the run directory's name"
    )
    mode: Literal["online", "offline", "disabled", "shared"] | None = option(
        None,
        "W&B's mode (offline: the run is written to disk only, for `wandb sync`); null: "
        "$WANDB_MODE or W&B's settings, else online",
    )
    images: bool = option(True, "also log the sample and reconstruction grids as images")
    layer_scalars: bool = option(True, LAYER_SCALARS_HELP)


@hookimpl
def register_trackers(register):  # noqa: ANN001 - the hook's register callable
    register(
        "tensorboard",
        "hvae_plugins.trackers.tensorboard:TensorBoardTracker",
        options=TensorBoardOptions,
        summary="TensorBoard event files in RUN_DIR/tensorboard: metrics, per-layer values, "
        "images, config",
    )
    register(
        "mlflow",
        "hvae_plugins.trackers.mlflow:MlflowTracker",
        options=MlflowOptions,
        summary="an MLflow run (RUN_DIR/mlflow, or $MLFLOW_TRACKING_URI): config as params, "
        'metrics per epoch, images; needs mlflow (pip install "hvae[mlflow]")',
    )
    register(
        "wandb",
        "hvae_plugins.trackers.wandb:WandbTracker",
        options=WandbOptions,
        summary="a Weights & Biases run (files in RUN_DIR/wandb; WANDB_MODE=offline works "
        'offline): config, metrics per epoch, images; needs wandb (pip install "hvae[wandb]")',
    )
