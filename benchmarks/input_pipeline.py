"""Input-pipeline throughput: CIFAR-shaped uint8 images through BatchStream, shuffled and flipped.

Run: ``python benchmarks/input_pipeline.py [--images 50000] [--batch-sizes 32,128] [--epochs 3]``;
``--source memmap`` streams a lazy split view of a memory-mapped ``.npy`` instead (the way the
ImageNet training split is read), from a temporary file.
Prints one JSON line: images/second per batch size (best of the epochs, after one warm-up
epoch) and the peak resident memory of the process. The consumer only touches each batch, so
this measures what the pipeline can deliver, not a training step.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hvae_core.data import BatchStream, ImageArray, LazyImages


def measure(images: ImageArray, batch_size: int, epochs: int, prefetch: int) -> dict[str, float]:
    stream = BatchStream(
        images, batch_size, shuffle=True, seed=0, flip=True, drop_remainder=True, prefetch=prefetch
    )
    rates = []
    for epoch in range(epochs + 1):  # epoch 0 warms up (thread start, page faults)
        start = time.perf_counter()
        count = 0
        checksum = 0
        for batch in stream.epoch(epoch):
            count += len(batch)
            checksum += int(batch[0, 0, 0, 0])  # touch the data
        elapsed = time.perf_counter() - start
        if epoch:
            rates.append(count / elapsed)
    return {
        "batch_size": batch_size,
        "images_per_second": round(max(rates)),
        "images_per_second_mean": round(float(np.mean(rates))),
        "batches_per_epoch": len(stream),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--batch-sizes", default="32,128")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--source", choices=("memory", "memmap"), default="memory")
    args = parser.parse_args(argv)
    images = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        source: ImageArray = images
        if args.source == "memmap":
            np.save(Path(tmp) / "images.npy", images)
            del images
            mapped = np.load(Path(tmp) / "images.npy", mmap_mode="r")
            source = LazyImages(mapped, np.random.RandomState(42).permutation(len(mapped)))
        results = [
            measure(source, int(b), args.epochs, args.prefetch) for b in args.batch_sizes.split(",")
        ]
        del source
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(
        json.dumps(
            {
                "benchmark": "input_pipeline",
                "images": args.images,
                "image_shape": [32, 32, 3],
                "shuffle": True,
                "flip": True,
                "source": args.source,
                "prefetch": args.prefetch,
                "results": results,
                "peak_rss_mib": round(peak_kib / 1024, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
