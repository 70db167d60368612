#!/usr/bin/env bash
# Train DDN with one Slurm task per GPU and no torchrun: srun starts every rank, and each rank
# takes RANK, LOCAL_RANK and WORLD_SIZE from SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS. There
# are no elastic restarts; a failed rank fails the job step. Submit from the repository root.
#
# Many nodes (default 2 nodes x 8 GPUs):
#   sbatch launchers/srun_direct.sh --config configs/ffhq64.yaml --data s3://my-bucket/ffhq64
#   sbatch --nodes=8 launchers/srun_direct.sh --config configs/ffhq64.yaml
# One node, 8 GPUs:
#   sbatch --nodes=1 launchers/srun_direct.sh --config configs/cifar10.yaml
# One GPU:
#   sbatch --nodes=1 --ntasks-per-node=1 --gpus-per-node=1 launchers/srun_direct.sh
# CPU ranks (2 nodes x 2 ranks, as the tests run it):
#   sbatch --nodes=2 --ntasks-per-node=2 --gpus-per-node=0 launchers/srun_direct.sh
# Print the resolved srun command and exit:
#   DRY_RUN=1 SLURM_JOB_ID=1 SLURM_NNODES=2 SLURM_NTASKS_PER_NODE=8 \
#     SLURM_JOB_NODELIST='gpu[01-02]' bash launchers/srun_direct.sh
#
# Options (command line or environment; the command line wins):
#   --config PATH         CONFIG            YAML config (default configs/digits.yaml)
#   --data URL            DATA_URL          shard directory or s3:// URL (default: the config's)
#   --run-dir DIR         RUN_DIR           run directory (default runs/<config name>-<job id>,
#                                           so a requeued job resumes)
#   --dry-run             DRY_RUN=1         print the resolved command, start nothing
#   key=value                               trainer overrides, e.g. train.duration_kimg=100
# Ranks per node: `sbatch --ntasks-per-node=N`. Environment only: PYTHON, REPO_DIR, RUN_ROOT
# (default runs), MASTER_ADDR (where node names do not resolve), MASTER_PORT (default a free port
# on the first node), PREEMPT_SIGNAL (USR1), STEP_GRACE_SECONDS (300), OMP_NUM_THREADS, NCCL_*,
# GLOO_SOCKET_IFNAME.
#
# Preemption: SIGUSR1 reaches this batch shell 300 s before the time limit; srun forwards it to
# every rank, the ranks save at the same step and exit, and the job requeues itself.
#SBATCH --job-name=ddn-srun
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
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

: "${CONFIG:=configs/digits.yaml}"
: "${DATA_URL:=}"
: "${PREEMPT_SIGNAL:=USR1}"
: "${STEP_GRACE_SECONDS:=300}"
: "${RUN_ROOT:=runs}"
: "${DRY_RUN:=0}"
# Elastic restarts and the per-node process count belong to torchrun; this path has neither.
MAX_RESTARTS=0
ddn_parse_args "$0" "$@"
[ -n "${SLURM_JOB_ID:-}" ] || ddn_die "srun_direct.sh runs inside a Slurm job; submit it with" \
  "sbatch, or use launchers/torchrun_local.sh without Slurm"
PYTHON=$(ddn_default_python)
NNODES=${SLURM_NNODES:-1}
# SLURM_NTASKS_PER_NODE is set when --ntasks-per-node is given, as in the #SBATCH lines above.
NPROC_PER_NODE=${SLURM_NTASKS_PER_NODE:-1}
RUN_NAME=$(basename "$CONFIG" .yaml)
: "${RUN_DIR:=$RUN_ROOT/$RUN_NAME-$SLURM_JOB_ID}"
ddn_check_settings

# ---- communication: NCCL between GPUs, gloo on CPU; override any value from the environment ----
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
if [ -n "${GLOO_SOCKET_IFNAME:-}" ]; then
  export GLOO_SOCKET_IFNAME
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
if ! command -v nvidia-smi >/dev/null; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi

ddn_resolve_head
export MASTER_ADDR=$HEAD_ADDR MASTER_PORT
ddn_build_worker_cmd
# Each task maps its Slurm ids to the variables torch.distributed reads, then becomes the trainer.
LAUNCH_CMD=(srun --kill-on-bad-exit=0 --wait="$STEP_GRACE_SECONDS")
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  # srun of Slurm 22.05 does not read SLURM_CPUS_PER_TASK of the batch job, so pass it on.
  LAUNCH_CMD+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi
# shellcheck disable=SC2016 # the variables expand inside each task, not here
rank_env='export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"'
LAUNCH_CMD+=(bash -c "$rank_env" ddn-rank "$PYTHON" "${WORKER_CMD[@]}")
if [ "$DRY_RUN" = 1 ]; then
  ddn_print_dry_run "$0"
  exit 0
fi

ddn_env_dump
ddn_log "starting $NNODES node(s) x $NPROC_PER_NODE ranks, master $MASTER_ADDR:$MASTER_PORT;" \
  "run dir $RUN_DIR"
ddn_log "command:$(ddn_print_words "${LAUNCH_CMD[@]}")"
ddn_run_step "${LAUNCH_CMD[@]}"
ddn_finish
