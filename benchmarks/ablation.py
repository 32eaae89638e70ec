"""What each plugin buys on a job: the default job, each plugin alone and combined, N seeds.

    python benchmarks/ablation.py                                  # 3 seeds, 300 epochs
    python benchmarks/ablation.py --seeds 1 --epochs 30 --backend jax
    python benchmarks/ablation.py --variants plain,conv-sylvester --iw-samples 1000
    python benchmarks/ablation.py --set regularizer.cr_flip=false --out ablation.json

Every (variant, seed) is a fresh ``hvae train --quiet`` subprocess in a temporary save
directory, run one after another so that they do not share the cores, followed by
``hvae evaluate RUN --split val --iw-samples K --json`` (EMA weights, as every evaluation).
Per run: the final validation ELBO (bits/dim), the importance-weighted bound on -log p(x)
with K posterior draws per image (bits/dim; ``hvae evaluate --iw-samples``), the active units
per latent layer (top first), and the seconds per epoch (the median of the epochs after the
first, which holds the compilation). A JSON document (every run, and per variant the mean and
spread, half the range over seeds, of each number) goes to ``--out`` (default: stdout, after
one JSON line per run) and a markdown table to stdout.

Active units are counted on the posterior's Gaussian means before any flow (as ``hvae
evaluate`` counts them): with a flow, information can also reach z through the flow's
context, which this count does not see.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "conv-sylvester": ["--flow", "conv-sylvester"],
    "orthogonal-sylvester": ["--flow", "orthogonal-sylvester"],
    "attention": ["--attention", "depthwise"],
    "cr-vae": ["--regularizer", "cr-vae"],
    "conv-sylvester+cr-vae": ["--flow", "conv-sylvester", "--regularizer", "cr-vae"],
    "all": ["--flow", "conv-sylvester", "--attention", "depthwise", "--regularizer", "cr-vae"],
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from: {', '.join(VARIANTS)}",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (0, 1, ...)")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--iw-samples", type=int, default=100, help="K of the importance-weighted bound")
    p.add_argument("--backend", default=None, help="default: hvae's default backend")
    p.add_argument("--config", default=None, help="preset or YAML file (default: the default job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="as for hvae")
    p.add_argument("--timeout", type=int, default=7200, help="seconds per training run")
    p.add_argument("--out", default=None, help="write the JSON document here")
    return p.parse_args()


def hvae(*args: str, timeout: int) -> str:
    command = [sys.executable, "-m", "hvae_core", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def run_one(args: argparse.Namespace, variant: str, seed: int) -> dict[str, Any]:
    common = ["--backend", args.backend] if args.backend else []
    with tempfile.TemporaryDirectory() as save_dir:
        train = ["train", "--quiet", "--save-dir", save_dir, "--epochs", str(args.epochs)]
        train += ["--seed", str(seed), *common, *VARIANTS[variant]]
        if args.config:
            train += ["--config", args.config]
        for item in args.overrides:
            train += ["--set", item]
        hvae(*train, timeout=args.timeout)
        [run_dir] = list(Path(save_dir).iterdir())
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evaluate = ["evaluate", str(run_dir), "--split", "val", "--json", "--quiet"]
        evaluate += ["--iw-samples", str(args.iw_samples), *common]
        lines = hvae(*evaluate, timeout=args.timeout).strip().splitlines()
        result = json.loads(lines[-1])
    epoch_seconds = [r["seconds"] for r in rows[1:]] or [rows[-1]["seconds"]]
    return {
        "variant": variant,
        "seed": seed,
        "epochs": rows[-1]["epoch"],
        "val_bpd": result["bpd"],
        "iw_bpd": result["iw_bpd"],
        "iw_samples": args.iw_samples,
        "kl_bpd": result["kl_bpd"],
        "active_units": result["active_units"],
        "active_units_total": result["active_units_total"],
        "latent_dims_total": result["latent_dims_total"],
        "seconds_per_epoch": statistics.median(epoch_seconds),
        "skipped_updates": sum(r.get("skipped_updates", 0) for r in rows),
        "grad_norm_max": max(r.get("grad_norm_max", 0.0) for r in rows),
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "spread": (max(values) - min(values)) / 2}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        layers = len(mine[0]["active_units"])
        out[variant] = {
            "seeds": len(mine),
            **{
                key: spread([float(r[key]) for r in mine])
                for key in ("val_bpd", "iw_bpd", "active_units_total", "seconds_per_epoch")
            },
            "active_units": [
                statistics.fmean(r["active_units"][i] for r in mine) for i in range(layers)
            ],
            "latent_dims_total": mine[0]["latent_dims_total"],
            "skipped_updates": sum(r["skipped_updates"] for r in mine),
        }
    return out


def markdown(summary: dict[str, Any], args: argparse.Namespace) -> str:
    head = (
        f"| variant | val ELBO (bits/dim) | IWAE K={args.iw_samples} (bits/dim) | active units "
        "(per layer, top first) | s/epoch | s/epoch vs plain |\n|---|---|---|---|---|---|\n"
    )
    base = summary.get("plain", {}).get("seconds_per_epoch", {}).get("mean")
    lines = []
    for variant, s in summary.items():
        per_layer = "/".join(f"{a:.0f}" for a in s["active_units"])
        ratio = f"{s['seconds_per_epoch']['mean'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {variant} | {s['val_bpd']['mean']:.3f} ± {s['val_bpd']['spread']:.3f} "
            f"| {s['iw_bpd']['mean']:.3f} ± {s['iw_bpd']['spread']:.3f} "
            f"| {s['active_units_total']['mean']:.0f}/{s['latent_dims_total']} ({per_layer}) "
            f"| {s['seconds_per_epoch']['mean']:.2f} | {ratio} |"
        )
    note = (
        f"\n{args.seeds} seed(s), {args.epochs} epochs, backend {args.backend or 'default'}; "
        "± is half the range over seeds."
    )
    return head + "\n".join(lines) + note


def main() -> None:
    args = parse()
    if args.backend is None:
        os.environ.pop("KERAS_BACKEND", None)  # the job's own default, as a new user gets it
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    runs = []
    for variant in variants:
        for seed in range(args.seeds):
            row = run_one(args, variant, seed)
            runs.append(row)
            print(json.dumps(row), flush=True)
    document = {
        "epochs": args.epochs,
        "seeds": args.seeds,
        "iw_samples": args.iw_samples,
        "backend": args.backend,
        "overrides": args.overrides,
        "runs": runs,
        "summary": summarise(runs),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(document, indent=2))
    else:
        print(json.dumps(document))
    print(markdown(document["summary"], args))


if __name__ == "__main__":
    main()
