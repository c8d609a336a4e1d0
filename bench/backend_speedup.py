#!/usr/bin/env python3
"""Runs bench/bench_backend.cpp's binary with repetitions and prints, per family and shape, the median bytes/s
with N threads over the same family with 1 thread (wall-clock time: the speedup a trainer sees). Usage:
    bench/backend_speedup.py build/default/bench/locmoe_bench_backend [--repetitions 5] [--min-time 0.2] [--filter REGEX]
Needs only the Python standard library."""
import re

import gbench


def main():
    medians = {}  # (family, shape, threads) -> bytes/s
    for b in gbench.medians(gbench.arguments(__doc__)).values():
        m = re.match(r"([a-z0-9_]+)/(T:\d+/d:\d+/n:\d+)/threads:(\d+)", b["name"])
        medians[(m.group(1), m.group(2), int(m.group(3)))] = b["bytes_per_second"]
    for (family, shape, threads), rate in sorted(medians.items()):
        base = medians.get((family, shape, 1))
        if threads > 1 and base:
            print(f"{family:24} {shape:22} threads {threads}: {rate / 1e9:7.2f} GB/s, {rate / base:5.2f}x one thread "
                  f"({base / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
