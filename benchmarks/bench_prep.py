"""Benchmark data prep throughput: 1 vs 2 workers, local disk vs Ceph RGW S3, side by side.

Inputs: the scikit-learn digits (1,797 images, 8x8) and a folder of synthetic 64x64 RGB PNGs.
Each configuration is timed `--repeats` times into a fresh output location, in interleaved rounds,
and the fastest run counts, which damps noise from other processes on a shared machine. The Ceph RGW cluster
(mon + memstore OSD + radosgw on 127.0.0.1) is started by this script and stopped at the end.

    .venv/bin/python benchmarks/bench_prep.py --images 3000 --repeats 3

Targets: 2 workers >= 1.8x the images/s of 1 worker; Ceph RGW >= 0.8x local disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ddn_dist.data.prep.jobs import PrepOptions, run_prep  # noqa: E402
from tests.fixtures.ceph import CephRGW, missing_binaries  # noqa: E402


def make_png_folder(root: str, count: int, resolution: int = 64, seed: int = 0) -> None:
    """Write `count` smooth random RGB PNGs (bilinear-upsampled 8x8 noise plus fine noise)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((resolution, resolution), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(
            -8, 9, size=(resolution, resolution, 3)
        )
        directory = os.path.join(root, f"{i // 1000:05d}")
        os.makedirs(directory, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            os.path.join(directory, f"{i:05d}.png")
        )


def time_prep(options: dict, out: str, endpoint_url: str | None) -> tuple[float, int]:
    """Run one prep job into a fresh location; return (images/s, images)."""
    started = time.perf_counter()
    summary = run_prep(PrepOptions(out=out, endpoint_url=endpoint_url, progress=False, **options))
    return summary.images / (time.perf_counter() - started), summary.images


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images", type=int, default=3000, help="synthetic 64x64 PNGs to shard (default 3000)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per configuration; the fastest counts"
    )
    parser.add_argument("--no-ceph", action="store_true", help="measure local disk only")
    args = parser.parse_args()

    scratch = tempfile.mkdtemp(prefix="ddn-bench-prep-")
    cluster = None
    try:
        folder = os.path.join(scratch, "png64")
        make_png_folder(folder, args.images)
        inputs = {
            "digits 8x8": dict(kind="digits", shard_samples=200),
            f"{args.images} PNG 64x64": dict(kind="folder", input_path=folder, shard_samples=250),
        }
        stores = [("local", os.path.join(scratch, "out"), None)]
        if not args.no_ceph and not missing_binaries():
            cluster = CephRGW().start()
            os.environ.update(cluster.env())
            bucket = cluster.make_bucket("bench")
            stores.append(("ceph", f"s3://{bucket}", cluster.endpoint_url))
        configs = [
            (input_name, store, base, endpoint, workers)
            for input_name in inputs
            for store, base, endpoint in stores
            for workers in (1, 2)
        ]
        # Rounds interleave the configurations, so a change in machine load hits all of them alike.
        results: dict[tuple, float] = {}
        for repeat in range(args.repeats):
            for input_name, store, base, endpoint, workers in configs:
                out = f"{base}/{input_name.split()[0]}-{workers}w-run{repeat}"
                options = {**inputs[input_name], "workers": workers}
                rate, images = time_prep(options, out, endpoint)
                key = (input_name, store, workers)
                results[key] = max(results.get(key, 0.0), rate)
                print(
                    f"round {repeat}: {input_name:>16} {store:>5} {workers} worker(s): {images} images, "
                    f"{rate:8.0f} images/s",
                    flush=True,
                )
        print()
        print(
            f"{'input':>16} {'store':>5} {'1 worker':>10} {'2 workers':>10} {'2w/1w':>6} {'vs local':>9}"
        )
        for input_name in inputs:
            for store, _, _ in stores:
                one, two = results[(input_name, store, 1)], results[(input_name, store, 2)]
                local = results[(input_name, "local", 1)]
                print(
                    f"{input_name:>16} {store:>5} {one:10.0f} {two:10.0f} {two / one:6.2f} {one / local:9.2f}"
                )
        print(f"\nmachine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.root, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
