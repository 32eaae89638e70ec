"""The train step before and after "noise as an input": images/second of the same job, interleaved.

    python benchmarks/noise_step.py                              # JAX: default job, cifar10 at 4
    python benchmarks/noise_step.py --backends jax,tensorflow --rounds 7
    python benchmarks/noise_step.py --jobs default --ref 6bf469f

The reference (``--ref``, by default 6bf469f: main just before the noise change) is checked out
into a temporary ``git worktree``; each (code, job, backend) is one worker subprocess with
``PYTHONPATH`` at its tree (its ``hvae_core`` is the one imported, and the JSON says which). A
worker builds the job's model with the run's seed, compiles its train step on random images
(timed apart: ``warmup_s``), then times steps when the parent asks. The parent asks the
workers in turn, round after round, so that a busy machine slows both codes alike, and
prints one JSON line per job and backend: median images/second of each code and new/ref (above
1: the new code is faster). The compilation caches are off (``HVAE_COMPILE_CACHE=0``) so both
codes compile cold. Only the ratios of one run mean something on a shared machine.

Jobs: ``default`` is ``hvae train``'s default job (its config and batch size); ``cifar10`` is
the cifar10 preset at ``--cifar-batch`` (4). ``--cifar-blocks`` scales the preset's block
counts down where its compile takes too long; the JSON records the counts used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", default="6bf469f", help="the code before the change (a git ref)")
    p.add_argument("--jobs", default="default,cifar10", help="comma-separated: default,cifar10")
    p.add_argument("--backends", default="jax", help="comma-separated: jax,tensorflow")
    p.add_argument("--cifar-batch", type=int, default=4)
    p.add_argument(
        "--cifar-blocks",
        type=float,
        default=1.0,
        help="scale the cifar10 preset's block counts (1: the preset as it is)",
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="timed steps per code and round (0: 30 for the default job, 2 for cifar10)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    p.add_argument("--worker", nargs=3, metavar=("JOB", "BACKEND", "SPEC"), help=argparse.SUPPRESS)
    return p.parse_args()


def job_spec(job: str, args: argparse.Namespace) -> dict[str, Any]:
    """The config source, flags and overrides of ``job`` (resolved by each worker's code)."""
    if job == "default":
        return {"config": None, "flags": {}, "overrides": []}
    if job != "cifar10":
        sys.exit(f"unknown job {job!r}: expected default or cifar10")
    overrides: list[str] = []
    if args.cifar_blocks != 1.0:
        from hvae_core.config import resolve_config

        model = resolve_config("cifar10").model
        for key in ("enc_num_blocks", "dec_num_blocks"):
            counts = [max(1 if n else 0, round(n * args.cifar_blocks)) for n in getattr(model, key)]
            overrides.append(f"model.{key}={counts}")
    return {"config": "cifar10", "flags": {"batch_size": args.cifar_batch}, "overrides": overrides}


def worker(job: str, backend: str, spec_json: str, warmup: int) -> None:
    """Build, compile, then time ``steps`` train steps for each line ``steps`` read from stdin;
    every answer is one JSON line on stdout."""
    os.environ["KERAS_BACKEND"] = backend
    import numpy as np

    import hvae_core
    from hvae_core.config import resolve_config
    from hvae_core.plugins import get_registry
    from hvae_core.training.setup import build_engine

    spec = json.loads(spec_json)
    cfg = resolve_config(spec["config"], {**spec["flags"], "backend": backend}, spec["overrides"])
    try:
        from hvae_core.data import open_dataset

        channels = open_dataset(cfg).image_shape[2]
    except Exception:  # no dataset files here: random images need only a shape
        channels = 1 if cfg.data.dataset == "digits" else 3
    shape = (cfg.image_size, cfg.image_size, channels)
    batch = cfg.training.batch_size
    t0 = time.perf_counter()
    engine = build_engine(cfg, shape, 8, steps_per_epoch=1000, registry=get_registry())
    build_s = time.perf_counter() - t0
    images = np.random.default_rng(0).integers(0, 256, (batch, *shape), dtype=np.uint8)
    t0 = time.perf_counter()
    for _ in range(warmup):
        engine.train_step(images, 1.0)
    info = {
        "hvae_core": str(Path(hvae_core.__file__).parents[1]),
        "batch_size": batch,
        "image_shape": list(shape),
        "enc_num_blocks": list(cfg.model.enc_num_blocks),
        "dec_num_blocks": list(cfg.model.dec_num_blocks),
        "parameters": engine.model.count_params(),
        "build_s": round(build_s, 1),
        "warmup_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        steps = int(line)
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.train_step(images, 1.0)  # floats back: each step is complete
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)


@contextlib.contextmanager
def ref_tree(ref: str) -> Iterator[Path]:
    """``ref`` checked out (detached) in a temporary git worktree, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="hvae-ref-")) / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(path), ref],
        check=True,
    )
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False
        )


def start(tree: Path, job: str, backend: str, spec: dict[str, Any], warmup: int) -> Any:
    env = dict(os.environ, PYTHONPATH=str(tree), HVAE_COMPILE_CACHE="0", KERAS_BACKEND=backend)
    command = [sys.executable, str(Path(__file__).resolve()), "--warmup", str(warmup)]
    command += ["--worker", job, backend, json.dumps(spec)]
    return subprocess.Popen(
        command, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def answer(proc: Any) -> dict[str, Any]:
    """The worker's next JSON line (its log lines go to stderr)."""
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"a worker stopped (exit {proc.wait()})")
    return json.loads(line)


def compare(
    job: str, backend: str, trees: dict[str, Path], args: argparse.Namespace
) -> dict[str, Any]:
    spec = job_spec(job, args)
    steps = args.steps or (30 if job == "default" else 2)
    procs = {code: start(tree, job, backend, spec, args.warmup) for code, tree in trees.items()}
    try:
        info = {code: answer(p) for code, p in procs.items()}  # both compiled
        seconds: dict[str, list[float]] = {code: [] for code in procs}
        for i in range(args.rounds):
            order = list(procs) if i % 2 == 0 else list(reversed(procs))
            for code in order:
                procs[code].stdin.write(f"{steps}\n")
                procs[code].stdin.flush()
                seconds[code].append(answer(procs[code])["seconds"] / steps)
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()
    batch = info["new"]["batch_size"]
    ips = {code: batch / statistics.median(s) for code, s in seconds.items()}
    return {
        "job": job,
        "backend": backend,
        "ref": args.ref,
        **{k: v for k, v in info["new"].items() if k not in ("hvae_core", "build_s", "warmup_s")},
        "cifar_blocks_scale": args.cifar_blocks if job == "cifar10" else None,
        "code": {code: i["hvae_core"] for code, i in info.items()},
        "warmup_s": {code: i["warmup_s"] for code, i in info.items()},
        "step_ms_median": {c: round(1000 * statistics.median(s), 1) for c, s in seconds.items()},
        "step_ms_all": {c: [round(1000 * t, 1) for t in s] for c, s in seconds.items()},
        "images_per_s": {code: round(v, 2) for code, v in ips.items()},
        "images_per_s_new_over_ref": round(ips["new"] / ips["ref"], 3),
        "rounds": args.rounds,
        "steps_per_round": steps,
    }


def main() -> None:
    args = parse()
    if args.worker:
        worker(*args.worker, args.warmup)
        return
    with ref_tree(args.ref) as ref:
        trees = {"new": ROOT, "ref": ref}
        for job in filter(None, args.jobs.split(",")):
            for backend in filter(None, args.backends.split(",")):
                print(json.dumps(compare(job, backend, trees, args)), flush=True)


if __name__ == "__main__":
    main()
