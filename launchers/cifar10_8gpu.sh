#!/usr/bin/env bash
# Train DDN on CIFAR-10 32x32 (configs/cifar10.yaml) on one node with 8 GPUs: one Slurm task runs
# torchrun with 8 workers. Submit from the repository root, with the Python environment that has
# ddn-dist installed active (or set PYTHON).
#
# One node, 8 GPUs (Slurm):
#   sbatch launchers/cifar10_8gpu.sh --data s3://my-bucket/cifar10
# One node, 8 GPUs (no Slurm):
#   bash launchers/cifar10_8gpu.sh --data /data/cifar10
# One GPU:
#   NPROC_PER_NODE=1 bash launchers/cifar10_8gpu.sh --data /data/cifar10
# Many nodes: `sbatch --nodes=N launchers/cifar10_8gpu.sh` works too (c10d rendezvous on the first
# node), but launchers/ffhq_64gpu.sh is the multi-node example.
# Print the resolved commands and exit:
#   DRY_RUN=1 bash launchers/cifar10_8gpu.sh
#
# Options (command line or environment; the command line wins):
#   --config PATH         CONFIG            YAML config (default configs/cifar10.yaml)
#   --data URL            DATA_URL          shard directory or s3:// URL (default: the config's)
#   --run-dir DIR         RUN_DIR           run directory (default runs/cifar10-<job id> under
#                                           Slurm, so a requeued job resumes; else runs/cifar10-local)
#   --nproc-per-node N    NPROC_PER_NODE    GPUs per node (default 8)
#   --max-restarts N      MAX_RESTARTS      torchrun restarts after a failed worker (default 3)
#   --dry-run             DRY_RUN=1         print the resolved commands, start nothing
#   key=value                               trainer overrides, e.g. train.duration_kimg=200000
# Environment only: PYTHON, REPO_DIR, RUN_ROOT (default runs), MASTER_ADDR, MASTER_PORT,
# PREEMPT_SIGNAL (USR1), SHUTDOWN_TIMEOUT_SECONDS (240), STEP_GRACE_SECONDS (300), NCCL_*.
#
# Preemption: SIGUSR1 reaches this batch shell 300 s before the time limit; it is forwarded to
# every rank, which save at the same step and exit, and the job requeues itself.
#SBATCH --job-name=ddn-cifar10
#SBATCH --nodes=1
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

: "${CONFIG:=configs/cifar10.yaml}"
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
: "${RUN_DIR:=$RUN_ROOT/cifar10-${SLURM_JOB_ID:-local}}"
ddn_check_settings

# ---- communication: NCCL between GPUs; every value can be overridden from the environment ----
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# A failed collective raises an error in every rank instead of hanging the job.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# With restarts enabled, a restarted worker group must not reuse the rendezvous TCP store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
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
