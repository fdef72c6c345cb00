#!/usr/bin/env bash
# On the GPU machine: `pie bench` of a `pie build` CUDA binary with the fused
# kernels off (PIE_CUDA_FUSE=0, one kernel per op) and on, for each config,
# in one command so both see the same GPU.
# Usage: fusion_ab.sh BINARY CONFIG_DIR MODEL[,MODEL...] [BATCHES]
# Writes $OUT/pie-<model>-fuse<0|1>.jsonl (one JSON object per batch size).
set -euo pipefail
bin=$1 configs=$2 models=$3 batches=${4:-1,64,256}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
for model in ${models//,/ }; do
  for fuse in 0 1; do
    out="$OUT/pie-$model-fuse$fuse.jsonl"
    PIE_CUDA_FUSE=$fuse "$bin" bench --config "$configs/$model.json" --driver cuda \
      --batch "$batches" --prompt 128 --gen 128 --reps 2 --json > "$out"
    python3 -c '
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(sys.argv[2], "fuse=" + sys.argv[3], "batch", r["batch"], "%.3f ms/step" % r["decode_ms_per_step"],
          "%.0f tok/s" % r["decode_tok_s"], "prefill %.0f tok/s" % r["prefill_tok_s"])
' "$out" "$model" "$fuse"
  done
done
