"""Time to the first step, with a cold and a warm persistent compilation cache.

    python benchmarks/first_step.py                          # jax and tensorflow, every job
    python benchmarks/first_step.py --backends jax --jobs train,cifar10
    python benchmarks/first_step.py --with-off               # also with the cache turned off

Every measurement is a fresh process. ``cold`` runs with an empty cache folder
($HVAE_CACHE_DIR), ``warm`` right after it with the folder the cold run filled, ``off`` (with
--with-off) with $HVAE_COMPILE_CACHE=0. Jobs:

- ``train``: the default job (``hvae train``, digits) until its first step has finished;
- ``cifar10``: the cifar10 preset (VDVAE's CIFAR-10 model) until its first step has finished,
  on a synthetic CIFAR-10 release (random images: compiling does not look at them) at
  ``--cifar-batch`` images per step (the compiled code is that of the preset, at that shape);
- ``evaluate`` and ``sample``: the whole command on a run of the default job trained for one
  epoch beforehand (``hvae evaluate RUN --split test``; ``hvae sample RUN --n 16``).

A train job stops the process as soon as its first step's results are on the host. Each line
says where the time went: ``start`` (interpreter, hvae, the config, Keras and the backend
imported), ``build`` (dataset and model built, up to the engine), ``first_step`` (the engine
set up, the step traced, compiled or loaded from the cache, and run once); on JAX also the
seconds JAX reports for tracing (``jax_trace``), lowering to StableHLO (``jax_lower``),
compiling or loading from the cache (``jax_compile_or_load``, of which reading the cache
``jax_cache_read``) and the compile time the cache saved (``jax_saved``), summed over every
compile in the process. One JSON line per measurement, then one line of warm/cold ratios per
job and backend.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

JOBS = ("train", "cifar10", "evaluate", "sample")

# Runs ``hvae`` in this process, timing its phases; a train stops after its first step.
CHILD = r"""
import json, os, sys, time
out = os.environ["FIRST_STEP_OUT"]
marks = {"spawned": float(os.environ["FIRST_STEP_T0"])}
jax_seconds = {}

def save():
    with open(out, "w") as f:
        json.dump({"marks": marks, "jax": jax_seconds}, f)

from hvae_core.backends import select

def first_step_engine(make_engine):
    def make(*args, **kwargs):
        marks["engine"] = time.time()
        engine = make_engine(*args, **kwargs)
        dispatch = engine.dispatch_step
        def once(*a, **k):
            engine.fetch(dispatch(*a, **k))
            marks["first_step"] = time.time()
            save()
            sys.stdout.flush()
            os._exit(0)
        engine.dispatch_step = once
        return engine
    return make

import_backend = select.import_backend
def timed_import(*args, **kwargs):
    import_backend(*args, **kwargs)
    marks["backend"] = time.time()
    from hvae_core.backends import engine as engines  # imports Keras: only now
    engines.make_engine = first_step_engine(engines.make_engine)
    if "jax" in sys.modules:
        from jax import monitoring
        names = {
            "/jax/core/compile/jaxpr_trace_duration": "jax_trace",
            "/jax/core/compile/jaxpr_to_mlir_module_duration": "jax_lower",
            "/jax/core/compile/backend_compile_duration": "jax_compile_or_load",
            "/jax/compilation_cache/compile_time_saved_sec": "jax_saved",
            "/jax/compilation_cache/cache_retrieval_time_sec": "jax_cache_read",
        }
        def listen(event, seconds, **kw):
            if event in names:
                jax_seconds[names[event]] = jax_seconds.get(names[event], 0.0) + seconds
        monitoring.register_event_duration_secs_listener(listen)
select.import_backend = timed_import

from hvae_core.cli import main
try:
    main(sys.argv[1:])
finally:
    marks["end"] = time.time()
    save()
"""


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="jax,tensorflow", help="comma-separated backends")
    p.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated: {', '.join(JOBS)}")
    p.add_argument("--cifar-batch", type=int, default=4, help="images per cifar10 step")
    p.add_argument("--with-off", action="store_true", help="also with the cache turned off")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per process")
    p.add_argument("--keep", type=Path, help="keep the work folder here (default: removed)")
    return p.parse_args()


def fake_cifar10(folder: Path, per_batch: int = 1200) -> Path:
    """A CIFAR-10 python release of random images (5 x ``per_batch`` training images, enough
    for VDVAE's 5,000-image validation split)."""
    rng = __import__("numpy").random.default_rng(0)
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype="uint8")
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(batches / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    return folder


def run(args: list[str], cache: Path, mode: str, work: Path, timeout: int) -> dict[str, Any]:
    """One fresh ``hvae`` process: its phases, in seconds from its start."""
    out = work / "marks.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, HVAE_CACHE_DIR=str(cache), FIRST_STEP_OUT=str(out))
    env.pop("HVAE_COMPILE_CACHE", None)
    if mode == "off":
        env["HVAE_COMPILE_CACHE"] = "0"
    env["FIRST_STEP_T0"] = repr(time.time())
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=work,
    )
    if done.returncode != 0 or not out.exists():
        raise SystemExit(f"hvae {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    report = json.loads(out.read_text())
    marks, t0 = report["marks"], report["marks"]["spawned"]
    row: dict[str, Any] = {}
    if "first_step" in marks:
        row["seconds"] = round(marks["first_step"] - t0, 2)
        row["start"] = round(marks["backend"] - t0, 2)
        row["build"] = round(marks["engine"] - marks["backend"], 2)
        row["first_step"] = round(marks["first_step"] - marks["engine"], 2)
    else:
        row["seconds"] = round(marks["end"] - t0, 2)
        row["start"] = round(marks["backend"] - t0, 2)
        row["rest"] = round(marks["end"] - marks["backend"], 2)
    row.update({k: round(v, 2) for k, v in report["jax"].items()})
    return row


def folder_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    opts = parse()
    jobs = opts.jobs.split(",")
    work = Path(tempfile.mkdtemp(prefix="hvae-first-step-"))
    modes = ["cold", "warm"] + (["off"] if opts.with_off else [])
    ratios = []
    try:
        # Not named "cifar10": a folder of that name in the working folder shadows the preset.
        data = fake_cifar10(work / "cifar-data") if "cifar10" in jobs else None
        for backend in opts.backends.split(","):
            run_dir = None
            if {"evaluate", "sample"} & set(jobs):  # a trained run to read, not timed
                saved = work / f"runs-{backend}"
                setup = ["train", "--backend", backend, "--epochs", "1", "--quiet"]
                run([*setup, "--save-dir", str(saved)], work / "setup-cache", "warm", work, 7200)
                run_dir = next(saved.iterdir())
            commands = {
                "train": ["train", "--backend", backend, "--quiet", "--no-save"],
                "cifar10": [
                    *("train", "--config", "cifar10", "--backend", backend, "--quiet"),
                    *("--no-save", "--data-dir", str(data), "--batch-size", str(opts.cifar_batch)),
                ],
                "evaluate": ["evaluate", str(run_dir), "--split", "test", "--json", "--quiet"],
                "sample": ["sample", str(run_dir), "--n", "16", "--out", "s.png", "--force"],
            }
            for job in jobs:
                cache = work / f"cache-{backend}-{job}"
                shutil.rmtree(cache, ignore_errors=True)
                rows = {}
                for mode in modes:
                    row = run(commands[job], cache, mode, work, opts.timeout)
                    files, size = folder_size(cache)
                    row = {"backend": backend, "job": job, "mode": mode, **row}
                    row |= {"cache_files": files, "cache_mb": round(size / 2**20, 1)}
                    print(json.dumps(row), flush=True)
                    rows[mode] = row
                ratio = {
                    "backend": backend,
                    "job": job,
                    "cold_s": rows["cold"]["seconds"],
                    "warm_s": rows["warm"]["seconds"],
                    "cold_over_warm": round(rows["cold"]["seconds"] / rows["warm"]["seconds"], 2),
                }
                if "off" in rows:
                    ratio["off_over_warm"] = round(
                        rows["off"]["seconds"] / rows["warm"]["seconds"], 2
                    )
                ratios.append(ratio)
                print(json.dumps(ratio), flush=True)
    finally:
        if opts.keep:
            shutil.copytree(work, opts.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"summary": ratios}))


if __name__ == "__main__":
    main()
