"""Skipped updates of a small VDVAE-layout model under the cifar10 preset's optimisation.

    KERAS_BACKEND=jax python benchmarks/skip_check.py --steps 300 --seeds 0 1 2

The digits (8x8, as 8-bit RGB, as in issue 15's side-by-side run) train through the real
engine with the cifar10 preset's settings (AdamW, lr 2e-4 after a 100-step warm-up, beta2 0.9,
weight decay 0.01, EMA 0.9999, clip 200, skip 400, scale_fn exp) on a width-64 model whose
blocks follow VDVAE's CIFAR-10 layout, scaled down: encoder 8x3,8d2,4x3,4d4,1x3; decoder
1x1,4m1,4x2,8m4,8x3. Each seed runs twice from the same initial state and batches: with the
thresholds on the nats scale (VDVAE's, the default) and on the bits scale (hvae before
issue 15). Prints one JSON object: skipped updates per seed and convention, the largest
gradient norm, and the mean train loss of the last 50 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import time

MODEL = [
    "model.stage_in_width=64",
    "model.enc_middle_width=16",
    "model.dec_middle_width=16",
    "model.z_width=16",
    "model.z_out_width=64",
    "model.z_out_middle_width=16",
    "model.enc_num_blocks=[4, 4, 0, 3]",
    "model.dec_num_blocks=[4, 3, 0, 1]",
]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="updates per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=32, help="the cifar10 preset's")
    p.add_argument("--units", nargs="+", default=["nats", "bits"], choices=["nats", "bits"])
    p.add_argument("--set", dest="overrides", action="append", default=[], help="as for hvae")
    return p.parse_args()


def digits_rgb():
    """The digits as 8-bit RGB: 4-bit levels times 17, in three equal channels."""
    import numpy as np
    from hvae_plugins.datasets.digits import digits_images

    levels = digits_images().astype(np.uint8) * 17
    return np.repeat(levels, 3, axis=-1)


def main() -> None:
    args = parse()
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras
    import numpy as np

    from hvae_core.config import resolve_config
    from hvae_core.training.setup import build_engine

    images = digits_rgb()
    batches_per_epoch = len(images) // args.batch_size
    base = ["run.jit=true", f"training.batch_size={args.batch_size}", *MODEL, *args.overrides]

    def build(unit: str, seed: int):
        cfg = resolve_config(
            "cifar10",
            {"dataset": "digits", "seed": seed},
            [*base, f"training.grad_norm_unit={unit}"],
        )
        return cfg, build_engine(cfg, (8, 8, 3), 8, steps_per_epoch=batches_per_epoch)

    # One compiled engine per convention; each seed's initial state is loaded into it.
    engines = {unit: build(unit, 0) for unit in args.units}
    cfg = engines[args.units[0]][0]
    result: dict = {
        "backend": keras.backend.backend(),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "parameters": engines[args.units[0]][1].model.count_params(),
        "settings": {
            k: getattr(cfg.training, k)
            for k in (
                "optimizer",
                "learning_rate",
                "adam_beta2",
                "weight_decay",
                "ema_rate",
                "gradient_clipnorm",
                "gradient_skipnorm",
            )
        }
        | {"scale_fn": cfg.model.scale_fn, "warmup_steps": cfg.options("lr-schedule").warmup_steps},
        "runs": {},
    }
    for seed in args.seeds:
        initial = build(args.units[0], seed)[1].state()
        for unit, (_, engine) in engines.items():
            engine.load_state(initial)
            rng = np.random.default_rng(seed)
            order = np.concatenate(
                [rng.permutation(len(images)) for _ in range(args.steps // batches_per_epoch + 1)]
            )
            skipped, norms, losses = 0, [], []
            t0 = time.perf_counter()
            for step in range(args.steps):
                batch = images[order[step * args.batch_size : (step + 1) * args.batch_size]]
                m = engine.train_step(batch, 1.0)
                skipped += int(m["skipped"] > 0)
                norms.append(m["grad_norm"])
                losses.append(m["elbo_bpd"])
            result["runs"][f"seed{seed}_{unit}"] = {
                "skipped": skipped,
                "max_grad_norm": round(float(np.nanmax(norms)), 1),
                "grad_norm_unit": unit,
                "train_bpd_last50": round(float(np.nanmean(losses[-50:])), 3),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            print(f"seed {seed} {unit}: {result['runs'][f'seed{seed}_{unit}']}", flush=True)
    result["skipped"] = {
        unit: [result["runs"][f"seed{s}_{unit}"]["skipped"] for s in args.seeds]
        for unit in args.units
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
