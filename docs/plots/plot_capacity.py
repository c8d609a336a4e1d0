#!/usr/bin/env python3
"""Plot ec_min against the angle theta (the paper's Figure 6) from `locmoe capacity-curve` CSV.

    build/default/bin/locmoe capacity-curve --hidden 16,128,1024,5120,12288 --experts 16 \
        --angle-min 1 --angle-max 89.99 --points 1780 > docs/img/ec_min_vs_angle.csv
    /usr/bin/python3 docs/plots/plot_capacity.py docs/img/ec_min_vs_angle.csv docs/img/ec_min_vs_angle.svg

Also prints, per d, the angle where the erfc form crosses the exact ec_min (a markdown table for docs/theory.md).
Needs numpy and matplotlib (Debian: python3-numpy, python3-matplotlib).
"""
import csv
import math
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOG10E = 1.0 / math.log(10.0)


def main(csv_path, out_path):
    rows = defaultdict(list)
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            rows[int(r["hidden"])].append(r)
    experts = next(iter(rows.values()))[0]["experts"]

    fig, (ax, ratio_ax) = plt.subplots(1, 2, figsize=(11, 4.6))
    print("| d | theta where ec_min_erfc = ec_min | delta there | erfc form is a lower bound of ec_min for |")
    print("|---|---|---|---|")
    for d, rs in sorted(rows.items()):
        theta = [float(r["theta_degrees"]) for r in rs]
        delta = [float(r["delta"]) for r in rs]
        exact = [float(r["log_ec_min"]) * LOG10E for r in rs]
        erfc = [float(r["log_ec_min_erfc"]) * LOG10E for r in rs]
        expo = [float(r["log_ec_min_exp_bound"]) * LOG10E for r in rs]
        near = [i for i, t in enumerate(theta) if t >= 84.0]
        (line,) = ax.plot([theta[i] for i in near], [exact[i] for i in near], label=f"d = {d}")
        ax.plot([theta[i] for i in near], [erfc[i] for i in near], ls="--", color=line.get_color(), lw=0.9)
        ax.plot([theta[i] for i in near], [expo[i] for i in near], ls=":", color=line.get_color(), lw=0.9)
        # ec_min_erfc / ec_min - 1, from the logs (exact even where the values overflow).
        ratio = [math.expm1((b - a) / LOG10E) for a, b in zip(exact, erfc)]
        ratio_ax.plot(delta, ratio, color=line.get_color(), label=f"d = {d}")
        gap = [a - b for a, b in zip(exact, erfc)]  # > 0: the erfc form is below ec_min (a lower bound)
        cross = None
        for i in range(1, len(gap)):
            if (gap[i - 1] > 0) != (gap[i] > 0):
                cross = theta[i - 1] + (theta[i] - theta[i - 1]) * gap[i - 1] / (gap[i - 1] - gap[i])
        if cross is None:
            print(f"| {d} | none for theta in [{theta[0]:.2f}, {theta[-1]:.2f}] deg | | |")
        else:
            print(f"| {d} | {cross:.2f} deg | {math.cos(math.radians(cross)):.4f} | "
                  f"delta > {math.cos(math.radians(cross)):.4f} (theta < {cross:.2f} deg) |")
    ax.set_xlabel("theta, degrees (delta = cos theta)")
    ax.set_ylabel("log10 of expert capacity")
    ax.set_ylim(-2, 12)
    ax.set_title(f"ec_min (solid), erfc form (dashed), exp form (dotted); n = {experts}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ratio_ax.set_xscale("log")
    ratio_ax.set_yscale("symlog", linthresh=1e-3)
    ratio_ax.axhline(0.0, color="black", lw=0.6)
    ratio_ax.set_xlabel("delta")
    ratio_ax.set_ylabel("ec_min_erfc / ec_min - 1")
    ratio_ax.set_title("> 0: the erfc form overestimates ec_min (not a lower bound)", fontsize=9)
    ratio_ax.grid(alpha=0.3)
    ratio_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: plot_capacity.py CURVE.csv OUT.svg")
    main(sys.argv[1], sys.argv[2])
