"""The GPU suite: the cifar10 preset's train step on every backend, in float32 and
mixed_bfloat16, at batch 32 and 128 — images/second, compile seconds, peak device memory.

    python benchmarks/gpu_suite.py                      # the whole grid, one JSON line each
    python benchmarks/gpu_suite.py --backends jax --batch-sizes 32 --steps 5
    python benchmarks/gpu_suite.py --config tiny --batch-sizes 8   # a quick check on a CPU

Each cell runs ``benchmarks/train_throughput.py`` in a fresh process (a backend is fixed per
process, and peak memory is then the cell's own) under ``--timeout`` seconds; a cell that fails
(out of memory, a missing backend) is reported with its reason and the suite goes on. The last
line is a table-shaped summary. Nothing here is GPU-specific: on a CPU it measures the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="cifar10")
    p.add_argument("--backends", default="jax,tensorflow,torch")
    p.add_argument("--precisions", default="float32,mixed_bfloat16")
    p.add_argument("--batch-sizes", default="32,128")
    p.add_argument("--steps", type=int, default=20, help="timed steps per cell")
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    p.add_argument("--out", type=Path, default=None, help="also append the JSON lines here")
    return p.parse_args()


def cell(args: argparse.Namespace, backend: str, precision: str, batch: int) -> dict:
    command = [
        sys.executable,
        str(HERE / "train_throughput.py"),
        "--config",
        args.config,
        "--backend",
        backend,
        "--batch-size",
        str(batch),
        "--steps",
        str(args.steps),
        "--warmup",
        "1",
        "--set",
        f"model.precision={precision}",
    ]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:300], "seconds": round(time.perf_counter() - started, 1)}
    return json.loads(lines[-1])


def main() -> None:
    args = parse()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rows = []
    for backend in args.backends.split(","):
        for precision in args.precisions.split(","):
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                row = {
                    "backend": backend,
                    "precision": precision,
                    "batch_size": batch,
                    **cell(args, backend, precision, batch),
                }
                rows.append(row)
                line = json.dumps(row)
                print(line, flush=True)
                if args.out is not None:
                    with args.out.open("a") as f:
                        f.write(line + "\n")
    summary = {
        f"{r['backend']}/{r['precision']}/{r['batch_size']}": (
            r.get("error")
            or {
                "images_per_second": r.get("images_per_second"),
                "compile_s": r.get("warmup_seconds"),
                "peak_device_mb": r.get("peak_device_mb"),
            }
        )
        for r in rows
    }
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
