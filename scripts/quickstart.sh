#!/usr/bin/env bash
# Quick start: set up the environment and run the demo on this machine's CPUs.
#   bash scripts/quickstart.sh                              # shards to ./demo_out/digits, 2 CPU ranks
#   bash scripts/quickstart.sh --data s3://bucket/digits --endpoint-url http://127.0.0.1:7480
# The demo shards the 8x8 digits that ship with scikit-learn into WebDataset shards, trains a DDN with
# DeepSpeed ZeRO-2 on 2 CPU ranks under torchrun, and prints images/s, the final loss, the sample and
# reconstruction grids it wrote, and the sample-quality figures. Extra arguments go to `ddn demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=cpu PYTHONWARNINGS=ignore::FutureWarning
exec .venv/bin/ddn demo "$@"
