#!/usr/bin/env bash
# The GPU check: one command, no editing, under 8 minutes on one GPU, one table at the end.
#   bash benchmarks/gpu_check.sh            (from anywhere; uses ./.venv if present, else $PYTHON or python3)
# Without a CUDA GPU it runs on CPU (smaller model and region) and says that the GPU figures are open.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv || true
else
  echo "NOTE: no CUDA GPU visible - degrading to a CPU run; the GPU figures stay open."
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
exec timeout 470 "$PY" benchmarks/gpu_check.py "$@"
