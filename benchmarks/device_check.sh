#!/usr/bin/env bash
# The CUDA checks, as run on a lent GPU machine (no network there): wheels carried in .whl/,
# results written under $OUT. Usage: bash benchmarks/device_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/solotune-device}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_memory.py tests/test_ablate.py 2>&1 | tee "$OUT/pytest.txt" | tail -15
timeout 200 python3 benchmarks/cuda_memory.py --steps 4 --out "$OUT/cuda_memory.json" 2>/dev/null | tee "$OUT/cuda_memory.md"
