#!/usr/bin/env bash
# Train DDN on FFHQ 64x64 (configs/ffhq64.yaml) on 8 nodes x 8 GPUs. One Slurm task per node runs
# torchrun, and the torchruns meet in a c10d rendezvous on the first node of the allocation.
# Submit from the repository root, with the Python environment that has ddn-dist installed active
# (or set PYTHON).
#
# Many nodes (the default 8 x 8 = 64 GPUs):
#   sbatch launchers/ffhq_64gpu.sh --data s3://my-bucket/ffhq64
#   sbatch --nodes=4 launchers/ffhq_64gpu.sh --data s3://my-bucket/ffhq64 train.duration_kimg=50000
# One node, 8 GPUs:
#   sbatch --nodes=1 launchers/ffhq_64gpu.sh --data s3://my-bucket/ffhq64
# One GPU (no Slurm):
#   NPROC_PER_NODE=1 bash launchers/ffhq_64gpu.sh --data /data/ffhq64
# Print the resolved srun/torchrun commands and exit, here for a made-up 8-node allocation:
#   DRY_RUN=1 SLURM_JOB_ID=1 SLURM_NNODES=8 SLURM_JOB_NODELIST='gpu[01-08]' \
#     bash launchers/ffhq_64gpu.sh
#
# Options (command line or environment; the command line wins):
#   --config PATH         CONFIG            YAML config (default configs/ffhq64.yaml)
#   --data URL            DATA_URL          shard directory or s3:// URL (default: the config's)
#   --run-dir DIR         RUN_DIR           run directory on a local or shared file system (default
#                                           runs/ffhq64-<job id>, so a requeued job resumes)
#   --nproc-per-node N    NPROC_PER_NODE    GPUs per node (default 8)
#   --max-restarts N      MAX_RESTARTS      torchrun restarts after a failed worker (default 3)
#   --dry-run             DRY_RUN=1         print the resolved commands, start nothing
#   key=value                               trainer overrides, e.g. train.duration_kimg=50000
# Node count: `sbatch --nodes=N`. Environment only: PYTHON (default .venv/bin/python, else
# python3), REPO_DIR (default the submit directory), RUN_ROOT (default runs), MASTER_ADDR (head
# address where node names do not resolve), MASTER_PORT (default a free port on the first node),
# PREEMPT_SIGNAL (USR1), SHUTDOWN_TIMEOUT_SECONDS (240), STEP_GRACE_SECONDS (300), and the NCCL_*
# variables of the communication block below.
#
# Preemption: Slurm sends SIGUSR1 to this batch shell 300 s before the time limit; the shell
# forwards it to every rank, the ranks agree on a step, save, and exit, and the shell runs
# `scontrol requeue`. The requeued job keeps its job id, so it resumes from the same RUN_DIR.
#SBATCH --job-name=ddn-ffhq64
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
[ -f "$REPO_DIR/launchers/common.sh" ] || {
  echo "launchers/common.sh not found under REPO_DIR=$REPO_DIR; submit from the repository root" \
    "or set REPO_DIR" >&2
  exit 1
}
cd "$REPO_DIR"
# shellcheck source=launchers/common.sh
source "$REPO_DIR/launchers/common.sh"

: "${CONFIG:=configs/ffhq64.yaml}"
: "${DATA_URL:=}"
: "${NPROC_PER_NODE:=8}"
: "${MAX_RESTARTS:=3}"
: "${PREEMPT_SIGNAL:=USR1}"
: "${SHUTDOWN_TIMEOUT_SECONDS:=240}"
: "${STEP_GRACE_SECONDS:=300}"
: "${RUN_ROOT:=runs}"
: "${DRY_RUN:=0}"
ddn_parse_args "$0" "$@"
PYTHON=$(ddn_default_python)
NNODES=${SLURM_NNODES:-1}
: "${RUN_DIR:=$RUN_ROOT/ffhq64-${SLURM_JOB_ID:-local}}"
ddn_check_settings

# ---- communication: NCCL between GPUs; every value can be overridden from the environment ----
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Loopback and container bridges never carry traffic between nodes.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
# A failed collective raises an error in every rank instead of hanging the job.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
if [ -n "${NCCL_IB_HCA:-}" ]; then
  export NCCL_IB_HCA
fi
if [ -n "${GLOO_SOCKET_IFNAME:-}" ]; then
  export GLOO_SOCKET_IFNAME
fi
# With restarts enabled, a restarted worker group must not reuse the rendezvous TCP store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# Data-loader workers and the CPU side of each rank; 8 ranks share a node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if [ -n "${SLURM_JOB_ID:-}" ]; then
  ddn_resolve_head
fi
ddn_build_worker_cmd
ddn_build_torchrun_cmd
if [ "$DRY_RUN" = 1 ]; then
  ddn_print_dry_run "$0"
  exit 0
fi

ddn_env_dump
ddn_log "starting $NNODES node(s) x $NPROC_PER_NODE GPUs; run dir $RUN_DIR"
ddn_log "command:$(ddn_print_words "${LAUNCH_CMD[@]}")"
ddn_run_step "${LAUNCH_CMD[@]}"
ddn_finish
