"""Checkpoint save throughput and resume time at a new world size, measured side by side.

    .venv/bin/python benchmarks/bench_checkpoint.py [--hidden 1024] [--saves 3] [--nproc 2]

1. Save throughput: `--nproc` CPU ranks (gloo, ZeRO stage 2, fp32 Adam) save an MLP's checkpoint
   `--saves` times through CheckpointManager (fsync on). After each save rank 0 writes the same
   number of bytes to one file in the same directory, in 8 MiB chunks, then fsyncs it.
   Ratio = sequential seconds / save seconds (1.0: as fast as a plain sequential write).
2. Resume at a new world size: one rank resumes from a checkpoint saved by one rank (plain, native
   load) and from one saved by `--nproc` ranks (universal conversion, then universal load).
   Time = prepare_ds_config + deepspeed.initialize + load, inside the process.
   Ratio = new-world-size seconds / plain seconds.

The script runs itself under torchrun (`--worker`) for each measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHUNK_BYTES = 8 * 1024 * 1024


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Checkpoint save and resume benchmark")
    parser.add_argument("--hidden", type=int, default=1024, help="MLP width (3 hidden layers)")
    parser.add_argument("--saves", type=int, default=3, help="timed saves per run")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the saving run")
    parser.add_argument("--resumes", type=int, default=2, help="timed resumes per kind")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument(
        "--worker", choices=["save", "resume"], default=None, help=argparse.SUPPRESS
    )
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def build_engine(hidden: int, manager):
    """Return a ZeRO-2 engine of a 3-hidden-layer MLP, its config prepared by `manager`."""
    import deepspeed
    import torch

    world_size = int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, 8),
    )
    config = manager.prepare_ds_config(
        {
            "train_batch_size": 4 * world_size,
            "train_micro_batch_size_per_gpu": 4,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {"stage": 2},
            "steps_per_print": 1000000,
        }
    )
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    return engine


def train_step(engine) -> float:
    import torch

    x = torch.randn(4, 64)
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


def sequential_write_seconds(directory: str, num_bytes: int) -> float:
    """Write `num_bytes` to one new file in 8 MiB chunks, fsync it, and return the seconds."""
    path = os.path.join(directory, "sequential-baseline.bin")
    chunk = os.urandom(CHUNK_BYTES)
    started = time.monotonic()
    with open(path, "wb") as f:
        remaining = num_bytes
        while remaining > 0:
            f.write(chunk[: min(remaining, CHUNK_BYTES)])
            remaining -= CHUNK_BYTES
        f.flush()
        os.fsync(f.fileno())
    seconds = time.monotonic() - started
    os.remove(path)
    return seconds


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch.distributed as dist

    from ddn_dist.checkpoint import CheckpointManager

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    manager = CheckpointManager(args.run_dir, keep_last=1)
    result: dict = {}
    if args.worker == "save":
        engine = build_engine(args.hidden, manager)
        train_step(engine)
        saves = []
        for index in range(args.saves):
            saved = manager.save(engine, f"bench{index}", {"index": index})
            baseline = (
                sequential_write_seconds(manager.checkpoint_dir, saved.num_bytes)
                if rank == 0
                else 0.0
            )
            saves.append(
                {
                    "bytes": saved.num_bytes,
                    "save_seconds": saved.seconds,
                    "sequential_seconds": baseline,
                }
            )
            dist.barrier()
        result = {"saves": saves}
    else:
        started = time.monotonic()
        engine = build_engine(args.hidden, manager)
        client_state = manager.load(engine)
        seconds = time.monotonic() - started
        result = {
            "resume_seconds": seconds,
            "resumed": client_state is not None,
            "loss_after_resume": train_step(engine),
        }
    if rank == 0:
        Path(args.result).write_text(json.dumps(result))
    dist.barrier()


def launch(nproc: int, mode: str, run_dir: Path, result: Path, args: argparse.Namespace) -> dict:
    command = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        str(Path(__file__).resolve()),
        "--worker",
        mode,
        "--run-dir",
        str(run_dir),
        "--result",
        str(result),
        "--hidden",
        str(args.hidden),
        "--saves",
        str(args.saves),
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        PYTHONWARNINGS="ignore::FutureWarning",
    )
    completed = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{mode} run with {nproc} ranks failed:\n{completed.stderr[-3000:]}")
    return json.loads(result.read_text())


def main() -> int:
    args = parse_args()
    if args.worker:
        worker(args)
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ckpt-"))
    saved_many = launch(
        args.nproc, "save", workdir / f"saved_ws{args.nproc}", workdir / "save.json", args
    )
    saves = saved_many["saves"]
    num_bytes = saves[0]["bytes"]
    save_seconds = statistics.median(s["save_seconds"] for s in saves)
    sequential_seconds = statistics.median(s["sequential_seconds"] for s in saves)
    print(
        f"checkpoint size: {num_bytes / 1e6:.1f} MB (hidden {args.hidden}, {args.nproc} ranks, "
        "ZeRO stage 2, fp32 Adam)"
    )
    print(
        f"save: median {save_seconds:.3f} s = {num_bytes / save_seconds / 1e6:.0f} MB/s; "
        f"sequential write: median {sequential_seconds:.3f} s = "
        f"{num_bytes / sequential_seconds / 1e6:.0f} MB/s"
    )
    print(
        f"save throughput / sequential write throughput: {sequential_seconds / save_seconds:.2f} "
        "(target >= 0.5)"
    )

    launch(1, "save", workdir / "saved_ws1", workdir / "save1.json", args)
    timings: dict[str, list[float]] = {"plain": [], "new_world_size": []}
    for index in range(args.resumes):
        for kind, source in (("plain", "saved_ws1"), ("new_world_size", f"saved_ws{args.nproc}")):
            run_dir = workdir / f"resume_{kind}_{index}"
            shutil.copytree(workdir / source, run_dir)
            result = launch(1, "resume", run_dir, workdir / "resume.json", args)
            if not result["resumed"]:
                raise RuntimeError(f"{kind} resume found no checkpoint in {run_dir}")
            timings[kind].append(result["resume_seconds"])
    plain = statistics.median(timings["plain"])
    new_size = statistics.median(timings["new_world_size"])
    print(
        f"resume at 1 rank: plain {plain:.2f} s (runs {timings['plain']}); from {args.nproc} "
        f"ranks via universal conversion {new_size:.2f} s (runs {timings['new_world_size']})"
    )
    print(f"resume at a new world size / plain resume: {new_size / plain:.2f} (target <= 2)")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
