"""Tiny DeepSpeed training run used by the checkpoint tests (run it under torchrun).

An MLP regresses a fixed random function on synthetic batches. Batch `step` is drawn from a
generator seeded with (seed, step) and split evenly over the ranks, so the global batch and hence
the loss curve do not depend on the world size. Rank 0 appends one JSON line per step to --loss-log:
{"step", "loss", "world_size", "attempt"}. Checkpoints go through CheckpointManager.

Fault injection (all by SIGKILL of the process itself, so nothing is cleaned up):
--kill-at-step N: rank 1 dies before step N, on the first attempt only (torchrun restarts).
--kill-in-save N: rank 1 dies right after writing its first file of the checkpoint at step N.
--kill-before-commit N: rank 0 dies after all ranks wrote step N's checkpoint, before its marker.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from ddn_dist.checkpoint import CheckpointManager
from ddn_dist.logs import setup_logging

GLOBAL_BATCH = 12  # divisible by world sizes 1, 2, 3 and 4
IN_FEATURES, HIDDEN, OUT_FEATURES = 8, 32, 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--stage", type=int, default=2, help="ZeRO stage (0-3)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--steps", type=int, default=8, help="total optimizer steps")
    parser.add_argument("--stop-at", type=int, default=0, help="save and exit after this step")
    parser.add_argument("--save-every", type=int, default=0, help="save every N steps (0: never)")
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--mirror-url", default=None)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="hidden width (model size)")
    parser.add_argument("--loss-log", required=True, help="JSON lines file, appended by rank 0")
    parser.add_argument(
        "--final-state", default=None, help="torch.save file of final weights + Adam"
    )
    parser.add_argument("--kill-at-step", type=int, default=0)
    parser.add_argument("--kill-in-save", type=int, default=0)
    parser.add_argument("--kill-before-commit", type=int, default=0)
    return parser.parse_args()


def make_model(hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, OUT_FEATURES),
    )


def global_batch(seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return inputs (GLOBAL_BATCH, IN) and targets (GLOBAL_BATCH, OUT) of one step."""
    target_map = torch.randn(
        IN_FEATURES, OUT_FEATURES, generator=torch.Generator().manual_seed(seed)
    )
    x = torch.randn(
        GLOBAL_BATCH, IN_FEATURES, generator=torch.Generator().manual_seed(seed * 1000 + step)
    )
    return x, torch.sin(x @ target_map)


def ds_config(stage: int, world_size: int, bf16: bool) -> dict:
    return {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world_size,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 4},
        },
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1000000,
    }


def install_kill_hooks(
    args: argparse.Namespace, engine, manager: CheckpointManager, rank: int
) -> None:
    """Make this rank SIGKILL itself in the save chosen by --kill-in-save/--kill-before-commit."""
    state = {"step": 0}

    if args.kill_in_save and rank == 1:
        original_save = engine.checkpoint_engine.save

        def save_then_die(state_dict, path):
            original_save(state_dict, path)
            if state["step"] == args.kill_in_save:
                os.kill(os.getpid(), signal.SIGKILL)

        engine.checkpoint_engine.save = save_then_die

    if args.kill_before_commit and rank == 0:
        original_commit = manager._commit

        def die_then_commit(engine_, tag):
            if state["step"] == args.kill_before_commit:
                os.kill(os.getpid(), signal.SIGKILL)
            return original_commit(engine_, tag)

        manager._commit = die_then_commit

    return state


def main() -> int:
    args = parse_args()
    setup_logging("INFO")
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    manager = CheckpointManager(args.run_dir, keep_last=args.keep_last, mirror_url=args.mirror_url)
    config = manager.prepare_ds_config(ds_config(args.stage, world_size, args.bf16))
    model = make_model(args.hidden)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    kill_state = install_kill_hooks(args, engine, manager, rank)

    client_state = manager.load(engine)
    start = 0 if client_state is None else int(client_state["step"])
    if rank == 0:
        print(f"RESUMED_FROM_STEP {start} universal={config.get('checkpoint', {})}", flush=True)

    per_rank = GLOBAL_BATCH // world_size
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    for step in range(start, args.steps):
        if args.kill_at_step and step == args.kill_at_step and rank == 1 and attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = global_batch(args.seed, step)
        x = x[rank * per_rank : (rank + 1) * per_rank].to(dtype)
        y = y[rank * per_rank : (rank + 1) * per_rank].to(dtype)
        loss = torch.nn.functional.mse_loss(engine(x).float(), y.float())
        engine.backward(loss)
        engine.step()

        mean_loss = loss.detach().float().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world_size
        if rank == 0:
            with open(args.loss_log, "a", encoding="utf-8") as f:
                record = {
                    "step": step + 1,
                    "loss": mean_loss.item(),
                    "world_size": world_size,
                    "attempt": attempt,
                }
                f.write(json.dumps(record) + "\n")

        done = step + 1
        if (args.save_every and done % args.save_every == 0) or done == args.stop_at:
            kill_state["step"] = done
            manager.save(engine, f"step{done:05d}", {"step": done, "rng": torch.get_rng_state()})
        if done == args.stop_at:
            break

    if args.final_state:
        weights, exp_avg, exp_avg_sq = {}, {}, {}
        for name, param in engine.module.named_parameters():
            if args.stage == 0:
                # Without ZeRO the safe_get_* helpers return None, so read the torch optimizer.
                adam_state = engine.optimizer.state[param]
                weights[name] = param.detach().float().clone()
                exp_avg[name] = adam_state["exp_avg"].clone()
                exp_avg_sq[name] = adam_state["exp_avg_sq"].clone()
                continue
            weights[name] = safe_get_full_fp32_param(param)
            exp_avg[name] = safe_get_full_optimizer_state(param, "exp_avg")
            exp_avg_sq[name] = safe_get_full_optimizer_state(param, "exp_avg_sq")
        if rank == 0:
            torch.save(
                {"weights": weights, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, args.final_state
            )
    dist.barrier()
    if rank == 0:
        print("TRAINING_DONE", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
