# Sourced by the device A/B scripts (qwen3_decode_ab.sh, gemm_tune_final.sh)
# with their arguments PIE_BINARY GPU_TEST_BINARY|- SHARED_BENCH_DIR: sets
# bin, tests, configs and root, writes $OUT/gpu.txt, and defines
# `gpu_tests` and `bench`.
set -uo pipefail
bin=$1 tests=$2 shared=$3
configs=$shared/configs
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# gpu_tests GREP_PATTERN: the GPU test binary (unless "-"), its log to
# $OUT/tests.log, the lines matching the pattern shown.
gpu_tests() {
  [ "$tests" != - ] || return 0
  PIE_FIXTURES=$root/tests/fixtures timeout 300 "$tests" --ignored --test-threads=1 --nocapture 2>&1 \
    | tee "$OUT/tests.log" | grep -E "^test |test result|panicked|$1"
}

# `bench`: one pie bench run of $bin appended to $OUT/rows.txt (one line
# per batch, plus the step-timing and warning lines) and $OUT/rows.jsonl
# (pie bench's JSON with the run's label first).
#
# bench LABEL [VAR=VALUE ...] -- PIE_BENCH_ARGS...
bench() {
  local label=$1; shift
  local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  env "${envs[@]}" "$bin" bench --driver cuda --prompt 128 --gen 128 --reps 3 --json \
    --kv-cache-dtype bf16 "$@" > /tmp/bench.json 2> /tmp/bench.err
  python3 - "$label" <<'PY' | tee -a "$OUT/rows.txt"
import json, sys
for line in open("/tmp/bench.json"):
    r = json.loads(line)
    print(sys.argv[1], "batch", r["batch"], "%.4f ms/step" % r["decode_ms_per_step"],
          "%.0f tok/s" % r["decode_tok_s"])
PY
  grep -E "step timing|warning|gemm tune" /tmp/bench.err | sed "s/^/$label: /" | tee -a "$OUT/rows.txt"
  sed "s/^{/{\"label\":\"$label\",/" /tmp/bench.json >> "$OUT/rows.jsonl"
}
