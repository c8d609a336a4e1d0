"""locmoe_torch.MoELayer: 4 processes on gloo, as 2 nodes of 2 ranks, against one process running the same layer
(the same experts) over the same tokens (the ranks' tokens concatenated in rank order).

Each expert receives its rows in (source rank, token) order, which is the single process's token order, so the
outputs and the gradients of x and of the expert weights are equal bit for bit. The gate's parameters are
replicated: their gradient is a sum over the ranks' tokens, compared within float32 rounding of the sum.

Run by ctest with PYTHONPATH=<build>/python (tests/torch/CMakeLists.txt).
"""
import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from locmoe_torch import MoELayer

WORLD, PER_NODE, T, HIDDEN, FFN, EXPERTS = 4, 2, 96, 24, 32, 8


def inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(T, HIDDEN, generator=g), torch.randn(T, HIDDEN, generator=g)


def run(layer, x, upstream):
    x = x.clone().requires_grad_()
    y = layer(x)
    ((y * upstream).sum() + layer.aux_loss).backward()
    gate = layer.gate_bias if layer.gate_kind == "grap" else layer.gate_weight
    first, second = layer.experts.parameters()
    return {"y": y.detach(), "grad_x": x.grad, "grad_w1": first.grad, "grad_w2": second.grad,
            "grad_gate": gate.grad, "aux": layer.aux_loss.detach(), "counts": layer.last_counts}


class BiasedExperts(torch.nn.Module):
    """A caller's own experts (MoELayer's `experts=`): y = tanh(x W_j + b_j) for local expert j, expert e's weights
    from the seed 100 + e."""

    def __init__(self, first, count):
        super().__init__()
        gens = [torch.Generator().manual_seed(100 + e) for e in range(first, first + count)]
        self.weight = torch.nn.Parameter(torch.stack([torch.randn(HIDDEN, HIDDEN, generator=g) for g in gens]))
        self.bias = torch.nn.Parameter(torch.stack([torch.randn(HIDDEN, generator=g) for g in gens]))

    def forward(self, rows, counts):
        pieces = rows.split(counts)
        return torch.cat([torch.tanh(p @ self.weight[j] + self.bias[j]) for j, p in enumerate(pieces)])


def make_layer(settings, **kwargs):
    """The layer of `settings`; "skew" makes expert 0 win most tokens (ranks and experts left with no rows);
    "custom" gives the layer BiasedExperts."""
    settings = dict(settings)
    skew = settings.pop("skew", False)
    experts = settings.pop("experts", EXPERTS)
    if settings.pop("custom", False):
        ranks = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        settings["experts"] = BiasedExperts(rank * experts // ranks, experts // ranks)
    layer = MoELayer(HIDDEN, FFN, experts, seed=7, **settings, **kwargs)
    if skew:
        with torch.no_grad():
            layer.gate_bias[0] += 3.0
    return layer


def worker(rank, init_file, out_dir, settings, world, per_node):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))  # a failing rank must not hang the others for 30 min
    layer = make_layer(settings, ranks_per_node=per_node)
    x, upstream = inputs()
    block = slice(rank * T // world, (rank + 1) * T // world)
    result = run(layer, x[block], upstream[block])
    result["sub_groups"] = layer.node_group is not None and layer.peer_group is not None
    result["link_bytes"] = layer.link_bytes(HIDDEN * 4)
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("settings,world,per_node", [
    (dict(gate="grap", topk=1), WORLD, PER_NODE),
    (dict(gate="dense", topk=2), WORLD, PER_NODE),
    (dict(gate="dense", topk=2, exchange="two_level"), WORLD, PER_NODE),
    (dict(gate="grap", topk=1, exchange="two_level", skew=True), WORLD, PER_NODE),
    (dict(gate="dense", topk=2, exchange="two_level", experts=12), 6, 2),
    (dict(gate="dense", topk=2, chunks=3), WORLD, PER_NODE),
    (dict(gate="grap", topk=2, exchange="two_level", chunks=4, skew=True), WORLD, PER_NODE),
    (dict(gate="dense", topk=2, exchange="two_level", chunks=2, custom=True), WORLD, PER_NODE),
    (dict(gate="grap", topk=1, chunks=200), WORLD, PER_NODE),
], ids=["grap-top1", "dense-top2", "dense-top2-two-level", "grap-top1-two-level-skewed", "3-nodes-of-2",
        "dense-top2-3-chunks", "grap-top2-two-level-4-chunks-skewed", "own-experts-two-level-2-chunks",
        "more-chunks-than-rows"])
def test_ranks_equal_one_process(settings, world, per_node):
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "init"), tmp, settings, world, per_node), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(world)]
    whole = run(make_layer(settings), *inputs())  # one process: no exchange
    local = settings.get("experts", EXPERTS) // world
    chunked = settings.get("chunks", 1) > 1
    assert all(r["sub_groups"] == (settings.get("exchange") == "two_level") for r in ranks)
    if settings.get("skew") and settings.get("topk", 1) == 1:  # expert 0 takes every token: other ranks get no rows
        assert [int(r["counts"].sum()) for r in ranks] == [T, 0, 0, 0]
    assert torch.equal(torch.cat([r["y"] for r in ranks]), whole["y"])
    assert torch.equal(torch.cat([r["grad_x"] for r in ranks]), whole["grad_x"])
    for r, got in enumerate(ranks):
        for name in ("grad_w1", "grad_w2"):
            want = whole[name][r * local:(r + 1) * local]
            if chunked:  # a sum of the chunks' sums: float32 rounding of the sum, at the gradient's scale
                scale = want.abs().max().item()
                torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6 * scale, msg=f"rank {r} {name}")
            else:
                assert torch.equal(got[name], want), f"rank {r} {name}"
        # what rank r received per (source, local expert) is the whole batch's count of each source's tokens
        assert int(got["counts"].sum()) == int(whole["counts"][0, r * local:(r + 1) * local].sum())
    # a sum over the ranks' partial sums against one sum over all tokens: float32 rounding at the gradient's scale
    scale = whole["grad_gate"].abs().max().item()
    torch.testing.assert_close(sum(r["grad_gate"] for r in ranks), whole["grad_gate"], rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(sum(r["aux"] for r in ranks), whole["aux"], rtol=1e-6, atol=0)


def test_bad_settings():
    with pytest.raises(ValueError, match="gate"):
        MoELayer(8, 8, 4, gate="hash")
    with pytest.raises(ValueError, match="topk"):
        MoELayer(8, 8, 4, topk=5)
    with pytest.raises(ValueError, match="exchange"):
        MoELayer(8, 8, 4, exchange="ring")
    for chunks in (0, 1.5, True):
        with pytest.raises(ValueError, match="chunks"):
            MoELayer(8, 8, 4, chunks=chunks)
    with pytest.raises(ValueError, match="x must be"):
        MoELayer(8, 8, 4)(torch.randn(3, 7))


def test_capacity_is_each_ranks_own():
    """With a capacity factor each rank drops within its own batch (Megatron-Core's per-micro-batch capacity): the
    output of rank r's tokens is that of one process running the layer on rank r's tokens alone."""
    torch.set_num_threads(1)
    settings = dict(gate="dense", topk=2, capacity_factor=0.5, aux_loss_coeff=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "init"), tmp, settings, WORLD, PER_NODE), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(WORLD)]
    x, upstream = inputs()
    for r, got in enumerate(ranks):
        block = slice(r * T // WORLD, (r + 1) * T // WORLD)
        alone = run(make_layer(settings), x[block], upstream[block])
        assert torch.equal(got["y"], alone["y"]), f"rank {r}"
        assert torch.equal(got["grad_x"], alone["grad_x"]), f"rank {r}"
        # bytes per link class: from the rank's own kept choices, experts in blocks (expert e on rank e // 2)
        kept = alone["counts"].reshape(-1).tolist()  # one process: kept rows per expert
        where = [e * WORLD // EXPERTS for e in range(EXPERTS)]
        same = sum(c for e, c in enumerate(kept) if where[e] == r)
        intra = sum(c for e, c in enumerate(kept) if where[e] != r and where[e] // PER_NODE == r // PER_NODE)
        row = HIDDEN * 4
        assert got["link_bytes"] == {"same_rank": same * row, "intra_node": intra * row,
                                     "inter_node": (sum(kept) - same - intra) * row}, f"rank {r}"
