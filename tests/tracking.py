"""Test doubles of experiment trackers, and the readers of what the first-party trackers wrote:
TensorBoard's of event files, MLflow's client of its store, and W&B's protocol buffers of an
offline run's records."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from hvae_core.cli import cli


class StrictTracker:
    """Exactly the Protocol's signatures (no defaults, no **kwargs), so that a call that
    strays from the contract fails. It records every call in ``calls``."""

    def __init__(self, calls: list[tuple[str, Any]]) -> None:
        self.calls = calls

    def start(self, config: dict[str, Any], first_epoch: int) -> None:
        self.calls.append(("start", (config, first_epoch)))

    def log_epoch(self, row: dict[str, Any], images: dict[str, np.ndarray]) -> None:
        self.calls.append(("log_epoch", (row, images)))
        row["epoch"] = -1  # the tracker's own copy: no other tracker may see this

    def close(self) -> None:
        self.calls.append(("close", ()))


class FailingTracker(StrictTracker):
    def log_epoch(self, row: dict[str, Any], images: dict[str, np.ndarray]) -> None:
        super().log_epoch(row, images)
        raise RuntimeError("the server is down\n(details)")


def factory_for(calls: list, made: list, cls: type = StrictTracker) -> Any:
    """A tracker factory with exactly the contract's signature; ``made`` records its calls."""

    def factory(options, run, *, run_dir):  # noqa: ANN001, ANN202 - the contract, untyped
        made.append((options, run, run_dir))
        return cls(calls)

    return factory


def events(logdir: Path) -> Any:
    """Everything TensorBoard would show from ``logdir``, read by TensorBoard itself."""
    pytest.importorskip("tensorboard", reason="TensorBoard reads the event files back")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    everything = {"scalars": 0, "images": 0, "tensors": 0, "histograms": 0}
    reader = EventAccumulator(str(logdir), size_guidance=everything)
    reader.Reload()
    return reader


def scalars(reader: Any, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in reader.Scalars(tag)}


def config_text(reader: Any) -> dict[int, Any]:
    """The config that the tensorboard tracker wrote as text, by step, as YAML again."""
    out = {}
    for event in reader.Tensors("config/text_summary"):
        text = event.tensor_proto.string_val[0].decode()
        out[event.step] = yaml.safe_load("\n".join(line[4:] for line in text.splitlines()))
    return out


# --- MLflow: its own client reads its store back ---------------------------------------------


def mlflow_client(tracking_uri: str) -> Any:
    pytest.importorskip("mlflow", reason="MLflow reads its store back")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def mlflow_history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every value logged under ``key``, in the order they were logged."""
    metrics = client.get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(metrics, key=lambda m: m.timestamp)]


# MLflow names a stepped image images/KEY<sep>step<sep>STEP<sep>timestamp<sep>...; the
# separator was % before MLflow 3, and is + since.
STEPPED_IMAGE = re.compile(
    r"^(?P<key>[\w.\- ~]+)[+%]step[+%](?P<step>\d+)[+%].*(?<!compressed)\.png$"
)


def mlflow_images(client: Any, run_id: str, dst: Path) -> dict[tuple[str, int], np.ndarray]:
    """The full-size PNGs that ``log_image(key=, step=)`` logged, by (key, step), as pixels,
    downloaded by MLflow's client."""
    out = {}
    for info in client.list_artifacts(run_id, "images"):
        match = STEPPED_IMAGE.match(Path(info.path).name)
        if match:
            local = client.download_artifacts(run_id, info.path, str(dst))
            key = match["key"].replace("~", "/")
            assert (key, int(match["step"])) not in out, info.path
            out[key, int(match["step"])] = np.asarray(Image.open(local))
    return out


# --- W&B: the records of an offline run -------------------------------------------------------
# An offline run keeps everything it would upload in RUN-ID.wandb, W&B's transaction log (W&B
# writes wandb-summary.json and config.yaml only where it syncs): records of W&B's own protocol
# buffer, wandb.proto.wandb_internal_pb2.Record, framed as LevelDB's log format (blocks of
# 32 KiB, each record in chunks with a 7-byte header: checksum, length, type) after a 7-byte
# file header (":W&B", a magic number, a version).

LEVELDB_BLOCK = 32768
LEVELDB_CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def leveldb_records(data: bytes) -> list[bytes]:
    assert data[:4] == b":W&B", data[:7]
    records, pending, pos = [], b"", 7
    while pos + LEVELDB_CHUNK_HEADER <= len(data):
        left = LEVELDB_BLOCK - pos % LEVELDB_BLOCK
        if left < LEVELDB_CHUNK_HEADER:  # a block's tail too short for a header: padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + LEVELDB_CHUNK_HEADER])
        chunk = data[pos + LEVELDB_CHUNK_HEADER : pos + LEVELDB_CHUNK_HEADER + length]
        pos += LEVELDB_CHUNK_HEADER + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    return records


@dataclass
class OfflineRun:
    """What one session of a W&B run recorded offline."""

    folder: Path
    run_id: str = ""
    project: str = ""
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per step
    summary: dict[str, Any] = field(default_factory=dict)  # the last value of each key

    def media(self, row: dict[str, Any], key: str) -> np.ndarray:
        """The pixels of the image that ``row`` (of the history) logged under ``key``."""
        assert row[key]["_type"] == "image-file", row[key]
        return np.asarray(Image.open(self.folder / "files" / row[key]["path"]))


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Every offline run under ``wandb_dir`` (a folder W&B named ``wandb``), oldest first."""
    pytest.importorskip("wandb", reason="W&B's protocol buffers read its records")
    from wandb.proto.wandb_internal_pb2 import Record

    runs = []
    for folder in sorted(wandb_dir.glob("offline-run-*")):
        run = OfflineRun(folder)
        [log] = folder.glob("run-*.wandb")
        for data in leveldb_records(log.read_bytes()):
            record = Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.run_id, run.project = record.run.run_id, record.run.project
                run.name = record.run.display_name
                for item in record.run.config.update:
                    run.config[_item_key(item)] = json.loads(item.value_json)
            elif kind == "config":
                for item in record.config.update:
                    run.config[_item_key(item)] = json.loads(item.value_json)
            elif kind == "history":
                row: dict[str, Any] = {}
                for item in record.history.item:
                    _set_nested(row, item)
                run.history.append(row)
            elif kind == "summary":
                for item in record.summary.update:
                    _set_nested(run.summary, item)
        runs.append(run)
    return runs


def _set_nested(out: dict[str, Any], item: Any) -> None:
    """An item's value at its key, or at its nested key (an image: samples -> path, ...)."""
    path = list(item.nested_key) or [item.key]
    for part in path[:-1]:
        out = out.setdefault(part, {})
    out[path[-1]] = json.loads(item.value_json)


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def one_line_error(result, fragment: str) -> None:
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
