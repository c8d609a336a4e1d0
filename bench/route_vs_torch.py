#!/usr/bin/env python3
"""The router step, locmoe against PyTorch at equal thread count (1 each: Google Benchmark runs the step on
one thread and bench/torch_route.py calls torch.set_num_threads(1)). Runs
    <binary> --benchmark_filter=route_step --benchmark_format=json   (with repetitions; median tokens/s)
    /usr/bin/python3 bench/torch_route.py --json --threads 1          (median of --torch-repeat steps)
matches (T, n, k) and prints locmoe tokens/s, PyTorch tokens/s and their ratio. With --pieces it also runs
route_only, assign_only, losses_only and each loss alone, and prints the milliseconds of each piece. On a
shared machine, --rounds N alternates the two programs N times and keeps the median of each side's results.
Usage:
    bench/route_vs_torch.py build/default/bench/locmoe_bench_route [--repetitions 3] [--min-time 0.2]
                            [--rounds 1] [--pieces]
Needs only the Python standard library (PyTorch only in the interpreter that runs torch_route.py)."""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SKIPPED = "torch_route.py: PyTorch not available, skipped"
PIECES = ("route_only", "assign_only", "losses_only", "aux_loss_only", "z_loss_only", "locality_loss_only")


def locmoe_medians(a):
    families = "|".join(("route_step",) + PIECES) if a.pieces else "route_step"
    out = subprocess.run([a.binary, f"--benchmark_filter=^({families})/", "--benchmark_format=json",
                          f"--benchmark_repetitions={a.repetitions}", f"--benchmark_min_time={a.min_time}",
                          "--benchmark_enable_random_interleaving=true", "--benchmark_report_aggregates_only=true"],
                         check=True, capture_output=True, text=True).stdout
    medians = {}  # (family, (T, n, k)) -> (tokens/s, ms per step, tokens per CPU second)
    for b in json.loads(out)["benchmarks"]:
        # With repetitions the medians (aggregates only); with one repetition the run itself.
        if b.get("aggregate_name", "median" if a.repetitions == 1 else None) != "median":
            continue
        m = re.match(r"([a-z_]+)/T:(\d+)/n:(\d+)/k:(\d+)", b["name"])
        shape = (int(m.group(2)), int(m.group(3)), int(m.group(4)))
        cpu_s = b["cpu_time"] * {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]
        medians[(m.group(1), shape)] = (b["items_per_second"], shape[0] / b["items_per_second"] * 1e3, shape[0] / cpu_s)
    return medians


def torch_medians(a):
    try:
        out = subprocess.run([a.python, os.path.join(HERE, "torch_route.py"), "--json", "--threads", "1",
                              "--repeat", str(a.torch_repeat), "--malloc", a.malloc],
                             check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        return None, None
    if out.strip() == SKIPPED:
        return None, None
    doc = json.loads(out)
    results = {(r["T"], r["n"], r["k"]): (r["tokens_per_s"], r["median_s"] * 1e3, r["cpu_tokens_per_s"])
               for r in doc["results"]}
    return f"{doc['torch']}, malloc {doc['malloc']}", results


def median_of(rounds):
    """Per key, the median over rounds of each field (the rounds' own medians)."""
    return {key: tuple(statistics.median(r[key][i] for r in rounds if key in r) for i in range(3))
            for key in set().union(*rounds)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("binary", help="locmoe_bench_route")
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--min-time", default="0.2", help="--benchmark_min_time (seconds, benchmark 1.7 syntax)")
    p.add_argument("--python", default="/usr/bin/python3", help="the interpreter that has PyTorch")
    p.add_argument("--torch-repeat", type=int, default=30)
    p.add_argument("--malloc", choices=("reuse", "default"), default="reuse", help="torch_route.py --malloc")
    p.add_argument("--target", type=float, default=5.0, help="ratio to report as met or not")
    p.add_argument("--rounds", type=int, default=1, help="alternate locmoe and PyTorch this many times")
    p.add_argument("--pieces", action="store_true", help="also time the pieces (route, assign, losses, each loss)")
    a = p.parse_args()

    rounds_mine, rounds_theirs, version = [], [], None
    for _ in range(a.rounds):
        rounds_mine.append(locmoe_medians(a))
        version, theirs = torch_medians(a)
        if theirs:
            rounds_theirs.append(theirs)
    mine = median_of(rounds_mine)
    theirs = median_of(rounds_theirs) if rounds_theirs else None
    shapes = sorted({s for f, s in mine if f == "route_step"})
    print("router step, 1 thread each: locmoe (median of %d repetitions) vs %s%s" %
          (a.repetitions, f"PyTorch {version} (median of {a.torch_repeat} steps)" if theirs else "PyTorch: skipped",
           f"; median over {a.rounds} alternating rounds" if a.rounds > 1 else ""))
    print("tokens/s from wall-clock time; 'CPU ratio': the same from each process's CPU time, which leaves out")
    print(f"the time other processes took the core. Target: both ratios >= {a.target:g}.")
    print(f"{'T':>6} {'n':>4} {'k':>2} {'locmoe tok/s':>13} {'torch tok/s':>12} {'ratio':>7} {'CPU ratio':>9}  target")
    for s in shapes:
        ours = mine[("route_step", s)]
        cells = f"{s[0]:>6} {s[1]:>4} {s[2]:>2} {ours[0]:>13.4g}"
        if theirs and s in theirs:
            ratio, cpu_ratio = ours[0] / theirs[s][0], ours[2] / theirs[s][2]
            met = min(ratio, cpu_ratio) >= a.target
            cells += f" {theirs[s][0]:>12.4g} {ratio:>7.2f} {cpu_ratio:>9.2f}  {'met' if met else 'NOT met'}"
        else:
            cells += f" {'-':>12} {'-':>7} {'-':>9}"
        print(cells)
    if a.pieces:
        print("\nlocmoe pieces, ms per call (medians; each piece runs alone, so they need not add up exactly;")
        print("losses = aux + z + locality, each with its gradient), and the PyTorch step")
        print(f"{'T':>6} {'n':>4} {'k':>2} {'step':>8} {'route':>8} {'assign':>8} {'losses':>8} {'aux':>8} "
              f"{'z':>8} {'locality':>9} {'torch step':>11}")
        for s in shapes:
            cells = [mine.get((f, s), (0, float("nan"), 0))[1] for f in ("route_step",) + PIECES]
            torch_ms = f"{theirs[s][1]:>11.3f}" if theirs and s in theirs else f"{'-':>11}"
            print(f"{s[0]:>6} {s[1]:>4} {s[2]:>2} " + " ".join(f"{c:>8.3f}" for c in cells[:-1]) +
                  f" {cells[-1]:>9.3f} " + torch_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
