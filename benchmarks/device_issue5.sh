#!/usr/bin/env bash
# Issue 5's GPU checks, on a lent GPU machine (no network there; wheels carried in .whl/, the
# Alpaca records for the benchmark in the ignored .devdata/). Results under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/solotune-device}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_fastpaths.py 2>&1 | tee "$OUT/pytest.txt" | tail -8
# A larger model for the side-by-side benchmark: TinyLlama-1.1B's shape with a 49k vocabulary,
# random weights (throughput and memory do not depend on them; both tools train the same one).
python3 -c "
from solotune.testing import make_tokenizer, make_model
tok = make_tokenizer()
m = make_model(tok, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=49152, initializer_range=0.02, max_position_embeddings=2048)
m.save_pretrained('/tmp/llama-1b'); tok.save_pretrained('/tmp/llama-1b')"
timeout 420 python3 benchmarks/vs_trl.py --device cuda --model /tmp/llama-1b --data .devdata/alpaca.json \
  --records 64 --precisions bf16 --out "$OUT/vs_trl_cuda.md" 2>&1 | tee "$OUT/vs_trl_cuda.log" | tail -25
