#!/usr/bin/env python3
"""Runs bench/bench_backend.cpp's binary with repetitions and prints, per family and shape, the median bytes/s
with N threads over the same family with 1 thread (wall-clock time: the speedup a trainer sees). Usage:
    bench/backend_speedup.py build/default/bench/locmoe_bench_backend [--repetitions 5] [--min-time 0.2]
Needs only the Python standard library."""
import argparse
import json
import re
import subprocess


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("binary")
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--min-time", default="0.2")
    a = p.parse_args()
    out = subprocess.run([a.binary, f"--benchmark_repetitions={a.repetitions}", "--benchmark_enable_random_interleaving=true",
                          "--benchmark_report_aggregates_only=true", f"--benchmark_min_time={a.min_time}",
                          "--benchmark_format=json"], check=True, capture_output=True, text=True).stdout
    medians = {}  # (family, shape, threads) -> bytes/s
    for b in json.loads(out)["benchmarks"]:
        if b.get("aggregate_name") == "median" or (a.repetitions == 1 and b.get("run_type") == "iteration"):
            m = re.match(r"([a-z0-9_]+)/(T:\d+/d:\d+/n:\d+)/threads:(\d+)", b["name"])
            medians[(m.group(1), m.group(2), int(m.group(3)))] = b["bytes_per_second"]
    for (family, shape, threads), rate in sorted(medians.items()):
        base = medians.get((family, shape, 1))
        if threads > 1 and base:
            print(f"{family:24} {shape:22} threads {threads}: {rate / 1e9:7.2f} GB/s, {rate / base:5.2f}x one thread "
                  f"({base / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
