"""What train_lm.py reports of a run: link classes of a send matrix, the modelled All-to-All at the paper's clusters,
and the terminal table and CSV of the runs.

The projection to the paper's clusters (64N, 128N, 256N: 8, 16 and 32 nodes of 8 Ascend 910A NPUs, the paper's
Table 1) is ours, not the paper's. The run measures the share of all routed rows that stay on their rank (a), go to the
other ranks of their node (b) and leave the node (c). On a cluster of N'
nodes of G' ranks the node share f = a + b is carried over as the same fraction of the way from uniform routing to
all-local: f' = u' + (f - u) (1 - u') / (1 - u), u = 1 / N and u' = 1 / N' the node shares of a uniform router
(so a router that ignores the topology stays uniform at every size, and one that keeps every row on its node
stays local); the rank's share of its node's rows, g = a / f, is mapped the same way with 1 / G and 1 / G'. Every
rank then sends its mean number of rows m: round(m f' g') to itself, round(m f' (1 - g')) dealt as whole rows over
the other ranks of its node and round(m (1 - f')) over the ranks of other nodes (so a rank with fewer rows than
destinations sends fewer messages), each row `token_bytes` bytes (default 10240: d = 5120 in
fp16, the paper's model), and exchange.hpp's alpha-beta model times one flat and one split-gather All-to-All on
Ascend 910 links. Load imbalance is not carried over (every destination of a class gets the same rows).
"""
import csv
import io
import math

import torch

import locmoe_torch as lt

PAPER_CLUSTERS = {"64N": 8, "128N": 16, "256N": 32}  # nodes of 8 NPUs
PAPER_RANKS_PER_NODE = 8
LINK_CLASSES = ("same_rank", "intra_node", "inter_node")


def by_link_class(matrix, ranks_per_node):
    """{class: sum of matrix[s][d] over pairs of that class} for an [R, R] matrix (source-major)."""
    out = dict.fromkeys(LINK_CLASSES, 0)
    for s in range(matrix.shape[0]):
        for d in range(matrix.shape[1]):
            same_node = s // ranks_per_node == d // ranks_per_node
            key = "same_rank" if s == d else ("intra_node" if same_node else "inter_node")
            out[key] += int(matrix[s, d])
    return out


def _toward_local(share, uniform, uniform_there):
    """share's position between uniform (0) and 1 (all local), at a size whose uniform share is uniform_there."""
    if uniform >= 1:
        return 1.0
    return min(1.0, max(0.0, uniform_there + (share - uniform) * (1 - uniform_there) / (1 - uniform)))


def _deal(rows, destinations, source):
    """rows (an integer) over the destinations as evenly as whole rows go; source s puts its e extra rows on
    destinations [s e, s e + e) of its list (mod their count), so the sources' extras spread over the
    destinations (not exactly evenly: each source's list starts at its own next node)."""
    if not destinations:
        return []
    k = len(destinations)
    out = [rows // k] * k
    for i in range(rows % k):
        out[(source * (rows % k) + i) % k] += 1
    return list(zip(destinations, out))


def projected_send_matrix(rows, ranks_per_node, nodes_there, ranks_per_node_there, token_bytes):
    """The send matrix in bytes [R', R'] of the module comment's projection of `rows` [R, R] (rows per step): the
    shares of all the rows kept on their rank (a) and node (a + b), each rank's mean number of rows, whole rows
    per link class dealt evenly (a rank with fewer rows than destinations sends fewer messages)."""
    R = rows.shape[0]
    nodes = R // ranks_per_node
    total = float(rows.sum())
    node = torch.arange(R) // ranks_per_node
    a = float(rows.diagonal().sum()) / max(total, 1e-300)
    b = float(rows[node.view(R, 1) == node.view(1, R)].sum()) / max(total, 1e-300) - a
    f = _toward_local(a + b, 1 / nodes, 1 / nodes_there)
    g = _toward_local(a / (a + b) if a + b > 0 else 1 / ranks_per_node, 1 / ranks_per_node, 1 / ranks_per_node_there)
    per_rank = total / R
    G, N = ranks_per_node_there, nodes_there
    same, intra, inter = (round(per_rank * f * g), round(per_rank * f * (1 - g)) if G > 1 else 0,
                          round(per_rank * (1 - f)) if N > 1 else 0)
    out = torch.zeros(G * N, G * N, dtype=torch.int64)
    for s in range(G * N):
        home = s // G
        out[s, s] = same
        peers = [home * G + (s % G + i) % G for i in range(1, G)]
        remote = [(home * G + G + i) % (G * N) for i in range(G * (N - 1))]
        for d, r in _deal(intra, peers, s % G) + _deal(inter, remote, s):
            out[s, d] = r
    return out * token_bytes


def modelled_all_to_all(rows, ranks_per_node, token_bytes):
    """{"<cluster> <scheme>": seconds} of one All-to-All: at the run's own topology ("run") and projected to the
    paper's clusters, flat and split-gather, on Ascend 910 links."""
    out = {}
    own = (rows.double() * token_bytes).round().to(torch.int64)
    for scheme in ("flat", "split_gather"):
        out[f"run {scheme}"] = lt.model_exchange_seconds(own, ranks_per_node, scheme)
        for name, nodes in PAPER_CLUSTERS.items():
            m = projected_send_matrix(rows, ranks_per_node, nodes, PAPER_RANKS_PER_NODE, token_bytes)
            out[f"{name} {scheme}"] = lt.model_exchange_seconds(m, PAPER_RANKS_PER_NODE, scheme)
    return out


def flat_row(run):
    """One run as a flat dict of scalars (CSV columns); the curve as "step:loss" pairs. A failed run has only its
    settings and `error`."""
    row = {k: run.get(k) for k in ("router", "sharding", "capacity", "error", "steps", "final_val_loss",
                                    "final_perplexity", "inter_node_share", "max_mean_load", "drop_rate",
                                    "tokens_per_second", "step_seconds", "step_seconds_overlap", "mean_capacity",
                                    "mean_delta", "negative_cosine_share", "plan_check")}
    if "error" in run:
        return row
    for k, v in run["bytes_per_step"].items():
        row[f"bytes_per_step_{k}"] = v
    for k, v in run["modelled_all_to_all_seconds"].items():
        row[f"a2a_{k.replace(' ', '_')}_seconds"] = v
    row["val_loss"] = " ".join(f"{s}:{v:.4f}" for s, v in run["val_loss"])
    return row


def to_csv(runs):
    rows = [flat_row(r) for r in runs]
    fields = max((list(r) for r in rows), key=len, default=[])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def table(runs):
    """The terminal summary: one line per run."""
    head = (f"{'router':<16}{'sharding':<12}{'capacity':<9}{'val loss':>9}{'ppl':>8}{'inter':>7}{'max/mean':>9}"
            f"{'drops':>7}{'tok/s':>8}{'64N flat us':>12}{'64N s-g us':>11}")
    lines = [head]
    for r in runs:
        if "error" in r:
            lines.append(f"{r['router']:<16}{r['sharding']:<12}{str(r['capacity']):<9}failed: {r['error']}")
            continue
        m = r["modelled_all_to_all_seconds"]
        lines.append(f"{r['router']:<16}{r['sharding']:<12}{str(r['capacity']):<9}{r['final_val_loss']:>9.3f}"
                     f"{r['final_perplexity']:>8.1f}{r['inter_node_share']:>7.3f}{r['max_mean_load']:>9.2f}"
                     f"{r['drop_rate']:>7.3f}{r['tokens_per_second']:>8.0f}{m['64N flat'] * 1e6:>12.1f}"
                     f"{m['64N split_gather'] * 1e6:>11.1f}")
    return "\n".join(lines)


def perplexity(loss):
    return math.exp(loss) if loss < 700 else float("inf")
