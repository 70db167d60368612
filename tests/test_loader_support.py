"""Helpers of the loader tests: a small shard writer and a multi-process runner (no tests here)."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import tarfile

import numpy as np
from PIL import Image

from ddn_dist.data.index import DatasetInfo, SampleEntry, ShardEntry, ShardIndex, save_index


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's 1,797 digits as (N, 8, 8) uint8 images and (N,) labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return images, digits.target.astype(np.int64)


def write_shards(
    out_dir: str,
    images: np.ndarray,
    labels: np.ndarray | None,
    shard_sizes: list[int],
    name: str = "digits",
) -> ShardIndex:
    """Write images as uneven tar shards with an index.json; sample keys are "<shard>-<i>"."""
    if sum(shard_sizes) != len(images):
        raise ValueError(f"shard sizes add up to {sum(shard_sizes)}, not {len(images)}")
    os.makedirs(out_dir, exist_ok=True)
    shards = []
    start = 0
    for shard_number, size in enumerate(shard_sizes):
        file_name = f"shard-{shard_number:05d}.tar"
        buffer = io.BytesIO()
        entries = []
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, start + size):
                key = f"s{shard_number:03d}-{i:06d}"
                offset = buffer.tell()
                png = io.BytesIO()
                mode = "L" if images.ndim == 3 else "RGB"
                Image.fromarray(images[i], mode=mode).save(png, format="PNG")
                members = [("png", png.getvalue())]
                if labels is not None:
                    members.append(("cls", str(int(labels[i])).encode()))
                for extension, data in members:
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    info.mtime = 0
                    tar.addfile(info, io.BytesIO(data))
                entries.append(SampleEntry(key, offset, buffer.tell() - offset))
        data = buffer.getvalue()
        with open(os.path.join(out_dir, file_name), "wb") as f:
            f.write(data)
        shards.append(
            ShardEntry(file_name, size, len(data), hashlib.sha256(data).hexdigest(), entries)
        )
        start += size
    channels = 1 if images.ndim == 3 else images.shape[3]
    info = DatasetInfo(
        name=name,
        resolution=images.shape[1],
        channels=channels,
        num_samples=len(images),
        has_labels=labels is not None,
        num_classes=int(labels.max()) + 1 if labels is not None else 0,
        mean=[0.5] * channels,
        std=[0.5] * channels,
    )
    index = ShardIndex(info, shards)
    save_index(out_dir, index)
    return index


def all_keys(index: ShardIndex) -> list[str]:
    """Return every sample key of an index."""
    return [sample.key for shard in index.shards for sample in shard.samples]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank: int, world_size: int, port: int, job: dict, out_dir: str) -> None:
    """Run one rank of a loader job under torch.distributed (gloo) and write its results as JSON.

    `job` has "config" (LoaderConfig keyword arguments), optional "state" (to load first) and
    optional "max_steps" (stop after that many consumed batches, with workers reading ahead).
    Every step all-reduces a tensor, so a rank with fewer batches than the others hangs the job.
    """
    import json
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from ddn_dist.data.loader import LoaderConfig, StreamingLoader

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=90),
    )
    loader = StreamingLoader(LoaderConfig(**job["config"]), rank=rank, world_size=world_size)
    if job.get("state") is not None:
        loader.load_state_dict(job["state"])
    batches_at_start = loader.batches_remaining()
    epoch_at_start = loader.epoch
    keys: list[str] = []
    steps = 0
    max_steps = job.get("max_steps")
    for batch in loader:
        if max_steps is not None and steps >= max_steps:
            break
        loader.mark_consumed(batch, steps)
        keys += [key for key, ok in zip(batch.keys, batch.valid.tolist()) if ok]
        steps += 1
        dist.all_reduce(torch.ones(1))
    result = {
        "rank": rank,
        "keys": keys,
        "steps": steps,
        "batches_at_start": batches_at_start,
        "epoch_at_start": epoch_at_start,
        "state": loader.state_dict(),
        "counters": loader.counters(),
    }
    loader.close()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def _spawn_entry(index: int, world_size: int, port: int, job: dict, out_dir: str) -> None:
    run_rank(index, world_size, port, job, out_dir)


def launch(world_size: int, job: dict, out_dir: str, timeout_seconds: float = 150) -> list[dict]:
    """Run `job` on `world_size` spawned ranks; return each rank's result, raising on failure."""
    import json
    import time

    import torch.multiprocessing as mp

    os.makedirs(out_dir, exist_ok=True)
    context = mp.start_processes(
        _spawn_entry,
        args=(world_size, free_port(), job, out_dir),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_seconds
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"loader job on {world_size} ranks did not finish in "
                    f"{timeout_seconds} s (a rank with fewer batches hangs)"
                )
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = []
    for rank in range(world_size):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results
