#!/usr/bin/env bash
# pie next to llama.cpp on one GGUF, in one command: ROUNDS rounds of
# (pie at 1 and 2 threads, then ../shared/bench/llamacpp_peer.sh), back to
# back, so both see the same machine; every round is kept in the JSON.
# usage: bench/cpu_side_by_side.sh PIE_BINARY MODEL.gguf OUT.json [ROUNDS]
set -euo pipefail
PIE=${1:?usage: cpu_side_by_side.sh PIE MODEL.gguf OUT.json [ROUNDS]}
MODEL=${2:?model}
OUT=${3:?out}
ROUNDS=${4:-1}
PEER=$(dirname "$0")/../../shared/bench/llamacpp_peer.sh
TMP=$(mktemp -d)
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r: load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  cut -d' ' -f1-3 /proc/loadavg > "$TMP/load.$r"
  for t in 1 2; do
    RAYON_NUM_THREADS=$t "$PIE" bench --model "$MODEL" --prompt 128 --gen 128 --reps 3 --json \
      | tail -n 1 > "$TMP/pie.$r.$t"
  done
  "$PEER" "$MODEL" "$TMP/peer.$r"
done
python3 - "$TMP" "$ROUNDS" "$MODEL" > "$OUT" <<'PY'
import json, sys, os, datetime
tmp, rounds, model = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = {"date": datetime.date.today().isoformat(), "model_file": os.path.basename(model),
       "workload": "prompt 128 tokens, 128 generated, greedy", "rounds": []}
for r in range(1, rounds + 1):
    pie = []
    for t in (1, 2):
        row = json.load(open(f"{tmp}/pie.{r}.{t}")); row["threads"] = t; pie.append(row)
    out["rounds"].append({"loadavg_before": open(f"{tmp}/load.{r}").read().split(),
                          "pie": pie, "llama_cpp": json.load(open(f"{tmp}/peer.{r}"))})
print(json.dumps(out, indent=1))
PY
rm -r "$TMP"
