"""Training from digits shards in the session's Ceph RGW, with the checkpoints mirrored to S3."""

from __future__ import annotations

import pytest

from ddn_dist.checkpoint import CheckpointManager
from tests.train_helpers import output_of, read_stats, run_train, write_config

pytestmark = [pytest.mark.ceph, pytest.mark.slow]


def test_trains_from_ceph_and_mirrors(tmp_path, s3_env, digits_s3_shards):
    bucket = s3_env.make_bucket("train-mirror")
    mirror = f"s3://{bucket}/run"
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "s3.yaml", digits_s3_shards, str(run_dir),
                          train={"duration_kimg": 0.32},
                          checkpoint={"mirror_url": mirror, "endpoint_url": s3_env.endpoint_url},
                          data={"endpoint_url": s3_env.endpoint_url})
    proc = run_train(config)
    assert proc.returncode == 0, output_of(proc)
    assert read_stats(run_dir)[-1]["step"] == 10
    tag = CheckpointManager(str(run_dir)).latest_tag()
    assert tag == "step00000010"
    remote = s3_env.filesystem().find(f"{bucket}/run/{tag}")
    assert any(path.endswith("COMPLETE.json") for path in remote), remote
