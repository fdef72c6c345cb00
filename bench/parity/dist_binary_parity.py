#!/usr/bin/env python3
"""A `pie build` binary against transformers' references on the GPU.

Usage: dist_binary_parity.py BINARY FIXTURE_DIR [FIXTURE_DIR ...]

For every prompt of each fixture's reference.json (made by
tests/fixtures/make_fixtures.py with transformers): `BINARY logits --driver
cuda --json` must be within 1e-3 * max|ref| at every position, and
`BINARY generate --ids ... --max-tokens N --driver cuda --json` must give
transformers' greedy tokens (where its generate() was cache-consistent).
Prints one JSON line per fixture; exits 1 if any check fails.
"""
import json
import os
import subprocess
import sys

TOL = 1e-3


def run(binary, *args):
    driver = os.environ.get("PIE_DRIVER", "cuda")
    out = subprocess.run([binary, *args, "--driver", driver, "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def check(binary, fixture):
    ref = json.load(open(f"{fixture}/reference.json"))
    worst, greedy_ok = 0.0, True
    for p in ref["prompts"]:
        ids = ",".join(map(str, p["ids"]))
        ours = run(binary, "logits", "--model", fixture, "--ids", ids)["logits"]
        diff = max(abs(a - b) for ra, rb in zip(ours, p["logits"]) for a, b in zip(ra, rb))
        scale = max(abs(b) for rb in p["logits"] for b in rb)
        worst = max(worst, diff / scale)
        if p.get("cache_consistent", True):
            n = str(len(p["greedy"]))
            got = run(binary, "generate", "--model", fixture, "--ids", ids, "--max-tokens", n)["ids"]
            greedy_ok &= got == p["greedy"]
    return {"fixture": fixture, "max_diff_over_max_ref": worst, "greedy_equal": greedy_ok,
            "ok": worst <= TOL and greedy_ok}


def main():
    binary, fixtures = sys.argv[1], sys.argv[2:]
    results = [check(binary, f) for f in fixtures]
    for r in results:
        print(json.dumps({"binary": binary, **r}))
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
