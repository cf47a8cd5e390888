#!/usr/bin/env bash
# The decode benchmark at paper-like settings on a GPU, in well under 6 minutes; results in $OUT.
#
#   OUT=/path/to/results bash tools/gpu_benchmark.sh        # from the repository root
#   GQA_BENCH_TINY=1 OUT=/tmp/o bash tools/gpu_benchmark.sh # a seconds-long smoke run on CPU
#
# Needs python3 with jax, flax, absl-py (matplotlib for the PNG; torch + transformers for the HF
# peer); the package need not be installed (PYTHONPATH). Two runs, each under a hard timeout;
# every run rewrites its JSON/Markdown/PNG after each row, so a timeout keeps what was measured.
#   1. attention decode step, XXL heads (64 x 64, emb 4096), input 2048, batch 16, G = 64..1,
#      bfloat16 and float32;
#   2. whole greedy decode, XXL width at reduced depth (2 encoder + 2 decoder layers), input 2048,
#      output 512 (the paper's Figure 6 lengths), batch 16, G = 64..1, then HF T5 (MHA) on CUDA;
#      bfloat16 first, then float32.
# Files (6 + log): attention/decode_benchmark.{json,md,png}, decode/decode_benchmark.{json,md,png},
# gpu_benchmark.log.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # leave GPU memory to the torch peer too
PYTHON="${PYTHON:-python3}"
LOG="$OUT/gpu_benchmark.log"

if [[ -n "${GQA_BENCH_TINY:-}" ]]; then
  MODEL=(--num_heads=4 --head_dim=8 --emb_dim=32 --mlp_dim=64 --vocab_size=100 --batch=2
         --input_length=16 --bandwidth_mib=16 --matmul_n=64)
  ATTENTION=(--output_length=4 --reps=2) DECODE=(--output_length=4 --reps=2)
  LIMITS=(120 120)
else
  MODEL=(--num_heads=64 --head_dim=64 --emb_dim=4096 --mlp_dim=10240 --vocab_size=32128
         --batch=16 --input_length=2048 --bandwidth_mib=4096 --matmul_n=8192)
  ATTENTION=(--output_length=64 --reps=20)
  DECODE=(--output_length=512 --num_encoder_layers=2 --num_decoder_layers=2 --reps=3)
  LIMITS=(100 230)
fi

{
  date; uptime; nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>&1
  "$PYTHON" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
} >"$LOG" 2>&1

run() {  # run <name> <seconds> <flags...>
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" >>"$LOG"
  timeout --signal=INT --kill-after=10 "$limit" "$PYTHON" -m gqa_t5x.benchmark "${MODEL[@]}" "$@" \
    --dtypes=bfloat16,float32 --output_dir="$OUT/$name" >>"$LOG" 2>&1
  echo "=== $name exit status $?" >>"$LOG"
}

run attention "${LIMITS[0]}" --levels=attention --peer=false "${ATTENTION[@]}"
run decode "${LIMITS[1]}" --levels=decode "${DECODE[@]}"
grep -v '^[IW][0-9]\{4\} ' "$LOG" | tail -n 60
