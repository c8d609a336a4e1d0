#!/usr/bin/env python3
"""Runs bench/bench_gating.cpp's binary with repetitions and prints, per shape, each family's median
bytes/s as a ratio to the faster of read_reference and read_wide (same element type, same bytes), and the GrAP/dense and
GrAP/scalar tokens/s ratios. Usage:
    bench/ratios.py build/default/bench/locmoe_bench_gating [--repetitions 5] [--filter REGEX]
Needs only the Python standard library."""
import re
import sys

import gbench


def main():
    medians = {}
    for b in gbench.medians(gbench.arguments(__doc__, min_time="0.5")).values():
        m = re.match(r"([a-z0-9_]+)/T:(\d+)/d:(\d+)/n:(\d+)(?:/k:(\d+))?", b["name"])
        family, shape, k = m.group(1), (int(m.group(2)), int(m.group(3)), int(m.group(4))), m.group(5)
        medians[(family + (f"/k={k}" if k else ""), shape)] = (b["bytes_per_second"], b["tokens/s"])
    shapes = sorted({s for _, s in medians})
    print(f"{'family':22} " + " ".join(f"{'(%d,%d,%d)' % s:>18}" for s in shapes))
    for family in sorted({f for f, _ in medians}):
        dtype = "bf16" if "bf16" in family else "fp16" if "fp16" in family else "f32"
        cells = []
        for s in shapes:
            refs = [medians.get((f"read_{kind}_{dtype}", s)) for kind in ("reference", "wide")]
            refs = [r for r in refs if r]
            v, ref = medians.get((family, s)), max(refs, key=lambda r: r[0]) if refs else None
            cells.append(f"{v[0] / ref[0]:18.3f}" if v and ref else f"{'-':>18}")
        print(f"{family:22} " + " ".join(cells))
    print("\ntokens/s ratios")
    for num, den in [("grap_top1_f32", "dense_top1_f32"), ("grap_top1_f32", "scalar_top1_f32"),
                     ("grap_top1_bf16", "grap_top1_f32")]:
        cells = []
        for s in shapes:
            x, y = medians.get((num, s)), medians.get((den, s))
            cells.append(f"{x[1] / y[1]:18.2f}" if x and y else f"{'-':>18}")
        print(f"{num + ' / ' + den:38} " + " ".join(cells))
    print("\nmedian GB/s of the reads: " + ", ".join(
        f"{f} {s}: {v[0] / 1e9:.1f}" for (f, s), v in sorted(medians.items()) if f.startswith("read_")))


if __name__ == "__main__":
    sys.exit(main())
