#!/usr/bin/env python3
"""How often each GrAP expert wins Top-1 when n does not divide d (docs/theory.md, "GrAP's blocks").

Tokens are isotropic Gaussian vectors (their direction is uniform on the sphere, which is all Top-1 sees); the
gate's logit for expert i is scale_i * (sum of the token's features in block i), without the ReLU (it only
matters when every logit is negative, probability 2^-n). Three weightings:
  paper:  blocks [ceil(i d/n), ceil((i+1) d/n)), scale n/d for all (eq. 4's indicator with integer j);
  locmoe: blocks [floor(i d/n), floor((i+1) d/n)), scale 1/|B_i| (the block mean: gating.hpp);
  equal:  locmoe's blocks, scale 1/sqrt(|B_i|) (equal weight norms: Assumption 1, and so Lemma 2's 1/n).
Prints, per (d, n), the largest and smallest selection frequency over the experts times n (1 = balanced), for
experts grouped by block size. Usage: /usr/bin/python3 docs/plots/grap_block_balance.py [--tokens 400000]
"""
import argparse
import math

import numpy as np


def blocks(d, n, rounding):
    edge = [rounding(i * d / n) for i in range(n + 1)]
    return [(edge[i], edge[i + 1]) for i in range(n)]


def frequencies(d, n, weighting, tokens, rng):
    rounding = (lambda v: math.ceil(v - 1e-12)) if weighting == "paper" else (lambda v: math.floor(v + 1e-12))
    spans = blocks(d, n, rounding)
    sizes = np.array([e - b for b, e in spans], dtype=float)
    scale = {"paper": np.full(n, n / d), "locmoe": 1 / sizes, "equal": 1 / np.sqrt(sizes)}[weighting]
    counts = np.zeros(n)
    done = 0
    while done < tokens:
        batch = min(100000, tokens - done)
        x = rng.standard_normal((batch, d))
        logits = np.stack([x[:, b:e].sum(axis=1) for b, e in spans], axis=1) * scale
        counts += np.bincount(logits.argmax(axis=1), minlength=n)
        done += batch
    return sizes, counts / tokens * n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=400000)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    print("| d | n | block sizes | weighting | n x frequency, smaller blocks | n x frequency, larger blocks |")
    print("|---|---|---|---|---|---|")
    for d, n in ((10, 4), (100, 16), (1000, 64), (5000, 64)):
        for weighting in ("paper", "locmoe", "equal"):
            sizes, f = frequencies(d, n, weighting, a.tokens, np.random.default_rng(a.seed))
            small, large = f[sizes == sizes.min()], f[sizes == sizes.max()]
            print(f"| {d} | {n} | {int(sizes.min())}, {int(sizes.max())} | {weighting} | "
                  f"{small.mean():.3f} | {large.mean():.3f} |")


if __name__ == "__main__":
    main()
