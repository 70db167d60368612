"""Step time of DeepSpeed ZeRO-2 against plain torch DDP on the same DDN, data and ranks.

    .venv/bin/python benchmarks/bench_trainer.py --ranks 2 --steps 30 --config configs/digits.yaml

Starts itself under torchrun (gloo on CPU). Both variants train the model of the config's `model:`
section with Adam on the same fixed batches, including the per-step all-reduce of the
Split-and-Prune statistics and `SplitPrune.step`, so the ratio measures what DeepSpeed adds.
The variants alternate in blocks (DDP, ZeRO-2, DDP, ZeRO-2), so drifts in machine load affect
both. The printed figures are medians over the timed steps of all blocks. Target: ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/digits.yaml", help="YAML config (model section)")
    parser.add_argument("--ranks", type=int, default=2, help="processes (ranks) to start")
    parser.add_argument("--micro-batch", type=int, default=32, help="images per rank per step")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per block")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps per block")
    parser.add_argument("--blocks", type=int, default=2, help="blocks per variant, alternating")
    parser.add_argument("--stage", type=int, default=2, help="ZeRO stage of the DeepSpeed variant")
    parser.add_argument("--without-split-prune", action="store_true",
                        help="skip the S&P statistics all-reduce and row copies in both variants")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_batches(args, rank, model_cfg):
    import torch

    generator = torch.Generator().manual_seed(rank)
    shape = (args.micro_batch, model_cfg.image_channels, model_cfg.resolution, model_cfg.resolution)
    return [torch.rand(shape, generator=generator) * 2 - 1 for _ in range(8)]


def run_steps(forward_backward_step, sp, access, batches, count, split_prune=True):
    import torch.distributed as dist

    times = []
    for i in range(count):
        started = time.perf_counter()
        forward_backward_step(batches[i % len(batches)])
        delta = sp.local_stats_delta()
        if split_prune:
            dist.all_reduce(delta)
            if hasattr(access, "defer"):
                access.defer()
            sp.step(delta, access)
            if hasattr(access, "flush"):
                access.flush()
        times.append(time.perf_counter() - started)
    return times


def ddp_block(args, model_cfg, batches):
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from ddn_dist.model import LocalParamAccess, SplitPrune, build_model

    torch.manual_seed(0)
    model = build_model(model_cfg)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    sp = SplitPrune(model)
    access = LocalParamAccess(optimizer)

    def step(images):
        out = ddp(images)
        loss = out.per_sample_loss.sum() / images.shape[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    split_prune = not args.without_split_prune
    run_steps(step, sp, access, batches, args.warmup_steps, split_prune)
    return run_steps(step, sp, access, batches, args.steps, split_prune)


def zero_block(args, model_cfg, batches, world_size):
    import torch

    from ddn_dist.model import SplitPrune, build_model
    from ddn_dist.trainer.engine import build_engine
    from ddn_dist.trainer.param_access import DeepSpeedParamAccess

    torch.manual_seed(0)
    model = build_model(model_cfg)
    ds_config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": args.micro_batch * world_size,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                                 "weight_decay": 0.0, "adam_w_mode": False,
                                                 "torch_adam": True}},
        "zero_optimization": {"stage": args.stage},
        "steps_per_print": 1 << 30,
    }
    engine = build_engine(model, ds_config)
    sp = SplitPrune(engine.module)
    access = DeepSpeedParamAccess(engine)

    def step(images):
        out = engine(images)
        loss = out.per_sample_loss.sum() / images.shape[0]
        engine.backward(loss)
        engine.step()

    split_prune = not args.without_split_prune
    run_steps(step, sp, access, batches, args.warmup_steps, split_prune)
    return run_steps(step, sp, access, batches, args.steps, split_prune)


def worker(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from ddn_dist.config import load_config, model_config

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model_cfg = model_config(load_config(args.config))
    batches = make_batches(args, rank, model_cfg)
    ddp_times, zero_times = [], []
    for _ in range(args.blocks):
        ddp_times += ddp_block(args, model_cfg, batches)
        zero_times += zero_block(args, model_cfg, batches, world_size)
    if rank == 0:
        from ddn_dist.model import build_model

        ddp = statistics.median(ddp_times)
        zero = statistics.median(zero_times)
        parameters = sum(p.numel() for p in build_model(model_cfg).parameters())
        print(f"model of {args.config}: {parameters / 1e6:.2f} M parameters, {world_size} ranks x "
              f"{args.micro_batch} images, {len(ddp_times)} timed steps per variant")
        print(f"torch DDP      median step {ddp * 1000:8.1f} ms")
        print(f"ZeRO-{args.stage} (DS)   median step {zero * 1000:8.1f} ms")
        print(f"ratio ZeRO-{args.stage} / DDP = {zero / ddp:.3f} (target <= 1.05)")


def main() -> int:
    args = parse_args()
    if args.worker:
        worker(args)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(args.ranks), os.path.abspath(__file__), "--worker", *sys.argv[1:]]
    return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
