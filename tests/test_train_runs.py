"""End-to-end runs of `python -m ddn_dist.train` under torchrun: 2 CPU ranks, gloo, digits shards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ddn_dist.checkpoint import CheckpointManager
from ddn_dist.data.audit import read_audit
from ddn_dist.snapshot import load_snapshot
from ddn_dist.trainer.preemption import EXIT_CONFIG
from tests.train_helpers import (REPO, output_of, read_stats, run_train, torchrun_command,
                                 train_env, write_config)

DIGITS_IMAGES = 1797

pytestmark = pytest.mark.slow


def _train_ok(tmp_path, digits_shards, name, overrides=(), nproc=2, **sections):
    run_dir = tmp_path / name
    config = write_config(tmp_path / f"{name}.yaml", digits_shards, str(run_dir), **sections)
    proc = run_train(config, nproc=nproc, overrides=list(overrides))
    assert proc.returncode == 0, output_of(proc)
    return run_dir, proc


@pytest.mark.parametrize("stage, precision", [(1, "fp32"), (2, "bf16"), (3, "fp32")])
def test_zero_stage_trains(tmp_path, digits_shards, stage, precision):
    # Stage 3 also keeps an EMA, partitioned like the weights, and snapshots it.
    ema_halflife = 0.1 if stage == 3 else 0.0
    run_dir, _ = _train_ok(tmp_path, digits_shards, f"z{stage}",
                           [f"deepspeed.stage={stage}", f"deepspeed.precision={precision}",
                            f"train.ema_halflife_kimg={ema_halflife}"])
    stats = read_stats(run_dir)
    assert [r["step"] for r in stats] == list(range(1, 21))
    first = sum(r["loss"] for r in stats[:3]) / 3
    last = sum(r["loss"] for r in stats[-3:]) / 3
    assert last < 0.8 * first, [r["loss"] for r in stats]
    assert sum(r["sp_events"] for r in stats) > 0

    for name in ("snapshot-000000.safetensors", "snapshot-000001.safetensors",
                 "snapshot-latest.safetensors", "samples-000001.png", "config.yaml"):
        assert (run_dir / name).is_file(), name
    model, meta = load_snapshot(str(run_dir / "snapshot-latest.safetensors"))
    assert meta["step"] == 20
    assert meta["ema"] is (stage == 3)
    assert model.num_layers == 4
    trained = CheckpointManager(str(run_dir)).export_fp32_state_dict()
    snapshot = model.state_dict()
    differs = any(not torch.equal(snapshot[name], trained[name]) for name in snapshot)
    # The snapshot contains the EMA when enabled, else exactly the trained fp32 weights.
    assert differs is (stage == 3)
    assert CheckpointManager(str(run_dir)).latest_tag() == "step00000020"


@pytest.mark.parametrize("stop_step", [7, 4])
def test_resume_matches_uninterrupted(tmp_path, digits_shards, stop_step):
    # 7 steps of 256 images use up epoch 0: 1,792 of 1,797 images, because the partial round is
    # dropped. A stop at step 7 resumes at the start of epoch 1, a stop at step 4 in the middle of
    # epoch 0, where the loader continues the interrupted pass batch for batch. Model, Adam, S&P
    # statistics, learning rate and the chain-dropout random streams must continue bit for bit.
    sections = {"train": {"batch": 256, "duration_kimg": 2.56, "tick_kimg": 0.256,
                          "snapshot_kimg": 0, "checkpoint_kimg": 0},
                "deepspeed": {"micro_batch": 128}}
    straight, _ = _train_ok(tmp_path, digits_shards, "straight", **sections)
    staged, first = _train_ok(tmp_path, digits_shards, "staged",
                              [f"train.stop_at_step={stop_step}"], **sections)
    assert f"stopped at step {stop_step}" in first.stderr
    assert CheckpointManager(str(staged)).latest_tag() == f"step{stop_step:08d}"
    _, second = _train_ok(tmp_path, digits_shards, "staged", **sections)
    assert f"resumed at step {stop_step}" in second.stderr

    expected = [(r["step"], r["loss"], r["group_losses"]) for r in read_stats(straight)]
    resumed = [(r["step"], r["loss"], r["group_losses"]) for r in read_stats(staged)]
    assert [step for step, _, _ in resumed] == list(range(1, 11))
    assert resumed == expected
    weights_straight = load_file(straight / "snapshot-latest.safetensors")
    weights_staged = load_file(staged / "snapshot-latest.safetensors")
    assert weights_straight.keys() == weights_staged.keys()
    for name, value in weights_straight.items():
        assert torch.equal(value, weights_staged[name]), name


def test_elastic_resume_consumes_each_sample_once(tmp_path, digits_shards):
    # Global batch 48 = 8 x accumulation 3 x 2 ranks = 8 x 6 x 1 = 8 x 2 x 3.
    sections = {"train": {"batch": 48, "duration_kimg": 1.92, "tick_kimg": 0.48,
                          "snapshot_kimg": 0, "checkpoint_kimg": 0},
                "deepspeed": {"micro_batch": 8}}
    stop_step = 10
    run_dir, _ = _train_ok(tmp_path, digits_shards, "elastic",
                           [f"train.stop_at_step={stop_step}",
                            f"data.audit_dir={tmp_path / 'audit-ws2'}"], **sections)
    before = read_audit(str(tmp_path / "audit-ws2"))
    assert len(before) == stop_step * 48
    assert {r.step for r in before} == set(range(1, stop_step + 1))

    for world_size in (1, 3):
        resumed_dir = tmp_path / f"elastic-ws{world_size}"
        shutil.copytree(run_dir, resumed_dir)
        audit = tmp_path / f"audit-ws{world_size}"
        config = write_config(tmp_path / f"ws{world_size}.yaml", digits_shards, str(resumed_dir),
                              **sections)
        proc = run_train(config, nproc=world_size, overrides=[f"data.audit_dir={audit}"])
        assert proc.returncode == 0, output_of(proc)
        assert f"resumed at step {stop_step}" in proc.stderr

        after = read_audit(str(audit))
        assert min(r.step for r in after) == stop_step + 1
        epoch0 = [r.key for r in before + after if r.epoch == 0]
        assert len(epoch0) == len(set(epoch0)), f"duplicates at world size {world_size}"
        # Only the last partial round of micro-batches (fewer than world size x 8) is dropped.
        dropped = DIGITS_IMAGES - len(epoch0)
        assert 0 <= dropped < world_size * 8, dropped
        assert any(r.epoch == 1 for r in after)
        stats = read_stats(resumed_dir)
        assert stats[-1]["step"] == 40


def test_resume_of_other_model_rejected(tmp_path, digits_shards):
    run_dir, _ = _train_ok(tmp_path, digits_shards, "reshape", ["train.stop_at_step=2"])
    tag = CheckpointManager(str(run_dir)).latest_tag()
    with open(run_dir / "config.yaml") as handle:
        started_with = yaml.safe_load(handle)
    assert started_with["model"]["max_k"] == 8

    config = write_config(tmp_path / "reshape-k4.yaml", digits_shards, str(run_dir))
    proc = run_train(config, overrides=["model.max_k=4"])
    assert proc.returncode != 0, output_of(proc)
    assert f"exitcode  : {EXIT_CONFIG}" in proc.stderr, output_of(proc)
    assert f"checkpoint {tag} in {run_dir / 'checkpoints'} belongs to a model of another shape" in proc.stderr
    assert "size mismatch for ddls.0.weight" in proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr
    assert "RuntimeError" not in proc.stderr
    # The run is left as it was: its checkpoint and the config it started with.
    assert CheckpointManager(str(run_dir)).latest_tag() == tag
    with open(run_dir / "config.yaml") as handle:
        assert yaml.safe_load(handle) == started_with


def test_preemption_saves_and_requeues(tmp_path, digits_shards):
    run_dir = tmp_path / "preempt"
    config = write_config(tmp_path / "preempt.yaml", digits_shards, str(run_dir),
                          train={"duration_kimg": 100, "checkpoint_kimg": 0, "snapshot_kimg": 0})
    command = torchrun_command(2) + ["-m", "ddn_dist.train", "--config", config]
    proc = subprocess.Popen(command, cwd=REPO, env=train_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "stats.jsonl").exists() or len(read_stats(run_dir)) < 3:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        # One rank alone receives the signal; the all-reduced flag stops both at the same step.
        os.kill(workers[-1].pid, signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "exitcode  : 75" in stderr, stderr[-3000:]
    assert "checkpoint saved, exiting with status 75" in stderr
    tag = CheckpointManager(str(run_dir)).latest_tag()
    assert tag is not None
    step = int(tag.removeprefix("step"))
    assert step >= 3
    assert f"preempted at step {step}" in stderr


@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_steps_skipped_then_stop(tmp_path, digits_shards, stage):
    run_dir = tmp_path / f"nan{stage}"
    config = write_config(tmp_path / f"nan{stage}.yaml", digits_shards, str(run_dir),
                          train={"nonfinite_at_steps": [2, 5, 6], "max_nonfinite_steps": 2},
                          deepspeed={"stage": stage})
    proc = run_train(config)
    assert proc.returncode != 0
    assert "2 consecutive steps up to step 6" in proc.stderr, output_of(proc)
    stats = {r["step"]: r for r in read_stats(run_dir)}
    assert stats[2]["nonfinite_steps"] == 1
    assert stats[3]["nonfinite_steps_total"] == 1
    assert stats[3]["nonfinite_steps"] == 0
    assert stats[4]["loss"] == stats[4]["loss"]  # NaN != NaN: step 4 trained with a finite loss
    assert stats[5]["nonfinite_steps_total"] == 2
    assert 6 not in stats  # the second skip in a row stops the run before its tick
