"""Launchers on a real two-node Slurm cluster: training to completion, preemption and requeue.

Both "nodes" are slurmd daemons on this machine and their names do not resolve, so the jobs get
MASTER_ADDR=127.0.0.1 and GLOO_SOCKET_IFNAME=lo, as the launchers document for such setups.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import pytest

from ddn_dist.checkpoint import CheckpointManager
from ddn_dist.data.audit import read_audit
from ddn_dist.data.index import load_index

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
NODES = 2
RANKS_PER_NODE = 2
WORLD_SIZE = NODES * RANKS_PER_NODE
MICRO_BATCH = 16
GLOBAL_BATCH = MICRO_BATCH * WORLD_SIZE
JOB_TIMEOUT_SECONDS = 300.0



@pytest.fixture(autouse=True)
def cancel_jobs_after_test(slurm_cluster):
    """Leave no job of a failed test behind to hold the nodes for the next test."""
    yield
    slurm_cluster.cancel_all_jobs()


def job_env(run_dir: Path) -> dict[str, str]:
    """Environment for a launcher job on the test cluster."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHON": str(REPO / ".venv" / "bin" / "python"),
        "RUN_DIR": str(run_dir),
        "OMP_NUM_THREADS": "1",
        # Short waits keep a failing test from hanging for the production grace periods.
        "SHUTDOWN_TIMEOUT_SECONDS": "60",
        "STEP_GRACE_SECONDS": "60",
    }


def training_overrides(data_dir: str, audit_dir: Path, duration_images: int) -> list[str]:
    """Trainer overrides for a short digits run with the audit log on."""
    return [
        f"data.data={data_dir}",
        f"data.audit_dir={audit_dir}",
        "data.num_workers=1",
        f"train.batch={GLOBAL_BATCH}",
        f"deepspeed.micro_batch={MICRO_BATCH}",
        f"train.duration_kimg={duration_images / 1000}",
        "train.lr_warmup_kimg=0",
        "train.tick_kimg=0.256",
        "train.snapshot_kimg=1000",
        "train.checkpoint_kimg=1000",
        "train.checkpoint_minutes=0",
    ]


def dataset_keys(data_dir: str) -> list[str]:
    """Keys of every sample in the shard index."""
    index = load_index(str(Path(data_dir) / "index.json"))
    return [sample.key for shard in index.shards for sample in shard.samples]


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def audit_steps(audit_dir: Path) -> dict[int, list[int]]:
    """Steps recorded per rank, in file order."""
    steps: dict[int, list[int]] = {}
    for record in read_audit(str(audit_dir)):
        steps.setdefault(record.rank, []).append(record.step)
    return steps


def assert_completed(cluster, job_id: int, log_path: Path) -> None:
    info = cluster.wait(job_id, timeout=JOB_TIMEOUT_SECONDS)
    assert info.state == "COMPLETED", f"job {job_id} {info.state}:\n{read_log(log_path)[-6000:]}"
    assert info.exit_code == "0:0"


def assert_each_sample_once(records, keys: list[str], duration_images: int) -> None:
    """Every consumed (epoch, key) appears once, and the run consumed exactly its duration."""
    pairs = Counter((record.epoch, record.key) for record in records)
    repeated = [pair for pair, count in pairs.items() if count > 1]
    assert repeated == [], f"samples consumed twice: {repeated[:5]}"
    assert len(records) == duration_images
    assert {record.key for record in records} <= set(keys)
    # The first epoch is complete when the run is longer than it; with remainder=drop, fewer
    # than one global batch of its samples may be left out.
    epoch0 = {record.key for record in records if record.epoch == 0}
    if duration_images >= len(keys):
        assert len(keys) - len(epoch0) < GLOBAL_BATCH


def test_cpu_launcher_two_nodes(slurm_cluster, digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    audit_dir = tmp_path / "audit"
    log_path = tmp_path / "job.log"
    keys = dataset_keys(digits_shards)
    steps = len(keys) // GLOBAL_BATCH
    duration_images = steps * GLOBAL_BATCH

    job_id = slurm_cluster.sbatch(
        REPO / "launchers" / "cpu_2rank.sh",
        *training_overrides(digits_shards, audit_dir, duration_images),
        sbatch_args=[f"--nodes={NODES}", f"--output={log_path}", "--job-name=ddn-two-nodes"],
        env=job_env(run_dir),
        cwd=REPO,
    )
    assert_completed(slurm_cluster, job_id, log_path)

    log = read_log(log_path)
    # Environment dump.
    assert "==== environment ====" in log
    assert re.search(r"^torch: 2\.", log, re.MULTILINE)
    assert re.search(r"^deepspeed: ", log, re.MULTILINE)
    assert "---- pip freeze ----" in log
    assert re.search(r"^torch==", log, re.MULTILINE)
    assert "nvidia-smi not found" in log
    assert "---- resolved config ----" in log
    assert f"SLURM_JOB_NODELIST=node[1-{NODES}]" in log
    assert "==== end of environment ====" in log
    # The resolved torchrun command and the end of the step.
    assert f"--rdzv-id={job_id}" in log
    assert "--rdzv-endpoint=127.0.0.1:" in log
    assert "training step finished" in log
    assert "SECRET" not in log

    records = read_audit(str(audit_dir))
    assert sorted({record.rank for record in records}) == list(range(WORLD_SIZE))
    assert_each_sample_once(records, keys, duration_images)
    per_rank = Counter(record.rank for record in records)
    assert set(per_rank.values()) == {duration_images // WORLD_SIZE}


def test_preemption_requeue_resumes(slurm_cluster, digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    audit_dir = tmp_path / "audit"
    log_path = tmp_path / "job.log"
    keys = dataset_keys(digits_shards)
    # One and a half epochs: the signal lands after a few steps, well before the end, and the
    # resumed job crosses an epoch boundary.
    duration_images = 3 * (len(keys) // GLOBAL_BATCH) // 2 * GLOBAL_BATCH

    job_id = slurm_cluster.sbatch(
        REPO / "launchers" / "cpu_2rank.sh",
        *training_overrides(digits_shards, audit_dir, duration_images),
        sbatch_args=[f"--nodes={NODES}", f"--output={log_path}", "--job-name=ddn-preempt"],
        env=job_env(run_dir),
        cwd=REPO,
    )
    # Signal once every rank has trained a few steps.
    deadline = time.monotonic() + JOB_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        steps = audit_steps(audit_dir) if audit_dir.exists() else {}
        if len(steps) == WORLD_SIZE and min(len(s) for s in steps.values()) >= 3 * MICRO_BATCH:
            break
        assert slurm_cluster.job_state(job_id) in ("PENDING", "RUNNING"), read_log(log_path)[-4000:]
        time.sleep(0.5)
    else:
        tail = read_log(log_path)[-4000:]
        pytest.fail(f"training did not start in {JOB_TIMEOUT_SECONDS} s:\n{tail}")
    slurm_cluster.signal(job_id, "USR1", batch=True)

    # The batch shell requeues the job: it comes back as PENDING with one restart.
    info = slurm_cluster.wait_for_state(job_id, ["PENDING"], timeout=JOB_TIMEOUT_SECONDS)
    assert info.restarts == 1
    log = read_log(log_path)
    assert "received SIGUSR1" in log
    assert f"requeueing job {job_id}" in log

    # Every rank saved at the same step, and had consumed exactly the batches of the saved steps.
    saved = re.findall(r"\[rank (\d+)\] WARNING ddn_dist\.train: preempted at step (\d+)", log)
    assert sorted(int(rank) for rank, _ in saved) == list(range(WORLD_SIZE))
    saved_steps = {int(step) for _, step in saved}
    assert len(saved_steps) == 1, f"ranks saved at different steps: {saved}"
    stop_step = saved_steps.pop()
    assert 0 < stop_step * GLOBAL_BATCH < duration_images
    tag = CheckpointManager(str(run_dir)).latest_tag()
    assert tag is not None
    assert int(re.search(r"\d+$", tag).group()) == stop_step
    first_run = audit_steps(audit_dir)
    assert sorted(first_run) == list(range(WORLD_SIZE))
    for rank, steps in first_run.items():
        assert len(steps) == stop_step * MICRO_BATCH, f"rank {rank} consumed {len(steps)} samples"
    assert len({max(steps) for steps in first_run.values()}) == 1

    slurm_cluster.release_requeued(job_id)
    assert_completed(slurm_cluster, job_id, log_path)
    log = read_log(log_path)
    assert log.count("==== environment ====") == 2
    assert f"slurm job: {job_id}, restart 1" in log

    records = read_audit(str(audit_dir))
    assert_each_sample_once(records, keys, duration_images)
    # The resumed job continued after the saved step on every rank.
    total_steps = duration_images // GLOBAL_BATCH
    for rank, steps in audit_steps(audit_dir).items():
        resumed = steps[len(first_run[rank]):]
        assert len(resumed) == (total_steps - stop_step) * MICRO_BATCH
        assert min(resumed) > max(first_run[rank])


def test_srun_direct_two_nodes(slurm_cluster, digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    audit_dir = tmp_path / "audit"
    log_path = tmp_path / "job.log"
    keys = dataset_keys(digits_shards)
    duration_images = 4 * GLOBAL_BATCH

    job_id = slurm_cluster.sbatch(
        REPO / "launchers" / "srun_direct.sh",
        *training_overrides(digits_shards, audit_dir, duration_images),
        sbatch_args=[
            f"--nodes={NODES}", f"--ntasks-per-node={RANKS_PER_NODE}", "--gpus-per-node=0",
            "--cpus-per-task=1", f"--output={log_path}", "--job-name=ddn-srun-direct",
        ],
        env=job_env(run_dir),
        cwd=REPO,
    )
    assert_completed(slurm_cluster, job_id, log_path)
    log = read_log(log_path)
    assert "torch.distributed.run" not in log.split("==== end of environment ====")[-1]
    records = read_audit(str(audit_dir))
    assert sorted({record.rank for record in records}) == list(range(WORLD_SIZE))
    assert_each_sample_once(records, keys, duration_images)
