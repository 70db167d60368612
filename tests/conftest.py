"""Shared pytest configuration: the service fixtures are plugins, each started once per session."""

import os

pytest_plugins = [
    "tests.fixtures.data",
    "tests.fixtures.ceph",
    "tests.fixtures.slurm",
    "tests.fixtures.prometheus",
    "tests.fixtures.trained",
    "tests.fixtures.faulty_proxy",
]

# One thread per process: the suite runs many small multi-process jobs on two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
