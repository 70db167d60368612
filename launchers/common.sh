# shellcheck shell=bash
# Helpers shared by the launchers in this folder. Source it; it defines functions and runs nothing.
#
# The functions read these variables, which each launcher sets (environment first, then defaults):
#   REPO_DIR, PYTHON, CONFIG, DATA_URL, RUN_DIR, NPROC_PER_NODE, MAX_RESTARTS, MASTER_ADDR,
#   MASTER_PORT, PREEMPT_SIGNAL, REQUEUE_EXIT_CODE, SHUTDOWN_TIMEOUT_SECONDS,
#   STEP_GRACE_SECONDS, DRY_RUN
# and fill these arrays: OVERRIDES (key=value arguments of the command line), TRAINER_OVERRIDES
# (those plus the run directory and data URL), WORKER_CMD and LAUNCH_CMD.

# Exit status of `python -m ddn_dist.train` after a preemption save: EX_TEMPFAIL from sysexits.h.
: "${REQUEUE_EXIT_CODE:=75}"

ddn_log() {
  printf '[launcher %s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

ddn_die() {
  ddn_log "error: $*"
  exit 1
}

# Print the usage block at the top of the launcher: the comment lines after the shebang.
ddn_usage() {
  sed -n '2,/^[^#]/{/^#SBATCH/d;/^#/!d;s/^# \{0,1\}//;p}' "$1"
}

# Parse launcher options and collect trainer overrides (key=value) into OVERRIDES.
ddn_parse_args() {
  local script=$1
  shift
  OVERRIDES=()
  while [ $# -gt 0 ]; do
    case "$1" in
      -h | --help) ddn_usage "$script"; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --config=*) CONFIG=${1#*=} ;;
      --data=*) DATA_URL=${1#*=} ;;
      --run-dir=*) RUN_DIR=${1#*=} ;;
      --nproc-per-node=*) NPROC_PER_NODE=${1#*=} ;;
      --max-restarts=*) MAX_RESTARTS=${1#*=} ;;
      --config | --data | --run-dir | --nproc-per-node | --max-restarts)
        [ $# -ge 2 ] || ddn_die "option $1 needs a value"
        # Rewrite `--option value` as `--option=value` and parse it again.
        set -- "$1=$2" "${@:3}"
        continue ;;
      -*) ddn_die "unknown option '$1'; launcher options are --config, --data, --run-dir," \
            "--nproc-per-node, --max-restarts and --dry-run" ;;
      *=*) OVERRIDES+=("$1") ;;
      *) ddn_die "unknown argument '$1'; pass launcher options or trainer overrides as key=value" ;;
    esac
    shift
  done
}

# Pick the Python interpreter: $PYTHON, else the project's virtual environment, else python3.
ddn_default_python() {
  if [ -n "${PYTHON:-}" ]; then
    printf '%s\n' "$PYTHON"
  elif [ -x "$REPO_DIR/.venv/bin/python" ]; then
    printf '%s\n' "$REPO_DIR/.venv/bin/python"
  else
    printf '%s\n' python3
  fi
}

ddn_check_settings() {
  [ -f "$CONFIG" ] || ddn_die "config file '$CONFIG' not found; pass --config PATH or CONFIG=PATH" \
    "(relative paths are taken from $REPO_DIR)"
  case "$NPROC_PER_NODE" in
    '' | *[!0-9]* | 0) ddn_die "NPROC_PER_NODE='$NPROC_PER_NODE' is not a positive integer" ;;
  esac
  case "$MAX_RESTARTS" in
    '' | *[!0-9]*) ddn_die "MAX_RESTARTS='$MAX_RESTARTS' is not a non-negative integer" ;;
  esac
}

# Print the value of an `#SBATCH --NAME=VALUE` directive of a script, or nothing.
ddn_sbatch_directive() {
  sed -n "s/^#SBATCH --$2=\\([^ ]*\\).*/\\1/p" "$1" | head -n 1
}

# Pick a free TCP port on this host (the batch host is the first node of the allocation).
ddn_free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# Set HEAD_ADDR and MASTER_PORT for the rendezvous. The head is the first node of the allocation;
# MASTER_ADDR overrides it where node names do not resolve. There is deliberately no fallback to
# localhost: with one, every node would form a world of its own and wait forever.
ddn_resolve_head() {
  if [ -n "${MASTER_ADDR:-}" ]; then
    HEAD_ADDR=$MASTER_ADDR
    HEAD_SOURCE="MASTER_ADDR"
  else
    [ -n "${SLURM_JOB_NODELIST:-}" ] || ddn_die "SLURM_JOB_NODELIST is not set; run under sbatch" \
      "or set MASTER_ADDR to the address of the first node"
    command -v scontrol >/dev/null || ddn_die "scontrol not found, so the head node of" \
      "'$SLURM_JOB_NODELIST' cannot be resolved; set MASTER_ADDR to the address of the first node"
    local hosts
    hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || ddn_die "'scontrol show hostnames" \
      "$SLURM_JOB_NODELIST' failed; set MASTER_ADDR to the address of the first node"
    HEAD_ADDR=${hosts%%$'\n'*}
    [ -n "$HEAD_ADDR" ] || ddn_die "no host found in SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST';" \
      "set MASTER_ADDR to the address of the first node"
    HEAD_SOURCE="first node of $SLURM_JOB_NODELIST"
    if ! getent hosts "$HEAD_ADDR" >/dev/null; then
      if [ "${DRY_RUN:-0}" = 1 ]; then
        ddn_log "warning: head node '$HEAD_ADDR' does not resolve on $(hostname); a real run stops here"
      else
        ddn_die "head node '$HEAD_ADDR' does not resolve on $(hostname); set MASTER_ADDR to its address"
      fi
    fi
  fi
  if [ -z "${MASTER_PORT:-}" ]; then
    MASTER_PORT=$(ddn_free_port) || ddn_die "could not pick a free port; set MASTER_PORT"
  fi
  case "$MASTER_PORT" in
    '' | *[!0-9]*) ddn_die "MASTER_PORT='$MASTER_PORT' is not a port number" ;;
  esac
}

# Print the environment of the job for reproducing it: versions, selected variables, GPUs, packages
# and the resolved config. Variables whose names suggest credentials are never printed.
ddn_env_dump() {
  echo "==== environment ===="
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  echo "repository: $REPO_DIR (commit $(git -C "$REPO_DIR" rev-parse HEAD 2>/dev/null || echo none))"
  echo "slurm job: ${SLURM_JOB_ID:-none}, restart ${SLURM_RESTART_COUNT:-0}," \
    "nodes ${SLURM_JOB_NODELIST:-none}"
  # Package metadata is read without importing torch, which takes seconds; CUDA and NCCL versions
  # need the import, so they are printed only where nvidia-smi finds a driver.
  "$PYTHON" - <<'PY' || ddn_log "warning: could not print package versions"
import platform
import shutil
from importlib import metadata

print(f"python: {platform.python_version()} ({platform.python_implementation()})")
for package in ("torch", "deepspeed", "webdataset", "ddn-dist"):
    try:
        print(f"{package}: {metadata.version(package)}")
    except metadata.PackageNotFoundError:
        print(f"{package}: not installed")
if shutil.which("nvidia-smi"):
    import torch

    print(f"CUDA (torch build): {torch.version.cuda}, GPUs visible: {torch.cuda.device_count()}")
    if torch.cuda.is_available():
        print(f"NCCL: {'.'.join(map(str, torch.cuda.nccl.version()))}")
PY
  echo "---- variables (SLURM_, NCCL_, GLOO_, TORCH, CUDA_, OMP_, MASTER_, DDN_) ----"
  env | grep -E '^(SLURM_|NCCL_|GLOO_|TORCH|CUDA_|OMP_|MASTER_|DDN_)' \
    | grep -viE '^[^=]*(SECRET|TOKEN|PASSWORD|KEY)[^=]*=' | sort || true
  echo "---- GPU inventory ----"
  if command -v nvidia-smi >/dev/null; then
    if [ -n "${SLURM_JOB_ID:-}" ] && [ "${DRY_RUN:-0}" != 1 ]; then
      srun --nodes="${SLURM_NNODES:-1}" --ntasks-per-node=1 --label \
        nvidia-smi --query-gpu=index,name,memory.total,driver_version,pci.bus_id --format=csv,noheader \
        || ddn_log "warning: nvidia-smi failed on some node"
    else
      nvidia-smi --query-gpu=index,name,memory.total,driver_version,pci.bus_id --format=csv,noheader \
        || ddn_log "warning: nvidia-smi failed"
    fi
  else
    echo "nvidia-smi not found on $(hostname): no NVIDIA GPUs listed"
  fi
  echo "---- pip freeze ----"
  "$PYTHON" -m pip freeze 2>/dev/null || ddn_log "warning: pip freeze failed"
  echo "---- resolved config ----"
  ddn_print_config
  echo "==== end of environment ===="
}

# Print the config as the trainer resolves it (YAML + overrides) and stop on an invalid one, before
# any node starts. Falls back to the file when ddn_dist.config cannot be imported.
ddn_print_config() {
  local status=0
  "$PYTHON" - "$CONFIG" "${TRAINER_OVERRIDES[@]}" <<'PY' || status=$?
import sys
try:
    from ddn_dist.config import ConfigError, load_config
except ImportError as err:
    print(f"cannot import ddn_dist.config: {err}", file=sys.stderr)
    sys.exit(3)
try:
    print(load_config(sys.argv[1], sys.argv[2:]).to_yaml(), end="")
except ConfigError as err:
    print(f"invalid configuration: {err}", file=sys.stderr)
    sys.exit(2)
PY
  case "$status" in
    0) ;;
    2) ddn_die "config $CONFIG with overrides ${TRAINER_OVERRIDES[*]:-none} is invalid;" \
         "fix the value named above" ;;
    *)
      echo "(could not resolve the config; the file $CONFIG and the overrides follow)"
      cat "$CONFIG"
      printf 'override: %s\n' "${TRAINER_OVERRIDES[@]}" ;;
  esac
}

# Fill WORKER_CMD: the trainer with its config, run directory, data URL and overrides.
ddn_build_worker_cmd() {
  TRAINER_OVERRIDES=("train.run_dir=$RUN_DIR")
  if [ -n "${DATA_URL:-}" ]; then
    TRAINER_OVERRIDES+=("data.data=$DATA_URL")
  fi
  TRAINER_OVERRIDES+=("${OVERRIDES[@]}")
  WORKER_CMD=(-m ddn_dist.train --config "$CONFIG" "${TRAINER_OVERRIDES[@]}")
}

# Fill LAUNCH_CMD with torchrun, wrapped in srun (one task per node) inside a Slurm job.
# Needs WORKER_CMD; inside Slurm also HEAD_ADDR and MASTER_PORT (ddn_resolve_head).
ddn_build_torchrun_cmd() {
  local torchrun=("$PYTHON" -m torch.distributed.run
    --nproc-per-node="$NPROC_PER_NODE"
    --max-restarts="$MAX_RESTARTS"
    # torchrun forwards these signals to its workers and, unlike a worker failure, does not
    # restart them afterwards; it waits SHUTDOWN_TIMEOUT_SECONDS for the save, then kills.
    --signals-to-handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIG$PREEMPT_SIGNAL"
    --shutdown-timeout="$SHUTDOWN_TIMEOUT_SECONDS")
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    torchrun+=(--nnodes="$NNODES" --rdzv-backend=c10d
      --rdzv-endpoint="$HEAD_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID")
    LAUNCH_CMD=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1
      --kill-on-bad-exit=0 --wait="$STEP_GRACE_SECONDS")
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
      # srun of Slurm 22.05 does not read SLURM_CPUS_PER_TASK of the batch job, so pass it on.
      LAUNCH_CMD+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    fi
    LAUNCH_CMD+=("${torchrun[@]}" "${WORKER_CMD[@]}")
  else
    LAUNCH_CMD=("${torchrun[@]}" --standalone --nnodes=1 "${WORKER_CMD[@]}")
  fi
}

ddn_print_dry_run() {
  local script=$1 world=$(( NNODES * NPROC_PER_NODE ))
  echo "dry run: nothing is started"
  echo "nodes: $NNODES"
  echo "processes per node: $NPROC_PER_NODE"
  echo "world size: $world"
  if [ -n "${HEAD_ADDR:-}" ] && [[ " ${LAUNCH_CMD[*]} " != *" torch.distributed.run "* ]]; then
    echo "rendezvous: MASTER_ADDR=$HEAD_ADDR MASTER_PORT=$MASTER_PORT (head from $HEAD_SOURCE)"
  elif [ -n "${HEAD_ADDR:-}" ]; then
    echo "rendezvous: c10d $HEAD_ADDR:$MASTER_PORT (id ${SLURM_JOB_ID:-none}, head from $HEAD_SOURCE)"
  else
    echo "rendezvous: torchrun --standalone on this machine"
  fi
  echo "preemption signal: SIG$PREEMPT_SIGNAL (#SBATCH --signal=$(ddn_sbatch_directive "$script" signal))" \
    "forwarded to every rank; requeue on it or on exit status $REQUEUE_EXIT_CODE"
  echo "requeue: $(grep -c '^#SBATCH --requeue' "$script" | sed 's/^0$/no/;s/^[1-9].*/yes/')"
  echo "max restarts: $MAX_RESTARTS"
  echo "run dir: $RUN_DIR"
  printf 'command:'
  ddn_print_words "${LAUNCH_CMD[@]}"
}

# Print words on one line, shell-quoted only where a shell would need it.
ddn_print_words() {
  local word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      printf ' %s' "$word"
    else
      printf ' %q' "$word"
    fi
  done
  printf '\n'
}

# Run the training step in the background and forward PREEMPT_SIGNAL from the batch shell to it.
# Bash runs a trap only between commands, and `wait` returns early when one fires, so the loop
# waits again until the step has really ended. Sets STEP_STATUS and PREEMPTED.
ddn_run_step() {
  PREEMPTED=0
  "$@" &
  STEP_PID=$!
  trap ddn_forward_preemption "$PREEMPT_SIGNAL"
  while true; do
    STEP_STATUS=0
    wait "$STEP_PID" || STEP_STATUS=$?
    if [ "$STEP_STATUS" -gt 128 ] && kill -0 "$STEP_PID" 2>/dev/null; then
      continue
    fi
    break
  done
  trap - "$PREEMPT_SIGNAL"
}

# NOTE: torchrun installs its signal handlers only when it starts its workers, and the trainer
# installs its own only after its imports, so a signal in the first seconds after a (re)start kills
# the processes without a save. The job is still requeued and resumes from the previous checkpoint.
ddn_forward_preemption() {
  PREEMPTED=1
  ddn_log "received SIG$PREEMPT_SIGNAL; forwarding it to the training step (pid $STEP_PID)" \
    "so every rank saves at the same step and exits"
  # srun passes the signal to every process of the step on every node (checked with Slurm 22.05
  # and proctrack/linuxproc), so the workers get it even before torchrun forwards it.
  kill -s "$PREEMPT_SIGNAL" "$STEP_PID" 2>/dev/null || ddn_log "warning: the step already ended"
}

# After the step: requeue the job when the trainer asked for it (REQUEUE_EXIT_CODE) or when the
# preemption signal stopped an unfinished step, else exit with the step's status. torchrun exits
# with status 1 after forwarding a signal, whatever its workers returned.
ddn_finish() {
  if [ "$STEP_STATUS" = "$REQUEUE_EXIT_CODE" ] || { [ "$PREEMPTED" = 1 ] && [ "$STEP_STATUS" != 0 ]; }
  then
    if [ -z "${SLURM_JOB_ID:-}" ]; then
      ddn_log "training stopped for preemption (exit status $STEP_STATUS); run the same command" \
        "again to resume from the latest checkpoint in $RUN_DIR"
      exit "$REQUEUE_EXIT_CODE"
    fi
    if [ "$PREEMPTED" = 1 ] && [[ " ${LAUNCH_CMD[*]} " == *" torch.distributed.run "* ]]; then
      ddn_log "torchrun prints a SignalException traceback after forwarding SIG$PREEMPT_SIGNAL;" \
        "that traceback is expected"
    fi
    ddn_log "requeueing job $SLURM_JOB_ID (step exit status $STEP_STATUS, signal received:" \
      "$PREEMPTED); the requeued job resumes from the latest checkpoint in $RUN_DIR"
    command -v scontrol >/dev/null || ddn_die "scontrol not found, so job $SLURM_JOB_ID cannot be" \
      "requeued; resubmit it with RUN_DIR=$RUN_DIR to resume"
    scontrol requeue "$SLURM_JOB_ID" || ddn_die "scontrol requeue $SLURM_JOB_ID failed; resubmit" \
      "with RUN_DIR=$RUN_DIR to resume"
    exit 0
  fi
  if [ "$STEP_STATUS" = 0 ]; then
    ddn_log "training step finished; run dir $RUN_DIR"
  else
    ddn_log "training step failed with exit status $STEP_STATUS; see the log above"
  fi
  exit "$STEP_STATUS"
}
