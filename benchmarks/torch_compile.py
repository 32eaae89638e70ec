"""PyTorch: eager against ``run.torch_compile``, and the memory layout of Keras' convolutions.

    python benchmarks/torch_compile.py                       # tiny, default, medium
    python benchmarks/torch_compile.py --models tiny,default --layouts eager --rounds 7
    python benchmarks/torch_compile.py --compile-models ""   # layouts only, no torch.compile

For each model (``tiny``: the tiny preset, 8x8x1; ``default``: the model of ``hvae train``'s
default job, its digits' 8x8x1 images; ``medium``: VDVAE's cifar10 block layout at width 32 and
about a quarter of its depth, 32x32x3 images), at ``--batch-size`` (default: the default job's),
two engines with the same weights run the real torch train step on random images: eager, and
through ``torch.compile``. The first step of each is timed apart (the compiled one's is the
compile: ``compile_s`` is the difference), and Dynamo's counters say how many graphs it made
of the loss and why it broke them. Then, in interleaved rounds so that a busy machine slows
every variant alike:

  eager         Keras' own convolution: NHWC permuted to NCHW, copied contiguous, then copied
                again into torch.channels_last memory (Keras 3's torch backend does both)
  eager_nchw    the convolution in plain NCHW memory (no channels_last copy)
  eager_direct  the NHWC tensor handed to the convolution as the channels_last view it already
                is (no copy at all)
  compiled      the torch.compile'd step

A micro-benchmark of one 3x3 convolution (forward and backward) at each model's width runs the
three layouts the same way. One JSON line per model, then a summary line of ratios against
eager (below 1: faster), with the number of steps after which the compile has paid for
itself, and the steps of the default job (``default_job_steps``: epochs times batches per
epoch) to compare it with. Only ratios from one run mean something on a shared machine. The
inductor cache is a fresh temporary directory (cold compile) unless ``--warm-cache``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

MODELS: dict[str, list[str]] = {
    "tiny": [],
    "default": [],
    "medium": [
        "model.stage_in_width=32",
        "model.enc_middle_width=8",
        "model.dec_middle_width=8",
        "model.z_out_width=32",
        "model.z_out_middle_width=8",
        "model.enc_num_blocks=[3, 2, 2, 1, 0, 1]",
        "model.dec_num_blocks=[5, 3, 2, 1, 0, 1]",
    ],
}
PRESET: dict[str, str | None] = {"tiny": "tiny", "default": None, "medium": "cifar10"}
CHANNELS = {"tiny": 1, "default": 1, "medium": 3}
DEFAULT_BATCH = 32  # the default job's training.batch_size
LAYOUTS = ("eager", "eager_nchw", "eager_direct")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models", default="tiny,default,medium", help="comma-separated: tiny,default,medium"
    )
    p.add_argument(
        "--compile-models",
        default="tiny,default",
        help="the models also run through torch.compile (medium: tens of CPU minutes)",
    )
    p.add_argument(
        "--layouts",
        default=",".join(LAYOUTS),
        help=f"the eager convolution layouts timed (comma-separated: {','.join(LAYOUTS)})",
    )
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per model")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    p.add_argument("--warm-cache", action="store_true", help="keep torch's inductor cache")
    return p.parse_args()


@contextlib.contextmanager
def conv_layout(name: str) -> Iterator[None]:
    """Keras' torch convolutions with the memory layout ``name`` (see the module's doc)."""
    from keras.src.backend.torch import nn

    saved = nn._transpose_spatial_inputs, nn._maybe_convert_to_channels_last
    if name == "eager_nchw":
        nn._maybe_convert_to_channels_last = lambda tensor: tensor
    elif name == "eager_direct":
        # A permuted NHWC tensor is already channels_last in memory: no copy at all.
        nn._transpose_spatial_inputs = lambda x: (
            x.permute(0, 3, 1, 2) if x.ndim == 4 else saved[0](x)
        )
    try:
        yield
    finally:
        nn._transpose_spatial_inputs, nn._maybe_convert_to_channels_last = saved


def build_engine(config: Any, shape: tuple[int, int, int]) -> Any:
    from hvae_core.plugins import get_registry
    from hvae_core.training import setup

    # The run's seed: the same weights for every engine of a model.
    return setup.build_engine(config, shape, 8, steps_per_epoch=1000, registry=get_registry())


def default_job_steps() -> int | None:
    """Train steps of ``hvae train``'s default job: epochs times batches per epoch (None: its
    dataset cannot be opened here)."""
    from hvae_core.config import resolve_config

    cfg = resolve_config()
    try:
        from hvae_core.data import open_dataset

        train = open_dataset(cfg).load("train")
    except Exception:  # no dataset here: the figure is informative only
        return None
    return cfg.training.epochs * (len(train) // cfg.training.batch_size)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def compile_stats() -> dict[str, Any]:
    """Where torch.compile's time went, and how many graphs Dynamo made of the step."""
    from torch._dynamo.utils import compile_times, counters

    times = dict(zip(*compile_times(repr="csv", aggregate=True), strict=True))
    seconds = {k: float(v) for k, v in times.items() if k != "Function"}
    return {
        "dynamo_total_s": round(seconds.get("_compile.compile_inner", 0.0), 1),
        "dynamo_tracing_s": round(seconds.get("bytecode_tracing", 0.0), 1),
        "backend_compile_s": round(seconds.get("OutputGraph.call_user_compiler", 0.0), 1),
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "break_reasons": sorted({k.splitlines()[0][:90] for k in counters["graph_break"]}),
        "frames_compiled": counters["frames"]["ok"],
    }


def conv_micro(width: int, size: int, batch: int, rounds: int) -> dict[str, float]:
    """Milliseconds of one 3x3 convolution's forward and backward, per layout."""
    import keras

    conv = keras.layers.Conv2D(width, 3, padding="same")
    x = keras.ops.convert_to_tensor(
        keras.random.normal((batch, size, size, width), seed=0)
    ).requires_grad_(True)
    conv.build(x.shape)

    def step() -> None:
        for _ in range(10):
            keras.ops.sum(conv(x)).backward()

    times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for _ in range(rounds):
        for name in LAYOUTS:
            with conv_layout(name):
                times[name].append(timed(step)[0] / 10)
    return {name: round(1000 * statistics.median(t), 3) for name, t in times.items()}


def measure(name: str, args: argparse.Namespace, compile_it: bool) -> dict[str, Any]:
    import keras
    import numpy as np
    import torch
    from torch._dynamo import utils as dynamo_utils

    from hvae_core.config import resolve_config

    dynamo_utils.counters.clear()  # compile_stats: this model's compile alone
    dynamo_utils.compilation_time_metrics.clear()
    overrides = MODELS[name]
    eager_cfg = resolve_config(PRESET[name], {"batch_size": args.batch_size}, overrides)
    shape = (eager_cfg.image_size, eager_cfg.image_size, CHANNELS[name])
    images = np.random.default_rng(0).integers(0, 256, (args.batch_size, *shape), dtype=np.uint8)
    engines = {"eager": build_engine(eager_cfg, shape)}
    if compile_it:
        compiled_cfg = resolve_config(
            PRESET[name], {"batch_size": args.batch_size}, [*overrides, "run.torch_compile=true"]
        )
        engines["compiled"] = build_engine(compiled_cfg, shape)
    first = {k: timed(lambda e=e: e.train_step(images, 1.0)) for k, e in engines.items()}
    row: dict[str, Any] = {
        "model": name,
        "image_shape": list(shape),
        "batch_size": args.batch_size,
        "parameters": engines["eager"].model.count_params(),
        "torch_threads": torch.get_num_threads(),
        "first_step_s": {k: round(t, 2) for k, (t, _) in first.items()},
    }
    if compile_it:
        losses = [first[k][1]["loss"] for k in ("eager", "compiled")]
        row["first_loss_rel_diff"] = abs(losses[1] - losses[0]) / abs(losses[0])
        row["compile"] = compile_stats()
    layouts = [v for v in LAYOUTS if v in args.layouts.split(",")] or ["eager"]
    variants = [*layouts, *(["compiled"] if compile_it else [])]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            engine = engines["compiled" if variant == "compiled" else "eager"]
            layout = "eager" if variant == "compiled" else variant
            with conv_layout(layout):
                seconds, _ = timed(
                    lambda e=engine: [e.train_step(images, 1.0) for _ in range(args.steps)]
                )
            times[variant].append(seconds / args.steps)
    if compile_it:  # a recompile during the rounds would show here
        row["graphs_after_rounds"] = compile_stats()["graphs"]
    row["step_ms"] = {v: round(1000 * statistics.median(t), 1) for v, t in times.items()}
    row["steps_per_s"] = {v: round(1000 / ms, 2) for v, ms in row["step_ms"].items()}
    width = max(eager_cfg.model.stage_in_width)
    if len(layouts) > 1:
        row["conv3x3_ms"] = conv_micro(width, shape[0], args.batch_size, args.rounds)
    keras.backend.clear_session()
    return row


def ratios(row: dict[str, Any]) -> dict[str, float]:
    """Each variant's step time, and the first compiled step's, over eager's (1: no change)."""
    eager = row["step_ms"]["eager"]
    out = {f"{v}/eager_step": round(ms / eager, 3) for v, ms in row["step_ms"].items()}
    conv = row.get("conv3x3_ms", {})
    out |= {f"{v}/eager_conv": round(ms / conv["eager"], 3) for v, ms in conv.items()}
    if "compiled" in row["first_step_s"]:
        first = row["first_step_s"]
        out["compiled_first_step/eager_first_step"] = round(first["compiled"] / first["eager"], 1)
        saved = (row["step_ms"]["eager"] - row["step_ms"]["compiled"]) / 1000
        compile_cost = first["compiled"] - first["eager"]
        out["compile_s"] = round(compile_cost, 1)
        # JSON has no infinity: None when the compiled step is not faster (never repaid).
        out["steps_to_repay_compile"] = round(compile_cost / saved) if saved > 0 else None
    return out


def main() -> None:
    args = parse()
    os.environ["KERAS_BACKEND"] = "torch"
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="hvae-inductor-")
    compile_models = set(filter(None, args.compile_models.split(",")))
    summary = {}
    for name in filter(None, args.models.split(",")):
        if name not in MODELS:
            sys.exit(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")
        row = measure(name, args, name in compile_models)
        print(json.dumps(row), flush=True)
        summary[name] = ratios(row)
    print(json.dumps({"summary": summary, "default_job_steps": default_job_steps()}), flush=True)


if __name__ == "__main__":
    main()
