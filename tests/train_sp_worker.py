"""torchrun worker for the distributed Split-and-Prune test (run by tests/test_train_split_prune.py).

For each ZeRO stage given, every rank trains a fresh copy of a tiny DDN for a few steps on its own
fixed batch, sums the S&P statistics over ranks and applies `SplitPrune.step` with
`DeepSpeedParamAccess`. Each rank then saves its events, its working weights and the full fp32
weights and Adam states to `<out>/stage<s>-rank<r>.pt`, with the EMA (beta 0.5) that follows the same row copies. Rank 0 also trains a single-process
reference (plain torch Adam on the concatenated global batch, `LocalParamAccess`) and saves it to
`<out>/reference.pt`. The test compares the files.
"""

from __future__ import annotations

import argparse
import os

STEPS = 3
MICRO_BATCH = 6
LR = 1e-2
EMA_BETA = 0.5
MODEL = {"architecture": "pyramid", "resolution": 8, "image_channels": 1, "max_channels": 32,
         "max_k": 4, "max_blocks": 1, "chain_dropout": 0.0}


def rank_batch(rank: int, step: int):
    import torch

    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.rand(MICRO_BATCH, 1, 8, 8, generator=generator) * 2 - 1


def ds_config(stage: int, world_size: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "train_batch_size": MICRO_BATCH * world_size,
        "optimizer": {"type": "Adam", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8,
                                                 "weight_decay": 0.0, "adam_w_mode": False,
                                                 "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1 << 30,
    }


def full_tensors(engine):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params, exp_avg, exp_avg_sq, working = {}, {}, {}, {}
    for name, param in engine.module.named_parameters():
        params[name] = safe_get_full_fp32_param(param).clone()
        exp_avg[name] = safe_get_full_optimizer_state(param, "exp_avg").clone()
        exp_avg_sq[name] = safe_get_full_optimizer_state(param, "exp_avg_sq").clone()
        if hasattr(param, "ds_id"):
            with deepspeed.zero.GatheredParameters([param]):
                working[name] = param.data.clone()
        else:
            working[name] = param.data.clone()
    return {"params": params, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "working": working}


def train_distributed(stage: int, rank: int, world_size: int) -> dict:
    import torch
    import torch.distributed as dist

    from ddn_dist.model import ModelConfig, SplitPrune, build_model
    from ddn_dist.trainer.ema import WeightEMA
    from ddn_dist.trainer.engine import build_engine
    from ddn_dist.trainer.param_access import DeepSpeedParamAccess

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(MODEL))
    engine = build_engine(model, ds_config(stage, world_size))
    sp = SplitPrune(engine.module, warmup_samples=0)
    ema = WeightEMA(engine.module, stage)
    access = DeepSpeedParamAccess(engine, on_copy=[ema.copy_rows])
    events = []
    for step in range(STEPS):
        out = engine(rank_batch(rank, step))
        loss = out.per_sample_loss.sum() / MICRO_BATCH
        engine.backward(loss)
        engine.step()
        delta = sp.local_stats_delta()
        dist.all_reduce(delta)
        access.defer()
        events.append([(e.layer, e.split, e.pruned) for e in sp.step(delta, access)])
        access.flush()
        ema.update(EMA_BETA)
    result = full_tensors(engine)
    result["events"] = events
    result["ema"] = ema.full_state_dict()
    return result


def train_reference(world_size: int) -> dict:
    import torch

    from ddn_dist.model import LocalParamAccess, ModelConfig, SplitPrune, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(MODEL))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    sp = SplitPrune(model, warmup_samples=0)
    names = {id(p): n for n, p in model.named_parameters()}
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    local = LocalParamAccess(optimizer)

    class AccessWithEMA:
        def copy_rows(self, param, src_rows, dst_rows):
            local.copy_rows(param, src_rows, dst_rows)
            ema[names[id(param)]][dst_rows] = ema[names[id(param)]][src_rows]

    access = AccessWithEMA()
    events = []
    for step in range(STEPS):
        images = torch.cat([rank_batch(r, step) for r in range(world_size)])
        out = model(images)
        # Mean over the global batch, as data parallelism averages the per-rank means.
        loss = out.per_sample_loss.sum() / (MICRO_BATCH * world_size)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        events.append([(e.layer, e.split, e.pruned) for e in sp.step(sp.local_stats_delta(), access)])
        for name, param in model.named_parameters():
            ema[name].lerp_(param.detach(), 1 - EMA_BETA)
    state = {name: optimizer.state[p] for name, p in model.named_parameters()}
    return {
        "events": events,
        "ema": ema,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "exp_avg": {n: s["exp_avg"].clone() for n, s in state.items()},
        "exp_avg_sq": {n: s["exp_avg_sq"].clone() for n, s in state.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", default="1,2,3")
    args = parser.parse_args()

    import deepspeed
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    for stage in [int(s) for s in args.stages.split(",")]:
        result = train_distributed(stage, rank, world_size)
        torch.save(result, os.path.join(args.out, f"stage{stage}-rank{rank}.pt"))
    if rank == 0:
        torch.save(train_reference(world_size), os.path.join(args.out, "reference.pt"))
    dist.barrier()


if __name__ == "__main__":
    main()
