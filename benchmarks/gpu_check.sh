#!/usr/bin/env bash
# The GPU check of language-model fine-tuning and serving (benchmarks/gpu_check.py): one table, within
# minutes on a CUDA machine; on a machine without one it says so and exits 0. Runs with the project's
# .venv, else $PYTHON or python3 (an environment where hfbatch is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
exec "$python" benchmarks/gpu_check.py "$@"
