#!/usr/bin/env bash
# Train DDN with plain torchrun, without Slurm. Run it from the repository root.
#
# One GPU:
#   NPROC_PER_NODE=1 bash launchers/torchrun_local.sh --config configs/cifar10.yaml
# One node, every GPU (the default counts them with nvidia-smi; 1 process without GPUs):
#   bash launchers/torchrun_local.sh --config configs/cifar10.yaml --data /data/cifar10
# Many nodes: run the same command on every machine with the same NNODES, MASTER_ADDR (an address
# of the first machine that the others can reach), MASTER_PORT and RDZV_ID:
#   NNODES=2 MASTER_ADDR=10.0.0.1 MASTER_PORT=29400 RDZV_ID=cifar-run1 \
#     bash launchers/torchrun_local.sh --config configs/cifar10.yaml
# Print the resolved command and exit:
#   DRY_RUN=1 bash launchers/torchrun_local.sh
#
# Options (command line or environment; the command line wins):
#   --config PATH         CONFIG            YAML config (default configs/digits.yaml)
#   --data URL            DATA_URL          shard directory or s3:// URL (default: the config's)
#   --run-dir DIR         RUN_DIR           run directory (default runs/<config name>); running
#                                           the same command again resumes from it
#   --nproc-per-node N    NPROC_PER_NODE    processes on this machine (default: GPU count, or 1)
#   --max-restarts N      MAX_RESTARTS      torchrun restarts after a failed worker (default 3)
#   --dry-run             DRY_RUN=1         print the resolved command, start nothing
#   key=value                               trainer overrides, e.g. train.duration_kimg=100
# Environment only: PYTHON (default .venv/bin/python, else python3), NNODES (default 1),
# MASTER_ADDR and MASTER_PORT (rendezvous endpoint, required when NNODES > 1), RDZV_ID (required
# when NNODES > 1), SHUTDOWN_TIMEOUT_SECONDS (120), OMP_NUM_THREADS, NCCL_*, GLOO_SOCKET_IFNAME.
#
# Stopping: SIGUSR1 or SIGTERM to torchrun makes every rank save at the same step and exit.
set -euo pipefail

REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cd "$REPO_DIR"
# shellcheck source=launchers/common.sh
source "$REPO_DIR/launchers/common.sh"

: "${CONFIG:=configs/digits.yaml}"
: "${DATA_URL:=}"
: "${NPROC_PER_NODE:=}"
: "${MAX_RESTARTS:=3}"
: "${NNODES:=1}"
: "${PREEMPT_SIGNAL:=USR1}"
: "${SHUTDOWN_TIMEOUT_SECONDS:=120}"
: "${RUN_ROOT:=runs}"
: "${DRY_RUN:=0}"
ddn_parse_args "$0" "$@"
PYTHON=$(ddn_default_python)
if [ -z "$NPROC_PER_NODE" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi
: "${RUN_DIR:=$RUN_ROOT/$(basename "$CONFIG" .yaml)}"
ddn_check_settings

# ---- communication: NCCL between GPUs, gloo on CPU; override any value from the environment ----
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
if [ -n "${GLOO_SOCKET_IFNAME:-}" ]; then
  export GLOO_SOCKET_IFNAME
fi
# With restarts enabled, a restarted worker group must not reuse the rendezvous TCP store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

ddn_build_worker_cmd
LAUNCH_CMD=("$PYTHON" -m torch.distributed.run
  --nproc-per-node="$NPROC_PER_NODE"
  --max-restarts="$MAX_RESTARTS"
  --signals-to-handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIG$PREEMPT_SIGNAL"
  --shutdown-timeout="$SHUTDOWN_TIMEOUT_SECONDS")
if [ "$NNODES" = 1 ]; then
  # --standalone picks a free port for a rendezvous on this machine.
  LAUNCH_CMD+=(--standalone --nnodes=1)
else
  if [ -z "${MASTER_ADDR:-}" ] || [ -z "${MASTER_PORT:-}" ]; then
    ddn_die "NNODES=$NNODES needs MASTER_ADDR and MASTER_PORT: the rendezvous endpoint on the" \
      "first machine"
  fi
  [ -n "${RDZV_ID:-}" ] || ddn_die "NNODES=$NNODES needs RDZV_ID, the same on every machine"
  LAUNCH_CMD+=(--nnodes="$NNODES" --rdzv-backend=c10d
    --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID")
fi
LAUNCH_CMD+=("${WORKER_CMD[@]}")

if [ "$DRY_RUN" = 1 ]; then
  echo "dry run: nothing is started"
  echo "nodes: $NNODES"
  echo "processes per node: $NPROC_PER_NODE"
  echo "world size: $(( NNODES * NPROC_PER_NODE ))"
  echo "run dir: $RUN_DIR"
  printf 'command:'
  ddn_print_words "${LAUNCH_CMD[@]}"
  exit 0
fi

ddn_log "starting $NPROC_PER_NODE process(es) on $(hostname); run dir $RUN_DIR"
ddn_log "command:$(ddn_print_words "${LAUNCH_CMD[@]}")"
# exec, so that a SIGTERM or SIGUSR1 sent to this script reaches torchrun, which forwards it.
exec "${LAUNCH_CMD[@]}"
