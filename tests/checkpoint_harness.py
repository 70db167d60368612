"""Launch tests/checkpoint_train_script.py under torchrun and read back what it recorded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "checkpoint_train_script.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = 6  # steps of every shared run
STOP_AT = 3  # step after which the stopped runs save and exit


@dataclass
class RunResult:
    """Exit status, combined output and per-step losses of one torchrun launch."""

    returncode: int
    output: str
    losses: list[dict]  # every line of the loss log written during this launch

    @property
    def succeeded(self) -> bool:
        """True when training finished.

        ZeRO-3 runs on CPU (DeepSpeed 0.19.8, torch 2.13) have been seen to abort at process exit,
        after training, with "terminate called without an active exception". Such a run counts.
        """
        if self.returncode == 0:
            return True
        return (
            "TRAINING_DONE" in self.output and "terminate called without an active" in self.output
        )

    def loss_by_step(self, attempt: int | None = None) -> dict[int, float]:
        """Return {step: loss}, optionally only from one torchrun attempt."""
        return {
            r["step"]: r["loss"] for r in self.losses if attempt is None or r["attempt"] == attempt
        }

    def resumed_from(self) -> list[int]:
        """Return the step each attempt resumed from (0 for a fresh start), in order."""
        return [
            int(line.split()[1])
            for line in self.output.splitlines()
            if line.startswith("RESUMED_FROM_STEP")
        ]


def run_training(
    tmp: Path,
    name: str,
    nproc: int,
    run_dir: Path,
    *args: str,
    max_restarts: int = 0,
    env: dict | None = None,
    timeout: float = 300,
) -> RunResult:
    """Run the training script with `nproc` ranks; `name` names its loss log and output file."""
    loss_log = tmp / f"{name}.jsonl"
    if loss_log.exists():
        loss_log.unlink()

    command = [
        str(TORCHRUN),
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        str(max_restarts),
        "--monitor-interval",
        "0.5",
        str(SCRIPT),
        "--run-dir",
        str(run_dir),
        "--loss-log",
        str(loss_log),
        *args,
    ]
    full_env = dict(os.environ)
    full_env.update(
        {
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
            "PYTHONWARNINGS": "ignore::FutureWarning",
            # Restarted workers otherwise reuse the agent's TCP store and may connect to the dead
            # attempt's gloo port (torch 2.13).
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        }
    )
    full_env.update(env or {})

    completed = subprocess.run(
        command,
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )

    output = completed.stdout + completed.stderr
    (tmp / f"{name}.out").write_text(output)
    losses = []
    if loss_log.exists():
        losses = [json.loads(line) for line in loss_log.read_text().splitlines() if line.strip()]
    return RunResult(returncode=completed.returncode, output=output, losses=losses)


def load_final_state(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Return {"weights"|"exp_avg"|"exp_avg_sq": {param name: tensor}} saved by --final-state."""
    return torch.load(path, map_location="cpu", weights_only=False)


class StageRuns:
    """A reference run and a stopped run of one ZeRO stage, shared by that stage's tests."""

    def __init__(self, tmp: Path, stage: int, reference: StageRuns | None):
        self.tmp = tmp
        self.stage = stage
        self.reference_dir = tmp / "reference_run"
        if reference is None:
            self.reference = run_training(
                tmp,
                "reference",
                2,
                tmp / "reference_run",
                "--stage",
                str(stage),
                "--steps",
                str(STEPS),
                "--save-every",
                str(STEPS),
                "--final-state",
                str(tmp / "reference_state.pt"),
            )
            assert self.reference.succeeded, self.reference.output[-3000:]
            self.reference_state = tmp / "reference_state.pt"
        else:
            self.reference = reference.reference
            self.reference_state = reference.reference_state
            self.reference_dir = reference.reference_dir
        self.stopped_dir = tmp / "stopped_run"
        stopped = run_training(
            tmp,
            "stopped",
            2,
            self.stopped_dir,
            "--stage",
            str(stage),
            "--steps",
            str(STEPS),
            "--stop-at",
            str(STOP_AT),
        )
        assert stopped.succeeded, stopped.output[-3000:]
        self.stopped = stopped

    def resume(self, nproc: int):
        """Copy the stopped run and resume it to the end with `nproc` ranks."""
        name = f"resume_ws{nproc}"
        run_dir = self.tmp / name
        shutil.copytree(self.stopped_dir, run_dir)
        result = run_training(
            self.tmp,
            name,
            nproc,
            run_dir,
            "--stage",
            str(self.stage),
            "--steps",
            str(STEPS),
            "--final-state",
            str(self.tmp / f"{name}.pt"),
        )
        assert result.succeeded, result.output[-3000:]
        return result, load_final_state(self.tmp / f"{name}.pt")


_stage_runs: dict[int, StageRuns] = {}


def shared_stage_runs(tmp_path_factory, stage: int) -> StageRuns:
    """Return the runs of `stage`, launching them on first use in this pytest session."""
    if stage not in _stage_runs:
        reference = None if stage in (2, 3) else shared_stage_runs(tmp_path_factory, 2)
        _stage_runs[stage] = StageRuns(tmp_path_factory.mktemp(f"stage{stage}"), stage, reference)
    return _stage_runs[stage]
