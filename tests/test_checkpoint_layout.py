"""CheckpointManager bookkeeping in one process, with a fake engine writing DeepSpeed's file names.

The fake engine replaces DeepSpeed where only the files matter: completion markers, the
latest pointer, pruning, crash windows and the mirror. The torchrun tests cover the real engine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import ddn_dist.checkpoint as checkpoint_module
from ddn_dist.checkpoint import CheckpointManager
from ddn_dist.checkpointing.layout import MARKER_NAME, POINTER_NAME, CompleteMarker, read_marker
from ddn_dist.checkpointing.universal import needs_universal


class FakeEngine:
    """Writes the files a DeepSpeed ZeRO engine writes, with `world_size` optimizer shards."""

    def __init__(self, world_size: int = 2, stage: int = 2, shard_bytes: int = 4096):
        self.dp_world_size = world_size
        self.stage = stage
        self.shard_bytes = shard_bytes
        self.loaded: list[tuple[str, str]] = []

    def zero_optimization_stage(self) -> int:
        return self.stage

    def load_universal_checkpoint(self) -> bool:
        return False

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=True):
        directory = os.path.join(save_dir, tag)
        os.makedirs(directory, exist_ok=True)
        torch.save(client_state, os.path.join(directory, "mp_rank_00_model_states.pt"))
        for rank in range(self.dp_world_size):
            name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            with open(os.path.join(directory, name), "wb") as f:
                f.write(os.urandom(self.shard_bytes))
        if save_latest:
            with open(os.path.join(save_dir, "latest"), "w") as f:
                f.write(tag)

    def load_checkpoint(self, load_dir, tag, **kwargs):
        self.loaded.append((load_dir, tag))
        path = os.path.join(load_dir, tag, "mp_rank_00_model_states.pt")
        return path, torch.load(path, weights_only=False)


def _tags(manager: CheckpointManager) -> list[str]:
    return sorted(
        name
        for name in os.listdir(manager.checkpoint_dir)
        if os.path.isdir(os.path.join(manager.checkpoint_dir, name))
    )


def test_save_writes_marker_and_pointer(tmp_path):
    manager = CheckpointManager(tmp_path)
    saved = manager.save(FakeEngine(), "step1", {"kimg": 1.5})
    directory = Path(manager.checkpoint_dir) / "step1"
    marker = read_marker(str(directory))
    sizes = {p.name: p.stat().st_size for p in directory.iterdir() if p.name != MARKER_NAME}
    assert marker.files == sizes
    assert saved.num_bytes == sum(sizes.values())
    assert marker.world_size == 2
    assert marker.zero_stage == 2
    assert marker.partitioned_optimizer
    assert (Path(manager.checkpoint_dir) / POINTER_NAME).read_text().strip() == "step1"
    assert not (Path(manager.checkpoint_dir) / "latest").exists()
    assert manager.latest_tag() == "step1"


def test_load_returns_client_state(tmp_path):
    manager = CheckpointManager(tmp_path)
    engine = FakeEngine()
    assert manager.load(engine) is None
    manager.save(engine, "step1", {"kimg": 1.5})
    manager.save(engine, "step2", {"kimg": 3.0})
    assert manager.load(engine) == {"kimg": 3.0}
    assert engine.loaded == [(manager.checkpoint_dir, "step2")]


def test_keep_last_prunes_oldest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    engine = FakeEngine()
    for step in range(1, 6):
        manager.save(engine, f"step{step}", {"step": step})
    assert _tags(manager) == ["step4", "step5"]
    assert manager.latest_tag() == "step5"


def test_incomplete_dir_ignored_then_removed(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    engine = FakeEngine()
    manager.save(engine, "step1", {"step": 1})
    engine.save_checkpoint(manager.checkpoint_dir, "step2", {"step": 2}, save_latest=False)
    assert manager.latest_tag() == "step1"
    manager.save(engine, "step3", {"step": 3})
    assert _tags(manager) == ["step1", "step3"]


def test_truncated_file_falls_back(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    engine = FakeEngine()
    manager.save(engine, "step1", {"step": 1})
    manager.save(engine, "step2", {"step": 2})
    shard = Path(manager.checkpoint_dir) / "step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    assert manager.latest_tag() == "step1"
    assert manager.load(engine) == {"step": 1}


def test_crash_before_marker_keeps_previous(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=5)
    engine = FakeEngine()
    manager.save(engine, "step1", {"step": 1})

    def crash(directory, marker):
        raise OSError("simulated crash before the marker is written")

    monkeypatch.setattr(checkpoint_module, "write_marker", crash)
    with pytest.raises(OSError, match="simulated crash"):
        manager.save(engine, "step2", {"step": 2})
    assert manager.latest_tag() == "step1"
    assert (Path(manager.checkpoint_dir) / POINTER_NAME).read_text().strip() == "step1"


def test_crash_before_pointer_keeps_previous(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=5)
    engine = FakeEngine()
    manager.save(engine, "step1", {"step": 1})

    def crash(root, tag):
        raise OSError("simulated crash before the pointer is replaced")

    monkeypatch.setattr(checkpoint_module, "write_pointer", crash)
    with pytest.raises(OSError, match="simulated crash"):
        manager.save(engine, "step2", {"step": 2})
    assert read_marker(os.path.join(manager.checkpoint_dir, "step2")) is not None
    assert manager.latest_tag() == "step1"


def test_missing_pointer_uses_highest_sequence(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    engine = FakeEngine()
    for tag in ("b", "a", "c0"):
        manager.save(engine, tag, {})
    os.remove(os.path.join(manager.checkpoint_dir, POINTER_NAME))
    assert manager.latest_tag() == "c0"
    os.remove(os.path.join(manager.checkpoint_dir, "c0", MARKER_NAME))
    assert manager.latest_tag() == "a"


def test_malformed_marker_ignored(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    engine = FakeEngine()
    manager.save(engine, "step1", {})
    manager.save(engine, "step2", {})
    Path(manager.checkpoint_dir, "step2", MARKER_NAME).write_text("{not json")
    assert manager.latest_tag() == "step1"


def test_resave_same_tag_replaces(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    manager.save(FakeEngine(shard_bytes=100), "step1", {"version": 1})
    manager.save(FakeEngine(shard_bytes=300), "step1", {"version": 2})
    marker = read_marker(os.path.join(manager.checkpoint_dir, "step1"))
    assert marker.files["zero_pp_rank_0_mp_rank_00_optim_states.pt"] == 300
    assert manager.load(FakeEngine()) == {"version": 2}


@pytest.mark.parametrize("tag", ["", "a/b", ".hidden", "step_universal", "latest", "x y"])
def test_invalid_tag_rejected(tmp_path, tag):
    with pytest.raises(ValueError, match="invalid checkpoint tag"):
        CheckpointManager(tmp_path).save(FakeEngine(), tag, {})


def test_invalid_arguments_rejected(tmp_path):
    with pytest.raises(ValueError, match="mirror_url"):
        CheckpointManager("s3://bucket/run")
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def _marker(world_size: int, stage: int) -> CompleteMarker:
    return CompleteMarker(
        tag="t",
        sequence=1,
        world_size=world_size,
        zero_stage=stage,
        partitioned_optimizer=stage > 0,
    )


@pytest.mark.parametrize(
    ("saved_world_size", "saved_stage", "world_size", "stage", "expected"),
    [
        (2, 2, 2, 2, False),
        (2, 2, 3, 2, True),
        (2, 3, 1, 3, True),
        (2, 1, 2, 2, True),
        (2, 0, 3, 0, False),
        (4, 0, 1, 0, False),
    ],
)
def testneeds_universal(saved_world_size, saved_stage, world_size, stage, expected):
    assert needs_universal(_marker(saved_world_size, saved_stage), world_size, stage) is expected


@pytest.mark.parametrize(("saved_stage", "stage"), [(0, 2), (2, 0)])
def test_stage_zero_change_rejected(saved_stage, stage):
    with pytest.raises(ValueError, match=f"zero_optimization.stage={saved_stage}"):
        needs_universal(_marker(2, saved_stage), 2, stage)


def test_prepare_ds_config_fresh_run(tmp_path):
    config = {"zero_optimization": {"stage": 2}, "train_batch_size": 8}
    prepared = CheckpointManager(tmp_path).prepare_ds_config(config)
    assert prepared == config
    assert prepared is not config


def test_prepare_ds_config_reads_json_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    assert CheckpointManager(tmp_path).prepare_ds_config(str(path)) == {
        "zero_optimization": {"stage": 0}
    }


def test_mirror_restores_missing_run_dir(tmp_path):
    mirror = tmp_path / "mirror"
    writer = CheckpointManager(tmp_path / "first", keep_last=2, mirror_url=str(mirror))
    engine = FakeEngine()
    for step in range(1, 4):
        writer.save(engine, f"step{step}", {"step": step})
    assert sorted(p.name for p in mirror.iterdir()) == [POINTER_NAME, "step2", "step3"]
    assert (mirror / "step3" / MARKER_NAME).exists()

    reader = CheckpointManager(tmp_path / "second", mirror_url=str(mirror))
    assert reader.latest_tag() is None
    assert reader.load(FakeEngine()) == {"step": 3}
    assert reader.latest_tag() == "step3"
    for name in os.listdir(mirror / "step3"):
        original = Path(writer.checkpoint_dir) / "step3" / name
        assert (Path(reader.checkpoint_dir) / "step3" / name).read_bytes() == original.read_bytes()


def test_mirror_ignores_partial_upload(tmp_path):
    mirror = tmp_path / "mirror"
    writer = CheckpointManager(tmp_path / "first", keep_last=5, mirror_url=str(mirror))
    writer.save(FakeEngine(), "step1", {"step": 1})
    writer.save(FakeEngine(), "step2", {"step": 2})
    os.remove(mirror / "step2" / MARKER_NAME)
    (mirror / "step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()

    reader = CheckpointManager(tmp_path / "second", mirror_url=str(mirror))
    assert reader.load(FakeEngine()) == {"step": 1}


def test_prune_removes_conversions_and_scratch(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    engine = FakeEngine()
    manager.save(engine, "step1", {})
    root = Path(manager.checkpoint_dir)
    (root / "step1_universal").mkdir()
    (root / ".convert-step1-0123abcd").mkdir()
    (root / ".download-step0-0123abcd").mkdir()
    manager.save(engine, "step2", {})
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step2"]
