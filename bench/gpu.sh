#!/usr/bin/env bash
# The GPU benchmark as a GPU machine runs it, as is: bench/bench_gpu.py on every visible GPU.
#
#   bench/gpu.sh                  # writes bench/results/gpu.json and prints a summary
#   bench/gpu.sh --batch 4        # extra arguments go to bench_gpu.py
#
# Uses the Python that is there when it imports torch; otherwise makes .venv-gpu from the
# repository's pyproject.toml (the base dependencies and the [trainer] extra, from PyPI only).
# Under 8 minutes on one 8-GPU H100/H200 node, set-up included.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
  echo "torch is not importable: creating .venv-gpu from pyproject.toml [trainer]"
  "$PYTHON" -m venv .venv-gpu
  # the package itself is not installed: PYTHONPATH below finds it, so no build backend is needed
  .venv-gpu/bin/pip install --quiet --upgrade pip
  "$PYTHON" - <<'EOF' > .venv-gpu/requirements.txt
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["trainer"]))
EOF
  .venv-gpu/bin/pip install --quiet -r .venv-gpu/requirements.txt
  PYTHON="$ROOT/.venv-gpu/bin/python"
fi

export PYTHONPATH="$ROOT/operator:$ROOT/trainer${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
GPUS="$( (nvidia-smi -L 2>/dev/null || true) | wc -l)"
if [ "$GPUS" -lt 1 ]; then
  echo "no GPU visible (nvidia-smi -L lists none); for the CPU code path: python bench/bench_gpu.py --cpu-smoke" >&2
  exit 1
fi
echo "$GPUS GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$GPUS" bench/bench_gpu.py "$@"
