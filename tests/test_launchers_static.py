"""Launcher scripts without running training: shellcheck, dry runs, and rejected settings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHELL_SCRIPTS = sorted(
    [*REPO.glob("launchers/*.sh"), *REPO.glob("data_prep/*.sh"), *REPO.glob("data_prep/*.sbatch")]
)
FAKE_ALLOCATION = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NNODES": "8",
    "SLURM_JOB_NODELIST": "gpu[001-008]",
}


def run_launcher(script: str, *args: str, env: dict[str, str], timeout: float = 60.0):
    """Run a launcher with bash and return the CompletedProcess."""
    return subprocess.run(
        ["bash", str(REPO / "launchers" / script), *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return the test environment without Slurm job variables or rendezvous settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLURM_", "SBATCH_", "SRUN_"))
        and key not in ("MASTER_ADDR", "MASTER_PORT")
    }
    env.update(extra or {})
    return env


def dry_run_fields(stdout: str) -> dict[str, str]:
    """Parse the `name: value` lines of a dry run."""
    fields = {}
    for line in stdout.splitlines():
        name, sep, value = line.partition(": ")
        if sep:
            fields[name] = value
    return fields


def option_value(command: str, option: str) -> str:
    match = re.search(rf"(?:^| ){re.escape(option)}=(\S+)", command)
    assert match, f"{option} missing from: {command}"
    return match.group(1)


def test_launcher_scripts_found():
    names = {path.name for path in SHELL_SCRIPTS}
    for name in ("ffhq_64gpu.sh", "cifar10_8gpu.sh", "torchrun_local.sh", "cpu_2rank.sh",
                 "srun_direct.sh", "common.sh"):
        assert name in names


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: path.name)
def test_shellcheck_clean(script: Path):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed; run scripts/install_services.sh")
    result = subprocess.run(
        ["shellcheck", "-x", "--severity=style", str(script.relative_to(REPO))],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.slurm
def test_ffhq_dry_run_64_ranks(slurm_cluster):
    env = clean_env({**FAKE_ALLOCATION, "SLURM_CONF": str(slurm_cluster.conf_path), "DRY_RUN": "1"})
    result = run_launcher("ffhq_64gpu.sh", "--data", "s3://bucket/ffhq64", "train.kimg=10", env=env)
    assert result.returncode == 0, result.stderr
    fields = dry_run_fields(result.stdout)
    assert fields["nodes"] == "8"
    assert fields["processes per node"] == "8"
    assert fields["world size"] == "64"
    assert fields["requeue"] == "yes"
    assert fields["run dir"] == "runs/ffhq64-4242"
    assert "--signal=B:USR1@300" in fields["preemption signal"]
    assert fields["preemption signal"].startswith("SIGUSR1")

    command = fields["command"]
    assert command.startswith("srun ")
    assert option_value(command, "--nodes") == "8"
    assert option_value(command, "--ntasks-per-node") == "1"
    assert option_value(command, "--nnodes") == "8"
    assert option_value(command, "--nproc-per-node") == "8"
    assert option_value(command, "--rdzv-backend") == "c10d"
    assert option_value(command, "--rdzv-id") == "4242"
    assert "SIGUSR1" in option_value(command, "--signals-to-handle").split(",")
    assert int(option_value(command, "--max-restarts")) > 0
    # The head is the first node of the allocation, not this host or localhost.
    endpoint = option_value(command, "--rdzv-endpoint")
    host, _, port = endpoint.rpartition(":")
    assert host == "gpu001"
    assert 0 < int(port) < 65536
    assert "localhost" not in command
    assert "--node-rank" not in command
    assert "data.data=s3://bucket/ffhq64" in command
    assert "train.run_dir=runs/ffhq64-4242" in command
    assert command.endswith("train.kimg=10")


@pytest.mark.slurm
def test_ffhq_unresolvable_head_fails(slurm_cluster):
    env = clean_env({**FAKE_ALLOCATION, "SLURM_CONF": str(slurm_cluster.conf_path),
                     "PYTHON": "/bin/false"})
    result = run_launcher("ffhq_64gpu.sh", env=env)
    assert result.returncode == 1
    assert "gpu001" in result.stderr
    assert "MASTER_ADDR" in result.stderr


def test_missing_scontrol_fails_without_fallback(tmp_path):
    # A PATH without scontrol: the launcher must stop rather than rendezvous on localhost.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = ("bash", "sed", "head", "dirname", "basename", "date", "grep", "getent", "hostname")
    for tool in tools:
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    env = clean_env({**FAKE_ALLOCATION, "PATH": str(bin_dir)})
    result = run_launcher("ffhq_64gpu.sh", env=env)
    assert result.returncode == 1
    assert "scontrol not found" in result.stderr
    assert "MASTER_ADDR" in result.stderr


@pytest.mark.slurm
def test_master_addr_overrides_head(slurm_cluster):
    env = clean_env({**FAKE_ALLOCATION, "SLURM_CONF": str(slurm_cluster.conf_path),
                     "DRY_RUN": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "31234"})
    result = run_launcher("ffhq_64gpu.sh", env=env)
    assert result.returncode == 0, result.stderr
    command = dry_run_fields(result.stdout)["command"]
    assert option_value(command, "--rdzv-endpoint") == "10.1.2.3:31234"


def test_cpu_launcher_local_dry_run():
    env = clean_env({"DRY_RUN": "1", "NPROC_PER_NODE": "3"})
    result = run_launcher("cpu_2rank.sh", "--run-dir", "/tmp/run x", "train.kimg=1", env=env)
    assert result.returncode == 0, result.stderr
    fields = dry_run_fields(result.stdout)
    assert fields["world size"] == "3"
    assert "--standalone" in fields["command"]
    assert "srun" not in fields["command"]
    assert "'train.run_dir=/tmp/run x'" in fields["command"] or \
        "train.run_dir=/tmp/run\\ x" in fields["command"]


def test_srun_direct_dry_run_ranks():
    # MASTER_ADDR is set, so the launcher needs no scontrol here.
    env = clean_env({"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4",
                     "SLURM_JOB_NODELIST": "node[1-2]", "MASTER_ADDR": "127.0.0.1", "DRY_RUN": "1"})
    result = run_launcher("srun_direct.sh", env=env)
    assert result.returncode == 0, result.stderr
    fields = dry_run_fields(result.stdout)
    assert fields["world size"] == "8"
    assert "torch.distributed.run" not in fields["command"]
    assert "RANK=\\$SLURM_PROCID" in fields["command"]
    assert fields["rendezvous"].startswith("MASTER_ADDR=127.0.0.1 MASTER_PORT=")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE='two'"),
        ({"MAX_RESTARTS": "-1"}, "MAX_RESTARTS='-1'"),
        ({"CONFIG": "configs/missing.yaml"}, "config file 'configs/missing.yaml' not found"),
    ],
)
def test_bad_settings_rejected(setting, message):
    result = run_launcher("cpu_2rank.sh", env=clean_env({"DRY_RUN": "1", **setting}))
    assert result.returncode == 1
    assert message in result.stderr


def test_unknown_option_rejected():
    result = run_launcher("torchrun_local.sh", "--nodes=2", env=clean_env({"DRY_RUN": "1"}))
    assert result.returncode == 1
    assert "unknown option '--nodes=2'" in result.stderr


def test_help_prints_usage():
    result = run_launcher("ffhq_64gpu.sh", "--help", env=clean_env())
    assert result.returncode == 0
    assert "sbatch launchers/ffhq_64gpu.sh" in result.stdout
    assert "#SBATCH" not in result.stdout
