"""A real Prometheus scrapes a real 2-rank CPU training run through the file-SD targets it writes.

Every dashboard panel query and every recording rule must return data for the run. Injected NaN
losses must fire DDNLossNotFinite, and pausing a rank with SIGSTOP must fire DDNMetricsTargetDown
for that rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from unittest.mock import ANY

import psutil
import pytest
import yaml

from tests.fixtures.prometheus import (
    MONITORING,
    PrometheusServer,
    dashboard_queries,
    free_port,
    metric_names_in,
    substitute_grafana_variables,
)

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
DATA_TIMEOUT_SECONDS = 150


def free_port_pair() -> int:
    """Return a port p such that p and p + 1 were both free on 127.0.0.1 a moment ago."""
    for _ in range(100):
        base = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise RuntimeError("found no two adjacent free ports on 127.0.0.1")


def recording_rule_names() -> list[str]:
    rules = yaml.safe_load((MONITORING / "rules" / "recording.yml").read_text())
    return [r["record"] for g in rules["groups"] for r in g["rules"]]


def queries_without_data(server: PrometheusServer, run: str, job_id: str, gpu: bool,
                         timeout: float) -> list[str]:
    """Poll every panel query and recording rule for the run; return those still empty."""
    pending = {}
    for dashboard, title, expr in dashboard_queries():
        if not gpu and any(n.startswith("ddn_gpu_") for n in metric_names_in(expr)):
            continue  # GPU memory gauges exist only when CUDA is available
        pending[f"{dashboard} / {title}: {expr}"] = substitute_grafana_variables(expr, run, job_id)
    for name in recording_rule_names():
        pending[f"recording rule {name}"] = f'{name}{{run="{run}", job_id="{job_id}"}}'

    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for label, expr in list(pending.items()):
            if server.query(expr):
                del pending[label]
        time.sleep(1.0)
    return sorted(pending)


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """Map rank -> PID of the training workers started by torchrun."""
    ranks = {}
    # Direct children only: the loader workers are forked from the training workers and share
    # their command line and environment.
    for child in psutil.Process(launcher.pid).children(recursive=False):
        try:
            env = child.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if "ddn_dist.train" in " ".join(child.cmdline()) and "RANK" in env:
            ranks[int(env["RANK"])] = child.pid
    return ranks


def wait_for_alert(server: PrometheusServer, name: str, job_id: str, rank: str,
                   timeout: float) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for alert in server.alerts():
            labels = alert["labels"]
            key = (labels["alertname"], labels.get("job_id"), labels.get("rank"))
            if key == (name, job_id, rank) and alert["state"] == "firing":
                return alert
        time.sleep(0.5)
    return None


def test_training_run_scraped_through_file_sd(prometheus_server, digits_shards, tmp_path):
    run = f"promtest-{uuid.uuid4().hex[:6]}"
    job_id = uuid.uuid4().hex[:8]
    sd_dir = prometheus_server.sd_dir
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SLURM_JOB_ID", None)  # the trainer takes the job id from SLURM_JOB_ID, else --rdzv-id
    run_dir = tmp_path / run
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        "--rdzv-id", job_id,
        "-m", "ddn_dist.train", "--config", str(REPO / "configs" / "digits.yaml"),
        f"data.data={digits_shards}",
        f"train.run_dir={run_dir}",  # the run label is the run directory's name
        "train.duration_kimg=1000",
        "train.tick_kimg=0.25",
        "train.checkpoint_kimg=0.5",
        # Rank 0's loss turns NaN at these steps; the trainer skips them and counts them.
        "train.nonfinite_at_steps=[40,80,120,160,200]",
        "metrics.enabled=true",
        f"metrics.sd_dir={sd_dir}",
        f"metrics.port_base={free_port_pair()}",
        "metrics.bind_address=127.0.0.1",
    ]
    log_path = tmp_path / "train.log"
    with open(log_path, "wb") as log_file:
        launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len([p for p in os.listdir(sd_dir) if p.startswith(run)]) < 2:
            log_tail = log_path.read_text()[-3000:]
            assert launcher.poll() is None, f"training exited early:\n{log_tail}"
            assert time.monotonic() < deadline, f"no file-SD targets in 120 s:\n{log_tail}"
            time.sleep(0.5)
        [file_name] = [p for p in os.listdir(sd_dir) if p.startswith(run) and "rank1" in p]
        assert file_name == f"{run}-{job_id}-rank1.json"
        [target] = json.loads((sd_dir / file_name).read_text())
        assert target["labels"] == {"job_id": job_id, "run": run, "rank": "1", "node": ANY}

        # The trainer's own exposition passes promtool's naming checks.
        with urllib.request.urlopen(f"http://{target['targets'][0]}/metrics", timeout=10) as r:
            payload = r.read().decode()
        checked = subprocess.run(["promtool", "check", "metrics"], input=payload, text=True,
                                 capture_output=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr

        missing = queries_without_data(prometheus_server, run, job_id, gpu=False,
                                       timeout=DATA_TIMEOUT_SECONDS)
        assert missing == [], "queries without data:\n" + "\n".join(missing)

        # A scrape that times out while a rank is busy marks its series stale until the next one,
        # so wait for a scrape round in which both ranks responded.
        deadline = time.monotonic() + 60
        while True:
            ranks = prometheus_server.query(f'count by (rank) (ddn_run_info{{run="{run}"}})')
            seen = sorted(r["metric"]["rank"] for r in ranks)
            if seen == ["0", "1"] or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        up = prometheus_server.query(f'up{{run="{run}"}}')
        assert seen == ["0", "1"], f"ranks with ddn_run_info: {seen}; up: {up}"

        # The injected non-finite steps fire the loss alert once Prometheus scrapes the higher count.
        alert = wait_for_alert(prometheus_server, "DDNLossNotFinite", job_id, "0", 120)
        assert alert is not None, "DDNLossNotFinite did not fire for the injected NaN losses"

        # A frozen rank cannot respond to scrapes, so Prometheus marks it down and alerts.
        pids = worker_pids(launcher)
        assert sorted(pids) == [0, 1]
        os.kill(pids[1], signal.SIGSTOP)
        try:
            alert = wait_for_alert(prometheus_server, "DDNMetricsTargetDown", job_id, "1", 30)
        finally:
            os.kill(pids[1], signal.SIGCONT)
        assert alert is not None, "DDNMetricsTargetDown did not fire for the stopped rank"
        assert alert["labels"]["run"] == run
    finally:
        # SIGTERM to the workers only, so each saves at its next step boundary and exits. A
        # signalled torchrun would SIGKILL workers still running 30 s later (torch 2.13).
        if launcher.poll() is None:
            for pid in worker_pids(launcher).values():
                os.kill(pid, signal.SIGTERM)
        try:
            launcher.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=30)

    left = [p for p in os.listdir(sd_dir) if p.startswith(run)]
    assert left == [], f"file-SD targets left after the run ended:\n{log_path.read_text()[-3000:]}"
