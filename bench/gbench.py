"""What the bench/*.py scripts share: the command line (binary, repetitions, filter, minimum time) and one run of a
Google Benchmark binary, randomly interleaved, returning each benchmark's median (or its only run) by name."""
import argparse
import json
import subprocess


def arguments(doc, min_time="0.2"):
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("binary")
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--filter", default=".")
    p.add_argument("--min-time", default=min_time)
    return p.parse_args()


def medians(a):
    """{benchmark name without the aggregate suffix: its JSON entry} for the median of each benchmark."""
    out = subprocess.run([a.binary, f"--benchmark_filter={a.filter}", f"--benchmark_repetitions={a.repetitions}",
                          "--benchmark_enable_random_interleaving=true", "--benchmark_report_aggregates_only=true",
                          f"--benchmark_min_time={a.min_time}", "--benchmark_format=json"],
                         check=True, capture_output=True, text=True).stdout
    result = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("aggregate_name") == "median" or (a.repetitions == 1 and b.get("run_type") == "iteration"):
            result[b.get("run_name", b["name"])] = b
    return result
