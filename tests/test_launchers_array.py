"""The data-prep array job on a real two-node Slurm cluster: parts, dependent merge, same result."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from ddn_dist.data.index import load_index

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
PARTS = 3
SHARD_SAMPLES = 200
PREP_DIR_NAME = "_prep"  # part manifests, which depend on the split



@pytest.fixture(autouse=True)
def cancel_jobs_after_test(slurm_cluster):
    """Leave no job of a failed test behind to hold the nodes for the next test."""
    yield
    slurm_cluster.cancel_all_jobs()


def dataset_files(root: Path) -> dict[str, bytes]:
    """Return {relative path: bytes} of index.json and the shards, without the part manifests."""
    files = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and not relative.startswith(PREP_DIR_NAME + "/"):
            files[relative] = path.read_bytes()
    return files


def test_array_job_matches_single_run(slurm_cluster, tmp_path):
    parts_out = tmp_path / "parts"
    single_out = tmp_path / "single"
    prep_args = ["digits", "--out", str(parts_out), "--shard-samples", str(SHARD_SAMPLES)]
    env = {
        **slurm_cluster.env,
        "PREP_PARTS": str(PARTS),
        # The test nodes have 2 CPUs each, and the script requests 4 CPUs per task by default.
        "PREP_SBATCH_ARGS": "--cpus-per-task=1",
        "DDN_COMMAND": f"{PYTHON} -m ddn_dist.cli",
    }
    submit = subprocess.run(
        ["bash", str(REPO / "data_prep" / "shard_array.sbatch"), *prep_args],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert submit.returncode == 0, submit.stderr
    match = re.search(r"array job (\d+) \((\d+) tasks\) and merge job (\d+)", submit.stdout)
    assert match, submit.stdout
    array_id, tasks, merge_id = (int(group) for group in match.groups())
    assert tasks == PARTS

    merge_job = slurm_cluster.job_info(merge_id)
    assert merge_job is not None
    assert merge_job.fields.get("Dependency", "").startswith(f"afterok:{array_id}")

    merge_info = slurm_cluster.wait(merge_id, timeout=240)
    logs = "\n".join(path.read_text(errors="replace") for path in sorted(tmp_path.glob("*.out")))
    assert merge_info.state == "COMPLETED", logs
    for task in range(PARTS):
        task_info = slurm_cluster.job_info(f"{array_id}_{task}")
        assert task_info is not None
        assert task_info.state == "COMPLETED", logs
    manifests = sorted(path.name for path in (parts_out / PREP_DIR_NAME).glob("part-*.json"))
    assert len(manifests) == PARTS

    single = subprocess.run(
        [str(PYTHON), "-m", "ddn_dist.cli", "prep", "digits", "--out", str(single_out),
         "--shard-samples", str(SHARD_SAMPLES), "--no-progress"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert single.returncode == 0, single.stderr

    merged_files = dataset_files(parts_out)
    single_files = dataset_files(single_out)
    assert sorted(merged_files) == sorted(single_files)
    for name, data in single_files.items():
        assert merged_files[name] == data, f"{name} differs between the array job and one process"
    assert load_index(str(parts_out / "index.json")).dataset.num_samples == 1797
