#!/usr/bin/env python3
"""Plots of `locmoe simulate --csv` output for docs/simulate.md.

    python3 docs/plots/plot_simulate.py docs/data/simulate.csv docs/data/simulate_mu.csv --out docs/images

Needs matplotlib (Debian: python3-matplotlib). The first CSV holds every router on each preset; the second, a
sweep of LocMoE's locality coefficient (rows differ in loc_coeff). Writes three PNG files into --out:
  simulate_traffic.png   inter-node share of kept bytes and max/mean expert load, per router and cluster
  simulate_a2a.png       modelled dispatch All-to-All (flat, split-gather, two-level), per router and cluster
  simulate_locality.png  the sweep: inter-node share, affinity and modelled time against mu
"""
import argparse
import csv
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROUTERS = ["hash", "switch", "rre", "locmoe", "node-limited"]
PRESETS = ["64N", "128N", "256N"]


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def by_preset(rows):
    presets = [p for p in PRESETS if any(r["preset"] == p for r in rows)]
    presets += sorted({r["preset"] for r in rows} - set(presets))
    return presets


def grouped_bars(ax, rows, field, scale, ylabel):
    presets = by_preset(rows)
    routers = [r for r in ROUTERS if any(x["router"] == r for x in rows)]
    width = 0.8 / len(routers)
    for i, router in enumerate(routers):
        values = []
        for p in presets:
            match = [x for x in rows if x["preset"] == p and x["router"] == router]
            values.append(float(match[0][field]) * scale if match else 0.0)
        ax.bar([j + i * width for j in range(len(presets))], values, width, label=router)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(presets))])
    ax.set_xticklabels(presets)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def save(fig, out, name):
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    print(path)


def plot_traffic(rows, out):
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    grouped_bars(axes[0], rows, "inter_node_share", 100, "inter-node share of kept bytes (%)")
    axes[0].set_ylim(0, 100)
    grouped_bars(axes[1], rows, "max_mean_load", 1, "max / mean expert load")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[0].legend(fontsize=8, ncol=2, loc="lower right")
    save(fig, out, "simulate_traffic.png")


def plot_a2a(rows, out):
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, (field, title) in zip(axes, [("a2a_seconds_flat", "flat"), ("a2a_seconds_groupwise", "split-gather (paper 3.2)"),
                                         ("a2a_seconds_two_level", "two-level (HetuMoE)")]):
        grouped_bars(ax, rows, field, 1e6, "modelled dispatch All-to-All (us)")
        ax.set_title(title)
    axes[0].legend(fontsize=8, ncol=2, loc="upper left")
    save(fig, out, "simulate_a2a.png")


def plot_locality(rows, out):
    series = defaultdict(list)
    for r in rows:
        series[r["preset"]].append(r)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for preset in by_preset(rows):
        pts = sorted(series[preset], key=lambda r: float(r["loc_coeff"]))
        mu = [max(float(r["loc_coeff"]), 1e-3) for r in pts]  # mu = 0 drawn at 1e-3 on the log axis
        axes[0].plot(mu, [100 * float(r["inter_node_share"]) for r in pts], "o-", label=preset)
        axes[1].plot(mu, [float(r["affinity"]) for r in pts], "o-", label=preset)
        base = float(pts[0]["a2a_seconds_flat"])
        axes[2].plot(mu, [100 * (float(r["a2a_seconds_flat"]) / base - 1) for r in pts], "o-", label=preset)
    labels = ["inter-node share of kept bytes (%)", "affinity of kept choices (task reward)",
              "modelled flat All-to-All vs mu = 0 (%)"]
    for ax, label in zip(axes, labels):
        ax.set_xscale("log")
        ax.set_xlabel("locality coefficient mu (0 drawn at 1e-3)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save(fig, out, "simulate_locality.png")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("routers_csv")
    parser.add_argument("sweep_csv", nargs="?")
    parser.add_argument("--out", default="docs/images")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = read(args.routers_csv)
    plot_traffic(rows, args.out)
    plot_a2a(rows, args.out)
    if args.sweep_csv:
        plot_locality(read(args.sweep_csv), args.out)


if __name__ == "__main__":
    main()
