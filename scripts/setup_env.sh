#!/usr/bin/env bash
# Create .venv with the pinned CPU torch, DeepSpeed (communication op prebuilt) and this package.
# Usage: bash scripts/setup_env.sh            (idempotent; reruns are fast)
# Env:   VENV=path (default .venv), DDN_TORCH_SPEC (default torch==2.13.0, the CPU wheel on this kind
#        of machine; on a GPU cluster pass the CUDA build you want, for example "torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${DDN_TORCH_SPEC:-torch==2.13.0}
DEEPSPEED_SPEC=${DDN_DEEPSPEED_SPEC:-deepspeed==0.19.8}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip wheel setuptools ninja

# Torch first, so that nothing later pulls a multi-GB CUDA build through a bare `torch` requirement.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "$TORCH_SPEC"
fi

# DeepSpeed with the shared-memory communication op compiled once at install time, because every CPU
# run would otherwise compile it (30-55 s) on first use.
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_SHM_COMM=1 DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation --no-deps "$DEEPSPEED_SPEC"
fi

"$PY" -m pip install -q -e ".[test]"
echo "environment ready: $VENV ($("$PY" -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null))"
