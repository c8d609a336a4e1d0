"""The routers that do not learn (Hash, PanGu-Sigma's RRE), the delta of a batch for the critical capacity, and the
communication model, on locmoe's routers.hpp, capacity.hpp and exchange.hpp.

    probs, routing_map = locmoe_torch.hash_routing(token_ids, num_experts=8)
    delta = locmoe_torch.empirical_delta(locmoe_torch.routed_cosines(x, locmoe_torch.grap_weights(d, n), expert))

The routing functions return Megatron-Core's pair (probs [T, n] float32, routing_map [T, n] bool) with one expert
per token and prob 1, so their result goes wherever topk_routing_with_score_function's does (token dropping,
permute, unpermute). Nothing is learned and no gradient flows through them.
"""
import torch

from ._ops import check_int, check_matrix, ops

__all__ = ["hash_routing", "rre_routing", "balanced_hash_table", "grap_weights", "routed_cosines", "empirical_delta",
           "model_exchange_seconds"]


def _one_hot(experts, num_experts):
    routing_map = torch.zeros(experts.shape[0], num_experts, dtype=torch.bool)
    routing_map[torch.arange(experts.shape[0]), experts] = True
    return routing_map.to(torch.float32), routing_map


def hash_routing(token_ids, num_experts, seed=0, table=None):
    """Roller et al.'s Hash layer (routers.hpp hash_route): token t goes to table[id_t] when a table is given
    (balanced_hash_table builds the balanced one), else to splitmix64(id_t ^ seed) mod n. token_ids: 1-D integer
    tensor of ids >= 0 (and < len(table)). Returns (probs, routing_map) [T, n], prob 1."""
    num_experts = check_int("num_experts", num_experts, 1)
    seed = check_int("seed", seed, 0, 2**63 - 1)
    table = None if table is None else torch.as_tensor(table)
    return _one_hot(ops.hash_route(torch.as_tensor(token_ids), num_experts, seed, table), num_experts)


def balanced_hash_table(frequencies, num_experts):
    """Roller et al.'s balanced assignment (routers.hpp): ids by decreasing frequency (ties: lower id), each to the
    expert with the least total frequency so far (ties: lower index). frequencies: 1-D, finite, >= 0. Returns the
    table [len(frequencies)] (int64) for hash_routing."""
    return ops.balanced_hash_table(torch.as_tensor(frequencies), check_int("num_experts", num_experts, 1))


def rre_routing(token_ids, domains, num_experts, groups, seed=0):
    """PanGu-Sigma's Random Routed Experts (routers.hpp rre_route): the token's domain g in [0, groups) picks the
    expert group [floor(g n / G), floor((g + 1) n / G)), then splitmix64(id ^ seed) mod the group's size picks
    the expert in it. token_ids and domains: 1-D integer tensors of one entry per token. Returns
    (probs, routing_map) [T, n], prob 1."""
    num_experts = check_int("num_experts", num_experts, 1)
    groups = check_int("groups", groups, 1, num_experts)
    seed = check_int("seed", seed, 0, 2**63 - 1)
    return _one_hot(ops.rre_route(torch.as_tensor(token_ids), torch.as_tensor(domains), num_experts, groups, seed),
                    num_experts)


def grap_weights(hidden_size, num_experts, dtype=torch.float64):
    """The weight vectors of the GrAP gate (grap_gating: w_i = the mean over feature block i, blocks
    [floor(i d / n), floor((i + 1) d / n))) as an [n, d] matrix: w_i[j] = 1 / |B_i| for j in B_i, else 0."""
    d = check_int("hidden_size", hidden_size, 1)
    n = check_int("num_experts", num_experts, 1, d)
    w = torch.zeros(n, d, dtype=dtype)
    for i in range(n):
        begin, end = i * d // n, (i + 1) * d // n
        w[i, begin:end] = 1.0 / (end - begin)
    return w


def routed_cosines(x, w, expert):
    """cos_t = x_t . w_{e_t} / (|x_t| |w_{e_t}|) (capacity.hpp routed_cosines), float64, in token order; tokens with
    expert -1 (routed nowhere) and zero-norm rows are left out. x [T, d], w [n, d] finite; expert [T] in [-1, n)."""
    check_matrix("x", x)
    check_matrix("w", w, cols=x.shape[1])
    return ops.routed_cosines(x.detach(), w.detach(), torch.as_tensor(expert))


def empirical_delta(cosines, q=0.05):
    """The q-quantile (type 7, numpy's default) of the cosines (capacity.hpp empirical_delta): the delta of the
    paper's Assumption 3 read off a batch. A value <= 0 gives no usable delta (critical_capacity rejects it)."""
    return ops.empirical_delta(torch.as_tensor(cosines, dtype=torch.float64), float(q))


def model_exchange_seconds(send_bytes, ranks_per_node, scheme="flat", links="ascend_910"):
    """The alpha-beta model's time of one All-to-All (exchange.hpp model_exchange_time) for the send matrix
    send_bytes [R, R] (bytes, source-major) on R / ranks_per_node nodes. scheme: "flat", "split_gather" (the
    paper's group-wise exchange) or "two_level"; links: "ascend_910" (the paper's clusters) or "dgx_a100"."""
    send_bytes = torch.as_tensor(send_bytes)
    if send_bytes.is_floating_point() or send_bytes.is_complex() or send_bytes.dtype == torch.bool:
        raise TypeError(f"send_bytes must hold integers (bytes), got {send_bytes.dtype}")
    return ops.model_exchange_seconds(send_bytes, check_int("ranks_per_node", ranks_per_node, 1), scheme, links)
