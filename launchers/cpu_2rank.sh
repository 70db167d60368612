#!/usr/bin/env bash
# Train DDN on CPUs only: 2 ranks per node by default, gloo, one thread per rank. The quick-start
# demo and the Slurm tests use this script. Run it from the repository root.
#
# One machine, 2 ranks (no Slurm):
#   bash launchers/cpu_2rank.sh
#   bash launchers/cpu_2rank.sh --config configs/digits.yaml train.duration_kimg=20
# One machine, 4 ranks:
#   NPROC_PER_NODE=4 bash launchers/cpu_2rank.sh
# Slurm, 2 nodes x 2 ranks (torchrun on each node, c10d rendezvous on the first node):
#   sbatch --nodes=2 launchers/cpu_2rank.sh --data s3://bucket/digits
# Where node names do not resolve to addresses (several slurmd on one host):
#   MASTER_ADDR=127.0.0.1 GLOO_SOCKET_IFNAME=lo sbatch --nodes=2 launchers/cpu_2rank.sh
# Print the resolved commands and exit:
#   DRY_RUN=1 bash launchers/cpu_2rank.sh
#
# Options (command line or environment; the command line wins):
#   --config PATH         CONFIG            YAML config (default configs/digits.yaml)
#   --data URL            DATA_URL          shard directory or s3:// URL (default: the config's)
#   --run-dir DIR         RUN_DIR           run directory (default runs/<config name>-<job id>
#                                           under Slurm, else runs/<config name>-local)
#   --nproc-per-node N    NPROC_PER_NODE    ranks per node (default 2)
#   --max-restarts N      MAX_RESTARTS      torchrun restarts after a failed worker (default 3)
#   --dry-run             DRY_RUN=1         print the resolved commands, start nothing
#   key=value                               trainer overrides, e.g. train.duration_kimg=5
# Environment only: PYTHON (default .venv/bin/python, else python3), REPO_DIR (default the
# submit directory under Slurm), RUN_ROOT (default runs), MASTER_ADDR, MASTER_PORT (default a free
# port on the first node), PREEMPT_SIGNAL (USR1), SHUTDOWN_TIMEOUT_SECONDS (120),
# STEP_GRACE_SECONDS (120), OMP_NUM_THREADS (1), GLOO_SOCKET_IFNAME.
#
# Preemption: Slurm sends SIGUSR1 to this batch shell 120 s before the time limit (or use
# `scancel --batch --signal=USR1 JOBID`); the shell forwards it to every rank, the ranks save at
# the same step, and the job requeues itself with the same job id, so it resumes from RUN_DIR.
#SBATCH --job-name=ddn-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
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

: "${CONFIG:=configs/digits.yaml}"
: "${DATA_URL:=}"
: "${NPROC_PER_NODE:=2}"
: "${MAX_RESTARTS:=3}"
: "${PREEMPT_SIGNAL:=USR1}"
: "${SHUTDOWN_TIMEOUT_SECONDS:=120}"
: "${STEP_GRACE_SECONDS:=120}"
: "${RUN_ROOT:=runs}"
: "${DRY_RUN:=0}"
ddn_parse_args "$0" "$@"
PYTHON=$(ddn_default_python)
NNODES=${SLURM_NNODES:-1}
RUN_NAME=$(basename "$CONFIG" .yaml)
: "${RUN_DIR:=$RUN_ROOT/$RUN_NAME-${SLURM_JOB_ID:-local}}"
ddn_check_settings

# ---- communication: gloo on CPU ----
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export DS_ACCELERATOR=cpu
# With restarts enabled, a restarted worker group must not reuse the rendezvous TCP store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
if [ -n "${GLOO_SOCKET_IFNAME:-}" ]; then
  export GLOO_SOCKET_IFNAME
fi

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
ddn_log "starting $NNODES node(s) x $NPROC_PER_NODE ranks; run dir $RUN_DIR"
ddn_log "command:$(ddn_print_words "${LAUNCH_CMD[@]}")"
ddn_run_step "${LAUNCH_CMD[@]}"
ddn_finish
