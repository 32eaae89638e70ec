"""Test doubles of experiment trackers, and TensorBoard's own reader of event files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml


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
