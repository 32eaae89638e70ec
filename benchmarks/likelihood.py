"""The importance-weighted bound of a trained run against its ELBO: how much tighter, at what cost.

    python benchmarks/likelihood.py RUN_DIR                      # K = 1, 10, 100, 1000 on test
    python benchmarks/likelihood.py RUN_DIR --k 1,10 --split val --batch-size 256

Loads the run with ``hvae_core.load`` (EMA weights, one device), scores the split's images
(through the dataset's transform, as ``hvae evaluate`` does) with the ELBO, then with the
bound for every K. One JSON line per measurement: bits/dim, seconds (the first K includes
compiling the bound's step), images; then a summary line with the bound's gain over the ELBO.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--split", default="test")
    p.add_argument("--k", default="1,10,100,1000", help="comma-separated sample counts")
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward pass")
    p.add_argument("--backend", default=None)
    return p.parse_args()


def main() -> None:
    args = parse()
    import hvae_core
    from hvae_core.data import evaluation_batches, open_dataset

    model = hvae_core.load(args.run_dir, backend=args.backend)
    dataset = open_dataset(model.config)
    images = dataset.load(args.split)
    size = args.batch_size or model.batch_size
    batches = list(evaluation_batches(images, size, dataset))
    started = time.monotonic()
    elbo = model.elbo(iter(batches), batch_size=size)["bpd"]
    elbo_seconds = time.monotonic() - started
    print(
        json.dumps(
            {
                "measure": "elbo",
                "bpd": elbo,
                "seconds": round(elbo_seconds, 2),
                "images": len(images),
            }
        ),
        flush=True,
    )
    rows = []
    for k in (int(v) for v in args.k.split(",")):
        started = time.monotonic()
        per_image = np.concatenate(
            [model.log_likelihood(b, k, batch_size=size)["per_image_bpd"] for b in batches]
        )
        row = {
            "measure": "iwae",
            "k": k,
            "bpd": float(per_image.mean()),
            "gain_over_elbo": float(elbo - per_image.mean()),
            "seconds": round(time.monotonic() - started, 2),
            "images": len(images),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        json.dumps(
            {
                "summary": True,
                "elbo_bpd": elbo,
                "iwae_bpd": {r["k"]: r["bpd"] for r in rows},
                "batch_size": size,
            }
        )
    )


if __name__ == "__main__":
    main()
