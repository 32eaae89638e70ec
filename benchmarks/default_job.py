"""The README's main job, ``hvae train``, as a new user runs it: wall time, where it goes, result.

    python benchmarks/default_job.py                       # the default job as it stands
    python benchmarks/default_job.py --backends jax,torch,tensorflow
    python benchmarks/default_job.py --backends jax --set training.epochs=10

Each job runs as a fresh ``hvae train --quiet`` subprocess in a temporary save directory. One
JSON line per job: wall seconds, the phases the trainer reports when it ends (set-up, train
steps, evaluation, images and plots, checkpoints), what is left (interpreter start, imports,
config), the final validation bits/dim and the epochs run; then a summary line. Jobs run one
after another, so that they do not share the cores (the ratios of one run are what to read on
a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PHASE = re.compile(r"([\d.]+) s ([a-z -]+?)(?:,|$)")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--backends",
        default="",
        help="comma-separated backends to run the job on (default: hvae's default backend)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], help="as for hvae")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per job")
    return p.parse_args()


def phases(output: str) -> dict[str, float]:
    """The trainer's closing ``time: ...`` line as {phase: seconds}."""
    lines = [line for line in output.splitlines() if line.startswith("time: ")]
    if not lines:
        return {}
    return {name.strip(): float(s) for s, name in PHASE.findall(lines[-1][len("time: ") :])}


def run_job(backend: str | None, overrides: list[str], timeout: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as save_dir:
        command = [sys.executable, "-m", "hvae_core", "train", "--quiet", "--save-dir", save_dir]
        if backend:
            command += ["--backend", backend]
        for item in overrides:
            command += ["--set", item]
        env = dict(os.environ)
        env.pop("KERAS_BACKEND", None)  # the job's own default, as a new user gets it
        started = time.monotonic()
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
        wall = time.monotonic() - started
        output = done.stdout + done.stderr
        result: dict[str, Any] = {
            "backend": backend or "default",
            "returncode": done.returncode,
            "wall_s": round(wall, 1),
        }
        if done.returncode != 0:
            result["error"] = output[-2000:]
            return result
        parts = phases(output)
        result["phases_s"] = parts
        result["start_and_imports_s"] = round(wall - sum(parts.values()), 1)
        [run_dir] = list(Path(save_dir).iterdir())
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        result["epochs"] = rows[-1]["epoch"] if rows else 0
        result["val_bpd"] = rows[-1].get("val_bpd") if rows else None
        first = rows[0]["seconds"] if rows else None
        result["first_epoch_s"] = first  # includes compiling the step
        result["backend_used"] = next(
            (
                line.split("backend ")[1].split()[0]
                for line in output.splitlines()
                if line.startswith("hvae: backend ")
            ),
            None,
        )
        return result


def main() -> None:
    args = parse()
    backends = [b for b in args.backends.split(",") if b] or [None]
    results = []
    for backend in backends:
        result = run_job(backend, args.overrides, args.timeout)
        results.append(result)
        print(json.dumps(result), flush=True)
    summary: dict[str, Any] = {"summary": True}
    timed = [r for r in results if r["returncode"] == 0]
    if len(timed) > 1:
        fastest = min(timed, key=lambda r: r["wall_s"])
        summary["wall_vs_fastest"] = {
            r["backend"]: round(r["wall_s"] / fastest["wall_s"], 2) for r in timed
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
