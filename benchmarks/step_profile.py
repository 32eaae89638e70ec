"""Where a train step's compile time and step time go, against a plain stack of the same blocks.

    python benchmarks/step_profile.py --config cifar10 --backend jax --batch-size 4
    python benchmarks/step_profile.py --config cifar10 --depths 0.5,1,2 --variants hvae
    python benchmarks/step_profile.py --config cifar10 --variants hvae,unstacked,plain --ops

Variants, each trained by the same engine (optimizer, clipping, skipping, EMA) on random images
of the preset's shape:
  hvae       the model as ``hvae train`` builds it (repeated blocks as loops over stacked weights)
  unstacked  the same model with one set of weights per block, applied one by one
  plain      a plain Keras stack of the same bottleneck blocks (the encoder's, then three per
             top-down block: prior, posterior, residual), pooling and unpooling between scales,
             a squared-error loss: what the residual blocks alone cost
``--depths`` multiplies every scale's block counts (compile time against depth). ``--ops`` (JAX)
counts the step's operations by where they come from (blocks, noise sampling, KL and Gaussians,
the DMoL likelihood, optimizer, the step's norm/clip/skip/EMA) and times the compilation of the
loss alone and of loss plus gradients. One JSON line per variant and depth, then a summary line
with the ratios of this run (the machine is shared: ratios mean something, absolute times less).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections import Counter
from typing import Any


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="cifar10", help="preset or YAML file")
    p.add_argument("--backend", choices=["tensorflow", "jax", "torch"], default="jax")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    p.add_argument("--variants", default="hvae,plain", help="comma-separated: hvae,unstacked,plain")
    p.add_argument("--depths", default="1", help="comma-separated block-count multipliers")
    p.add_argument("--ops", action="store_true", help="JAX: operation counts and piece compiles")
    p.add_argument("--precision", default=None, help="float32 or mixed_bfloat16")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="as for hvae")
    return p.parse_args()


def scaled(counts: list[int], factor: float) -> list[int]:
    return [max(1, round(c * factor)) if c else 0 for c in counts]


def plain_stack(config: Any, image_shape: tuple[int, int, int]) -> Any:
    """The bottleneck blocks of ``config``'s model as one plain Keras stack."""
    import keras
    from keras import ops

    from hvae_core.model.blocks import ResidualBlock
    from hvae_core.model.layout import scales

    model_cfg = config.model
    layout = scales(model_cfg, config.resolutions)

    class PlainStack(keras.Model):
        def __init__(self) -> None:
            super().__init__(dtype=model_cfg.precision)
            self.num_bits = 8
            policy = self.dtype_policy
            act = model_cfg.b_act
            self.stem = keras.layers.Conv2D(layout[0].width, 3, padding="same", dtype=policy)
            self.down, self.up = [], []

            def block(s: Any, middle: int) -> Any:
                return ResidualBlock(
                    s.width, middle, s.width, s.kernel_size, activation=act, dtype=policy
                )

            for s in layout:
                self.down.append(("resize", s))
                self.down += [block(s, s.enc_middle_width) for _ in range(s.enc_blocks)]
            for s in reversed(layout):
                self.up.append(("unpool", s))
                self.up += [block(s, s.dec_middle_width) for _ in range(3 * s.dec_blocks)]
            # 1x1 convolutions where the width may change between scales
            self.resizes = [keras.layers.Conv2D(s.width, 1, dtype=policy) for s in layout]
            self.resizes_down = [keras.layers.Conv2D(s.width, 1, dtype=policy) for s in layout]
            self.head = keras.layers.Conv2D(image_shape[2], 1, dtype=policy)
            self.blocks = [b for b in self.down + self.up if not isinstance(b, tuple)]

        def call(self, x: Any) -> Any:
            h = self.stem(x)
            for item in self.down:
                if isinstance(item, tuple):
                    kind, s = item
                    if kind == "resize":
                        while h.shape[1] > s.resolution:
                            h = ops.average_pool(h, 2, 2)
                        h = self.resizes_down[s.index](h)
                    continue
                h = item(h)
            for item in self.up:
                if isinstance(item, tuple):
                    s = item[1]
                    while h.shape[1] < s.resolution:
                        h = ops.repeat(ops.repeat(h, 2, axis=1), 2, axis=2)
                    h = self.resizes[s.index](h)
                    continue
                h = item(h)
            return self.head(h)

        def build_weights(self) -> None:
            self(ops.zeros((1, *image_shape)))

        def losses_for(self, x: Any, **_: Any) -> dict[str, Any]:
            loss = ops.mean(ops.square(ops.cast(self(x), "float32") - x))
            return {"loss": loss}

    return PlainStack()


def classify(eqn: Any) -> str:
    """Where an operation of the step comes from, by the source lines that made it."""
    frames = [f.file_name for f in eqn.source_info.traceback.frames]
    joined = " ".join(frames)
    if "keras/src/optimizers" in joined:
        return "optimizer"
    if "keras/src/random" in joined:
        return "noise sampling"
    for name in frames:
        if "hvae_core" not in name and "benchmarks" not in name:
            continue
        base = os.path.basename(name)
        if base == "likelihood.py":
            return "DMoL likelihood"
        if base == "distributions.py":
            return "Gaussians and KL"
        if base in ("blocks.py", "step_profile.py"):
            return "residual blocks"
        if base == "decoder.py":
            return "top-down bookkeeping"
        if base in ("encoder.py", "resample.py", "heads.py"):
            return "encoder, resampling, head"
        if base == "repeat.py":
            return "loops over stacked weights"
        if base == "hvae.py":
            return "loss assembly"
        if base.startswith("engine"):
            return "step: norm, clip, skip, EMA, accumulation"
    return "other"


def count_ops(jaxpr: Any, counts: Counter) -> None:
    for eqn in jaxpr.eqns:
        counts[classify(eqn)] += 1
        for sub in eqn.params.values():
            for j in sub if isinstance(sub, list | tuple) else [sub]:
                inner = getattr(j, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    count_ops(inner, counts)
                elif hasattr(j, "eqns"):
                    count_ops(j, counts)


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def jax_pieces(engine: Any, images: Any) -> dict[str, Any]:
    import jax
    import numpy as np

    tv, ntv, ov, ema = engine.state_arrays
    x = engine._put(images)
    beta, skip = np.float32(1.0), np.float32(0.0)
    out: dict[str, Any] = {}
    jaxpr = jax.make_jaxpr(engine._train_impl)(engine.state_arrays, x, beta, skip)
    counts: Counter = Counter()
    count_ops(jaxpr.jaxpr, counts)
    out["ops_total"] = sum(counts.values())
    out["ops_by_source"] = dict(counts.most_common())

    def loss(tv: Any, ntv: Any, x: Any) -> Any:
        return engine._loss(tv, ntv, x, beta, True)[0]

    for name, fn in (("loss", loss), ("loss_and_grad", jax.grad(loss))):
        lowered, lower_s = timed(lambda fn=fn: jax.jit(fn).lower(tv, ntv, x))
        _, compile_s = timed(lowered.compile)
        out[f"{name}_compile_s"] = round(lower_s + compile_s, 2)
    return out


def profile(args: argparse.Namespace, variant: str, depth: float) -> dict[str, Any]:
    import keras
    import numpy as np

    from hvae_core.backends.engine import make_engine
    from hvae_core.backends.select import set_random_seed
    from hvae_core.config import resolve_config
    from hvae_core.model.hvae import HVAE
    from hvae_core.plugins import get_registry
    from hvae_core.training.optim import make_optimizer

    flags = {"batch_size": args.batch_size, "backend": args.backend}
    base = resolve_config(args.config, flags, args.overrides)
    overrides = list(args.overrides)
    if args.precision:
        overrides.append(f"model.precision={args.precision}")
    if depth != 1:
        overrides.append(f"model.enc_num_blocks={scaled(base.model.enc_num_blocks, depth)}")
        overrides.append(f"model.dec_num_blocks={scaled(base.model.dec_num_blocks, depth)}")
    cfg = resolve_config(args.config, flags, overrides)
    size = cfg.image_size
    shape = (size, size, 3)
    set_random_seed(0)
    if variant == "plain":
        model = plain_stack(cfg, shape)
    else:
        model = HVAE(cfg, shape, 8, seed=0, stack_blocks=variant == "hvae")
    model.build_weights()
    engine = make_engine(model, make_optimizer(cfg, 1000, get_registry()), cfg)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size, *shape), dtype=np.uint8)
    _, first_s = timed(lambda: engine.train_step(images, 1.0))
    _, steps_s = timed(lambda: [engine.train_step(images, 1.0) for _ in range(args.steps)])
    step_s = steps_s / args.steps
    row: dict[str, Any] = {
        "variant": variant,
        "backend": keras.backend.backend(),
        "config": args.config,
        "depth": depth,
        "enc_blocks": sum(cfg.model.enc_num_blocks),
        "dec_blocks": sum(cfg.model.dec_num_blocks),
        "batch_size": args.batch_size,
        "precision": cfg.model.precision,
        "parameters": int(model.count_params()),
        "variables": len(model.trainable_variables),
        "compile_s": round(first_s - step_s, 2),
        "step_ms": round(1000 * step_s, 1),
        "images_per_second": round(args.batch_size / step_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if args.ops and args.backend == "jax":
        row.update(jax_pieces(engine, images))
    return row


def main() -> None:
    args = parse()
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rows = []
    for depth in [float(d) for d in args.depths.split(",")]:
        for variant in args.variants.split(","):
            row = profile(args, variant, depth)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary: dict[str, Any] = {"summary": True}
    by = {(r["variant"], r["depth"]): r for r in rows}
    for (variant, depth), r in by.items():
        plain = by.get(("plain", depth))
        if variant != "plain" and plain:
            key = f"{variant}_vs_plain_depth_{depth:g}"
            summary[key] = {
                "compile": round(r["compile_s"] / plain["compile_s"], 2),
                "time_per_image": round(r["step_ms"] / plain["step_ms"], 2),
            }
    hvae_rows = sorted((r for r in rows if r["variant"] == "hvae"), key=lambda r: r["depth"])
    if len(hvae_rows) > 1:
        first = hvae_rows[0]
        summary["hvae_compile_growth"] = {
            f"x{r['depth'] / first['depth']:g} blocks": round(
                r["compile_s"] / first["compile_s"], 2
            )
            for r in hvae_rows[1:]
        }
    print(json.dumps(summary), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
