"""locmoe_torch's fixed routers (Hash, RRE), the delta of a batch, the communication model and MoELayer's router and
capacity options, each against an independent computation in Python (issue 14)."""
import math
import os

import pytest
import torch

if os.environ.get("LOCMOE_TORCH_REQUIRED") != "1":
    pytest.importorskip("locmoe_torch")
import locmoe_torch as lt

MASK = (1 << 64) - 1


def splitmix64(x):
    """splitmix64's finalizer as Steele, Lea and Flood publish it (Python integers, wrapped to 64 bits)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def chosen(routing_map):
    assert routing_map.dtype == torch.bool and bool((routing_map.sum(dim=1) == 1).all())
    return routing_map.int().argmax(dim=1).tolist()


def test_hash_routing_is_splitmix_mod_n():
    ids = torch.tensor([0, 1, 2, 17, 8191, 2**40 + 3, 5, 5])
    for n, seed in ((8, 0), (16, 12345), (7, 2**63 - 1)):
        probs, routing_map = lt.hash_routing(ids, n, seed)
        assert chosen(routing_map) == [splitmix64(i ^ seed) % n for i in ids.tolist()]
        assert torch.equal(probs, routing_map.float())


def test_balanced_hash_table_and_its_routing():
    g = torch.Generator().manual_seed(3)
    freqs = torch.randint(0, 50, (40,), generator=g).tolist()
    n = 6
    load, table = [0] * n, [0] * len(freqs)
    for i in sorted(range(len(freqs)), key=lambda i: (-freqs[i], i)):  # the greedy of Roller et al.
        e = min(range(n), key=lambda e: (load[e], e))
        table[i], load[e] = e, load[e] + freqs[i]
    got = lt.balanced_hash_table(torch.tensor(freqs), n)
    assert got.tolist() == table
    ids = torch.tensor([3, 0, 39, 3])
    assert chosen(lt.hash_routing(ids, n, table=got)[1]) == [table[i] for i in ids.tolist()]
    with pytest.raises(ValueError, match="token_ids"):
        lt.hash_routing(torch.tensor([40]), n, table=got)
    with pytest.raises(ValueError, match="table"):
        lt.hash_routing(ids, 2, table=got)
    with pytest.raises(ValueError, match="frequencies"):
        lt.balanced_hash_table(torch.tensor([1.0, float("nan")]), n)


def test_rre_routing_groups_then_hash():
    ids = torch.arange(0, 300, 7)
    domains = ids % 3
    n, groups, seed = 8, 3, 99
    _, routing_map = lt.rre_routing(ids, domains, n, groups, seed)
    expect = []
    for i, g in zip(ids.tolist(), domains.tolist()):
        begin, end = g * n // groups, (g + 1) * n // groups
        expect.append(begin + splitmix64(i ^ seed) % (end - begin))
    assert chosen(routing_map) == expect
    with pytest.raises(ValueError, match="domains"):
        lt.rre_routing(ids, domains + 3, n, groups)
    with pytest.raises(ValueError, match="groups"):
        lt.rre_routing(ids, domains, n, 9)
    with pytest.raises(ValueError, match="token_ids"):
        lt.rre_routing(-ids - 1, domains, n, groups)


def test_grap_weights_are_the_gate():
    for d, n in ((12, 4), (10, 4), (7, 7), (130, 16)):
        x = torch.randn(9, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
        w = lt.grap_weights(d, n)
        assert torch.allclose(lt.grap_gating(x, n, relu=False), x @ w.T, rtol=1e-12, atol=1e-12)


def test_routed_cosines_and_delta_against_torch():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 24, dtype=torch.float64, generator=g)
    x[7] = 0  # no angle: left out
    w = torch.randn(6, 24, dtype=torch.float64, generator=g)
    expert = torch.randint(-1, 6, (200,), generator=g)
    keep = (expert >= 0) & (x.norm(dim=1) > 0)
    ref = torch.nn.functional.cosine_similarity(x[keep], w[expert[keep]], dim=1)
    got = lt.routed_cosines(x.float(), w, expert)  # float32 x is widened, not rounded further
    assert torch.allclose(got, torch.nn.functional.cosine_similarity(x.float().double()[keep], w[expert[keep]], dim=1),
                          rtol=0, atol=1e-12)
    assert torch.allclose(lt.routed_cosines(x, w, expert), ref, rtol=0, atol=1e-12)
    for q in (0.0, 0.05, 0.5, 1.0):
        assert lt.empirical_delta(ref, q) == pytest.approx(float(torch.quantile(ref, q)), abs=1e-15)
    with pytest.raises(ValueError, match="expert"):
        lt.routed_cosines(x, w, torch.full((200,), 6))
    with pytest.raises(ValueError, match="q"):
        lt.empirical_delta(ref, 1.5)
    with pytest.raises(ValueError, match="cosines"):
        lt.empirical_delta(torch.zeros(0, dtype=torch.float64))


def test_model_exchange_seconds_alpha_beta():
    one_way = torch.tensor([[0, 10**9], [0, 0]])
    # Ascend 910 links (exchange.hpp): intra 3.4 us + bytes / 18 GB/s, inter 9.6 us + bytes / 12.5 GB/s
    assert lt.model_exchange_seconds(one_way, 2) == pytest.approx(3.4e-6 + 1e9 / 18e9, rel=1e-12)
    assert lt.model_exchange_seconds(one_way, 1) == pytest.approx(9.6e-6 + 1e9 / 12.5e9, rel=1e-12)
    both = torch.tensor([[5, 10**9], [10**9, 7]])  # full duplex: the same time as one way; local bytes are free
    assert lt.model_exchange_seconds(both, 1) == pytest.approx(9.6e-6 + 1e9 / 12.5e9, rel=1e-12)
    assert lt.model_exchange_seconds(torch.zeros(4, 4, dtype=torch.int64), 2, "split_gather") == 0
    with pytest.raises(ValueError, match="scheme"):
        lt.model_exchange_seconds(one_way, 1, "ring")
    with pytest.raises(ValueError, match="send_bytes"):
        lt.model_exchange_seconds(-one_way, 1)
    with pytest.raises(ValueError, match="ranks_per_node"):
        lt.model_exchange_seconds(one_way, 3)


def expert_outputs(layer, x, experts):
    """y_t = FFN_{e_t}(x_t) from the layer's own weights, one token at a time."""
    w1, w2 = layer.experts.w1, layer.experts.w2
    return torch.stack([torch.relu(x[t] @ w1[e]) @ w2[e] for t, e in enumerate(experts)])


def test_moe_layer_hash_and_rre():
    torch.manual_seed(0)
    x = torch.randn(40, 16)
    ids = torch.arange(40) * 3
    domains = torch.arange(40) % 2
    layer = lt.MoELayer(16, 8, 4, gate="hash", seed=3)
    y = layer(x, token_ids=ids)
    experts = [splitmix64(i ^ 3) % 4 for i in ids.tolist()]
    assert torch.allclose(y, expert_outputs(layer, x, experts), rtol=1e-5, atol=1e-6)
    assert float(layer.aux_loss) == 0 and layer.last_load.tolist() == [experts.count(e) for e in range(4)]
    rre = lt.MoELayer(16, 8, 4, gate="rre", rre_groups=2, seed=3)
    y = rre(x, token_ids=ids, domains=domains)
    experts = [2 * g + splitmix64(i ^ 3) % 2 for i, g in zip(ids.tolist(), domains.tolist())]
    assert torch.allclose(y, expert_outputs(rre, x, experts), rtol=1e-5, atol=1e-6)
    y.sum().backward()  # gradients reach the experts
    assert rre.experts.w1.grad is not None
    with pytest.raises(ValueError, match="token_ids"):
        layer(x)
    with pytest.raises(ValueError, match="domains"):
        rre(x, token_ids=ids)
    with pytest.raises(ValueError, match="top-1"):
        lt.MoELayer(16, 8, 4, gate="hash", topk=2)
    with pytest.raises(ValueError, match="critical"):
        lt.MoELayer(16, 8, 4, gate="hash", capacity_factor="critical")
    with pytest.raises(ValueError, match="rre_groups"):
        lt.MoELayer(16, 8, 4, gate="rre", rre_groups=5)
    table = [3, 1, 2, 0] * 30  # through a table: expert = table[id]
    tabled = lt.MoELayer(16, 8, 4, gate="hash", hash_table=table, seed=3)
    assert torch.allclose(tabled(x, token_ids=ids), expert_outputs(tabled, x, [table[i] for i in ids.tolist()]),
                          rtol=1e-5, atol=1e-6)
    for kwargs, name in ((dict(gate="dense", hash_table=table), "hash_table"), (dict(gate="hash", rre_groups=2),
                         "rre_groups"), (dict(gate="dense", num_groups=2), "group_topk"),
                         (dict(gate="hash", num_groups=2, group_topk=1), "num_groups"),
                         (dict(gate="dense", drop_policy="bogus"), "drop_policy"),
                         (dict(gate="dense", capacity_factor="critical", delta_quantile="a"), "delta_quantile")):
        with pytest.raises(ValueError, match=name):
            lt.MoELayer(16, 8, 4, **kwargs)
    with pytest.raises(ValueError, match="drop_policy"):
        lt.megatron.drop_to_capacity(torch.ones(4, 2), torch.ones(4, 2, dtype=torch.bool), 10, "bogus")
    with pytest.raises(ValueError, match="seed"):
        lt.hash_routing(ids, 4, seed=-1)
    with pytest.raises(TypeError, match="send_bytes"):
        lt.model_exchange_seconds(torch.ones(2, 2), 1)


def test_moe_layer_node_limited_topk():
    torch.manual_seed(1)
    x = torch.randn(64, 16)
    layer = lt.MoELayer(16, 8, 8, topk=2, gate="dense", num_groups=4, group_topk=1, aux_loss_coeff=0)
    _, routing_map, logits = layer.route(x)
    groups = routing_map.view(64, 4, 2).any(dim=2).sum(dim=1)
    assert bool((groups == 1).all())  # both choices inside one group of 2 experts
    # the group of each token is the one with the highest top-2 sum of logits (Megatron-Core's group score)
    best = logits.view(64, 4, 2).sum(dim=2).argmax(dim=1)
    assert torch.equal(routing_map.view(64, 4, 2).any(dim=2).int().argmax(dim=1), best)


@pytest.mark.parametrize("gate", ["grap", "dense"])
def test_moe_layer_critical_capacity(gate):
    torch.manual_seed(2)
    x = torch.randn(256, 32).abs()  # positive activations: positive cosines to GrAP's block means
    layer = lt.MoELayer(32, 8, 4, gate=gate, capacity_factor="critical", delta_quantile=0.05, aux_loss_coeff=0)
    if gate == "dense":
        with torch.no_grad():
            layer.gate_weight.abs_()
    probs, routing_map, _ = layer.route(x)
    y = layer(x)
    first = routing_map.int().argmax(dim=1)
    w = lt.grap_weights(32, 4) if gate == "grap" else layer.gate_weight.detach().double()
    cos = torch.nn.functional.cosine_similarity(x.double(), w[first], dim=1)
    delta = float(torch.quantile(cos.abs(), 0.05))  # both caps, as the calculator counts (eq. 8)
    assert layer.last_negative_share == float((cos < 0).double().mean())
    assert layer.last_delta == pytest.approx(delta, abs=1e-12)
    assert layer.last_capacity == lt.critical_capacity(32, 4, delta)
    load = routing_map.sum(dim=0)
    assert layer.last_dropped == int((load - load.clamp(max=layer.last_capacity)).sum())
    # top-1 probs are all 1, so the "probs" policy keeps each expert's first `capacity` tokens (ties: lower index)
    seen, kept = [0] * 4, torch.zeros(256, dtype=torch.bool)
    for t, e in enumerate(first.tolist()):
        kept[t], seen[e] = seen[e] < layer.last_capacity, seen[e] + 1
    assert torch.allclose(y[kept], expert_outputs(layer, x[kept], first[kept].tolist()), rtol=1e-5, atol=1e-6)
    assert bool((y[~kept] == 0).all()) and int((~kept).sum()) == layer.last_dropped
    assert gate == "dense" or layer.last_dropped > 0  # GrAP's cosines are small here: the bound drops tokens
    flipped = layer(-x if gate == "grap" else x * 0 - 1)  # every routed cosine negative: |cos| still gives delta
    assert layer.last_negative_share == 1.0 and layer.last_delta > 0 and flipped.shape == x.shape
    if gate == "grap":  # +1, -1 in every block: every block mean is 0, so is every cosine and delta
        with pytest.raises(ValueError, match="delta"):
            layer(torch.tensor([1.0, -1.0]).repeat(10, 16))


def critical_worker(rank, init_file, out_dir):
    import datetime
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    torch.manual_seed(rank)
    layer = lt.MoELayer(32, 8, 4, gate="grap", capacity_factor="critical", aux_loss_coeff=0)
    x = torch.randn(64 + 64 * rank, 32).abs() * (rank + 1)  # each rank its own tokens and count
    layer(x)
    outcome = [layer.last_delta, layer.last_capacity]
    try:  # +1, -1 in every block: every cosine 0 on both ranks, so both raise (neither waits for the other)
        layer(torch.tensor([1.0, -1.0]).repeat(8, 16))
        outcome.append("no error")
    except ValueError as e:
        outcome.append(str(e))
    torch.save(outcome, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_critical_capacity_is_the_same_on_every_rank(tmp_path):
    torch.multiprocessing.spawn(critical_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert first[:2] == second[:2] and first[1] >= 1  # one delta, one capacity, from both ranks' cosines
    assert "delta" in first[2] and first[2] == second[2]
