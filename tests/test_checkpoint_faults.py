"""Crashes during training and during checkpoint writing, under torchrun with 2 CPU ranks.

Every crash is a real SIGKILL of a worker process, injected by tests/checkpoint_train_script.py.
"""

from __future__ import annotations

import os

import pytest

from ddn_dist.checkpoint import CheckpointManager
from ddn_dist.checkpointing.layout import MARKER_NAME
from tests.checkpoint_harness import run_training

pytestmark = pytest.mark.slow

STEPS = 6


def test_kill_during_save_keeps_previous(tmp_path):
    run_dir = tmp_path / "run"
    crashed = run_training(
        tmp_path,
        "crashed",
        2,
        run_dir,
        "--steps",
        str(STEPS),
        "--save-every",
        "2",
        "--kill-in-save",
        "4",
    )
    assert crashed.returncode != 0, "torchrun must report the killed worker"
    assert "TRAINING_DONE" not in crashed.output
    checkpoints = run_dir / "checkpoints"
    # Rank 1 wrote its optimizer shard of step 4 and died: a partial directory without a marker.
    partial = checkpoints / "step00004"
    assert (partial / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    assert not (partial / MARKER_NAME).exists()
    assert not (checkpoints / "latest").exists(), "DeepSpeed's own pointer must never be written"
    assert CheckpointManager(run_dir).latest_tag() == "step00002"

    resumed = run_training(
        tmp_path, "resumed", 2, run_dir, "--steps", str(STEPS), "--save-every", "2"
    )
    assert resumed.succeeded, resumed.output[-3000:]
    assert resumed.resumed_from() == [2]
    assert sorted(resumed.loss_by_step()) == [3, 4, 5, 6]
    # The crashed run finished steps 3 and 4 from the same state: the resumed run must repeat them.
    before, after = crashed.loss_by_step(), resumed.loss_by_step()
    assert after[3] == before[3]
    assert after[4] == before[4]
    assert CheckpointManager(run_dir).latest_tag() == "step00006"
    assert sorted(os.listdir(checkpoints / "step00004")).count(MARKER_NAME) == 1


def test_torchrun_restarts_killed_worker(tmp_path):
    run_dir = tmp_path / "run"
    result = run_training(
        tmp_path,
        "restarted",
        2,
        run_dir,
        "--steps",
        str(STEPS),
        "--save-every",
        "2",
        "--kill-at-step",
        "4",
        max_restarts=1,
    )
    assert result.succeeded, result.output[-3000:]
    assert "TRAINING_DONE" in result.output
    # Attempt 0 trained steps 1-4 and saved step 4; rank 1 died before step 5.
    assert result.resumed_from() == [0, 4]
    first, second = result.loss_by_step(attempt=0), result.loss_by_step(attempt=1)
    assert sorted(first) == [1, 2, 3, 4]
    assert sorted(second) == [5, 6]
    assert CheckpointManager(run_dir).latest_tag() == "step00006"
