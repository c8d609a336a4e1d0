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


def inputs(settings=None):
    g = torch.Generator().manual_seed(3)
    dtype = torch.float16 if settings and settings.get("half") else torch.float32
    return torch.randn(T, HIDDEN, generator=g).to(dtype), torch.randn(T, HIDDEN, generator=g).to(dtype)


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
        self.calls = 0
        gens = [torch.Generator().manual_seed(100 + e) for e in range(first, first + count)]
        self.weight = torch.nn.Parameter(torch.stack([torch.randn(HIDDEN, HIDDEN, generator=g) for g in gens]))
        self.bias = torch.nn.Parameter(torch.stack([torch.randn(HIDDEN, generator=g) for g in gens]))

    def forward(self, rows, counts):
        self.calls += 1
        if not rows.shape[0]:  # no rows: an output that needs no gradient (the layer must cope)
            return rows.new_zeros((0, HIDDEN))
        pieces = rows.split(counts)
        return torch.cat([torch.tanh(p @ self.weight[j] + self.bias[j]) for j, p in enumerate(pieces)])


def make_layer(settings, **kwargs):
    """The layer of `settings`; "skew" makes expert 0 win most tokens (with top-1 the other ranks get no rows);
    "custom" gives the layer BiasedExperts; "half": float16 tokens (inputs())."""
    settings = dict(settings)
    settings.pop("half", None)
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
    x, upstream = inputs(settings)
    block = slice(rank * T // world, (rank + 1) * T // world)
    result = run(layer, x[block], upstream[block])
    result["expert_calls"] = getattr(layer.experts, "calls", None)
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
    (dict(gate="grap", topk=1, chunks=5, custom=True, skew=True), WORLD, PER_NODE),
    (dict(gate="dense", topk=2, exchange="two_level", experts=12, chunks=3), 6, 2),
    (dict(gate="grap", topk=1, chunks=200), WORLD, PER_NODE),
    (dict(gate="dense", topk=2, chunks=3, half=True), WORLD, PER_NODE),
], ids=["grap-top1", "dense-top2", "dense-top2-two-level", "grap-top1-two-level-skewed", "3-nodes-of-2",
        "dense-top2-3-chunks", "grap-top2-two-level-4-chunks-skewed", "own-experts-two-level-2-chunks",
        "own-experts-5-chunks-skewed-empty", "3-nodes-of-2-3-chunks", "more-chunks-than-rows", "float16-3-chunks"])
def test_ranks_equal_one_process(settings, world, per_node):
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "init"), tmp, settings, world, per_node), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(world)]
    whole = run(make_layer(settings), *inputs(settings))  # one process: no exchange
    local = settings.get("experts", EXPERTS) // world
    chunked = settings.get("chunks", 1) > 1
    assert all(r["sub_groups"] == (settings.get("exchange") == "two_level") for r in ranks)
    if settings.get("skew") and settings.get("topk", 1) == 1:  # expert 0 takes every token: other ranks get no rows
        assert [int(r["counts"].sum()) for r in ranks] == [T, 0, 0, 0]
    if settings.get("custom"):  # the experts run once per chunk on every rank (once more in the one process: 1)
        assert [r["expert_calls"] for r in ranks] == [settings.get("chunks", 1)] * world
    assert torch.equal(torch.cat([r["y"] for r in ranks]), whole["y"])
    assert torch.equal(torch.cat([r["grad_x"] for r in ranks]), whole["grad_x"])
    for r, got in enumerate(ranks):
        for name in ("grad_w1", "grad_w2"):
            want, grad = whole[name][r * local:(r + 1) * local], got[name]
            if grad is None:  # no rows here and experts that then use no parameter: no gradient (the module's choice)
                assert settings.get("custom") and not int(got["counts"].sum()), f"rank {r} {name}: no gradient"
                grad = torch.zeros_like(want)
            if chunked:  # a sum of the chunks' sums: float32 rounding of the sum, at the gradient's scale
                scale = want.abs().max().item()
                torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6 * scale, msg=f"rank {r} {name}")
            else:
                assert torch.equal(grad, want), f"rank {r} {name}"
        # what rank r received per (source, local expert) is the whole batch's count of each source's tokens
        assert int(got["counts"].sum()) == int(whole["counts"][0, r * local:(r + 1) * local].sum())
    if settings.get("half"):
        return  # the gate's and the aux loss's sums in float16: compared bit for bit above where it holds
    # a sum over the ranks' partial sums against one sum over all tokens: float32 rounding at the gradient's scale
    scale = whole["grad_gate"].abs().max().item()
    torch.testing.assert_close(sum(r["grad_gate"] for r in ranks), whole["grad_gate"], rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(sum(r["aux"] for r in ranks), whole["aux"], rtol=1e-6, atol=0)


def retain_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    layer = make_layer(dict(gate="dense", topk=2, chunks=3))
    x, upstream = inputs()
    x = x[rank * T // 2:(rank + 1) * T // 2].clone().requires_grad_()
    y = layer(x)
    (y * upstream[:T // 2]).sum().backward(retain_graph=True)
    first = (x.grad.clone(), layer.experts.w1.grad.clone())
    (y * upstream[:T // 2]).sum().backward()  # again through the same graph: the gradients add up
    torch.save({"first": first, "second": (x.grad, layer.experts.w1.grad)}, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_backward_twice_with_retain_graph():
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(retain_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        for r in range(2):
            got = torch.load(os.path.join(tmp, f"{r}.pt"))
            for once, twice in zip(got["first"], got["second"]):
                assert torch.equal(twice, once * 2), f"rank {r}"


def test_bad_settings():
    with pytest.raises(ValueError, match="gate"):
        MoELayer(8, 8, 4, gate="switch")  # the gates are grap, dense, hash and rre
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
