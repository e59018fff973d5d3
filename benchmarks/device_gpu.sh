#!/usr/bin/env bash
# The GPU benchmark of the hot path, in one call on a lent GPU machine; under 8 minutes on one
# H200. Results under $OUT; the last screen holds every ratio.
#
#   bash benchmarks/device_gpu.sh          # on the GPU machine
#   DRY=1 bash benchmarks/device_gpu.sh    # the same steps on the CPU with tiny shapes; the CUDA tests skip
#
# 1. the CUDA tests (tests/ -m cuda);
# 2. solotune vs TRL SFTTrainer + PEFT on a 1B-class shape (TinyLlama-1.1B's layers with a 49k
#    vocabulary, random weights), records of 512 tokens, 32 steps: the memory breakdown's cost
#    and the default against the peer's best (vs_trl.py --focus overhead);
# 3. a Llama-2-7B-shaped step (LoRA r=16 on q, k, v, batch 8 x 512, bf16): plain, with
#    checkpointing, and QLoRA NF4; peak, tokens/s and MFU against `solotune estimate` (gpu_step.py).
#
# The GPU machine has torch but no network: the other wheels travel in .whl/ (an ignored folder;
# pass it in `carry`), made here with
#   pip download --no-deps -d .whl transformers==5.24.0 peft==0.21.2 trl==1.16.0 accelerate==1.15.0 \
#       datasets==5.2.0 bitsandbytes==0.50.2 safetensors==0.8.0 gguf==0.19.0 liger-kernel==0.8.5 ...
# and anything else `python3 -c "import solotune.cli"` reports missing there.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${DRY:-0}
OUT=${OUT:-/tmp/solotune-device}
PY=${PY:-python3}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "$DRY" = 1 ]; then
  DEVICE=cpu PRECISION=fp32 RECORDS=16 MAX_LEN=256 STEP_SHAPE=tiny STEPS=2 SEQ_LEN=64
  SHAPE="hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2"
else
  DEVICE=cuda PRECISION=bf16 RECORDS=256 MAX_LEN=512 STEP_SHAPE=llama2-7b STEPS=6 SEQ_LEN=512
  SHAPE="hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"

echo "== 1. the CUDA tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider -m cuda tests/ 2>&1 | tee "$OUT/pytest.txt" | tail -4

echo "== 2. vs TRL, 1B-class shape"
# Alpaca-format records long enough to fill 512 byte-level tokens (a short instruction, a long
# answer), made here: nothing to carry.
$PY - "$OUT/long-records.json" "$SHAPE" <<'EOF'
import json, sys
from solotune.testing import make_model, make_tokenizer
words = "the model learns what each record says about its answer and how long it takes".split()
rows = [{"instruction": " ".join(words[(i + j) % len(words)] for j in range(8)), "input": "",
         "output": " ".join(words[(3 * i + j) % len(words)] for j in range(120))} for i in range(512)]
json.dump(rows, open(sys.argv[1], "w"))
tok = make_tokenizer()
shape = eval(f"dict({sys.argv[2]})")
model = make_model(tok, vocab_size=49152, initializer_range=0.02, max_position_embeddings=2048, **shape)
model.save_pretrained("/tmp/solotune-1b"); tok.save_pretrained("/tmp/solotune-1b")
EOF
timeout 270 $PY benchmarks/vs_trl.py --focus overhead --device "$DEVICE" --model /tmp/solotune-1b \
  --data "$OUT/long-records.json" --records "$RECORDS" --max-len "$MAX_LEN" --precisions "$PRECISION" \
  --peer-micro 8,2 --out "$OUT/vs_trl.md" > "$OUT/vs_trl.log" 2>&1 || tail -5 "$OUT/vs_trl.log"

echo "== 3. Llama-2-7B-shaped step"
timeout 240 $PY benchmarks/gpu_step.py --shape "$STEP_SHAPE" --device "$DEVICE" --steps "$STEPS" \
  --seq-len "$SEQ_LEN" --out "$OUT/gpu_step.md" > "$OUT/gpu_step.log" 2>&1 || tail -5 "$OUT/gpu_step.log"

echo "== summary ($(head -1 "$OUT/gpu.txt"))"
tail -3 "$OUT/pytest.txt" | grep -E "passed|failed|skipped" || true
[ -f "$OUT/vs_trl.md" ] && sed -n '/^| tool/,$p' "$OUT/vs_trl.md"
[ -f "$OUT/gpu_step.md" ] && sed -n '/^| configuration/,$p' "$OUT/gpu_step.md"
