"""Benchmark the streaming loader: Ceph RGW against local disk, resume latency, shuffle quality.

Prints, measured side by side in one run on the same shards:
  1. images/s streamed from S3 (Ceph RGW on 127.0.0.1) against decoding the same shards from local
     disk, 2 loader workers, and their ratio (target >= 0.90);
  2. time to the first batch after a mid-epoch resume against a fresh start, from S3
     (target <= 1.2x);
  3. shuffle quality: the fraction of adjacent samples of a batch that come from the same shard,
     for this loader, for webdataset with a shuffle buffer of 1000, and for a uniform shuffle.

    python benchmarks/bench_loader.py                      # starts its own Ceph RGW
    python benchmarks/bench_loader.py --images 8192 --repeats 5

Without --endpoint-url the script starts a one-node Ceph RGW (tests/fixtures/ceph.py, needs
scripts/install_services.sh) and stops it at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddn_dist.data.index import load_index
from ddn_dist.data.loader import LoaderConfig, StreamingLoader
from ddn_dist.data.prep.jobs import PrepOptions, run_prep


def write_images(folder: str, count: int, resolution: int, seed: int) -> None:
    """Write smooth random RGB PNGs (upsampled noise); at 64x64 a sample takes about 9.5 KiB."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        coarse = rng.integers(0, 256, size=(resolution // 4, resolution // 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((resolution, resolution), Image.BILINEAR)
        noisy = np.asarray(image, dtype=np.int16) + rng.integers(
            -6, 7, size=(resolution, resolution, 3)
        )
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
            os.path.join(folder, f"{i:06d}.png")
        )


def run_epoch(loader: StreamingLoader) -> float:
    """Stream one epoch through an open loader; return images consumed per second."""
    started = time.perf_counter()
    images = 0
    for step, batch in enumerate(loader):
        loader.mark_consumed(batch, step)
        images += int(batch.valid.sum())
    return images / (time.perf_counter() - started)


def time_to_first_batch(config: LoaderConfig, state: dict | None) -> float:
    """Return seconds from loader creation (and state load) to the first batch."""
    started = time.perf_counter()
    loader = StreamingLoader(config)
    if state is not None:
        loader.load_state_dict(state)
    next(iter(loader))
    seconds = time.perf_counter() - started
    loader.close()
    return seconds


def half_epoch_state(config: LoaderConfig) -> dict:
    """Consume half an epoch and return the loader state."""
    loader = StreamingLoader(config)
    half = loader.batches_remaining() // 2
    for step, batch in enumerate(loader):
        if step >= half:
            break
        loader.mark_consumed(batch, step)
    state = loader.state_dict()
    loader.close()
    return state


def same_shard_fraction(batches: list[list[str]], shard_of: dict[str, int]) -> float:
    """Return the fraction of adjacent pairs within batches whose samples share a shard."""
    pairs = [(shard_of[a], shard_of[b]) for keys in batches for a, b in zip(keys, keys[1:])]
    return sum(a == b for a, b in pairs) / len(pairs)


def shuffle_quality(local_dir: str, batch_size: int) -> dict[str, float]:
    """Measure same-shard neighbours for this loader, webdataset shuffle(1000) and uniform."""
    import webdataset as wds

    index = load_index(local_dir)
    shard_of = {s.key: n for n, shard in enumerate(index.shards) for s in shard.samples}
    sizes = np.array([shard.num_samples for shard in index.shards], dtype=np.float64)
    result = {"uniform shuffle (expected)": float(((sizes / sizes.sum()) ** 2).sum())}

    for world_size in (1, 4):
        batches = []
        loader = StreamingLoader(
            LoaderConfig(local_dir, batch_size=batch_size, num_workers=2, seed=1),
            rank=0,
            world_size=world_size,
        )
        for step, batch in enumerate(loader):
            loader.mark_consumed(batch, step)
            batches.append(list(batch.keys))
        loader.close()
        result[f"ddn-dist loader, rank 0 of {world_size}, 2 workers"] = same_shard_fraction(
            batches, shard_of
        )

    urls = [os.path.join(local_dir, shard.url) for shard in index.shards]
    for buffer in (0, 1000):
        dataset = wds.WebDataset(urls, shardshuffle=len(urls), seed=1, empty_check=False)
        if buffer:
            dataset = dataset.shuffle(buffer, seed=1)
        keys = [sample["__key__"] for sample in dataset]
        batches = [
            keys[i : i + batch_size] for i in range(0, len(keys) - batch_size + 1, batch_size)
        ]
        name = (
            f"webdataset, shard shuffle + shuffle({buffer})"
            if buffer
            else "webdataset, shard shuffle only"
        )
        result[name] = same_shard_fraction(batches, shard_of)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4096, help="synthetic images in the data set")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels")
    parser.add_argument("--shard-samples", type=int, default=256, help="images per shard")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument(
        "--repeats", type=int, default=3, help="measured epochs per source (median)"
    )
    parser.add_argument(
        "--endpoint-url",
        default=None,
        help="use this S3 endpoint (credentials from AWS_*) instead of starting Ceph",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    scratch = tempfile.mkdtemp(prefix="ddn-bench-loader-")
    cluster = None
    try:
        if args.endpoint_url is None:
            from tests.fixtures.ceph import CephRGW

            print("starting Ceph RGW ...", flush=True)
            cluster = CephRGW().start()
            os.environ.update(cluster.env())
            endpoint = cluster.endpoint_url
            bucket = cluster.make_bucket("bench-loader")
        else:
            endpoint = args.endpoint_url
            bucket = f"bench-loader-{int(time.time())}"
            import s3fs

            s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(bucket)

        images_dir = os.path.join(scratch, "images")
        local_dir = os.path.join(scratch, "shards")
        s3_url = f"s3://{bucket}/shards"
        write_images(images_dir, args.images, args.resolution, seed=0)
        for out in (local_dir, s3_url):
            run_prep(
                PrepOptions(
                    kind="folder",
                    input_path=images_dir,
                    out=out,
                    seed=0,
                    shard_samples=args.shard_samples,
                    endpoint_url=endpoint,
                    progress=False,
                )
            )
        index = load_index(local_dir)
        mean_bytes = sum(s.length for sh in index.shards for s in sh.samples) / index.num_samples
        print(
            f"data set: {index.num_samples} images {args.resolution}x{args.resolution} RGB PNG, "
            f"{len(index.shards)} shards, {mean_bytes / 1024:.1f} KiB per sample in the tar"
        )

        def config(url: str, seed: int, persistent: bool = False) -> LoaderConfig:
            return LoaderConfig(
                url,
                endpoint_url=endpoint if url.startswith("s3://") else None,
                batch_size=args.batch_size,
                num_workers=2,
                seed=seed,
                persistent_workers=persistent,
            )

        # Persistent workers, one warm-up epoch per source, then epochs alternating between the
        # sources, so both see the same machine load.
        loaders = {
            "local": StreamingLoader(config(local_dir, 0, persistent=True)),
            "s3": StreamingLoader(config(s3_url, 0, persistent=True)),
        }
        rates: dict[str, list[float]] = {"local": [], "s3": []}
        warm_up = {name: run_epoch(loader) for name, loader in loaders.items()}
        for _ in range(args.repeats):
            for name, loader in loaders.items():
                rates[name].append(run_epoch(loader))
        for loader in loaders.values():
            loader.close()
        local_rate = statistics.median(rates["local"])
        s3_rate = statistics.median(rates["s3"])
        print(
            f"\n1. throughput, 2 persistent workers, batch {args.batch_size}, median of "
            f"{args.repeats} epochs after a warm-up epoch"
        )
        print(
            f"   local disk : {local_rate:9.0f} images/s  {[round(r) for r in rates['local']]} "
            f"(warm-up epoch {warm_up['local']:.0f})"
        )
        print(
            f"   Ceph RGW S3: {s3_rate:9.0f} images/s  {[round(r) for r in rates['s3']]} "
            f"(warm-up epoch {warm_up['s3']:.0f})"
        )
        pairs = [s3 / local for s3, local in zip(rates["s3"], rates["local"])]
        print(
            f"   ratio S3 / local = {s3_rate / local_rate:.3f}  (target >= 0.90); per adjacent "
            f"epoch pair {[round(r, 3) for r in pairs]}, median {statistics.median(pairs):.3f}"
        )

        state = half_epoch_state(config(s3_url, 0))
        fresh, resumed = [], []
        for _ in range(max(args.repeats, 5)):
            fresh.append(time_to_first_batch(config(s3_url, 0), None))
            resumed.append(time_to_first_batch(config(s3_url, 0), state))
        print(
            "\n2. time to first batch from S3, 2 workers (median of",
            len(fresh),
            "alternating runs)",
        )
        print(f"   fresh start     : {statistics.median(fresh) * 1000:7.1f} ms")
        print(
            f"   mid-epoch resume: {statistics.median(resumed) * 1000:7.1f} ms "
            f"(state with {len(state['consumed'])} consumed intervals)"
        )
        print(
            f"   ratio resume / fresh = {statistics.median(resumed) / statistics.median(fresh):.3f}"
            f"  (target <= 1.2)"
        )

        print("\n3. shuffle quality: fraction of adjacent samples in a batch from the same shard")
        for name, value in shuffle_quality(local_dir, args.batch_size).items():
            print(f"   {name:48s} {value:.4f}")
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.root, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
