"""``run.torch_compile``: Dynamo traces the train step's loss as one graph, without breaks.

A graph break splits the compiled loss into several graphs with Python in between (the step
before the noise change broke 21 times on the tiny preset). Each check counts graphs and breaks
with ``torch._dynamo.explain`` in a fresh torch process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from backends import run_on_backend

EXPLAIN = """
import torch

def explained(fn, *args):
    report = torch._dynamo.explain(fn)(*args)
    reasons = " | ".join(r.reason.splitlines()[0] for r in report.break_reasons)
    return np.array([report.graph_count, report.graph_break_count]), reasons
"""

PARTS_SCRIPT = (
    EXPLAIN
    + """
from keras import ops
from hvae_core.model.pixels import level_table, to_unit_range
from hvae_core.model.repeat import current_loop, loop_with

images = ops.convert_to_tensor(inputs["images"])
table = ops.convert_to_tensor(level_table(8))

def pixels(x):
    return to_unit_range(x, 8, table) * 2.0

def loop(x):
    with loop_with(None):
        return x + 1.0 if current_loop() is None else x

outputs["pixels"], outputs["pixels_reasons"] = explained(pixels, images)
outputs["pixels_values"] = ops.convert_to_numpy(pixels(images))
outputs["loop"], outputs["loop_reasons"] = explained(loop, images.float())
"""
)


def test_the_loss_parts_that_broke_the_graph_trace_as_one_graph(tmp_path: Path) -> None:
    """The pixel table made inside the traced loss (a NumPy array Keras cannot take there) and
    the repeated blocks' loop setting (a ContextVar, which Dynamo cannot trace at all)."""
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1) * 5
    out = run_on_backend("torch", PARTS_SCRIPT, {"images": images}, tmp_path, timeout=600)
    assert out["pixels"].tolist() == [1, 0], str(out["pixels_reasons"])
    assert out["loop"].tolist() == [1, 0], str(out["loop_reasons"])
    expected = (2.0 * images.astype(np.float64) / 255 - 1.0).astype(np.float32) * 2.0
    np.testing.assert_array_equal(out["pixels_values"], expected)


LOSS_SCRIPT = (
    EXPLAIN
    + """
from keras import ops
from hvae_core.config import resolve_config
from hvae_core.training.setup import build_engine

cfg = resolve_config("tiny", {"batch_size": 8}, ["run.torch_compile=true"])
engine = build_engine(cfg, (8, 8, 1), 8, steps_per_epoch=10)
images = ops.convert_to_tensor(inputs["images"])
noise = torch.randn(8, engine.latent_dims)
outputs["loss"], outputs["reasons"] = explained(
    engine.module, images, torch.tensor(1.0), noise
)
"""
)


# Dynamo traces Keras' Python for about a minute on a 2-core CPU.
@pytest.mark.slow
def test_the_tiny_models_loss_is_one_graph_without_breaks(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
    out = run_on_backend("torch", LOSS_SCRIPT, {"images": images}, tmp_path, timeout=1800)
    assert out["loss"].tolist() == [1, 0], str(out["reasons"])
