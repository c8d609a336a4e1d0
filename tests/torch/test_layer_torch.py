"""A whole MoE layer computed by locmoe (tests/layer_reference.hpp, run by locmoe_layer_driver) against the same
layer written in plain PyTorch, the way Megatron-Core writes routing, and differentiated by autograd, in float64.

Layer: logits = gate(x) (GrAP: ReLU(block means of x + b), blocks [floor(i d / n), floor((i + 1) d / n));
dense: x W^T + b) -> scores and torch.topk -> token dropping by position against the capacity -> dispatch by
index_select into an [n C, d] buffer -> experts y_e = W_e x as one bmm -> combine by a weighted index_add ->
L = sum(y * R) + aux + z + locality. The topology is layer_reference.hpp's: 2 ranks, 1 rank per node, expert e on
rank floor(2 e / n). The driver's routed experts are only compared with torch.topk's; the torch side computes
everything on its own.

Tolerance: for the loss and each gradient, max |locmoe - torch| <= 1e-10 * max |torch| (float64); the largest
error per quantity over all cases is printed at the end of the run (conftest.py).

Skipped when torch is not importable or LOCMOE_LAYER_DRIVER is unset, unless LOCMOE_TORCH_REQUIRED=1 (ctest sets
it): then either is an error.
"""
import os
import subprocess

import pytest

REQUIRED = os.environ.get("LOCMOE_TORCH_REQUIRED") == "1"
if REQUIRED:
    import numpy as np
    import torch
else:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")

DRIVER = os.environ.get("LOCMOE_LAYER_DRIVER")
if not DRIVER:
    if REQUIRED:
        raise RuntimeError("LOCMOE_LAYER_DRIVER is not set (the path of locmoe_layer_driver)")
    pytest.skip("LOCMOE_LAYER_DRIVER is not set", allow_module_level=True)

TOLERANCE = 1e-10
RANKS = 2
COEFFS = {"aux": 0.1, "z": 0.05, "loc": 0.1}
SMOOTHING = 0.01  # locality_loss_options' default eps
SIGMOID_EPSILON = 1e-20  # Megatron-Core's, in the sigmoid weights' and aux scores' denominators

# Largest relative error per quantity over all cases; conftest.py prints it.
LARGEST = {}
DROPPED = []  # dropped choices, per case that dropped any

# (name, score, softmax before Top-k, renormalize): the four scorings of test_layer_gradients.cpp.
SCORINGS = [
    ("softmax-before", "softmax", True, False),
    ("softmax-before-renormalized", "softmax", True, True),
    ("softmax-after", "softmax", False, False),
    ("sigmoid", "sigmoid", True, False),
]

# (name, T, d, n, token ranks): layer_reference.hpp's sizes with its contiguous rank blocks; and uneven GrAP blocks
# (n does not divide d) with ranks interleaved at random.
SHAPES = [("T8d8n4", 8, 8, 4, "blocks"), ("T24d10n6", 24, 10, 6, "random")]


def make_inputs(seed, T, d, n, ranks):
    rng = np.random.default_rng(seed)
    inputs = {
        "x": rng.normal(0.0, 1.0, (T, d)),
        "gate_weight": rng.normal(0.0, 0.5, (n, d)),
        "gate_bias": 3.0 + rng.normal(0.0, 0.3, (n,)),  # GrAP logits stay positive: ReLU's kink is avoided
        "expert_weight": rng.normal(0.0, 0.3, (n, d, d)),
        "upstream": rng.normal(0.0, 1.0, (T, d)),
    }
    if ranks == "blocks":
        token_rank = (RANKS * np.arange(T)) // T
    else:
        token_rank = rng.permutation((RANKS * np.arange(T)) // T)  # both ranks keep tokens
    inputs["token_rank"] = token_rank.astype(np.int32)
    return inputs


def run_driver(folder, dense, score, before, renormalize, k, drops):
    args = [DRIVER, str(folder), "--score", score, "--k", str(k)]
    args += ["--aux", repr(COEFFS["aux"]), "--z", repr(COEFFS["z"]), "--loc", repr(COEFFS["loc"])]
    if dense:
        args.append("--dense")
    if not before:
        args.append("--after-topk")
    if renormalize:
        args.append("--renormalize")
    if drops:
        args.append("--drops")
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    out = {name: np.load(folder / f"{name}.npy") for name in ("loss", "grad_x", "grad_gate_bias", "grad_expert_weight", "routed")}
    if dense:
        out["grad_gate_weight"] = np.load(folder / "grad_gate_weight.npy")
    assert out["loss"].dtype == np.float64 and out["routed"].dtype == np.int32
    return out


def grap_matrix(d, n):
    """GrAP's fixed weights: row i is 1 / |B_i| on block B_i = [floor(i d / n), floor((i + 1) d / n))."""
    w = torch.zeros(n, d, dtype=torch.float64)
    for i in range(n):
        begin, end = (i * d) // n, ((i + 1) * d) // n
        w[i, begin:end] = 1.0 / (end - begin)
    return w


def torch_layer(inputs, dense, score, before, renormalize, k, drops):
    """The layer in torch; returns the loss, the leaves (for their .grad), torch.topk's experts and the kept choices."""
    T, d = inputs["x"].shape
    n = inputs["gate_bias"].shape[0]
    leaf = lambda name: torch.tensor(inputs[name], dtype=torch.float64, requires_grad=True)
    x, gate_weight, gate_bias, expert_weight = leaf("x"), leaf("gate_weight"), leaf("gate_bias"), leaf("expert_weight")
    upstream = torch.tensor(inputs["upstream"], dtype=torch.float64)
    token_rank = torch.tensor(inputs["token_rank"], dtype=torch.int64)

    # Gate.
    if dense:
        logits = x @ gate_weight.t() + gate_bias
    else:
        logits = torch.relu(x @ grap_matrix(d, n).t() + gate_bias)

    # Routing (Megatron-Core TopKRouter: topk_softmax_with_capacity).
    if score == "softmax":
        if before:  # use_pre_softmax
            probs_all = torch.softmax(logits, dim=-1)
            top_probs, top_idx = torch.topk(probs_all, k, dim=1)
            if renormalize:
                top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
        else:
            top_logits, top_idx = torch.topk(logits, k, dim=1)
            top_probs = torch.softmax(top_logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        top_probs, top_idx = torch.topk(scores, k, dim=1)
        if k > 1:
            top_probs = top_probs / (top_probs.sum(dim=-1, keepdim=True) + SIGMOID_EPSILON)
    routing_map = torch.zeros(T, n, dtype=torch.int64).scatter(1, top_idx, 1)  # [T n], before capacity

    # Capacity, position policy: per expert the earliest tokens keep their place. Dropless: C = the largest load.
    load = routing_map.sum(dim=0)
    capacity = (T * k) // n if drops else int(load.max())
    position = torch.cumsum(routing_map, dim=0) - 1  # slot of token t at expert e, where routed
    slot = torch.gather(position, 1, top_idx)  # [T k]
    kept = slot < capacity

    # Dispatch: row e C + slot of an [n C, d] buffer holds token t; unused rows read a zero row (index T).
    tokens = torch.arange(T).unsqueeze(1).expand(T, k)
    rows = top_idx[kept] * capacity + slot[kept]
    row_token = torch.full((n * capacity,), T, dtype=torch.int64)
    row_token[rows] = tokens[kept]
    x_padded = torch.cat([x, torch.zeros(1, d, dtype=torch.float64)])
    buffer = x_padded.index_select(0, row_token).view(n, capacity, d)

    # Experts: y_e = W_e x, all at once.
    expert_out = torch.bmm(buffer, expert_weight.transpose(1, 2)).reshape(n * capacity, d)

    # Combine: y_t = sum over t's kept choices of weight * the expert's row.
    y = torch.zeros(T, d, dtype=torch.float64).index_add(
        0, tokens[kept], expert_out.index_select(0, rows) * top_probs[kept].unsqueeze(1))

    # Aux loss (Megatron-Core switch_load_balancing_loss_func): f from the routed choices before capacity, no
    # gradient; P from softmax(logits), or the normalized sigmoid for sigmoid scores.
    if score == "softmax":
        aux_scores = torch.softmax(logits, dim=-1)
    else:
        s = torch.sigmoid(logits)
        aux_scores = s / (s.sum(dim=-1, keepdim=True) + SIGMOID_EPSILON)
    f = routing_map.sum(dim=0).to(torch.float64) / T
    aux = COEFFS["aux"] * n / k * torch.sum(f * aux_scores.mean(dim=0))

    # Router z-loss (Megatron-Core z_loss_func).
    z = COEFFS["z"] * torch.mean(torch.logsumexp(logits, dim=-1) ** 2)

    # Locality loss (LocMoE eq. 6): mu * mean over ranks with tokens of KL(D_c(r) || D_l(r)).
    p = torch.softmax(logits, dim=-1)
    node_of_expert = (RANKS * torch.arange(n)) // n  # block placement; 1 rank per node, so node = rank
    kls = []
    for r in range(RANKS):
        mine = token_rank == r
        if not bool(mine.any()):
            continue
        local = (node_of_expert == r).to(torch.float64)
        target = (1 - SMOOTHING) * local / local.sum() + SMOOTHING / n
        d_c = p[mine].mean(dim=0)
        kls.append(torch.sum(d_c * torch.log(d_c / target)))
    locality = COEFFS["loc"] * torch.stack(kls).mean()

    loss = torch.sum(y * upstream) + aux + z + locality
    loss.backward()
    leaves = {"x": x, "gate_weight": gate_weight, "gate_bias": gate_bias, "expert_weight": expert_weight}
    return loss.detach(), leaves, top_idx, int(kept.sum())


def relative_error(ours, reference):
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    assert ours.shape == reference.shape, f"shape {ours.shape} != {reference.shape}"
    scale = np.max(np.abs(reference))
    return float(np.max(np.abs(ours - reference)) / scale) if scale > 0 else float(np.max(np.abs(ours)))


CASES = [(shape, dense, scoring, k, drops)
         for shape in SHAPES for dense in (False, True) for scoring in SCORINGS for k in (1, 2, 4) for drops in (False, True)]


@pytest.mark.parametrize("seed,shape,dense,scoring,k,drops", [
    pytest.param(1000 + i, *case,
                 id=f"{case[0][0]}-{'dense' if case[1] else 'grap'}-{case[2][0]}-k{case[3]}-{'drops' if case[4] else 'dropless'}")
    for i, case in enumerate(CASES)])
def test_layer_against_autograd(tmp_path, seed, shape, dense, scoring, k, drops):
    _, T, d, n, ranks = shape
    _, score, before, renormalize = scoring
    inputs = make_inputs(seed, T, d, n, ranks)
    for name, value in inputs.items():
        np.save(tmp_path / f"{name}.npy", value)

    ours = run_driver(tmp_path, dense, score, before, renormalize, k, drops)
    loss, leaves, top_idx, kept = torch_layer(inputs, dense, score, before, renormalize, k, drops)

    # The same experts, in the same order (best first); random data has no ties.
    np.testing.assert_array_equal(ours["routed"], top_idx.numpy().astype(np.int32))
    if kept < T * k:
        DROPPED.append(T * k - kept)
    compared = {"loss": (ours["loss"].reshape(()), loss.numpy())}
    for name in ("x", "gate_bias", "expert_weight") + (("gate_weight",) if dense else ()):
        compared[name] = (ours[f"grad_{name}"], leaves[name].grad.numpy())
    if not dense:
        assert leaves["gate_weight"].grad is None  # GrAP's weights are fixed
    errors = {name: relative_error(a, b) for name, (a, b) in compared.items()}
    for name, error in errors.items():
        LARGEST[name] = max(LARGEST.get(name, 0.0), error)
    bad = {name: error for name, error in errors.items() if not error <= TOLERANCE}
    assert not bad, f"relative errors above {TOLERANCE}: {bad}"
