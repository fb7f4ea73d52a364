#!/usr/bin/env bash
# The whole GPU benchmark matrix of benchmark_sdxl.py in about 8 minutes on an H100/H200-class GPU; figures in $OUT.
#   bash benchmarks/gpu_matrix.sh [OUT]      (default OUT: benchmark-sdxl-gpu)
# 1. the recommended command (pivotal tuning + prior preservation, rank 32, bf16, checkpointing) at 1024/768/512 px
#    x batch 1/2/4; 2. each speed/memory option on its own at 1024 px, batch 1 and 4. Each run writes a row to
#    $OUT/results.jsonl as it finishes; a time budget per part stops starting runs when the slot is nearly spent.
set -euo pipefail
OUT=${1:-benchmark-sdxl-gpu}
MODEL_DIR=${MODEL_DIR:-/tmp/sdxl-base-random}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" || true
python benchmarks/benchmark_sdxl.py --model sdxl-base --model_dir "$MODEL_DIR" --out "$OUT/matrix" \
  --resolutions 1024,768,512 --batch_sizes 1,2,4 --steps 3 --warmup_steps 2 --time_budget 270 2>&1 | tee "$OUT/matrix.log"
python benchmarks/benchmark_sdxl.py --model sdxl-base --model_dir "$MODEL_DIR" --out "$OUT/options" \
  --resolutions 1024 --batch_sizes 1,4 --steps 3 --warmup_steps 2 --no_plan --time_budget 200 \
  --variants no_checkpointing,quantize_int8,quantize_fp8,low_vram,8bit_adam,fused_adam,cache_latents,channels_last,compile 2>&1 | tee "$OUT/options.log"
