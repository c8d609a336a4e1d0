#!/usr/bin/env python3
"""Plots of `examples/torch/lm/train_lm.py --json` output for docs/training.md.

    /usr/bin/python3 docs/plots/plot_training.py docs/data/training.json --out docs/images

Needs matplotlib (Debian: python3-matplotlib). Writes into --out:
  training_loss.png     validation loss against the step, one panel per sharding, capacity factor runs
  training_traffic.png  inter-node share of the routed rows and max/mean expert load, per run
  training_a2a.png      the modelled flat and split-gather All-to-All projected to 64N/128N/256N, per run
and prints the tables of docs/training.md (markdown) on standard output.
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label(run):
    name = run["router"] + (f" mu={run['mu']:g}" if run["mu"] is not None else "")
    return name if run["capacity"] != "critical" else name + " (critical)"


def loss_curves(runs, out):
    shardings = ["iid", "node_skewed"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, sharding in zip(axes, shardings):
        for run in runs:
            if run["sharding"] == sharding:
                steps, losses = zip(*run["val_loss"])
                ax.plot(steps, losses, marker="o", markersize=3, label=label(run),
                        linestyle="--" if run["capacity"] == "critical" else "-")
        ax.set_title(f"{sharding} sharding")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("validation loss (nats/token)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "training_loss.png"), dpi=110)


def traffic(runs, out):
    names = [f"{label(r)}\n{r['sharding']}" for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].barh(names, [r["inter_node_share"] for r in runs], color="tab:blue")
    axes[0].axvline(0.5, color="gray", linestyle=":", label="uniform routing (2 nodes)")
    axes[0].set_xlabel("inter-node share of routed rows")
    axes[0].legend(fontsize=7)
    axes[1].barh(names, [r["max_mean_load"] for r in runs], color="tab:orange")
    axes[1].set_xlabel("max / mean expert load (before drops)")
    for ax in axes:
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "training_traffic.png"), dpi=110)


def all_to_all(runs, out):
    clusters = ["64N", "128N", "256N"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    names = [f"{label(r)} / {r['sharding']}" for r in runs]
    for ax, scheme in zip(axes, ["flat", "split_gather"]):
        width = 0.27
        for i, c in enumerate(clusters):
            ax.barh([y + (i - 1) * width for y in range(len(runs))],
                    [r["modelled_all_to_all_seconds"][f"{c} {scheme}"] * 1e6 for r in runs], height=width, label=c)
        ax.set_yticks(range(len(runs)))
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"modelled {scheme} All-to-All (us), Ascend 910 links")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "training_a2a.png"), dpi=110)


def tables(runs):
    """docs/training.md's two tables: quality and traffic, and the modelled All-to-All."""
    print("| run | val loss | ppl | inter-node share | max/mean load | drop rate | val drop rate | tokens/s | step s "
          "| step s, 2 chunks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        cap = "critical" if r["capacity"] == "critical" else f"cf {r['capacity']:g}"
        if r["capacity"] == "critical":
            cap += f" (mean {r['mean_capacity']:.2f}, delta {r['mean_delta']:.3f})"
        print(f"| {label(r).replace(' (critical)', '')} / {r['sharding']} / {cap} | {r['final_val_loss']:.3f} | "
              f"{r['final_perplexity']:.1f} | {r['inter_node_share']:.3f} | {r['max_mean_load']:.2f} | "
              f"{r['drop_rate']:.3f} | {r['val_drop_rate']:.3f} | {r['tokens_per_second']:.0f} | {r['step_seconds']:.3f} | "
              f"{r['step_seconds_overlap']:.3f} |")
    print()
    clusters = ["run", "64N", "128N", "256N"]
    print("| run | bytes/step same rank | intra-node | inter-node | "
          + " | ".join(f"{c} flat us | {c} split-gather us" for c in clusters) + " |")
    print("|---|---|---|---|" + "---|" * (2 * len(clusters)))
    for r in runs:
        b = r["bytes_per_step"]
        m = r["modelled_all_to_all_seconds"]
        times = " | ".join(f"{m[c + ' flat'] * 1e6:.1f} | {m[c + ' split_gather'] * 1e6:.1f}" for c in clusters)
        print(f"| {label(r)} / {r['sharding']} | {b['same_rank'] / 1024:.0f} KiB | {b['intra_node'] / 1024:.0f} KiB | "
              f"{b['inter_node'] / 1024:.0f} KiB | {times} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="train_lm.py --json output")
    p.add_argument("--out", default="docs/images")
    a = p.parse_args()
    with open(a.report) as f:
        runs = [r for r in json.load(f)["runs"] if "error" not in r]  # failed runs have no figures
    tables(runs)
    loss_curves(runs, a.out)
    traffic(runs, a.out)
    all_to_all(runs, a.out)


if __name__ == "__main__":
    main()
