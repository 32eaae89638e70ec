"""Train-step throughput: images/second, step time and peak memory of compiled train steps.

    python benchmarks/train_throughput.py --config cifar10 --backend jax --batch-size 32

Random images of the preset's shape go through the real engine (the same compiled step that
``hvae train`` runs); the first steps (compilation) are timed apart and excluded. Prints one
JSON line. Works on CPU and GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", help="preset or YAML file")
    p.add_argument("--backend", choices=["tensorflow", "jax", "torch"], default="tensorflow")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    p.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        help="data-parallel devices (on a CPU: virtual JAX devices, logical TensorFlow "
        "devices, gloo processes for torch); --batch-size is the global batch",
    )
    p.add_argument("--channels", type=int, default=None, help="default: the dataset's, else 3")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="SECTION.KEY=VALUE, as for hvae",
    )
    return p.parse_args()


def peak_memory_mb(backend: str) -> dict[str, float]:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        if backend == "jax":
            import jax

            stats = jax.devices()[0].memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                out["peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20
        elif backend == "torch":
            import torch

            if torch.cuda.is_available():
                out["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                info = tf.config.experimental.get_memory_info("GPU:0")
                out["peak_device_mb"] = info["peak"] / 2**20
    except Exception:  # device statistics are best effort
        pass
    return out


def main() -> None:
    args = parse()
    os.environ["KERAS_BACKEND"] = args.backend
    if args.backend == "jax" and args.devices > 1 and "WORLD_SIZE" not in os.environ:
        # Virtual CPU devices; accelerators, where present, are used instead.
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import numpy as np

    from hvae_core.config import resolve_config

    flags = {"batch_size": args.batch_size, "backend": args.backend}
    cfg = resolve_config(args.config, flags, args.overrides)
    channels = args.channels
    if channels is None:
        try:
            from hvae_core.data import open_dataset

            channels = open_dataset(cfg).image_shape[2]
        except Exception:  # no dataset files here: random data needs only a shape
            channels = 3
    import keras

    from hvae_core.backends.engine import setup_parallel
    from hvae_core.backends.parallel import Relaunch, launch_from_env
    from hvae_core.training.setup import build_engine

    try:
        parallel = setup_parallel(args.devices, launch_from_env(), 120)
    except Relaunch as relaunch:  # torch: one process per device
        sys.exit(relaunch.run(sys.argv))
    size, batch = cfg.image_size, cfg.training.batch_size
    # Every process starts from the same weights (the run's seed).
    engine = build_engine(cfg, (size, size, channels), 8, steps_per_epoch=1000, parallel=parallel)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, channels), dtype=np.uint8)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        engine.train_step(images, 1.0)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.train_step(images, 1.0)  # returns host floats: each step is complete
    seconds = time.perf_counter() - t0
    row = {
        "config": args.config,
        "backend": keras.backend.backend(),
        "batch_size": batch,
        "batch_size_div": cfg.training.batch_size_div,
        "devices": parallel.replicas,
        "image_shape": [size, size, channels],
        "parameters": engine.model.count_params(),
        "jit": cfg.run.jit,
        "precision": cfg.model.precision,
        "warmup_seconds": round(compile_s, 2),
        "step_ms": round(1000 * seconds / args.steps, 2),
        "images_per_second": round(batch * args.steps / seconds, 2),
        **{k: round(v, 1) for k, v in peak_memory_mb(args.backend).items()},
    }
    if parallel.is_chief:
        print(json.dumps(row))
        sys.stdout.flush()
    parallel.close()


if __name__ == "__main__":
    main()
