"""Measure the cost of the Prometheus metrics on the training step, with metrics on and off.

`--mode loop` (default) runs the digits DDN training step (forward, backward, Adam step) in one
process. It alternates blocks of steps that make the per-step metrics calls of a trainer
(observe_step, update_storage, update_memory, split_prune, node_frequency_spread) with blocks
that run with metrics disabled. While metrics are on, a thread scrapes /metrics every `--scrape-interval` seconds, as Prometheus would. Prints the
median step time of each side and their ratio (target: at most 1.01), plus the cost of the
metrics calls alone in microseconds.

`--mode trainer` runs the real 2-rank CPU trainer (torchrun, configs/digits.yaml) in alternating
pairs of runs with metrics off and on, scraped every `--scrape-interval` seconds. It compares the
median seconds per kimg of their status ticks and leaves out the first tick of each run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_metrics.py --steps 400 --batch 64
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_metrics.py --mode trainer \
        --data runs/data/digits --pairs 2 --kimg 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch
import yaml

from ddn_dist.metrics import MetricsConfig, TrainMetrics
from ddn_dist.model import ModelConfig, build_model

REPO = Path(__file__).resolve().parents[1]


def make_metrics(enabled: bool) -> TrainMetrics:
    config = MetricsConfig(enabled=enabled, port_base=0, bind_address="127.0.0.1")
    return TrainMetrics(
        config, run="bench", job_id="0", rank=0, local_rank=0, node="localhost", world_size=1,
        config_hash="bench",
    )


def record_step(m: TrainMetrics, step: int, seconds: float, loss: float, groups: list[str]) -> None:
    """Make the metrics calls of one training step."""
    m.observe_step(
        images=64, kimg=step * 0.064, step_seconds=seconds, data_wait_seconds=seconds * 0.01,
        loss=loss, group_losses={g: loss for g in groups}, grad_norm=1.0, lr=1e-3,
    )
    m.update_storage({"bytes_read": step * 4096, "retries": 0, "errors": 0, "corrupt_skipped": 0,
                      "padded": 0, "dropped": 0, "samples_consumed": step * 64})
    m.update_memory()
    for group in groups:
        m.split_prune(group, 0)
        m.node_frequency_spread(group, 0.1)


def scrape_forever(m: TrainMetrics, interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        with urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=5) as response:
            response.read()


def run_block(model, optimizer, batch, m: TrainMetrics, steps: int, first_step: int,
              groups: list[str]) -> list[float]:
    """Run `steps` training steps and return their wall times in seconds."""
    times = []
    for i in range(steps):
        start = time.perf_counter()
        out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        loss = float(out.loss.detach())
        record_step(m, first_step + i, time.perf_counter() - start, loss, groups)
        times.append(time.perf_counter() - start)
    return times


def bench_loop(args: argparse.Namespace) -> None:
    """Compare single-process training steps with and without the metrics calls."""
    torch.manual_seed(0)
    preset = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    model_cfg = ModelConfig.from_dict(preset["model"])
    model = build_model(model_cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = torch.rand(args.batch, model_cfg.image_channels, model_cfg.resolution,
                       model_cfg.resolution) * 2 - 1
    groups = sorted(set(model.layer_groups))

    on, off = make_metrics(True), make_metrics(False)
    on.start()
    stop = threading.Event()
    scraper = threading.Thread(target=scrape_forever, args=(on, args.scrape_interval, stop),
                               daemon=True)
    scraper.start()

    run_block(model, optimizer, batch, off, args.block, 0, groups)  # warm-up
    times = {"on": [], "off": []}
    step = 0
    while len(times["on"]) < args.steps:
        for side, m in (("on", on), ("off", off)):
            times[side] += run_block(model, optimizer, batch, m, args.block, step, groups)
            step += args.block
    stop.set()
    scraper.join()
    on.close()

    calls = []
    for i in range(2000):
        start = time.perf_counter()
        record_step(on, i, 0.1, 0.5, groups)
        calls.append(time.perf_counter() - start)

    median_on = statistics.median(times["on"])
    median_off = statistics.median(times["off"])
    print(f"steps per side: {len(times['on'])}, batch {args.batch}, groups {len(groups)}, "
          f"scrape every {args.scrape_interval} s")
    print(f"median step time, metrics off: {median_off * 1e3:.3f} ms")
    print(f"median step time, metrics on:  {median_on * 1e3:.3f} ms")
    print(f"ratio on/off: {median_on / median_off:.4f}")
    print(f"metrics calls per step alone: median {statistics.median(calls) * 1e6:.1f} us "
          f"({statistics.median(calls) / median_off * 100:.3f} % of the off step)")


def free_port_pair() -> int:
    """Return a port p such that p and p + 1 were both free on 127.0.0.1 a moment ago."""
    while True:
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            base = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
            return base


def scrape_ports(ports: list[int], interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        for port in ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    r.read()
            except OSError:
                pass  # the rank has not started serving yet, or has exited


def train_once(
    args: argparse.Namespace, metrics_on: bool, scratch: Path, index: int
) -> list[float]:
    """Run the 2-rank trainer once and return seconds per kimg of each tick after the first."""
    run_dir = scratch / f"run{index}-{'on' if metrics_on else 'off'}"
    port_base = free_port_pair()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
        "-m", "ddn_dist.train", "--config", str(REPO / "configs" / "digits.yaml"),
        f"data.data={args.data}", f"train.run_dir={run_dir}", f"train.duration_kimg={args.kimg}",
        f"train.tick_kimg={args.tick_kimg}", "train.checkpoint_kimg=0", "train.snapshot_kimg=0",
        f"metrics.enabled={'true' if metrics_on else 'false'}",
        f"metrics.port_base={port_base}", "metrics.bind_address=127.0.0.1",
        f"metrics.sd_dir={scratch / 'sd'}",
    ]
    stop = threading.Event()
    scraper = threading.Thread(target=scrape_ports,
                               args=([port_base, port_base + 1], args.scrape_interval, stop),
                               daemon=True)
    if metrics_on:
        scraper.start()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    stop.set()
    if metrics_on:
        scraper.join()
    if result.returncode != 0:
        raise RuntimeError(f"training run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    ticks = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return [tick["seconds_per_kimg"] for tick in ticks[1:]]


def bench_trainer(args: argparse.Namespace) -> None:
    """Compare real 2-rank training runs with metrics off and on, in alternating pairs."""
    times: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as scratch:
        for pair in range(args.pairs):
            for side in ("off", "on"):
                ticks = train_once(args, side == "on", Path(scratch), pair)
                times[side] += ticks
                print(f"pair {pair} metrics {side}: median {statistics.median(ticks):.3f} s/kimg "
                      f"over {len(ticks)} ticks", flush=True)
    median_on = statistics.median(times["on"])
    median_off = statistics.median(times["off"])
    print(f"median seconds per kimg, metrics off: {median_off:.3f}")
    print(f"median seconds per kimg, metrics on:  {median_on:.3f}")
    print(f"ratio on/off: {median_on / median_off:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["loop", "trainer"], default="loop",
                        help="loop: one process, alternating blocks; trainer: real 2-rank runs")
    parser.add_argument("--steps", type=int, default=400, help="loop: steps per side (default 400)")
    parser.add_argument("--block", type=int, default=20, help="loop: steps per alternating block")
    parser.add_argument("--batch", type=int, default=64, help="loop: images per step")
    parser.add_argument("--scrape-interval", type=float, default=1.0,
                        help="seconds between scrapes while metrics are on (default 1)")
    parser.add_argument("--data", default="runs/data/digits",
                        help="trainer: digits shard directory (from `ddn prep digits`)")
    parser.add_argument("--pairs", type=int, default=2, help="trainer: off/on run pairs")
    parser.add_argument("--kimg", type=float, default=3.0, help="trainer: kimg per run")
    parser.add_argument("--tick-kimg", type=float, default=0.25,
                        help="trainer: kimg per status tick, the unit of measurement")
    args = parser.parse_args()
    if args.mode == "loop":
        bench_loop(args)
    else:
        bench_trainer(args)


if __name__ == "__main__":
    main()
