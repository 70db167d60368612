"""Helpers for the trainer tests: torchrun command lines and small training configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A DDN small enough for CPU tests: 4 layers (1x1 to 8x8), 32 channels, K=8.
TINY_MODEL = {"architecture": "pyramid", "resolution": 8, "image_channels": 1, "max_channels": 32,
              "max_k": 8, "max_blocks": 1, "chain_dropout": 0.05}


def torchrun_command(nproc: int, max_restarts: int = 0) -> list[str]:
    """Return a torchrun command line on a free local port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(nproc), "--max-restarts", str(max_restarts)]


def train_env() -> dict[str, str]:
    """Return the environment of a CPU training job: one thread per rank, no warnings."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore",
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    return env


def write_config(path, data_url: str, run_dir: str, **sections) -> str:
    """Write a small digits training config; keyword arguments update its sections."""
    config = {
        "model": dict(TINY_MODEL),
        "data": {"data": data_url, "num_workers": 1, "seed": 0},
        "train": {"run_dir": run_dir, "batch": 32, "duration_kimg": 0.64, "lr": 2e-3,
                  "lr_warmup_kimg": 0.1, "tick_kimg": 0.032, "snapshot_kimg": 0.32,
                  "checkpoint_kimg": 0.32, "checkpoint_minutes": 0, "grid_size": 4},
        "deepspeed": {"stage": 2, "precision": "fp32", "micro_batch": 16},
        "checkpoint": {"keep_last": 2},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle)
    return str(path)


def run_train(config: str, nproc: int = 2, overrides: list[str] = (), timeout: float = 300,
              ) -> subprocess.CompletedProcess:
    """Run `python -m ddn_dist.train` under torchrun and return the finished process."""
    command = torchrun_command(nproc) + ["-m", "ddn_dist.train", "--config", config, *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=train_env())


def read_stats(run_dir) -> list[dict]:
    """Return the records of `<run_dir>/stats.jsonl`."""
    with open(os.path.join(run_dir, "stats.jsonl")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def output_of(proc: subprocess.CompletedProcess) -> str:
    """Return the tail of a finished process's output for assertion messages."""
    return (proc.stdout[-3000:] + "\n" + proc.stderr[-5000:]).strip()
