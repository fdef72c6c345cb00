"""One line per kernel of an `ncu --print-summary per-kernel` log (the
gpu__time_duration.sum metric): launches, mean and total µs, largest
total first.

Usage: python3 bench/gpu/ncu_summary.py NCU_LOG
"""
import re
import sys

HEADER = re.compile(r"  (\S+) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\).*Invocations (\d+)")
TIME = re.compile(r"\s+gpu__time_duration.sum\s+(\S+)\s+\S+\s+\S+\s+(\S+)")


def main():
    kernels = []
    current = None
    for line in open(sys.argv[1], errors="replace"):
        m = HEADER.match(line)
        if m:
            grid = "(%s,%s,%s)x%s" % m.group(2, 3, 4, 5)
            current = {"name": m.group(1), "grid": grid, "n": int(m.group(8)), "mean_us": 0.0}
            kernels.append(current)
            continue
        m = TIME.match(line)
        if m and current:
            scale = {"ms": 1000.0, "us": 1.0, "ns": 0.001}.get(m.group(1), 1.0)
            current["mean_us"] = float(m.group(2).replace(",", "")) * scale
    total = sum(k["n"] * k["mean_us"] for k in kernels)
    for k in sorted(kernels, key=lambda k: -k["n"] * k["mean_us"]):
        print("%-50s %-20s n=%4d mean %8.2f us total %9.1f us" % (
            k["name"][:50], k["grid"], k["n"], k["mean_us"], k["n"] * k["mean_us"]))
    print("all kernels: %.1f us" % total)


if __name__ == "__main__":
    main()
