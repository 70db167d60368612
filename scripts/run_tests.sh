#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine and run it.
#   bash scripts/run_tests.sh              # the whole suite, real services included
#   bash scripts/run_tests.sh -k loader    # extra arguments go to pytest
# Installs: .venv with the pinned CPU torch and DeepSpeed (scripts/setup_env.sh), then the Debian
# packages for Ceph RGW, Slurm, Prometheus and shellcheck plus the npm packages for the Grafana schema
# check (scripts/install_services.sh, needs root). The tests start each service once per session on
# 127.0.0.1 and stop it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup_env.sh
bash scripts/install_services.sh

export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu PYTHONWARNINGS=ignore::FutureWarning
# Kernel extensions compiled by DeepSpeed on first use land here once and are reused by every test.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}

# pytest exits with 5 when it collected no test: that is a failure here too.
exec .venv/bin/python -m pytest -ra --durations=30 -p no:cacheprovider "$@"
