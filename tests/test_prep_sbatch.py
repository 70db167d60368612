"""The Slurm array-job script of data prep, driven with a stand-in `sbatch` and array variables."""

import os
import shutil
import subprocess
import sys

import pytest

from ddn_dist.data.prep.jobs import PrepOptions, run_prep
from tests.test_prep_jobs import dataset_bytes

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "data_prep", "shard_array.sbatch")
PREP_ARGS = ["digits", "--max-images", "300", "--shard-samples", "40"]


def run_script(args, env, cwd):
    """Run the script with `env` on top of this environment, minus any Slurm or PREP_ variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PREP_"))}
    return subprocess.run(
        ["bash", SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**base, **env},
        cwd=cwd,
    )


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed; run scripts/install_services.sh")
    result = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_submit_array_then_merge(tmp_path):
    # A stand-in sbatch records its arguments and prints a job id as `sbatch --parsable` does.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\nwc -l < {log} | tr -d " "\n')
    fake.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PREP_PARTS": "3",
        "PREP_SBATCH_ARGS": "--partition=cpu --time=01:00:00",
    }
    result = run_script([*PREP_ARGS, "--out", "s3://bucket/digits"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "submitted array job 1 (3 tasks) and merge job 2" in result.stdout
    array_call, merge_call = log.read_text().splitlines()
    assert array_call.startswith("--parsable --partition=cpu --time=01:00:00 --array=0-2 ")
    assert array_call.endswith(
        "digits --max-images 300 --shard-samples 40 --out s3://bucket/digits"
    )
    assert "--dependency=afterok:1 " in merge_call
    assert "--export=ALL,PREP_MERGE=1 " in merge_call


def test_array_tasks_and_merge_equal_single_run(tmp_path):
    out = str(tmp_path / "parts")
    ddn = f"{sys.executable} -m ddn_dist.cli"
    for task in (11, 12):
        env = {
            "SLURM_JOB_ID": "7",
            "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_ARRAY_TASK_MIN": "11",
            "SLURM_ARRAY_TASK_COUNT": "2",
            "SLURM_CPUS_PER_TASK": "1",
            "DDN_COMMAND": ddn,
        }
        result = run_script([*PREP_ARGS, "--out", out], env, tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"ddn prep part {task - 11}/2" in result.stdout
    assert not os.path.exists(os.path.join(out, "index.json"))
    merge = run_script(
        [*PREP_ARGS, f"--out={out}"],
        {"SLURM_JOB_ID": "8", "PREP_MERGE": "1", "DDN_COMMAND": ddn},
        tmp_path,
    )
    assert merge.returncode == 0, merge.stderr
    run_prep(
        PrepOptions(
            kind="digits",
            out=str(tmp_path / "single"),
            max_images=300,
            shard_samples=40,
            progress=False,
        )
    )
    assert dataset_bytes(out) == dataset_bytes(tmp_path / "single")


def test_missing_out_rejected(tmp_path):
    result = run_script(["digits"], {}, tmp_path)
    assert result.returncode == 2
    assert "missing --out URL" in result.stderr
