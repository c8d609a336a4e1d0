#!/usr/bin/env python3
"""The layer step (forward + backward of the routing work), locmoe against PyTorch, one thread each. Runs
    <binary> --benchmark_format=json (layer_step_{f32,bf16}, with repetitions: median tokens/s)
    /usr/bin/python3 bench/torch_layer.py --json --threads 1
and prints, per (T, d, n, k, dtype), both tokens/s and their ratio (target: >= 4). Usage:
    bench/layer_vs_torch.py build/default/bench/locmoe_bench_layer [--repetitions 3] [--min-time 0.5]
Needs only the Python standard library (PyTorch only in the interpreter that runs torch_layer.py)."""
import argparse
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("binary")
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--min-time", default="0.5")
    p.add_argument("--python", default="/usr/bin/python3")
    p.add_argument("--torch-repeat", type=int, default=10)
    p.add_argument("--target", type=float, default=4.0)
    a = p.parse_args()
    out = subprocess.run([a.binary, "--benchmark_format=json", f"--benchmark_repetitions={a.repetitions}",
                          f"--benchmark_min_time={a.min_time}", "--benchmark_report_aggregates_only=true"],
                         check=True, capture_output=True, text=True).stdout
    mine = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("aggregate_name", "median" if a.repetitions == 1 else None) != "median":
            continue
        m = re.match(r"layer_step_(f32|bf16)/T:(\d+)/d:(\d+)/n:(\d+)/k:(\d+)", b["name"])
        mine[(int(m.group(2)), int(m.group(3)), int(m.group(4)), int(m.group(5)), m.group(1))] = b["items_per_second"]
    torch_out = subprocess.run([a.python, os.path.join(HERE, "torch_layer.py"), "--json", "--threads", "1",
                                "--repeat", str(a.torch_repeat)], check=True, capture_output=True, text=True).stdout
    if "not available" in torch_out:
        print(torch_out.strip())
        return 0
    doc = json.loads(torch_out)
    theirs = {(r["T"], r["d"], r["n"], r["k"], r["dtype"]): r["tokens_per_s"] for r in doc["results"]}
    print(f"layer step, forward + backward, 1 thread each; PyTorch {doc['torch']}, malloc {doc['malloc']}")
    print(f"{'T':>6} {'d':>5} {'n':>3} {'k':>2} {'dtype':>5} {'locmoe tok/s':>13} {'torch tok/s':>12} {'ratio':>7}")
    for key in sorted(mine):
        if key not in theirs:
            continue
        ratio = mine[key] / theirs[key]
        flag = "" if ratio >= a.target else f"  (below {a.target:g})"
        print(f"{key[0]:>6} {key[1]:>5} {key[2]:>3} {key[3]:>2} {key[4]:>5} {mine[key]:>13.4g} {theirs[key]:>12.4g} "
              f"{ratio:>7.2f}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
