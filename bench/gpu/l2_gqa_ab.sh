#!/usr/bin/env bash
# On the GPU machine, in one command: the GPU tests, then alternating A/B
# rounds of L2 prefetch ahead (PIE_CUDA_L2_AHEAD=1/2 against off) at
# Qwen3-0.6B batch 1, and of grouped attention's per-group partial kernels
# (PIE_CUDA_GQA_PARTIAL_G=1; off by default: the general one) and the one-launch attention
# past 16 rows (PIE_CUDA_GQA_FOLD_ROWS=64) at Qwen3-8B batch 64, the
# full-size Qwen3-0.6B parity, then ncu kernel summaries of 8B batch 64
# and 0.6B batch 1.
#
# Usage: l2_gqa_ab.sh PIE_BINARY GPU_TEST_BINARY|- SHARED_BENCH_DIR
# Writes $OUT/rows.txt, $OUT/rows.jsonl, $OUT/tests.log, the parity JSON
# and $OUT/ncu-8b-b64.txt. About 5 minutes on an H100.
source "$(dirname "$0")/device_ab.sh"

gpu_tests "L2 ahead|MLP half"
# The attention tests again with the per-group partial kernels switched on.
[ "$tests" = - ] || PIE_CUDA_GQA_PARTIAL_G=1 PIE_FIXTURES=$root/tests/fixtures timeout 200 \
  "$tests" --ignored --test-threads=1 grouped_attention bf16_kv_cache graph_decode masked_attention 2>&1 \
  | tee "$OUT/tests-partial-g.log" | grep -E "^test |test result|panicked" | sed "s/^/partial_g: /"
small=(--config "$configs/qwen3-0.6b.json")
large=(--config "$configs/qwen3-8b.json")
bench "ahead1" PIE_CUDA_L2_AHEAD=1 -- "${small[@]}" --batch 1
for round in 1 2; do
  bench "base$round" X=1 -- "${small[@]}" --batch 1
  bench "ahead2-$round" PIE_CUDA_L2_AHEAD=2 -- "${small[@]}" --batch 1
done
bench "8b-base" X=1 -- "${large[@]}" --batch 1,64
bench "8b-partial-by-group" PIE_CUDA_GQA_PARTIAL_G=1 -- "${large[@]}" --batch 64
bench "8b-fold64" PIE_CUDA_GQA_FOLD_ROWS=64 -- "${large[@]}" --batch 64
PIE_ARGS="--kv-cache-dtype bf16" timeout 200 python3 "$root/bench/parity/full_size_parity.py" \
  "$configs/qwen3-0.6b.json" "$bin" bfloat16 2>&1 | tail -1
[ "${NCU:-1}" = 1 ] || exit 0  # NCU=0: no profile (device time)
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
timeout 90 "$ncu" --clock-control none --cache-control none --metrics gpu__time_duration.sum \
  --print-summary per-kernel --launch-skip 3000 --launch-count 330 \
  "$bin" bench --driver cuda "${large[@]}" --batch 64 --prompt 128 --gen 16 --reps 1 \
  --kv-cache-dtype bf16 > "$OUT/ncu-8b-b64.txt" 2>&1
python3 "$root/bench/gpu/ncu_summary.py" "$OUT/ncu-8b-b64.txt" | tee "$OUT/ncu-8b-b64-summary.txt"
timeout 60 "$ncu" --clock-control none --cache-control none --metrics gpu__time_duration.sum \
  --print-summary per-kernel --launch-skip 2000 --launch-count 200 \
  "$bin" bench --driver cuda "${small[@]}" --batch 1 --prompt 128 --gen 32 --reps 1 \
  --kv-cache-dtype bf16 > "$OUT/ncu-0.6b-b1.txt" 2>&1
python3 "$root/bench/gpu/ncu_summary.py" "$OUT/ncu-0.6b-b1.txt" | tee "$OUT/ncu-0.6b-b1-summary.txt"
