"""A real Prometheus finds exporters through file-SD and fires the stall alert on a stalled run."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from ddn_dist.metrics import MetricsConfig, TrainMetrics

pytestmark = pytest.mark.prometheus


def start_exporter(sd_dir, run: str, job_id: str, rank: int) -> TrainMetrics:
    m = TrainMetrics(
        MetricsConfig(port_base=0, bind_address="127.0.0.1", sd_dir=str(sd_dir)),
        run=run, job_id=job_id, rank=rank, local_rank=rank, node="localhost", world_size=1,
        config_hash="test",
    )
    m.start()
    m.observe_step(
        images=8, kimg=0.008, step_seconds=0.2, data_wait_seconds=0.01, loss=0.5,
        group_losses={"8x8": 0.5}, grad_norm=1.0, lr=1e-3,
    )
    return m


def stalled_alerts(prometheus_server, job_id: str) -> list[dict]:
    return [
        a for a in prometheus_server.alerts()
        if a["labels"]["alertname"] == "DDNTrainingStalled" and a["labels"]["job_id"] == job_id
    ]


def test_stall_alert_fires_for_old_last_step(prometheus_server):
    job_id = uuid.uuid4().hex[:8]
    stalled = start_exporter(prometheus_server.sd_dir, "stalled", job_id, rank=0)
    healthy = start_exporter(prometheus_server.sd_dir, "healthy", job_id, rank=0)
    try:
        # The stalled run's last step was an hour ago, far over the 600 s threshold.
        stalled.last_step.set(time.time() - 3600)
        deadline = time.monotonic() + 45
        while not stalled_alerts(prometheus_server, job_id) and time.monotonic() < deadline:
            time.sleep(0.5)
        alerts = stalled_alerts(prometheus_server, job_id)
        assert alerts, f"no DDNTrainingStalled alert:\n{prometheus_server.log_tail()}"
        assert [a["labels"]["run"] for a in alerts] == ["stalled"]
        assert alerts[0]["state"] == "firing"
        assert float(alerts[0]["value"]) > 3000

        # The healthy run is scraped through its own file-SD target but does not alert.
        ages = prometheus_server.wait_for(
            f'time() - ddn_last_step_timestamp_seconds{{run="healthy", job_id="{job_id}"}}'
        )
        assert float(ages[0]["value"][1]) < 60
        assert ages[0]["metric"]["rank"] == "0"
        assert ages[0]["metric"]["node"] == "localhost"

        # The info metric's own run and job_id labels survive under exported_* names.
        [info] = prometheus_server.wait_for(f'ddn_run_info{{run="healthy", job_id="{job_id}"}}')
        assert info["metric"]["exported_run"] == "healthy"
        assert info["metric"]["exported_job_id"] == job_id
    finally:
        stalled.close()
        healthy.close()
    assert not [p for p in os.listdir(prometheus_server.sd_dir) if job_id in p]
