"""The ``mlflow`` tracker: one MLflow run per hvae run, step = epoch.

Where runs go: ``tracker.mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a store
of the run's own in ``RUN_DIR/mlflow``: an SQLite database (``mlflow.db``, MLflow's default
kind of store since the file store went into maintenance, which MLflow 3 refuses to open
unless told) and the artifacts beside it (``artifacts/``). The MLflow run's id is kept in
``RUN_DIR/mlflow/run.json``, so ``hvae train --resume`` continues the same MLflow run.

Written through :class:`mlflow.MlflowClient` alone (no global active run, no autologging), so
the official light package ``mlflow-skinny`` is enough; its SQLite store also needs
``sqlalchemy`` and ``alembic`` (the ``mlflow`` extra of hvae installs the three).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hvae_core import HvaeError

from .rows import scalars

INSTALL = 'pip install "hvae[mlflow]"'

try:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunStatus, RunTag
    from mlflow.exceptions import MlflowException
except ImportError as exc:
    raise HvaeError(
        "the mlflow tracker needs the package mlflow (or mlflow-skinny), which is not installed",
        hint=INSTALL,
    ) from exc

try:  # the installed client's limit; a server of MLflow 2.x or later takes as much
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
except ImportError:  # pragma: no cover - moved in some later MLflow
    MAX_PARAM_VAL_LENGTH = 6000

FOLDER = "mlflow"
STATE_FILE = "run.json"  # {"run_id": ..., "tracking_uri": ... (null: the store in FOLDER)}
DATABASE = "mlflow.db"
ARTIFACTS = "artifacts"
DEFAULT_EXPERIMENT = "hvae"
RUN_DIR_TAG = "hvae.run_dir"
# MLflow never changes a param: a resume that changes a setting records the new value here.
CHANGED_TAG = "hvae.config."
TRUNCATED = "..."


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping with dotted keys (``model.z_width``); an empty one (a
    plugin without options) has no key."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def param_value(value: Any) -> str:
    """A config value as MLflow keeps a param, a string: strings as they are, anything else as
    JSON (``true``, ``null``, ``[8, 16]``), cut to the length MLflow takes."""
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) > MAX_PARAM_VAL_LENGTH:
        text = text[: MAX_PARAM_VAL_LENGTH - len(TRUNCATED)] + TRUNCATED
    return text


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """MLflow's INFO lines ("Creating initial MLflow database tables...") and alembic's, and
    SQLAlchemy's deprecation warnings about MLflow's own code, while a store opens."""
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _sqlite_uri(path: Path) -> str:
    # SQLAlchemy escapes the path as its version reads it back (2.1 URL-decodes it).
    from sqlalchemy.engine import URL

    return URL.create("sqlite", database=path.resolve().as_posix()).render_as_string()


class MlflowTracker:
    """The resolved config as params with dotted keys; every number of the metrics row as a
    metric at step = epoch (list elements as ``KEY/00``, ...); the image grids as images at
    step = epoch; the config as the artifact ``config.yaml``; the run directory as a tag."""

    def __init__(self, options: Any, run: Any, *, run_dir: Path) -> None:
        self.options = options
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / FOLDER
        self.state_path = self.folder / STATE_FILE
        # null: the store in the run directory, which moves with it
        self.chosen_uri: str | None = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.folder.mkdir(exist_ok=True)
        with _quiet():
            self.client = MlflowClient(tracking_uri=self._uri())
            self.run_id = self._continued_run() or self._new_run()
        self.state_path.write_text(
            json.dumps({"run_id": self.run_id, "tracking_uri": self.chosen_uri}) + "\n"
        )

    def _uri(self) -> str:
        if self.chosen_uri is not None:
            return self.chosen_uri
        missing = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
        if missing:
            raise HvaeError(
                f"the mlflow tracker's store in the run directory (SQLite) needs "
                f"{' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                "installed",
                hint=f"{INSTALL}, or set tracker.mlflow.tracking_uri (or MLFLOW_TRACKING_URI) "
                "to an MLflow server",
            )
        return _sqlite_uri(self.folder / DATABASE)

    def _continued_run(self) -> str | None:
        """The MLflow run of an earlier session of this hvae run, in this same store."""
        try:
            state = json.loads(self.state_path.read_text())
            run_id, uri = state["run_id"], state["tracking_uri"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if uri != self.chosen_uri:
            return None  # another store: the run starts over there
        try:
            found = self.client.get_run(run_id)
        except MlflowException:
            return None  # deleted from the store since
        if found.info.lifecycle_stage != "active":
            return None
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id

    def _new_run(self) -> str:
        name = (
            self.options.experiment
            or os.environ.get("MLFLOW_EXPERIMENT_NAME")
            or DEFAULT_EXPERIMENT
        )
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = None
            if self.chosen_uri is None:  # the store's own artifacts go beside it
                location = (self.folder / ARTIFACTS).resolve().as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        tags = {RUN_DIR_TAG: str(self.run_dir.resolve())}
        created = self.client.create_run(
            experiment_id, run_name=self.options.run_name or self.run_dir.name, tags=tags
        )
        return created.info.run_id

    def start(self, config: dict[str, Any], first_epoch: int) -> None:
        logged = self.client.get_run(self.run_id).data.params
        params, changed = [], []
        for key, value in flatten(config).items():
            text = param_value(value)
            if key not in logged:
                params.append(Param(key, text))
            elif logged[key] != text:
                changed.append(RunTag(CHANGED_TAG + key, text))
        self.client.log_batch(self.run_id, params=params, tags=changed, synchronous=True)
        text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
        self.client.log_text(self.run_id, text, "config.yaml")

    def log_epoch(self, row: dict[str, Any], images: dict[str, np.ndarray]) -> None:
        epoch, now = int(row["epoch"]), _now_ms()
        numbers = scalars(row, layer_scalars=self.options.layer_scalars)
        metrics = [Metric(key, value, now, epoch) for key, value in numbers.items()]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        if self.options.images:
            for name, grid in images.items():
                self.client.log_image(
                    self.run_id, np.asarray(grid), key=name, step=epoch, synchronous=True
                )

    def close(self) -> None:
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))
