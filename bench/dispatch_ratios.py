#!/usr/bin/env python3
"""Runs bench/bench_dispatch.cpp's binary with repetitions and prints, per shape, the median bytes/s of
dispatch, combine and their backwards as a ratio to the fastest copy of the same bytes (memcpy_<family>,
rowcopy_<family> or ntcopy_<family>, non-temporal stores), from wall-clock time
(bytes_per_second) and from CPU time (the same bytes, so the ratio of median CPU times; it leaves out the time
the thread waited for a core on a busy machine), and plan_build's median tokens/s. Usage:
    bench/dispatch_ratios.py build/default/bench/locmoe_bench_dispatch [--repetitions 5] [--min-time 0.2]
Needs only the Python standard library."""
import re
import sys

import gbench


def main():
    medians = {}  # (family, shape) -> the median run's counters
    for b in gbench.medians(gbench.arguments(__doc__)).values():
        m = re.match(r"([a-z0-9_]+)/(T:\d+/d:\d+/n:\d+/k:\d+)", b["name"])
        medians[(m.group(1), m.group(2))] = b
    shapes = sorted({s for _, s in medians})
    print(f"{'ratio to the best copy (wall, cpu)':38} " + " ".join(f"{s:>26}" for s in shapes))
    families = [f"{op}_{t}" for op in ("dispatch", "combine", "combine_backward", "dispatch_backward")
                for t in ("f32", "bf16")]
    for family in families:
        cells = []
        for s in shapes:
            x = medians.get((family, s))
            refs = [medians.get((kind + family, s)) for kind in ("memcpy_", "rowcopy_", "ntcopy_")]
            refs = [r for r in refs if r]
            if not (x and refs):
                cells.append(f"{'-':>26}")
                continue
            ref = max(refs, key=lambda r: r["bytes_per_second"])
            wall, cpu = x["bytes_per_second"] / ref["bytes_per_second"], ref["cpu_time"] / x["cpu_time"]
            cells.append(f"{wall:18.3f}, {cpu:.3f}")
        print(f"{family + ' / best copy':38} " + " ".join(cells))
    print()
    for family in families:
        for kind in ("memcpy_", "rowcopy_", "ntcopy_"):
            cells = [f"{medians[(kind + family, s)]['bytes_per_second'] / 1e9:21.1f} GB/s" if (kind + family, s) in medians
                     else f"{'-':>26}" for s in shapes]
            print(f"{kind + family:38} " + " ".join(cells))
    cells = [f"{medians[('plan_build', s)]['items_per_second'] / 1e6:17.1f} M tokens/s" if ("plan_build", s) in medians
             else f"{'-':>26}" for s in shapes]
    print(f"{'plan_build':38} " + " ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
