"""locmoe_torch's Megatron-Core functions against plain-torch references written here (Megatron-Core's semantics,
with ties broken by the lower index as locmoe does), against torch.autograd.gradcheck in float64, against the
peers' golden data (../shared/golden/peers/mcore_*; skipped without it, unless LOCMOE_GOLDEN_REQUIRED=1), and with
bad arguments.

Run by ctest with PYTHONPATH=<build>/python (tests/torch/CMakeLists.txt).
"""
import json
import math
import os

import pytest
import torch

import locmoe_torch as lt

REQUIRED = os.environ.get("LOCMOE_TORCH_REQUIRED") == "1"
GOLDEN = os.environ.get("LOCMOE_GOLDEN_DIR", "")
PEERS = os.path.join(GOLDEN, "peers") if GOLDEN else ""

ROUTINGS = [  # (topk, use_pre_softmax, num_groups, group_topk, scaling_factor, score_function, bias)
    (1, False, None, None, None, "softmax", False),
    (2, False, None, None, None, "softmax", False),
    (2, True, None, None, None, "softmax", False),
    (3, True, None, None, 2.5, "softmax", False),
    (4, False, 4, 2, None, "softmax", False),
    (1, False, None, None, None, "sigmoid", False),
    (2, False, None, None, None, "sigmoid", True),
    (4, False, 4, 2, 1.5, "sigmoid", True),
]


# ---- plain-torch references ----------------------------------------------------------------------------------------

def ref_route(logits, topk, pre, groups, group_topk, scale, score, bias):
    """Megatron-Core's topk_routing_with_score_function, in plain torch (no ties in the tests' inputs)."""
    T, n = logits.shape
    S = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logit = logits.to(S)
    if score == "softmax":
        scores = torch.softmax(logit, dim=-1) if pre else logit
        key = scores
    else:
        scores = torch.sigmoid(logit)
        key = scores + bias.to(S) if bias is not None else scores
    if group_topk:
        group_scores = key.view(T, groups, -1).topk(max(1, topk // group_topk), dim=-1).values.sum(dim=-1)
        kept = torch.zeros_like(group_scores).scatter(1, group_scores.topk(group_topk, dim=-1).indices, 1).bool()
        key = key.masked_fill(~kept.repeat_interleave(n // groups, dim=1), float("-inf"))
    chosen = key.topk(topk, dim=-1).indices
    picked = scores.gather(1, chosen)
    if score == "softmax":
        probs = picked if pre else torch.softmax(picked, dim=-1)
    else:
        probs = picked / (picked.sum(dim=-1, keepdim=True) + 1e-20) if topk > 1 else picked
    if scale:
        probs = probs * scale
    probs = probs.to(logits.dtype)
    return (torch.zeros_like(logits).scatter(1, chosen, probs),
            torch.zeros(T, n, dtype=torch.bool).scatter(1, chosen, True))


def ref_drop(probs, routing_map, topk, cf, policy, pad):
    T, n = probs.shape
    capacity = math.ceil((T * topk / n) * cf)
    if capacity > T:
        mask = torch.ones(T, n, dtype=torch.bool)
    else:
        key = (probs if policy == "probs" else routing_map).double()
        order = torch.sort(key, dim=0, descending=True, stable=True).indices[:capacity]  # ties: lower token
        mask = torch.zeros(T, n, dtype=torch.bool).scatter(0, order, True)
    final = mask if pad else routing_map & mask
    return probs * final, final


def ref_permute(tokens, routing_map, probs, rows, pad):
    T, n = routing_map.shape
    if pad:
        capacity = rows // n
        order = torch.sort(routing_map.T.int(), dim=-1, descending=True, stable=True).indices[:, :capacity]
        sorted_indices, row_expert = order.reshape(-1), torch.arange(n).repeat_interleave(capacity)
    else:
        flat = torch.sort(routing_map.T.reshape(-1).int(), descending=True, stable=True).indices[:rows]
        sorted_indices, row_expert = flat % T, flat // T
    permuted_probs = probs[sorted_indices, row_expert] if probs is not None else None
    return tokens.index_select(0, sorted_indices), permuted_probs, sorted_indices


def ref_unpermute(permuted, sorted_indices, shape, probs, routing_map, pad):
    dtype = permuted.dtype
    if probs is not None:
        n = probs.shape[1]
        if pad:
            row_expert = torch.arange(permuted.shape[0]) // (permuted.shape[0] // n)
            weights = probs[sorted_indices, row_expert]
        else:
            weights = probs.T.contiguous().masked_select(routing_map.T.contiguous())
        permuted = permuted * weights.unsqueeze(-1)
    return torch.zeros(shape, dtype=permuted.dtype).index_add(0, sorted_indices, permuted).to(dtype)


def tolerance(dtype):
    return {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 1e-6),
            torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}[dtype]


def close(ours, theirs, dtype, what):
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def routing_args(cfg, n, seed=1):
    topk, pre, groups, group_topk, scale, score, bias = cfg
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=g) * 0.3 if bias else None
    return dict(topk=topk, use_pre_softmax=pre, num_groups=groups, group_topk=group_topk, scaling_factor=scale,
                score_function=score, expert_bias=b)


# ---- routing --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", ROUTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_routing_matches_reference(cfg, dtype):
    torch.manual_seed(2)
    logits = (torch.randn(67, 16) * 2).to(dtype).requires_grad_()
    args = routing_args(cfg, 16)
    probs, routing_map = lt.topk_routing_with_score_function(logits, **args)
    assert probs.dtype == dtype and routing_map.dtype == torch.bool and probs.shape == (67, 16)
    ref_logits = logits.detach().clone().requires_grad_()
    ref_probs, ref_map = ref_route(ref_logits, args["topk"], args["use_pre_softmax"], args["num_groups"],
                                   args["group_topk"], args["scaling_factor"], args["score_function"],
                                   args["expert_bias"])
    assert torch.equal(routing_map, ref_map)
    close(probs, ref_probs, dtype, "probs")
    upstream = torch.randn(67, 16).to(dtype)
    (probs * upstream).sum().backward()
    (ref_probs * upstream).sum().backward()
    close(logits.grad, ref_logits.grad, dtype, "grad logits")


@pytest.mark.parametrize("cfg", ROUTINGS)
def test_routing_gradcheck(cfg):
    torch.manual_seed(3)
    logits = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    args = routing_args(cfg, 16)
    if args["expert_bias"] is not None:
        args["expert_bias"] = args["expert_bias"].double()
    assert torch.autograd.gradcheck(lambda l: lt.topk_routing_with_score_function(l, **args)[0], (logits,))


def test_routing_ties_go_to_the_lower_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    _, routing_map = lt.topk_routing_with_score_function(logits, 2)
    assert routing_map.tolist() == [[False, True, True, False], [True, True, False, False]]
    probs, indices = lt.topk_routing_with_score_function(logits, 2, dense_output=True)
    assert indices.tolist() == [[1, 2], [0, 1]] and probs.shape == (2, 2)


def test_routing_invalid_token_routes_nowhere():
    logits = torch.randn(3, 4)
    logits[1, 2] = float("nan")
    probs, routing_map = lt.topk_routing_with_score_function(logits, 2)
    assert not routing_map[1].any() and not probs[1].any() and routing_map[0].sum() == 2


# ---- losses ---------------------------------------------------------------------------------------------------------

def test_aux_loss_matches_formula_and_gradcheck():
    torch.manual_seed(4)
    probs = torch.rand(20, 8, dtype=torch.float64, requires_grad=True)
    tpe = torch.randint(0, 6, (8,))
    loss = lt.switch_load_balancing_loss_func(probs, tpe, 20, 2, 8, 0.01)
    expected = 0.01 * 8 / (2 * 20 * 20) * sum(probs[:, e].sum() * tpe[e] for e in range(8))
    torch.testing.assert_close(loss, expected)
    assert torch.autograd.gradcheck(lambda p: lt.switch_load_balancing_loss_func(p, tpe, 20, 2, 8, 0.01), (probs,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_z_loss_matches_reference(dtype):
    torch.manual_seed(5)
    logits = (torch.randn(33, 8) * 3).to(dtype).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    loss = lt.z_loss_func(logits, 1e-3)
    ref = torch.logsumexp(ref_logits.float() if dtype != torch.float64 else ref_logits, dim=-1).square().mean() * 1e-3
    close(loss, ref, dtype, "z loss")
    loss.backward()
    ref.backward()
    close(logits.grad, ref_logits.grad, dtype, "z loss grad")
    assert loss.dtype == dtype


def test_z_loss_gradcheck_and_padding():
    torch.manual_seed(6)
    logits = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: lt.z_loss_func(l, 0.5), (logits,))
    padding = torch.zeros(10, dtype=torch.bool)
    padding[[1, 7]] = True
    masked = lt.z_loss_func(logits, 0.5, padding_mask=padding)
    expected = torch.logsumexp(logits[~padding], dim=-1).square().sum() / 8 * 0.5
    torch.testing.assert_close(masked, expected)


# ---- capacity and token dropping --------------------------------------------------------------------------------

def test_get_capacity_is_megatrons_expression():
    assert lt.get_capacity(100, 10, 1.1) == math.ceil((100 / 10) * 1.1)
    assert lt.get_capacity(4096, 64, 1.25) == 80
    assert lt.get_capacity(10, 64, 1.0, min_capacity=4) == 4
    with pytest.raises(ValueError, match="capacity_factor"):
        lt.get_capacity(10, 4, -1.0)
    with pytest.raises(ValueError, match="num_experts"):
        lt.get_capacity(10, 0, 1.0)


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("cf", [0.5, 1.0, 1.3, 4.0])
def test_token_dropping_matches_reference(policy, pad, cf):
    torch.manual_seed(7)
    logits = torch.randn(40, 8, requires_grad=True)
    probs, routing_map = lt.topk_routing_with_score_function(logits, 2)
    final_probs, final_map = lt.apply_router_token_dropping(probs, routing_map, 2, cf, policy, pad)
    ref_probs, ref_map = ref_drop(probs.detach(), routing_map, 2, cf, policy, pad)
    assert torch.equal(final_map, ref_map)
    assert torch.equal(final_probs.detach(), ref_probs)
    final_probs.sum().backward()  # gradient reaches the logits through the kept probs only
    assert logits.grad is not None


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_dropping_ties_zeros_and_negative_keys(policy, pad, dtype):
    g = torch.Generator().manual_seed(12)
    probs = (torch.randint(-2, 3, (50, 6), generator=g).float() / 4).to(dtype)  # ties, zeros, negatives
    routing_map = torch.rand(50, 6, generator=g) < 0.3
    for cf in (0.1, 0.2, 0.7, 1.0, 2.0, 3.0):
        final_probs, final_map = lt.apply_router_token_dropping(probs, routing_map, 2, cf, policy, pad)
        ref_probs, ref_map = ref_drop(probs, routing_map, 2, cf, policy, pad)
        assert torch.equal(final_map, ref_map), cf
        assert torch.equal(final_probs, ref_probs), cf


def test_token_dropping_gradcheck():
    torch.manual_seed(8)
    logits = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)

    def dropped(l):
        probs, routing_map = lt.topk_routing_with_score_function(l, 2, use_pre_softmax=True)
        return lt.apply_router_token_dropping(probs, routing_map, 2, 1.0)[0]
    assert torch.autograd.gradcheck(dropped, (logits,))


# ---- permute and unpermute ----------------------------------------------------------------------------------------

def routed(T=30, n=6, k=2, cf=None, pad=False, seed=9, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, n, generator=g, dtype=torch.float64).to(dtype)
    probs, routing_map = lt.topk_routing_with_score_function(logits, k)
    if cf is not None:
        probs, routing_map = lt.apply_router_token_dropping(probs, routing_map, k, cf, "probs", pad)
    return probs.detach(), routing_map


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["dropless", "drop", "pad"])
def test_permute_unpermute_match_reference(dtype, case):
    pad = case == "pad"
    probs, routing_map = routed(cf=None if case == "dropless" else 0.8, pad=pad, dtype=dtype)
    torch.manual_seed(10)
    tokens = torch.randn(30, 24).to(dtype)
    rows = int(routing_map.sum())
    permuted, permuted_probs, sorted_indices, pad_offsets, tpe = lt.permute(tokens, routing_map, probs, rows,
                                                                            drop_and_pad=pad)
    ref_permuted, ref_pp, ref_indices = ref_permute(tokens, routing_map, probs, rows, pad)
    assert pad_offsets is None and tpe is None
    assert torch.equal(sorted_indices, ref_indices) and torch.equal(permuted, ref_permuted)
    assert torch.equal(permuted_probs, ref_pp)
    y = lt.unpermute(permuted * 1.5, sorted_indices, tokens.shape, probs, routing_map, drop_and_pad=pad)
    ref_y = ref_unpermute(ref_permuted * 1.5, ref_indices, tokens.shape, probs, routing_map, pad)
    assert y.dtype == dtype
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(y, ref_y), "unpermute adds the same products in the same order"
    else:  # locmoe sums 16-bit rows in float, rounded once; Megatron-Core rounds each product and sum
        close(y, ref_y, dtype, "unpermute")
    plain = lt.unpermute(permuted, sorted_indices, tokens.shape)
    assert torch.equal(plain, ref_unpermute(ref_permuted, ref_indices, tokens.shape, None, None, pad))


@pytest.mark.parametrize("case", ["dropless", "pad"])
def test_permute_unpermute_gradients(case):
    pad = case == "pad"
    probs, routing_map = routed(cf=None if case == "dropless" else 1.0, pad=pad, dtype=torch.float64)
    torch.manual_seed(11)
    tokens = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    probs = probs.requires_grad_()
    rows = int(routing_map.sum())

    def step(x, p, permute_fn, unpermute_fn):
        permuted, permuted_probs, sorted_indices = permute_fn(x, routing_map, p, rows, pad)[:3]
        y = unpermute_fn(permuted * 1.5 + permuted_probs.unsqueeze(-1), sorted_indices, x.shape, p, routing_map, pad)
        return y

    ours = step(tokens, probs, lambda *a: lt.permute(*a[:4], drop_and_pad=a[4]),
                lambda *a: lt.unpermute(*a[:5], drop_and_pad=a[5]))
    ref_tokens = tokens.detach().clone().requires_grad_()
    ref_probs = probs.detach().clone().requires_grad_()
    ref = step(ref_tokens, ref_probs, ref_permute, ref_unpermute)
    upstream = torch.randn_like(ours)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(tokens.grad, ref_tokens.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probs.grad, ref_probs.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, p: step(x, p, lambda *a: lt.permute(*a[:4], drop_and_pad=a[4]),
                          lambda *a: lt.unpermute(*a[:5], drop_and_pad=a[5])), (tokens, probs))


def test_permute_reads_strided_tokens():
    probs, routing_map = routed()
    wide = torch.randn(30, 48)
    tokens = wide[:, ::2]  # column stride 2: copied once
    rows = int(routing_map.sum())
    permuted = lt.permute(tokens, routing_map, num_out_tokens=rows)[0]
    assert torch.equal(permuted, ref_permute(tokens, routing_map, None, rows, False)[0])
    sliced = wide[:, 8:32]  # row stride 48, unit column stride: read in place
    permuted = lt.permute(sliced, routing_map, num_out_tokens=rows)[0]
    assert torch.equal(permuted, ref_permute(sliced, routing_map, None, rows, False)[0])


def test_permute_num_out_tokens_cuts_and_extends_like_megatron():
    probs, routing_map = routed(T=7, n=3)
    tokens = torch.randn(7, 4)
    for rows in (0, 5, int(routing_map.sum()), 21):
        ours = lt.permute(tokens, routing_map, probs, rows)
        ref = ref_permute(tokens, routing_map, probs, rows, False)
        assert torch.equal(ours[2], ref[2]) and torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


# ---- bad arguments -------------------------------------------------------------------------------------------------

def test_bad_arguments_raise_named_errors():
    logits = torch.randn(5, 4)
    with pytest.raises(ValueError, match="topk"):
        lt.topk_routing_with_score_function(logits, 5)
    with pytest.raises(ValueError, match="topk"):
        lt.topk_routing_with_score_function(logits, 0)
    with pytest.raises(TypeError, match="logits"):
        lt.topk_routing_with_score_function(logits.int(), 1)
    with pytest.raises(ValueError, match="logits"):
        lt.topk_routing_with_score_function(torch.randn(4), 1)
    with pytest.raises(ValueError, match="score_function"):
        lt.topk_routing_with_score_function(logits, 1, score_function="relu")
    with pytest.raises(ValueError, match="num_groups"):
        lt.topk_routing_with_score_function(logits, 2, group_topk=1)
    with pytest.raises(ValueError, match="expert_bias"):
        lt.topk_routing_with_score_function(logits, 1, score_function="sigmoid", expert_bias=torch.zeros(3))
    probs, routing_map = lt.topk_routing_with_score_function(logits, 2)
    with pytest.raises(ValueError, match="drop_policy"):
        lt.apply_router_token_dropping(probs, routing_map, 2, 1.0, drop_policy="random")
    with pytest.raises(ValueError, match="routing_map"):
        lt.apply_router_token_dropping(probs, routing_map[:3], 2, 1.0)
    with pytest.raises(ValueError, match="num_out_tokens"):
        lt.permute(torch.randn(5, 3), routing_map, num_out_tokens=-1)
    with pytest.raises(ValueError, match="routing_map"):
        lt.permute(torch.randn(6, 3), routing_map, num_out_tokens=4)
    with pytest.raises(ValueError, match="sorted_indices"):
        lt.unpermute(torch.randn(3, 2), torch.tensor([0, 9, 1]), (5, 2))
    with pytest.raises(ValueError, match="hidden"):
        lt.unpermute(torch.randn(3, 2), torch.tensor([0, 1, 1]), (5, 3))
    with pytest.raises(ValueError, match="routing_map"):
        lt.unpermute(torch.randn(3, 2), torch.tensor([0, 1, 1]), (5, 2), probs=probs)
    with pytest.raises(ValueError, match="delta"):
        lt.critical_capacity(4096, 64, 1.5)


def test_capacity_calculator():
    assert lt.critical_capacity(4096, 64, 0.1) >= 1
    p = lt.p_delta(4096, 0.05)
    assert 0 < p < 1
    delta = lt.max_delta_for_capacity(4096, 64, 8.0)
    assert lt.critical_capacity(4096, 64, delta) <= 8


# ---- golden data (Megatron-Core's own outputs) -------------------------------------------------------------------

def golden_cases(folder):
    path = os.path.join(PEERS, folder)
    if not PEERS or not os.path.isdir(path):
        if os.environ.get("LOCMOE_GOLDEN_REQUIRED") == "1":
            pytest.fail(f"golden data required but {path} is missing")
        pytest.skip("golden data not present (LOCMOE_GOLDEN_DIR)")
    return [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".json") and f != "MANIFEST.json"]


def load(case_json, name):
    import numpy as np
    return torch.from_numpy(np.load(os.path.join(os.path.dirname(case_json), name)))


def test_golden_routing_and_dropping():
    checked = 0
    for case in golden_cases("mcore_routing"):
        data = json.load(open(case))
        logits = load(case, data["inputs"]["logits"]["file"])
        bias_file = os.path.basename(case).replace(".json", ".expert_bias.npy")
        ties = set(data.get("inputs_exact_tie_tokens") or [])
        for routing in data["routings"]:
            p = routing["params"]
            if p["score_function"] == "sqrtsoftplus" or (p["group_topk"] and p["topk"] // p["group_topk"] == 0):
                continue  # not supported / Megatron scores every group 0 (torch.topk's tie order decides)
            bias = load(case, bias_file) if p["expert_bias"] else None
            probs, routing_map = lt.topk_routing_with_score_function(
                logits, p["topk"], p["use_pre_softmax"], p["num_groups"], p["group_topk"], p["scaling_factor"],
                p["score_function"], bias)
            tie_tokens = set(routing["topk_tie_tokens"] or []) | ties
            for t, experts in enumerate(routing["topk_experts"]):
                if t in tie_tokens:
                    continue
                assert torch.nonzero(routing_map[t]).flatten().tolist() == experts, f"{case} token {t}"
                torch.testing.assert_close(probs[t, experts].double(), torch.tensor(routing["topk_probs"][t],
                                           dtype=torch.float64), rtol=2e-6, atol=1e-7)
                checked += 1
            if tie_tokens:
                continue
            for drop in routing["drops"]:
                if not drop["kept_routed_well_defined"]:
                    continue
                final_probs, final_map = lt.apply_router_token_dropping(
                    probs, routing_map, p["topk"], drop["capacity_factor"], drop["drop_policy"],
                    drop["pad_to_capacity"])
                assert final_map.sum(0).tolist() == drop["tokens_per_expert_after"], case
                whole = drop["final_map_well_defined"]  # padding included; else only the routed entries
                ours = final_map if whole else final_map & routing_map
                for t, experts in enumerate(drop["final_experts"]):
                    theirs = experts if whole else [e for e in experts if routing_map[t, e]]
                    assert torch.nonzero(ours[t]).flatten().tolist() == theirs, f"{case} drop token {t}"
                    torch.testing.assert_close(final_probs[t, experts].double(), torch.tensor(
                        drop["final_probs"][t], dtype=torch.float64), rtol=2e-6, atol=1e-7)
                checked += 1
    assert checked > 100


def test_golden_aux_loss():
    checked = 0
    for case in golden_cases("mcore_aux_loss"):
        data = json.load(open(case))
        for r in data["results"]:
            if r["padding_mask"] or r["topk_tie_tokens"]:
                continue
            logits = load(case, data["inputs"]["logits"]["file"]).requires_grad_()
            if r["score_function"] == "softmax":
                scores = torch.softmax(logits, dim=-1)
            else:
                s = torch.sigmoid(logits)
                scores = s / (s.sum(-1, keepdim=True) + 1e-20)
            routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, scores.topk(r["topk"]).indices, True)
            tpe = routing_map.sum(0)
            assert tpe.tolist() == r["tokens_per_expert"]
            loss = lt.switch_load_balancing_loss_func(scores, tpe, r["total_num_tokens"], r["topk"],
                                                      logits.shape[1], r["coeff"])
            loss.backward()
            assert math.isclose(loss.item(), r["loss"], rel_tol=2e-6)
            torch.testing.assert_close(logits.grad.double(), torch.tensor(r["grad"], dtype=torch.float64),
                                       rtol=1e-5, atol=1e-9)
            checked += 1
    assert checked > 0


def test_golden_z_loss():
    checked = 0
    for case in golden_cases("mcore_z_loss"):
        data = json.load(open(case))
        for r in data["results"]:
            if r["padding_mask"]:
                continue
            for suffix, dtype, rtol in (("", torch.float32, 2e-6), ("_f64", torch.float64, 1e-13)):
                logits = load(case, data["inputs"]["logits"]["file"]).to(dtype).requires_grad_()
                loss = lt.z_loss_func(logits, r["coeff"])
                loss.backward()
                assert math.isclose(loss.item(), r["z_loss" + suffix], rel_tol=rtol), case
                torch.testing.assert_close(logits.grad.double(), torch.tensor(r["grad" + suffix], dtype=torch.float64),
                                           rtol=rtol * 10, atol=1e-12)
                checked += 1
    assert checked > 0


def test_golden_permute_unpermute():
    checked = 0
    for case in golden_cases("mcore_permute"):
        data = json.load(open(case))
        if not data["kept_identity_well_defined"]:
            continue
        s = data["settings"]
        for suffix, dtype, rtol in (("", torch.float32, 2e-6), ("_f64", torch.float64, 1e-6)):
            out = {k: load(case, v) for k, v in data["outputs"].items() if k.endswith("_f64") == bool(suffix)}
            out = {k.replace("_f64", ""): v for k, v in out.items()}
            logits = load(case, data["inputs"]["logits"]).to(dtype).requires_grad_()
            tokens = load(case, data["inputs"]["tokens"]).to(dtype).requires_grad_()
            upstream = load(case, data["inputs"]["upstream"]).to(dtype)
            probs, routing_map = lt.topk_routing_with_score_function(logits, s["topk"], s["use_pre_softmax"])
            if s.get("capacity_factor"):
                probs, routing_map = lt.apply_router_token_dropping(probs, routing_map, s["topk"],
                                                                    s["capacity_factor"], s["drop_policy"],
                                                                    s["pad_to_capacity"])
            pad = s["pad_to_capacity"]
            if data["padding_identity_well_defined"]:
                assert torch.equal(routing_map, out["routing_map"].bool()), case
            else:  # which unrouted tokens pad an expert is torch.topk's tie order: compare the routed entries
                assert torch.equal(routing_map & (probs != 0), out["routing_map"].bool() & (out["probs"] != 0)), case
            torch.testing.assert_close(probs.detach().double(), out["probs"].double(), rtol=rtol, atol=1e-7)
            permuted, permuted_probs, sorted_indices, _, _ = lt.permute(tokens, routing_map, probs,
                                                                        routing_map.sum(), drop_and_pad=pad)
            if data["padding_identity_well_defined"]:
                assert torch.equal(sorted_indices, out["sorted_indices"]), case
                assert torch.equal(permuted.detach(), out["permuted_tokens"].to(dtype)), case
                torch.testing.assert_close(permuted_probs.detach().double(), out["permuted_probs"].double(),
                                           rtol=rtol, atol=1e-7)
            y = lt.unpermute(permuted * s["scale_before_unpermute"], sorted_indices, tokens.shape, probs,
                             routing_map, drop_and_pad=pad)
            torch.testing.assert_close(y.detach().double(), out["unpermuted"].double(), rtol=rtol * 4, atol=1e-6)
            (y * upstream).sum().backward()
            torch.testing.assert_close(tokens.grad.double(), out["grad_tokens"].double(), rtol=rtol * 4, atol=1e-6)
            torch.testing.assert_close(logits.grad.double(), out["grad_logits"].double(), rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("case", ["dropless", "pad"])
def test_unpermute_without_permutes_cache_and_after_in_place_changes(case):
    """unpermute reuses what permute found when given permute's own sorted_indices and map; a copy of them, or
    tensors changed in place since, are read afresh, with the same (or the changed) result."""
    pad = case == "pad"
    probs, routing_map = routed(cf=None if case == "dropless" else 0.8, pad=pad)
    tokens = torch.randn(30, 8)
    rows = int(routing_map.sum())
    permuted, _, sorted_indices, _, _ = lt.permute(tokens, routing_map, probs, rows, drop_and_pad=pad)
    cached = lt.unpermute(permuted, sorted_indices, tokens.shape, probs, routing_map, drop_and_pad=pad)
    fresh = lt.unpermute(permuted, sorted_indices.clone(), tokens.shape, probs, routing_map.clone(), drop_and_pad=pad)
    assert torch.equal(cached, fresh)
    assert torch.equal(cached, ref_unpermute(permuted, sorted_indices, tokens.shape, probs, routing_map, pad))
    version = sorted_indices._version
    sorted_indices.add_(0)  # written in place: what permute found is not trusted any more
    assert sorted_indices._version != version
    again = lt.unpermute(permuted, sorted_indices, tokens.shape, probs, routing_map, drop_and_pad=pad)
    assert torch.equal(again, cached)
    routing_map.logical_and_(routing_map)
    again = lt.unpermute(permuted, sorted_indices, tokens.shape, probs, routing_map, drop_and_pad=pad)
    assert torch.equal(again, cached)


# ---- LocMoE's own: GrAP gate and locality loss -----------------------------------------------------------------

def ref_grap(hidden, n, bias, relu):
    d = hidden.shape[1]
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    x = hidden.to(dtype)
    bounds = [i * d // n for i in range(n + 1)]
    logits = torch.stack([x[:, bounds[i]:bounds[i + 1]].mean(dim=1) for i in range(n)], dim=1)
    if bias is not None:
        logits = logits + bias.to(dtype)
    return torch.relu(logits) if relu else logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("d,n", [(64, 8), (70, 8), (9, 9)])
@pytest.mark.parametrize("relu", [True, False])
def test_grap_gating_matches_reference(dtype, d, n, relu):
    torch.manual_seed(13)
    hidden = torch.randn(37, d).to(dtype).requires_grad_()
    bias = (torch.randn(n) * 0.1).requires_grad_()
    logits = lt.grap_gating(hidden, n, bias, relu)
    ref_hidden = hidden.detach().clone().requires_grad_()
    ref_bias = bias.detach().clone().requires_grad_()
    ref = ref_grap(ref_hidden, n, ref_bias, relu)
    assert logits.dtype == ref.dtype
    close(logits, ref, torch.float64 if dtype == torch.float64 else torch.float32, "grap logits")
    upstream = torch.randn_like(ref)
    (logits * upstream).sum().backward()
    (ref * upstream).sum().backward()
    close(hidden.grad, ref_hidden.grad, dtype, "grap grad hidden")
    close(bias.grad, ref_bias.grad, torch.float32, "grap grad bias")


def test_grap_gating_gradcheck_and_errors():
    torch.manual_seed(14)
    hidden = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, b: lt.grap_gating(h, 4, b, relu=False), (hidden, bias))
    with pytest.raises(ValueError, match="num_experts"):
        lt.grap_gating(hidden, 11)
    with pytest.raises(ValueError, match="bias"):
        lt.grap_gating(hidden, 4, torch.zeros(3))


def ref_locality(probs, routing_map, ranks, per_node, rank, coeff, eps):
    n = probs.shape[1]
    node = rank // per_node
    local = torch.tensor([((e * ranks) // n) // per_node == node for e in range(n)], dtype=probs.dtype)
    target = (1 - eps) * local / local.sum() + eps / n
    mean = probs[routing_map.any(dim=1)].mean(dim=0)
    return coeff * (mean * (mean / target).log()).sum()


@pytest.mark.parametrize("ranks,per_node,rank", [(4, 2, 0), (4, 2, 3), (8, 4, 5), (1, 1, 0)])
def test_locality_loss_matches_reference_and_gradcheck(ranks, per_node, rank):
    torch.manual_seed(15)
    logits = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    routing_map = torch.rand(20, 8) < 0.3
    routing_map[3] = False  # a token that does not route is left out

    def loss(l, ref=False):
        probs = torch.softmax(l, dim=-1)
        fn = ref_locality if ref else lt.locality_loss_func
        return fn(probs, routing_map, ranks, per_node, rank, 0.1, 0.01)
    torch.testing.assert_close(loss(logits), loss(logits, ref=True), rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(loss, (logits,))
    with pytest.raises(ValueError, match="rank"):
        lt.locality_loss_func(torch.softmax(logits, -1), routing_map, ranks, per_node, ranks, 0.1)


# ---- several threads, large batches, inference mode, fork, and the operators' own checks -----------------------

@pytest.fixture
def four_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cfg", [ROUTINGS[1], ROUTINGS[2], ROUTINGS[6]])
def test_many_token_ranges_on_four_threads(four_threads, cfg):
    """T = 4096 splits every operator into several token ranges on the pool: the same results as the reference."""
    torch.manual_seed(16)
    logits = torch.randn(4096, 16, requires_grad=True)
    args = routing_args(cfg, 16)
    probs, routing_map = lt.topk_routing_with_score_function(logits, **args)
    ref_logits = logits.detach().clone().requires_grad_()
    ref_probs, ref_map = ref_route(ref_logits, args["topk"], args["use_pre_softmax"], None, None,
                                   args["scaling_factor"], args["score_function"], args["expert_bias"])
    assert torch.equal(routing_map, ref_map)
    close(probs, ref_probs, torch.float32, "probs")
    aux_map, scores = lt.compute_routing_scores_for_aux_loss(logits, 2, "softmax")
    assert torch.equal(aux_map, torch.zeros_like(aux_map).scatter(1, torch.softmax(logits, -1).topk(2).indices, True))
    tokens = torch.randn(4096, 40, requires_grad=True)
    permuted, _, sorted_indices, _, _ = lt.permute(tokens, routing_map, probs)
    y = lt.unpermute(permuted, sorted_indices, tokens.shape, probs, routing_map)
    ref_permuted, _, ref_indices = ref_permute(tokens, ref_map, ref_probs, int(ref_map.sum()), False)
    ref_y = ref_unpermute(ref_permuted, ref_indices, tokens.shape, ref_probs, ref_map, False)
    close(y, ref_y, torch.float32, "unpermute")
    upstream, expert_weight = torch.randn(4096, 40), torch.randn(16)
    torch.autograd.backward([y, (scores * expert_weight).sum()], [upstream, None])
    ref_scores = torch.softmax(ref_logits, -1)
    ref_tokens = tokens.detach().clone().requires_grad_()
    ref_permuted, _, ref_indices = ref_permute(ref_tokens, ref_map, ref_probs, int(ref_map.sum()), False)
    ref_y = ref_unpermute(ref_permuted, ref_indices, tokens.shape, ref_probs, ref_map, False)
    torch.autograd.backward([ref_y, (ref_scores * expert_weight).sum()], [upstream, None])
    # float32 softmax gradients p (w - p . w) cancel: compare at the scale of the largest one
    scale = ref_logits.grad.abs().max().item()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=2e-6, atol=4e-6 * scale)
    close(tokens.grad, ref_tokens.grad, torch.float32, "grad tokens")


@pytest.mark.parametrize("policy,pad", [("probs", False), ("position", False), ("probs", True)])
def test_dropping_and_permute_over_token_ranges_on_four_threads(four_threads, policy, pad):
    """T = 5000: token_dropping's scan, permute_index's two passes and unpermute's dL/dprobs run over several token
    ranges; the results equal the reference (maps and row orders exactly) and one thread's bit for bit."""
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(5000, 12, generator=g, dtype=torch.float64)
    probs, routing_map = lt.topk_routing_with_score_function(logits, 2)
    probs = probs.detach()
    dropped = {}
    for threads in (4, 1):
        torch.set_num_threads(threads)
        dropped[threads] = lt.apply_router_token_dropping(probs, routing_map, 2, 0.9, policy, pad)
    torch.set_num_threads(4)
    ref_probs, ref_map = ref_drop(probs, routing_map, 2, 0.9, policy, pad)
    assert torch.equal(dropped[4][1], ref_map) and torch.equal(dropped[1][1], ref_map)
    assert torch.equal(dropped[4][0], ref_probs)
    kept_probs, kept_map = dropped[4]
    tokens = torch.randn(5000, 6, generator=g, dtype=torch.float64)
    # num_out_tokens past the routed count: permute_index's unrouted entries too (dropless), or padded experts
    rows = 12 * 900 if pad else int(kept_map.sum()) + 37
    results = {}
    for threads in (4, 1):
        torch.set_num_threads(threads)
        p = kept_probs.clone().requires_grad_()
        permuted, permuted_probs, sorted_indices, _, _ = lt.permute(tokens, kept_map, p, rows, drop_and_pad=pad)
        y = lt.unpermute(permuted, sorted_indices[:], tokens.shape, p, kept_map, drop_and_pad=pad) if pad else \
            lt.unpermute(permuted[:int(kept_map.sum())], sorted_indices[:int(kept_map.sum())], tokens.shape, p,
                         kept_map)
        y.backward(torch.ones_like(y))
        results[threads] = (sorted_indices, permuted_probs.detach(), y.detach(), p.grad)
    torch.set_num_threads(4)
    ref_permuted, ref_pp, ref_indices = ref_permute(tokens, kept_map, kept_probs, rows, pad)
    assert torch.equal(results[4][0], ref_indices) and torch.equal(results[4][1], ref_pp)
    for a, b in zip(results[4], results[1]):
        assert torch.equal(a, b), "4 threads and 1 thread differ"
    # dL/dprobs[t, e] = sum of y's row of ones . the token's row: tokens[t].sum() where (t, e) has a permuted row
    expected = torch.zeros_like(kept_probs)
    used = ref_indices if pad else ref_indices[:int(kept_map.sum())]
    experts = torch.arange(12).repeat_interleave(rows // 12) if pad else \
        torch.arange(12).repeat_interleave(kept_map.sum(dim=0))
    expected[used, experts] = tokens.sum(dim=1)[used]
    torch.testing.assert_close(results[4][3], expected, rtol=1e-12, atol=1e-12)


def test_operators_check_their_tables_on_the_calling_thread(four_threads):
    ops = torch.ops.locmoe
    logits = torch.randn(2048, 8)
    _, _, indices = ops.route(logits, 2, False, 0, 0, 1.0, "softmax", None)
    bad = indices.clone()
    bad[1500, 1] = bad[1500, 0]  # an expert twice, in a range a worker thread would take
    with pytest.raises(ValueError, match="twice"):
        ops.route_backward(logits, bad, torch.ones(2048, 8), 2, False, 1.0, "softmax")
    bad = indices.clone()
    bad[1700, 0] = 8
    with pytest.raises(ValueError, match=r"\[-1, 8\)"):
        ops.route_backward(logits, bad, torch.ones(2048, 8), 2, False, 1.0, "softmax")
    slots, experts = ops.token_slots(torch.tensor([1, 0, 1]), 2)
    with pytest.raises(ValueError, match="pair"):
        ops.gather_rows(torch.randn(2, 4), slots, experts, 2)  # row 2 of a 2-row output
    wrong = experts.clone()
    wrong[0, 0] = 3
    with pytest.raises(ValueError, match="pair"):
        ops.combine_rows(torch.randn(3, 4), slots, wrong, None, 2)


def test_permute_defaults_and_refusals():
    probs, routing_map = routed()
    tokens = torch.randn(30, 4)
    everything = lt.permute(tokens, routing_map, probs)  # num_out_tokens None: every routed entry
    assert everything[2].shape[0] == int(routing_map.sum())
    import numpy as np
    assert torch.equal(lt.permute(tokens, routing_map, probs, np.int64(everything[2].shape[0]))[2], everything[2])
    with pytest.raises(ValueError, match="align_size"):
        lt.permute(tokens, routing_map, probs, align_size=16)
    with pytest.raises(ValueError, match="divide"):
        lt.topk_routing_with_score_function(torch.randn(5, 6), 2, num_groups=4, group_topk=2)
    assert lt.get_capacity(np.int64(100), 10, np.float32(1.5)) == 15


def test_inference_mode():
    with torch.inference_mode():
        probs, routing_map = lt.topk_routing_with_score_function(torch.randn(30, 6), 2)
        tokens = torch.randn(30, 4)
        permuted, _, sorted_indices, _, _ = lt.permute(tokens, routing_map, probs)
        y = lt.unpermute(permuted, sorted_indices, tokens.shape, probs, routing_map)
    assert torch.equal(y, ref_unpermute(permuted, sorted_indices, tokens.shape, probs, routing_map, False))


def test_a_forked_child_gets_its_own_pool(four_threads):
    import multiprocessing
    _route_and_permute()  # the parent's pool exists, with 4 threads
    child = multiprocessing.get_context("fork").Process(target=_route_in_child)
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0


def _route_and_permute():
    # 1024 tokens: several ranges on locmoe's pool; tensors small enough that torch's own (OpenMP) pool, which is
    # not fork-safe, stays out of it
    probs, routing_map = lt.topk_routing_with_score_function(torch.randn(1024, 8), 2)
    return lt.permute(torch.randn(1024, 8), routing_map, probs)[0]


def _route_in_child():
    os._exit(0 if _route_and_permute().shape[0] == 2048 else 1)


def test_z_loss_and_route_backward_over_blocks_on_four_threads(four_threads):
    """T = 5000 (not a multiple of the 64-token blocks): the z-loss's blocks and route_backward's blocks run on the
    pool; the loss and both gradients equal one thread's bit for bit and the reference within rounding. Rows with
    a NaN or +inf logit, or all -inf, are left out of the z-loss's mean and get no gradient; a -inf logit alone
    is a masked expert."""
    g = torch.Generator().manual_seed(23)
    logits = torch.randn(5000, 12, generator=g) * 4
    logits[17, 3] = float("nan")
    logits[4100, :] = float("-inf")
    logits[4999, 0] = float("inf")
    logits[64, 5] = float("-inf")
    upstream = torch.randn(5000, 12, generator=g)
    results = {}
    for threads in (4, 1):
        torch.set_num_threads(threads)
        l = logits.clone().requires_grad_()
        z = lt.z_loss_func(l, 1e-2)
        probs, _ = lt.topk_routing_with_score_function(l, 2)
        torch.autograd.backward([z, probs], [None, upstream])
        results[threads] = (z.detach(), l.grad)
    torch.set_num_threads(4)
    assert all(torch.equal(a, b) for a, b in zip(results[4], results[1])), "4 threads and 1 thread differ"
    valid = torch.ones(5000, dtype=torch.bool)
    valid[[17, 4100, 4999]] = False
    ref = logits.double().clone().requires_grad_()
    ref_z = torch.logsumexp(ref[valid], dim=-1).square().mean() * 1e-2
    routable = ref.masked_fill(~valid.unsqueeze(1), 0)  # no gradient reaches the invalid rows through it
    top = routable.detach().topk(2, dim=1).indices
    ref_probs = torch.zeros_like(ref).scatter(1, top, torch.softmax(routable.gather(1, top), dim=-1)) * \
        valid.unsqueeze(1)
    torch.autograd.backward([ref_z, ref_probs], [None, upstream.double()])
    torch.testing.assert_close(results[4][0].double(), ref_z.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(results[4][1].double(), ref.grad, rtol=1e-5, atol=1e-6)
    assert not results[4][1][[17, 4100, 4999]].any()


def test_masked_product_is_torchs_product_with_a_bool_mask():
    """apply_router_token_dropping's probs and their gradient: values * mask exactly as torch computes it
    (NaN and inf times 0 are NaN, -x times 0 is -0), in every row dtype, over several token ranges."""
    g = torch.Generator().manual_seed(24)
    values = torch.randn(3000, 7, generator=g, dtype=torch.float64)
    values[5, :3] = torch.tensor([float("nan"), float("inf"), -2.0], dtype=torch.float64)
    mask = torch.rand(3000, 7, generator=g) < 0.5
    mask[5, :3] = False
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        v = values.to(dtype)
        ours, theirs = torch.ops.locmoe.masked_product(v, mask), v * mask
        assert ours.dtype == dtype
        assert torch.equal(ours.isnan(), theirs.isnan())
        same = ~theirs.isnan()
        # NaN's sign is left out: torch's own differs between its vectorized and scalar bfloat16 paths
        assert torch.equal(ours[same], theirs[same]) and torch.equal(ours.signbit()[same], theirs.signbit()[same]), dtype
    strided = values.t().contiguous().t()  # column-major: copied to rows
    torch.testing.assert_close(torch.ops.locmoe.masked_product(strided, mask), strided * mask, rtol=0, atol=0,
                               equal_nan=True)
    with pytest.raises(ValueError, match="mask must have values' shape"):
        torch.ops.locmoe.masked_product(values, mask[:5])
    with pytest.raises(ValueError, match="values must be float32"):
        torch.ops.locmoe.masked_product(values.long(), mask)


def test_operators_write_their_outputs_whole():
    """route, aux_scores, route_backward, z_loss, token dropping and softmax_backward allocate their outputs
    uninitialized and write every entry: after freeing NaN-filled tensors of the same size (which the allocator
    hands out again), no NaN shows up, and the zeros are where the reference has them."""
    ops = torch.ops.locmoe
    g = torch.Generator().manual_seed(25)
    logits = torch.randn(3000, 12, generator=g)
    grad = torch.randn(3000, 12, generator=g)
    ref_probs, ref_map, indices = ops.route(logits, 2, False, 0, 0, 1.0, "softmax", None)
    checks = {
        "route": lambda: ops.route(logits, 2, False, 0, 0, 1.0, "softmax", None)[:2],
        "aux_scores": lambda: ops.aux_scores(logits, 2, "softmax"),
        "route_backward": lambda: (ops.route_backward(logits, indices, grad, 2, False, 1.0, "softmax"),),
        "z_loss": lambda: ops.z_loss(logits, 1e-2),
        "token_dropping": lambda: ops.token_dropping(ref_probs, ref_map, 300, "probs", False),
        "softmax_backward": lambda: (ops.softmax_backward(grad, torch.softmax(logits, -1)),),
    }
    for name, call in checks.items():
        expected = call()
        for _ in range(3):
            junk = [torch.full((3000, 12), float("nan")) for _ in range(4)]
            del junk
            for a, b in zip(call(), expected):
                assert torch.equal(a, b), name


def test_z_loss_refuses_a_coefficient_that_is_not_finite():
    logits = torch.randn(10, 4)
    for coeff in (float("nan"), float("inf"), 1e39):  # 1e39 overflows float32
        with pytest.raises(ValueError, match="z_loss_coeff must be finite"):
            lt.z_loss_func(logits, coeff)
    assert torch.isfinite(lt.z_loss_func(logits.double(), 1e39))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_backward_reads_any_gradient_layout(four_threads, dtype):
    """The aux scores' softmax backward: p (g - p . g) row by row, for a broadcast row (stride 0, as the aux loss's
    gradient arrives), a transposed and a contiguous g, over several token ranges; against torch's."""
    g = torch.Generator().manual_seed(26)
    probs = torch.softmax(torch.randn(3000, 12, generator=g, dtype=torch.float64) * 3, dim=-1).to(dtype)
    layouts = {
        "broadcast": torch.randn(12, generator=g, dtype=dtype).expand(3000, 12),
        "transposed": torch.randn(12, 3000, generator=g, dtype=dtype).t(),
        "contiguous": torch.randn(3000, 12, generator=g, dtype=dtype),
    }
    for name, grad in layouts.items():
        ours = torch.ops.locmoe.softmax_backward(grad, probs)
        reference = torch._softmax_backward_data(grad.double(), probs.double(), -1, torch.float64)
        assert ours.dtype == dtype
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(ours.double(), reference, rtol=tol, atol=tol, msg=name)
    with pytest.raises(ValueError, match="probs must be float32 or float64"):
        torch.ops.locmoe.softmax_backward(layouts["contiguous"], probs.bfloat16())
    with pytest.raises(ValueError, match="grad must have probs' shape"):
        torch.ops.locmoe.softmax_backward(layouts["contiguous"][:5], probs)
