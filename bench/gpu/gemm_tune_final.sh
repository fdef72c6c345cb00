#!/usr/bin/env bash
# On the GPU machine, in one command: the GPU tests; Qwen3-8B batch 64
# with the measured cuBLASLt GEMM algorithms (the default; the first round
# prints each shape's timings) against cublasGemmEx for every shape
# (PIE_CUDA_GEMM_TUNE=0), in alternating rounds, and with 4 features per
# thread in the register-held norms (PIE_CUDA_NORM_PER_THREAD=4); then the
# defaults at batch 1, 64 and 256 for both bench configs, the full-size
# Qwen3-0.6B parity, and the torch + CUDA-graph peer (torch.compile at
# Qwen3-0.6B batch 1, where it is the stronger peer).
#
# Usage: gemm_tune_final.sh PIE_BINARY GPU_TEST_BINARY|- SHARED_BENCH_DIR
# Writes $OUT/rows.txt, $OUT/rows.jsonl, $OUT/tests.log, the parity JSON
# and the peers' JSON. About 9 minutes on an H100.
source "$(dirname "$0")/device_ab.sh"

gpu_tests "tuned GEMM"
small=(--config "$configs/qwen3-0.6b.json")
large=(--config "$configs/qwen3-8b.json")
bench "8b-tuned1" PIE_CUDA_GEMM_TUNE=report -- "${large[@]}" --batch 64
bench "8b-untuned1" PIE_CUDA_GEMM_TUNE=0 -- "${large[@]}" --batch 64
bench "8b-norm4" PIE_CUDA_NORM_PER_THREAD=4 -- "${large[@]}" --batch 64
bench "8b-untuned2" PIE_CUDA_GEMM_TUNE=0 -- "${large[@]}" --batch 64
bench "8b-final" X=1 -- "${large[@]}" --batch 1,64,256
bench "0.6b-final" PIE_CUDA_GEMM_TUNE=report -- "${small[@]}" --batch 1,64,256
bench "0.6b-untuned" PIE_CUDA_GEMM_TUNE=0 -- "${small[@]}" --batch 64,256
PIE_ARGS="--kv-cache-dtype bf16" timeout 120 python3 "$root/bench/parity/full_size_parity.py" \
  "$configs/qwen3-0.6b.json" "$bin" bfloat16 2>&1 | tail -1
export PEER_DIR=$shared
timeout 170 python3 "$root/bench/gpu/peer_rows.py" qwen3-0.6b:1 qwen3-0.6b:64 qwen3-8b:1 qwen3-8b:64 2>&1 | tail -4
COMPILE=1 timeout 90 python3 "$root/bench/gpu/peer_rows.py" qwen3-0.6b:1 2>&1 | tail -1
