#!/usr/bin/env bash
# On the GPU machine, in one command: the GPU tests, then Qwen3 decode
# (prompt 128 + 128 steps, bf16 KV) of a `pie build --flavor cuda13.0`
# binary in alternating rounds of its A/B switches, device time per
# replay, Qwen3-8B, the full-size Qwen3-0.6B parity, and both torch peers.
#
# Usage: qwen3_decode_ab.sh PIE_BINARY GPU_TEST_BINARY|- SHARED_BENCH_DIR
#   SHARED_BENCH_DIR: a copy of ../shared/bench (configs/ and the peers).
# Variants (environment of the same binary): fold-t (PIE_CUDA_MLP_FOLD=1:
# one-launch MLP half, transposed down copy), fold-rows
# (PIE_CUDA_MLP_FOLD=rows), two-launch (the default), no-graph-argmax
# (PIE_CUDA_GRAPH_ARGMAX=0: the argmax launched after the decode graph).
# Writes $OUT/rows.txt (one line per run), $OUT/rows.jsonl (pie bench's
# JSON), $OUT/tests.log, the parity JSON and, with PEERS=1, the peers'
# JSON. About 5 minutes on an H200 (the peers add about 4: the device
# tool's 10-minute limit fits both, barely).
source "$(dirname "$0")/device_ab.sh"

gpu_tests "MLP"
small=(--config "$configs/qwen3-0.6b.json")
for round in 1 2 3; do
  bench "fold-t$round" PIE_CUDA_MLP_FOLD=1 -- "${small[@]}" --batch 1
  bench "fold-rows$round" PIE_CUDA_MLP_FOLD=rows -- "${small[@]}" --batch 1
  bench "two-launch$round" PIE_CUDA_MLP_FOLD=0 -- "${small[@]}" --batch 1
  bench "no-graph-argmax$round" PIE_CUDA_GRAPH_ARGMAX=0 -- "${small[@]}" --batch 1
done
bench "fold-t-timed" PIE_CUDA_STEP_TIMING=1 PIE_CUDA_MLP_FOLD=1 -- "${small[@]}" --batch 1,64
bench "two-launch-timed" PIE_CUDA_STEP_TIMING=1 -- "${small[@]}" --batch 1,64
bench "8b" PIE_CUDA_STEP_TIMING=0 -- --config "$configs/qwen3-8b.json" --batch 1,64
bench "8b-timed" PIE_CUDA_STEP_TIMING=1 -- --config "$configs/qwen3-8b.json" --batch 1,64
PIE_ARGS="--kv-cache-dtype bf16" timeout 200 python3 "$root/bench/parity/full_size_parity.py" \
  "$configs/qwen3-0.6b.json" "$bin" bfloat16 2>&1 | tail -1
[ "${PEERS:-0}" = 1 ] || exit 0
export PEER_DIR=$shared
timeout 150 python3 "$root/bench/gpu/peer_rows.py" qwen3-0.6b:1 qwen3-0.6b:64 qwen3-8b:1 qwen3-8b:64 2>&1 | tail -4
COMPILE=1 timeout 150 python3 "$root/bench/gpu/peer_rows.py" qwen3-0.6b:1 qwen3-8b:1 2>&1 | tail -2
