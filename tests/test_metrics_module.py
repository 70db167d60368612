"""Unit tests of ddn_dist.metrics: exported values, names, the HTTP endpoint and file-SD targets."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ddn_dist import file_sd
from ddn_dist.metrics import MetricsConfig, TrainMetrics, config_hash, frequency_spread


def make_metrics(tmp_path, **config) -> TrainMetrics:
    options = {"port_base": 0, "bind_address": "127.0.0.1", "sd_dir": str(tmp_path / "sd")}
    options.update(config)
    return TrainMetrics(
        MetricsConfig(**options),
        run="digits",
        job_id="42",
        rank=1,
        local_rank=1,
        node="node7",
        world_size=2,
        config_hash="cafe",
    )


def scrape(m: TrainMetrics) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=10) as response:
        return response.read().decode()


def samples_of(payload: str) -> dict[tuple[str, tuple], float]:
    """Map (sample name, sorted label items) to value."""
    values = {}
    for family in text_string_to_metric_families(payload):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_scraped_values_match_observations(tmp_path):
    m = make_metrics(tmp_path)
    m.start()
    try:
        steps = [(16, 0.20, 0.05, 0.9), (16, 0.30, 0.15, 0.7), (8, 0.40, 0.10, 0.5)]
        for i, (images, seconds, wait, loss) in enumerate(steps):
            m.observe_step(
                images=images, kimg=0.016 * (i + 1), step_seconds=seconds, data_wait_seconds=wait,
                loss=loss, group_losses={"4x4": loss + 1, "8x8": loss + 2}, grad_norm=2.0 + i,
                lr=1e-3 / (i + 1),
            )
        m.skipped_nonfinite()
        m.skipped_nonfinite()
        m.restarted()
        m.split_prune("8x8", 3)
        m.split_prune("8x8", 2)
        m.node_frequency_spread("4x4", 0.25)
        m.checkpoint_saved(1.5)
        m.update_storage({"bytes_read": 1000, "retries": 2, "errors": 0, "corrupt_skipped": 1})
        m.update_storage({"bytes_read": 1500, "retries": 3, "errors": 1, "corrupt_skipped": 1})
        values = samples_of(scrape(m))
    finally:
        m.close()

    assert values[("ddn_steps_total", ())] == 3
    assert values[("ddn_images_processed_total", ())] == 40
    assert values[("ddn_progress_kimg", ())] == pytest.approx(0.048)
    assert values[("ddn_step_duration_seconds_count", ())] == 3
    assert values[("ddn_step_duration_seconds_sum", ())] == pytest.approx(0.9)
    assert values[("ddn_step_duration_seconds_bucket", (("le", "0.25"),))] == 1
    assert values[("ddn_step_duration_seconds_bucket", (("le", "0.5"),))] == 3
    assert values[("ddn_data_wait_seconds_total", ())] == pytest.approx(0.30)
    assert values[("ddn_data_wait_ratio", ())] == pytest.approx(0.10 / 0.40)
    assert values[("ddn_loss", ())] == pytest.approx(0.5)
    assert values[("ddn_layer_group_loss", (("group", "4x4"),))] == pytest.approx(1.5)
    assert values[("ddn_layer_group_loss", (("group", "8x8"),))] == pytest.approx(2.5)
    assert values[("ddn_grad_norm", ())] == pytest.approx(4.0)
    assert values[("ddn_learning_rate", ())] == pytest.approx(1e-3 / 3)
    assert values[("ddn_nonfinite_steps_skipped_total", ())] == 2
    assert values[("ddn_restarts_total", ())] == 1
    assert values[("ddn_split_prune_events_total", (("group", "8x8"),))] == 5
    # A group seen only in losses still exports zero events.
    assert values[("ddn_split_prune_events_total", (("group", "4x4"),))] == 0
    assert values[("ddn_node_frequency_spread", (("group", "4x4"),))] == pytest.approx(0.25)
    assert values[("ddn_checkpoint_save_duration_seconds_sum", ())] == pytest.approx(1.5)
    assert abs(values[("ddn_checkpoint_last_success_timestamp_seconds", ())] - time.time()) < 60
    assert abs(values[("ddn_last_step_timestamp_seconds", ())] - time.time()) < 60
    assert values[("ddn_storage_read_bytes_total", ())] == 1500
    assert values[("ddn_storage_retries_total", ())] == 3
    assert values[("ddn_storage_errors_total", ())] == 1
    assert values[("ddn_corrupt_samples_skipped_total", ())] == 1
    assert values[("ddn_process_resident_memory_bytes", ())] > 10 * 2**20


def test_run_info_labels(tmp_path):
    m = make_metrics(tmp_path)
    m.start()
    try:
        values = samples_of(scrape(m))
    finally:
        m.close()
    [(name, labels)] = [key for key in values if key[0] == "ddn_run_info"]
    labels = dict(labels)
    assert labels["run"] == "digits"
    assert labels["job_id"] == "42"
    assert labels["config_hash"] == "cafe"
    assert labels["world_size"] == "2"
    assert labels["torch_version"].startswith("2.")
    assert labels["ddn_dist_version"] != "none"


def test_storage_counters_survive_loader_reset(tmp_path):
    m = make_metrics(tmp_path)
    m.update_storage({"bytes_read": 500})
    m.update_storage({"bytes_read": 200})  # a fresh loader counts from zero again
    m.update_storage({"bytes_read": 300})
    assert m.storage["bytes_read"]._value.get() == 500 + 200 + 100


def test_disabled_metrics_do_nothing(tmp_path):
    m = make_metrics(tmp_path, enabled=False)
    m.start()
    m.observe_step(
        images=4, kimg=0.004, step_seconds=0.1, data_wait_seconds=0.0, loss=1.0,
        group_losses={}, grad_norm=1.0, lr=1e-3,
    )
    assert m.port is None
    assert not (tmp_path / "sd").exists()
    assert m.images._value.get() == 0
    m.close()


def test_promtool_accepts_scraped_payload(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed; run scripts/install_services.sh")
    m = TrainMetrics(
        MetricsConfig(port_base=0, bind_address="127.0.0.1"), run="r", job_id="1", rank=0,
        local_rank=0, node="n", world_size=1, config_hash="x", gpu=True,
    )
    m.start()
    try:
        m.observe_step(
            images=4, kimg=0.004, step_seconds=0.1, data_wait_seconds=0.01, loss=1.0,
            group_losses={"8x8": 1.0}, grad_norm=1.0, lr=1e-3,
        )
        m.node_frequency_spread("8x8", 0.1)
        m.checkpoint_saved(0.3)
        payload = scrape(m)
    finally:
        m.close()
    result = subprocess.run([promtool, "check", "metrics"], input=payload, text=True,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ddn_gpu_memory_allocated_bytes" in payload


def test_file_sd_target_written_and_removed(tmp_path):
    m = make_metrics(tmp_path)
    m.start()
    path = tmp_path / "sd" / "digits-42-rank1.json"
    try:
        assert m.sd_path == str(path)
        [entry] = json.loads(path.read_text())
        assert entry["targets"] == [f"127.0.0.1:{m.port}"]
        assert entry["labels"] == {"job_id": "42", "run": "digits", "rank": "1", "node": "node7"}
        assert [p.name for p in path.parent.iterdir()] == [path.name]
    finally:
        m.close()
    assert not path.exists()
    m.close()  # a second close is harmless


def test_file_sd_target_removed_at_exit(tmp_path):
    sd_dir = tmp_path / "sd"
    script = textwrap.dedent(f"""
        import os
        from ddn_dist.metrics import MetricsConfig, TrainMetrics
        config = MetricsConfig(port_base=0, bind_address="127.0.0.1", sd_dir={str(sd_dir)!r})
        m = TrainMetrics(config, run="a/b", job_id="7", rank=0, local_rank=0, node="n",
                         world_size=1, config_hash="x")
        m.start()
        print(sorted(os.listdir({str(sd_dir)!r})), flush=True)
        raise SystemExit(3)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 3, result.stderr
    assert "['a_b-7-rank0.json']" in result.stdout
    assert os.listdir(sd_dir) == []


def test_target_host_choice(tmp_path):
    assert make_metrics(tmp_path).target_host() == "127.0.0.1"
    assert make_metrics(tmp_path, bind_address="0.0.0.0").target_host() == "node7"
    assert make_metrics(tmp_path, target_host="gpu01.cluster").target_host() == "gpu01.cluster"


def test_port_in_use_error_names_port_and_option(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        m = make_metrics(tmp_path, port_base=port - 1)  # local rank 1 -> the busy port
        with pytest.raises(RuntimeError, match=rf"port {port}\b.*metrics\.port_base"):
            m.start()
    assert not (tmp_path / "sd").exists()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="port_base"):
        MetricsConfig(port_base=70000)
    with pytest.raises(ValueError, match="sd_directory"):
        MetricsConfig.from_dict({"sd_directory": "/tmp"})
    assert MetricsConfig.from_dict({"port_base": 9500}).port_base == 9500


def test_observe_step_rejects_negative_time(tmp_path):
    m = make_metrics(tmp_path)
    with pytest.raises(ValueError, match="non-negative"):
        m.observe_step(
            images=4, kimg=0.0, step_seconds=-1.0, data_wait_seconds=0.0, loss=1.0,
            group_losses={}, grad_norm=1.0, lr=1e-3,
        )


def test_frequency_spread_values():
    assert frequency_spread([5, 5, 5, 5]) == 0.0
    # p = (0.5, 0.5, 0, 0), p*K = (2, 2, 0, 0), deviations from 1 are all 1.
    assert frequency_spread([1, 1, 0, 0]) == pytest.approx(1.0)
    assert frequency_spread([0.0, 0.0]) == 0.0
    assert math.isclose(frequency_spread([3, 1]), math.sqrt(((1.5 - 1) ** 2 + (0.5 - 1) ** 2) / 2))


def test_config_hash_stable_and_order_free():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


HUNG_RANK_SCRIPT = """
import os, sys, time
import torch
import torch.distributed as dist
from ddn_dist.metrics import MetricsConfig, TrainMetrics

rank, port, release = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
if rank == 0:
    m = TrainMetrics(MetricsConfig(port_base=0, bind_address="127.0.0.1"), run="r", job_id="1",
                     rank=0, local_rank=0, node="n", world_size=2, config_hash="x")
    m.start()
    print("PORT", m.port, flush=True)
else:
    while not os.path.exists(release):
        time.sleep(0.1)
dist.all_reduce(torch.ones(1))
print("REDUCED", flush=True)
dist.destroy_process_group()
"""


def test_endpoint_responds_during_hung_collective(tmp_path):
    script = tmp_path / "hung.py"
    script.write_text(HUNG_RANK_SCRIPT)
    release = tmp_path / "release"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ranks = [
        subprocess.Popen([sys.executable, str(script), str(r), port, str(release)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    try:
        line = ranks[0].stdout.readline()
        assert line.startswith("PORT"), line
        metrics_port = int(line.split()[1])
        time.sleep(1.0)  # rank 0 is now blocked in all_reduce, waiting for rank 1

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            payload = r.read().decode()
        assert "ddn_last_step_timestamp_seconds" in payload
        assert ranks[0].poll() is None

        release.touch()
        for process in ranks:
            output, _ = process.communicate(timeout=60)
            assert process.returncode == 0, output
            assert "REDUCED" in output
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()


def test_file_sd_address_and_name_format():
    assert file_sd.format_address("::1", 9400) == "[::1]:9400"
    assert file_sd.format_address("gpu01", 9401) == "gpu01:9401"
    assert file_sd.target_file_name("ffhq 64/a", "12", 3) == "ffhq_64_a-12-rank3.json"
