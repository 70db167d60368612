"""Checkpoint mirroring to a real Ceph RGW S3 endpoint on 127.0.0.1."""

from __future__ import annotations

import shutil

import pytest

from ddn_dist.checkpoint import CheckpointManager
from ddn_dist.checkpointing.layout import MARKER_NAME, POINTER_NAME
from tests.checkpoint_harness import STEPS, STOP_AT, run_training, shared_stage_runs
from tests.test_checkpoint_layout import FakeEngine

pytestmark = pytest.mark.ceph


def test_mirror_upload_prune_and_restore(s3_env, tmp_path):
    bucket = s3_env.make_bucket("ckpt-mirror")
    url = f"s3://{bucket}/run1"
    writer = CheckpointManager(tmp_path / "first", keep_last=2, mirror_url=url)
    for step in range(1, 4):
        writer.save(FakeEngine(), f"step{step}", {"step": step})
    assert writer.mirror_failures == 0

    fs = s3_env.filesystem()
    names = sorted(path.rsplit("/", 1)[-1] for path in fs.ls(f"{bucket}/run1"))
    assert names == [POINTER_NAME, "step2", "step3"]
    assert fs.exists(f"{bucket}/run1/step3/{MARKER_NAME}")
    assert fs.cat_file(f"{bucket}/run1/{POINTER_NAME}").decode().strip() == "step3"

    reader = CheckpointManager(tmp_path / "second", mirror_url=url)
    assert reader.load(FakeEngine()) == {"step": 3}
    assert reader.latest_tag() == "step3"


def test_mirror_unreachable(tmp_path, monkeypatch):
    # Port 9 (discard) has no listener on 127.0.0.1: every request fails to connect.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unused")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unused")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries would only add time
    CheckpointManager(tmp_path).save(FakeEngine(), "step1", {"step": 1})

    manager = CheckpointManager(
        tmp_path, mirror_url="s3://bucket/run", endpoint_url="http://127.0.0.1:9"
    )
    manager.mirror.retry.attempts = 2
    manager.mirror.retry.base_delay_seconds = 0.01
    manager.save(FakeEngine(), "step2", {"step": 2})
    assert manager.mirror_failures == 1
    assert manager.latest_tag() == "step2"

    fresh = CheckpointManager(
        tmp_path / "fresh", mirror_url="s3://bucket/run", endpoint_url="http://127.0.0.1:9"
    )
    fresh.mirror.retry.attempts = 1
    with pytest.raises(RuntimeError, match="could not be read"):
        fresh.load(FakeEngine())


@pytest.mark.slow
def test_resume_from_mirror_at_new_world_size(s3_server, tmp_path, tmp_path_factory):
    bucket = s3_server.make_bucket("ckpt-resume")
    url = f"s3://{bucket}/run"
    run_dir = tmp_path / "run"
    env = s3_server.env()
    first = run_training(
        tmp_path,
        "first",
        2,
        run_dir,
        "--steps",
        str(STEPS),
        "--stop-at",
        str(STOP_AT),
        "--mirror-url",
        url,
        env=env,
    )
    assert first.succeeded, first.output[-3000:]
    shutil.rmtree(run_dir)

    resumed = run_training(
        tmp_path, "resumed", 1, run_dir, "--steps", str(STEPS), "--mirror-url", url, env=env
    )
    assert resumed.succeeded, resumed.output[-3000:]
    assert "downloading step00003" in resumed.output
    assert resumed.resumed_from() == [STOP_AT]
    reference = shared_stage_runs(tmp_path_factory, 2).reference.loss_by_step()
    for step, loss in resumed.loss_by_step().items():
        assert loss == pytest.approx(reference[step], rel=1e-5), f"step {step}"
