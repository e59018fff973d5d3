#!/usr/bin/env bash
# The GPU benchmark of the hot path, in one call on a lent GPU machine: at most 8 minutes on one
# H200, the install of the wheels included. Each part has a time budget; a part that runs out is
# stopped and named, and the summary is printed all the same. Every result goes into one
# tarball, $OUT/device_gpu.tgz; the summary also stands alone in $OUT/summary.txt.
#
#   bash benchmarks/device_gpu.sh          # on the GPU machine
#   DRY=1 PY=.venv/bin/python bash benchmarks/device_gpu.sh   # the same steps on the CPU, tiny shapes; CUDA tests skip
#
# 1. the CUDA tests (tests/ -m cuda);
# 2. two runs of `solotune train` on a 1B-class shape (TinyLlama-1.1B's layers, a 49k vocabulary,
#    random weights, records of 512 tokens): fp16 with loss scaling, and --train.compile on with
#    the recompiles counted (TORCH_LOGS=recompiles);
# 3. solotune vs TRL SFTTrainer + PEFT on that shape, 32 steps: the memory breakdown's cost and
#    the default against the peer's best (vs_trl.py --focus overhead);
# 4. a Llama-2-7B-shaped step (LoRA r=16 on q, k, v, batch 8 x 512, bf16): plain, with
#    checkpointing, QLoRA NF4, and TRL on the same shape; peak, tokens/s and MFU end to end and
#    in steady state, against `solotune estimate` (gpu_step.py);
# 5. dropout keyed to the data against torch's, forward + backward at a 7B layer's shape (dropout_cost.py);
# 6. a DPO step of solotune against TRL's DPOTrainer and against an SFT step on the same
#    sequences, on the 1B-class shape (vs_trl_dpo.py).
#
# The GPU machine has torch 2.11 and transformers 5.17 but no network: the other wheels travel in
# .whl/ (an ignored folder; pass it in `carry`), made here for its Python 3.12 with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform any -d .whl \
#       transformers==5.24.0 peft==0.21.2 trl==1.16.0 datasets==5.2.0 dill multiprocess gguf==0.19.0 \
#       liger-kernel==0.8.5 bitsandbytes==0.50.2 tokenizers==0.23.3 huggingface-hub==2.4.0
# (bitsandbytes' wheel, 43 MB, is 4 MB with only libbitsandbytes_cpu.so and _cuda130.so kept).
set -uo pipefail
set -a
cd "$(dirname "$0")/.."
DRY=${DRY:-0}
OUT=${OUT:-/tmp/solotune-device}
PY=${PY:-python3}
RESULTS=$(mktemp -d)
RUNS=$(mktemp -d)  # the runs' folders (adapters: kept out of the tarball)
mkdir -p "$OUT"
START=$SECONDS
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# part NAME BUDGET_S COMMAND...: run one part under its budget; say how long it took, or that it ran out.
part() {
  local name=$1 budget=$2 start=$SECONDS rc
  shift 2
  echo "== $name (budget ${budget} s)"
  # The part's shell function runs in a bash of its own, which timeout can stop (set -a exports
  # the variables it reads, export -f the functions).
  timeout -k 5 "$budget" bash -c '"$@"' part "$@"
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "$name: ran out of its ${budget} s" | tee -a "$RESULTS/timeouts.txt"
  fi
  echo "$name: $((SECONDS - start)) s (exit $rc)" | tee -a "$RESULTS/parts.txt"
}

install_wheels() {
  ls .whl/*.whl >/dev/null 2>&1 || return 0
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}
export -f install_wheels

if [ "$DRY" = 1 ]; then
  DEVICE=cpu PRECISION=fp32 MP=off FP16=off RECORDS=16 MAX_LEN=256 STEP_SHAPE=tiny STEPS=4 SEQ_LEN=64 PAIRS=8
  SHAPE="hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2"
  COMPILE=off
else
  DEVICE=cuda PRECISION=bf16 MP=bf16 FP16=fp16 RECORDS=256 MAX_LEN=512 STEP_SHAPE=llama2-7b STEPS=8 SEQ_LEN=512 PAIRS=64
  SHAPE="hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4"
  COMPILE=on
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$RESULTS/gpu.txt"
  part "0. wheels" 30 install_wheels
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$RESULTS/gpu.txt"

cuda_tests() {
  $PY -m pytest -q -p no:cacheprovider -m cuda tests/ > "$RESULTS/pytest.txt" 2>&1
  tail -4 "$RESULTS/pytest.txt"
}
export -f cuda_tests
part "1. the CUDA tests" 80 cuda_tests

# Alpaca-format records long enough to fill 512 byte-level tokens (a short instruction, a long
# answer), and the 1B-class model, made here: nothing to carry.
make_inputs() {
  $PY - "$RESULTS/long-records.json" "$SHAPE" <<'EOF'
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
}
export -f make_inputs
part "2a. the 1B-class model" 25 make_inputs

train_1b() {  # NAME OPTIONS...: one `solotune train` on the 1B-class shape; its last lines
  local name=$1
  shift
  $PY -m solotune.cli train --model /tmp/solotune-1b --data "$RESULTS/long-records.json" --max-len "$MAX_LEN" \
    --batch 8 --no-generate.enabled --device "$DEVICE" --output-dir "$RUNS/$name" "$@" > "$RESULTS/$name.log" 2>&1
  local rc=$?
  grep -E "^(mixed precision|gradient scaling|compile|kernels|set-up check|Liger)|skipped|steps:|throughput|error" \
    "$RESULTS/$name.log" | tail -8
  return $rc
}
export -f train_1b
part "2b. fp16 with loss scaling" 30 train_1b fp16 --samples 64 --mp "$FP16"
compiled() {
  TORCH_LOGS=recompiles train_1b compile --samples "$RECORDS" --mp "$MP" --train.compile "$COMPILE"
  echo "recompiles: $(grep -c 'Recompiling function' "$RESULTS/compile.log")"
}
export -f compiled
part "2c. --train.compile $COMPILE" 50 compiled

vs_trl() {
  $PY benchmarks/vs_trl.py --focus overhead --device "$DEVICE" --model /tmp/solotune-1b \
    --data "$RESULTS/long-records.json" --records "$RECORDS" --max-len "$MAX_LEN" --precisions "$PRECISION" \
    --peer-micro 8 --out "$RESULTS/vs_trl.md" > "$RESULTS/vs_trl.log" 2>&1 || tail -5 "$RESULTS/vs_trl.log"
}
export -f vs_trl
part "3. vs TRL, 1B-class shape" 100 vs_trl

gpu_step() {
  $PY benchmarks/gpu_step.py --shape "$STEP_SHAPE" --device "$DEVICE" --steps "$STEPS" --seq-len "$SEQ_LEN" \
    --out "$RESULTS/gpu_step.md" > "$RESULTS/gpu_step.log" 2>&1 || tail -5 "$RESULTS/gpu_step.log"
}
export -f gpu_step
part "4. Llama-2-7B-shaped step" 95 gpu_step

dropout_cost() {
  $PY benchmarks/dropout_cost.py --out "$RESULTS/dropout_cost.md" > "$RESULTS/dropout_cost.log" 2>&1 \
    || tail -5 "$RESULTS/dropout_cost.log"
}
export -f dropout_cost
part "5. keyed dropout against torch's" 10 dropout_cost

vs_trl_dpo() {
  $PY benchmarks/vs_trl_dpo.py --device "$DEVICE" --precision "$PRECISION" --model /tmp/solotune-1b \
    --pairs "$PAIRS" --max-len 512 --repeats 1 --settings trl-dpo,solotune-dpo,solotune-sft --out "$RESULTS/vs_trl_dpo.md" \
    > "$RESULTS/vs_trl_dpo.log" 2>&1 || tail -5 "$RESULTS/vs_trl_dpo.log"
}
export -f vs_trl_dpo
part "6. DPO vs TRL, 1B-class shape" 60 vs_trl_dpo

{
  echo "== summary ($(head -1 "$RESULTS/gpu.txt"); $((SECONDS - START)) s in all)"
  cat "$RESULTS/parts.txt"
  [ -f "$RESULTS/timeouts.txt" ] && cat "$RESULTS/timeouts.txt"
  grep -E "passed|failed|skipped" "$RESULTS/pytest.txt" | tail -1
  grep -E "^(FAILED|ERROR)" "$RESULTS/pytest.txt"
  for run in fp16 compile; do
    [ -f "$RESULTS/$run.log" ] && echo "-- $run: $(grep -E 'steps:|throughput|error' "$RESULTS/$run.log" | tr '\n' ' ')"
  done
  [ -f "$RESULTS/compile.log" ] && echo "-- compile: $(grep -c 'Recompiling function' "$RESULTS/compile.log") recompiles"
  [ -f "$RESULTS/vs_trl.md" ] && sed -n '/^| tool/,$p' "$RESULTS/vs_trl.md"
  [ -f "$RESULTS/gpu_step.md" ] && sed -n '/^| configuration/,$p' "$RESULTS/gpu_step.md"
  [ -f "$RESULTS/dropout_cost.md" ] && sed -n '/^| tokens/,$p' "$RESULTS/dropout_cost.md"
  [ -f "$RESULTS/vs_trl_dpo.md" ] && sed -n '/^| setting/,$p' "$RESULTS/vs_trl_dpo.md"
} > "$RESULTS/summary.txt" 2>/dev/null
cp "$RESULTS/summary.txt" "$OUT/summary.txt"
tar czf "$OUT/device_gpu.tgz" -C "$RESULTS" .
cat "$OUT/summary.txt"
