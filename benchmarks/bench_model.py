"""Model benchmarks on CPU: DDN against a plain output head, and Split-and-Prune bookkeeping.

Usage (from the repository root):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_model.py [--steps 10] [--batch 32]

Part 1 trains a CIFAR-shaped small DDN (32x32 RGB, 64 channels, 2 blocks per scale, K=64) and
the same backbone with one plain 1x1 output head and an MSE loss, with Adam, and prints the
median step time of each (steps interleaved, same process) and the peak memory of each. Memory
is the growth of the resident set size (Linux VmHWM minus VmRSS before the first step, so it
covers activations, gradients and Adam state), each model measured in its own subprocess.
The DDN step includes its Split-and-Prune statistics collection and step.

Part 2 times the Split-and-Prune bookkeeping of one training step at FFHQ 64x64 shapes (127
DDLs, K=512 and 256): recording a micro-batch of distances in every DDL, building the flat
delta and `SplitPrune.step`, for the dense and the compact delta layouts. The step it is
compared with is an estimate: the multiply-adds of a training step (3x the forward) divided by
the multiply-add rate of a 3x3 convolution measured on the same CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from ddn_dist.model import LocalParamAccess, ModelConfig, SplitPrune, build_model
from ddn_dist.model.ddl import DiscreteDistributionLayer

SMALL = dict(resolution=32, image_channels=3, max_channels=64, max_k=64, max_blocks=2)
FFHQ = ModelConfig(resolution=64, image_channels=3, max_channels=256, max_k=512, max_blocks=64)


class PlainHead(nn.Module):
    """The DDN's blocks in the same order, then one 1x1 convolution to the image."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ddn = build_model(cfg)
        self.blocks = ddn.blocks
        self.register_buffer("initial_feature", ddn.initial_feature.clone(), persistent=False)
        last_channels = cfg.scale_channels()[-1]
        self.head = nn.Conv2d(last_channels, cfg.image_channels, 1, bias=False)

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        x = self.initial_feature.expand(target.shape[0], -1, 1, 1)
        for block in self.blocks:
            x = block(x)
        return F.mse_loss(self.head(x), target)


def make_trainer(kind: str, batch: int):
    """Return a closure running one training step of the DDN or the plain-head model."""
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL)
    target = torch.rand(batch, 3, 32, 32) * 2 - 1
    if kind == "plain":
        model = PlainHead(cfg)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step() -> None:
            loss = model(target)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            optimizer.step()

        return step
    model = build_model(cfg).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    split_prune = SplitPrune(model)
    access = LocalParamAccess(optimizer)

    def step() -> None:
        loss = model(target).loss
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        split_prune.step(split_prune.local_stats_delta(), access)

    return step


def read_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(kind: str, batch: int, steps: int) -> None:
    """Run in a subprocess: print the peak RSS growth in bytes over `steps` training steps."""
    step = make_trainer(kind, batch)
    before = read_status_kib("VmRSS")
    for _ in range(steps):
        step()
    print(json.dumps({"peak_growth_bytes": (read_status_kib("VmHWM") - before) * 1024}))


def measure_memory(kind: str, batch: int) -> int:
    command = [sys.executable, __file__, "--memory-child", kind, "--batch", str(batch)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_growth_bytes"]


def compare_heads(batch: int, steps: int) -> None:
    trainers = {kind: make_trainer(kind, batch) for kind in ("ddn", "plain")}
    for step in trainers.values():
        step()
        step()
    times: dict[str, list[float]] = {kind: [] for kind in trainers}
    for _ in range(steps):
        for kind, step in trainers.items():
            start = time.perf_counter()
            step()
            times[kind].append(time.perf_counter() - start)
    median = {kind: statistics.median(values) for kind, values in times.items()}
    memory = {kind: measure_memory(kind, batch) for kind in trainers}
    layers = build_model(ModelConfig(**SMALL)).num_layers
    print(f"DDN vs plain head, 32x32 RGB, 64 channels, {layers} layers, K=64, batch {batch}, CPU:")
    for kind in ("ddn", "plain"):
        print(f"  {kind:5s} step {median[kind] * 1e3:8.1f} ms   peak memory growth "
              f"{memory[kind] / 2**20:8.1f} MiB")
    print(f"  ratio time {median['ddn'] / median['plain']:.3f}x (target <= 1.10x), "
          f"memory {memory['ddn'] / memory['plain']:.3f}x (target <= 1.15x)")


def ffhq_forward_macs() -> int:
    """Multiply-adds of one FFHQ 64x64 forward pass per sample (convolutions and DDL heads)."""
    total = 0
    previous = FFHQ.scale_channels()[0]
    for scale, (channels, blocks) in enumerate(zip(FFHQ.scale_channels(), FFHQ.scale_blocks())):
        pixels = 4**scale
        for _ in range(blocks):
            total += 9 * previous * channels * pixels + 9 * channels * channels * pixels
            if previous != channels:
                total += previous * channels * pixels
            half = channels // 2
            total += half * half * pixels + 2 * 3 * half * pixels  # Gram matrix, selected head, leak
            previous = channels
    return total


def conv_macs_per_second() -> float:
    """Measured multiply-add rate of a 256-channel 3x3 convolution at 16x16 (forward)."""
    conv = nn.Conv2d(256, 256, 3, padding=1)
    x = torch.randn(8, 256, 16, 16)
    with torch.no_grad():
        conv(x)
        start = time.perf_counter()
        repeats = 5
        for _ in range(repeats):
            conv(x)
        seconds = (time.perf_counter() - start) / repeats
    return 9 * 256 * 256 * 256 * 8 / seconds


def ffhq_ddls() -> SimpleNamespace:
    ddls = []
    for scale, (channels, k, blocks) in enumerate(
        zip(FFHQ.scale_channels(), FFHQ.scale_ks(), FFHQ.scale_blocks())
    ):
        for _ in range(blocks):
            ddls.append(DiscreteDistributionLayer(channels, k, 3, group=f"{2**scale}x{2**scale}"))
    return SimpleNamespace(ddls=ddls)


def time_bookkeeping(compact: bool, batch: int, steps: int, prefill: float) -> tuple[float, int, int]:
    """Return (seconds per step, delta length, split events per step) of S&P at FFHQ shapes."""
    holder = ffhq_ddls()
    options = dict(max_samples_per_step=batch, rank=0, world_size=64) if compact else {}
    split_prune = SplitPrune(holder, **options)
    for stats in split_prune.stats:
        # Start from counts as after `prefill` samples per head, so the rule gets realistic frequencies.
        stats.count.fill_(prefill)
        stats.seen.fill_(prefill * stats.count.numel())
        stats.near2.fill_(prefill / (stats.count.numel() - 1))
        stats.near2.fill_diagonal_(0)
    access = LocalParamAccess(None)
    generator = torch.Generator().manual_seed(0)
    samples = [torch.rand(batch, ddl.k, generator=generator) for ddl in holder.ddls]
    elapsed, events = [], 0
    for _ in range(steps):
        start = time.perf_counter()
        for ddl, distances in zip(holder.ddls, samples):
            ddl.pending_stats().record(distances)
        delta = split_prune.local_stats_delta()
        events += len(split_prune.step(delta, access))
        elapsed.append(time.perf_counter() - start)
    return statistics.median(elapsed), delta.numel(), events // steps


def compare_bookkeeping(batch: int, steps: int) -> None:
    macs = ffhq_forward_macs()
    rate = conv_macs_per_second()
    step_seconds = 3 * macs * batch / rate
    print(f"Split-and-Prune bookkeeping at FFHQ 64x64 shapes (127 DDLs, K=512/256), "
          f"micro-batch {batch}, CPU:")
    print(f"  training step estimate: 3 x {macs / 1e9:.1f} GMAC/sample x {batch} / "
          f"{rate / 1e9:.1f} GMAC/s = {step_seconds:.1f} s")
    for compact in (False, True):
        for prefill, label in ((0.0, "fresh statistics"), (1000.0, "1000 samples per head")):
            seconds, length, events = time_bookkeeping(compact, batch, steps, prefill)
            layout = "compact (64 ranks)" if compact else "dense"
            print(f"  {layout:18s} {label:22s} {seconds * 1e3:8.1f} ms/step = "
                  f"{100 * seconds / step_seconds:.3f} % of the step; delta {length:,} float64 "
                  f"({length * 8 / 2**20:.1f} MiB to all_reduce), {events} splits/step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    parser.add_argument("--batch", type=int, default=32, help="micro-batch size in images")
    parser.add_argument("--memory-child", choices=("ddn", "plain"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_child:
        memory_child(args.memory_child, args.batch, steps=3)
        return
    compare_heads(args.batch, args.steps)
    compare_bookkeeping(args.batch, max(3, args.steps // 2))


if __name__ == "__main__":
    main()
