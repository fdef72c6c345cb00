#!/usr/bin/env bash
# On the GPU machine: `pie bench` of a `pie build` CUDA binary in several
# variants (environment and extra flags), for each config, in one command so
# every variant sees the same GPU.
# Usage: pie_ab.sh BINARY CONFIG_DIR MODEL[,MODEL...] BATCHES VARIANT...
#   VARIANT = LABEL:ENV_ASSIGNMENTS:EXTRA_FLAGS, e.g.
#   "unfused:PIE_CUDA_FUSE=0:" "fused::" "kv-bf16::--kv-cache-dtype bf16"
# Writes $OUT/pie-<model>-<label>.jsonl (one JSON object per batch size).
set -euo pipefail
bin=$1 configs=$2 models=$3 batches=$4
shift 4
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
for model in ${models//,/ }; do
  for variant in "$@"; do
    IFS=: read -r label envs flags <<< "$variant"
    out="$OUT/pie-$model-$label.jsonl"
    # shellcheck disable=SC2086 # envs and flags are word lists
    env $envs "$bin" bench --config "$configs/$model.json" --driver cuda \
      --batch "$batches" --prompt 128 --gen 128 --reps 2 --json $flags > "$out"
    python3 -c '
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(sys.argv[2], sys.argv[3], "batch", r["batch"], "%.3f ms/step" % r["decode_ms_per_step"],
          "%.0f tok/s" % r["decode_tok_s"], "prefill %.0f tok/s" % r["prefill_tok_s"])
' "$out" "$model" "$label"
  done
done
