"""Megatron-Core's routing functions (megatron/core/transformer/moe/moe_utils.py, the non-fused paths), with the
same names, keyword arguments, shapes, dtypes and row order, computed by locmoe's kernels.

Swap for a Megatron-Core user:  `from locmoe_torch import megatron as moe_utils`  (or import the names).

Where the results differ from Megatron-Core's, docs/parity.md says so; in short: ties (equal scores) go to the
lower expert or token index where Megatron-Core's follow torch.topk's implementation-defined order; float64
inputs are computed in float64 (Megatron-Core computes scores in float32); bfloat16/float16 rows are summed in
float and rounded once in unpermute; rows with NaN or +inf logits route nowhere (zero probabilities and
gradients) and are left out of the z-loss's mean.
"""
import math

import torch
from torch.autograd.function import once_differentiable

from ._ops import ROW_DTYPES, check_int, check_matrix, ops

__all__ = [
    "topk_routing_with_score_function",
    "compute_routing_scores_for_aux_loss",
    "switch_load_balancing_loss_func",
    "z_loss_func",
    "get_capacity",
    "apply_router_token_dropping",
    "permute",
    "unpermute",
]


class _Route(torch.autograd.Function):
    """Top-k routing; the chosen set is held fixed in the backward (the gradient flows through the probs)."""

    @staticmethod
    def forward(ctx, logits, topk, use_pre_softmax, num_groups, group_topk, scale, score_function, expert_bias):
        probs, routing_map, indices = ops.route(logits, topk, use_pre_softmax, num_groups, group_topk, scale,
                                                score_function, expert_bias)
        ctx.save_for_backward(logits, indices)
        ctx.set_materialize_grads(False)  # no zero [T, n] gradients for the maps autograd cannot use
        ctx.settings = (topk, use_pre_softmax, scale, score_function)
        ctx.mark_non_differentiable(routing_map, indices)
        return probs, routing_map, indices

    @staticmethod
    def backward(ctx, grad_probs, _grad_map, _grad_indices):
        if grad_probs is None or not ctx.needs_input_grad[0]:
            return (None,) * 8
        logits, indices = ctx.saved_tensors
        topk, use_pre_softmax, scale, score_function = ctx.settings
        grad = ops.route_backward(logits, indices, grad_probs, topk, use_pre_softmax, scale, score_function)
        return (grad,) + (None,) * 7


def topk_routing_with_score_function(logits, topk, use_pre_softmax=False, num_groups=None, group_topk=None,
                                     scaling_factor=None, score_function="softmax", expert_bias=None, fused=False,
                                     dense_output=False):
    """(routing_probs [T, n] in logits' dtype, routing_map [T, n] bool): Megatron-Core's top-k routing.

    softmax, use_pre_softmax=False: top-k of the logits, softmax over the k chosen (k = 1 gives 1);
    softmax, use_pre_softmax=True: softmax over all n, then top-k (not renormalized); sigmoid: top-k of
    sigmoid(l) + expert_bias (the bias only selects), probs s / (sum of the chosen s + 1e-20) when k > 1;
    num_groups/group_topk: node-limited top-k; scaling_factor multiplies the probs last. `fused` is accepted and
    ignored (locmoe is the fused path). dense_output=True returns (probs [T, k], indices [T, k] int64) instead,
    best first. Ties go to the lower expert index.
    """
    check_matrix("logits", logits)
    num_experts = logits.shape[1]
    topk = check_int("topk", topk, 1, num_experts)
    if score_function == "sqrtsoftplus":
        raise ValueError("score_function 'sqrtsoftplus' is not supported by locmoe_torch (softmax or sigmoid)")
    if score_function not in ("softmax", "sigmoid"):
        raise ValueError(f"score_function must be 'softmax' or 'sigmoid' (got {score_function!r})")
    groups, limit = 0, 0
    if group_topk:
        if not num_groups:
            raise ValueError("num_groups must be given (> 0) with group_topk")
        groups = check_int("num_groups", num_groups, 1, num_experts)
        if num_experts % groups:
            raise ValueError(f"num_groups ({groups}) must divide num_experts ({num_experts}), as Megatron-Core's view")
        limit = check_int("group_topk", group_topk, 1, groups)
    if expert_bias is not None:
        if not isinstance(expert_bias, torch.Tensor) or expert_bias.shape != (num_experts,):
            raise ValueError(f"expert_bias must be a tensor of shape [{num_experts}] (num_experts)")
    scale = float(scaling_factor) if scaling_factor else 1.0
    if not math.isfinite(scale):
        raise ValueError(f"scaling_factor must be finite (got {scaling_factor})")
    bias = expert_bias.detach() if expert_bias is not None else None
    probs, routing_map, indices = _Route.apply(logits, topk, bool(use_pre_softmax), groups, limit, scale,
                                               score_function, bias)
    if dense_output:
        chosen = indices.long()
        return probs.gather(1, chosen.clamp(min=0)) * (chosen >= 0), chosen
    return probs, routing_map


class _SoftmaxScores(torch.autograd.Function):
    """softmax(logits) over all n (and the map of its top-k, not differentiable)."""

    @staticmethod
    def forward(ctx, logits, topk, score_function):
        routing_map, scores = ops.aux_scores(logits, topk, score_function)
        ctx.mark_non_differentiable(routing_map)
        ctx.save_for_backward(scores)
        ctx.set_materialize_grads(False)  # no zero [T, n] gradients for the maps autograd cannot use
        ctx.logits_dtype = logits.dtype
        ctx.score_function = score_function
        return routing_map, scores

    @staticmethod
    @once_differentiable  # its backward is an operator without autograd: a second derivative raises
    def backward(ctx, _grad_map, grad_scores):
        if grad_scores is None:
            return None, None, None
        (scores,) = ctx.saved_tensors
        if ctx.score_function == "sigmoid":
            grad = grad_scores * scores * (1 - scores)
        else:  # p (g - p . g), row by row (the aux loss's g, one row broadcast over the tokens, read in place)
            grad = ops.softmax_backward(grad_scores, scores)
        return grad.to(ctx.logits_dtype), None, None


def compute_routing_scores_for_aux_loss(logits, topk, score_function, fused=False, padding_mask=None):
    """(routing_map [T, n] bool, scores [T, n] float32 (float64 for float64 logits)): the scores the aux loss
    reads, softmax(l) or sigmoid(l) / (sum + 1e-20), and the map of their plain top-k (no groups, no bias).
    padding_mask: True marks padding, whose rows are zeroed in both (as Megatron-Core's code does)."""
    check_matrix("logits", logits)
    topk = check_int("topk", topk, 1, logits.shape[1])
    if score_function not in ("softmax", "sigmoid"):
        raise ValueError(f"score_function must be 'softmax' or 'sigmoid' (got {score_function!r})")
    routing_map, scores = _SoftmaxScores.apply(logits, topk, score_function)
    if score_function == "sigmoid":
        scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    if padding_mask is not None:
        valid = (~padding_mask.bool()).unsqueeze(-1)
        routing_map, scores = routing_map & valid, scores * valid
    return routing_map, scores


def switch_load_balancing_loss_func(probs, tokens_per_expert, total_num_tokens, topk, num_experts,
                                    moe_aux_loss_coeff, fused=False, padding_mask=None):
    """coeff * n / (k T^2) * sum_e (sum_t probs[t, e]) * tokens_per_expert[e] (Switch Transformer's loss as
    Megatron-Core scales it; padding_mask: True marks the tokens that count). Autograd through probs."""
    check_matrix("probs", probs)
    if probs.shape[1] != num_experts:
        raise ValueError(f"probs must have num_experts = {num_experts} columns (got shape {tuple(probs.shape)})")
    check_int("topk", topk, 1)
    if not isinstance(total_num_tokens, torch.Tensor) and not total_num_tokens > 0:  # a tensor stays in the graph
        raise ValueError(f"total_num_tokens must be > 0 (got {total_num_tokens})")
    if padding_mask is not None:
        probs = probs * padding_mask.unsqueeze(-1)
    per_expert = probs.sum(dim=0)
    scale = num_experts * moe_aux_loss_coeff / (topk * total_num_tokens * total_num_tokens)
    return torch.sum(per_expert * tokens_per_expert) * scale


class _ZLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, coeff):
        loss, grad = ops.z_loss(logits, coeff)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        if grad_loss.numel() == 1 and float(grad_loss) == 1.0:  # loss.backward(): no pass over [T, n]
            return grad, None
        return grad * grad_loss, None


def z_loss_func(logits, z_loss_coeff, padding_mask=None):
    """z_loss_coeff * mean_t logsumexp(logits[t])^2 (ST-MoE); padding_mask: True marks padding (left out)."""
    check_matrix("logits", logits)
    coeff = float(z_loss_coeff)
    if padding_mask is not None:
        valid = ~padding_mask.bool()
        if not bool(valid.any()):
            return logits.sum() * 0
        logits = logits[valid]
    return _ZLoss.apply(logits, coeff)


def get_capacity(num_tokens, num_experts, capacity_factor, min_capacity=None):
    """ceil((num_tokens / num_experts) * capacity_factor), at least min_capacity: Megatron-Core's expression,
    evaluated in the same order in float64, so the same rounding."""
    num_tokens = check_int("num_tokens", num_tokens, 0)
    num_experts = check_int("num_experts", num_experts, 1)
    try:
        capacity_factor = float(capacity_factor)
    except (TypeError, ValueError):
        raise TypeError(f"capacity_factor must be a number (got {type(capacity_factor).__name__})") from None
    if not (math.isfinite(capacity_factor) and capacity_factor >= 0):
        raise ValueError(f"capacity_factor must be a finite number >= 0 (got {capacity_factor})")
    capacity = math.ceil((num_tokens / num_experts) * capacity_factor)
    if min_capacity is not None and capacity < min_capacity:
        capacity = min_capacity
    return capacity


class _DropTokens(torch.autograd.Function):
    """(routing_probs * final_map, final_map) from one operator; backward: the gradient times the map."""

    @staticmethod
    def forward(ctx, routing_probs, routing_map, capacity, drop_policy, pad_to_capacity):
        final_probs, final_map = ops.token_dropping(routing_probs, routing_map, capacity, drop_policy, pad_to_capacity)
        ctx.mark_non_differentiable(final_map)
        ctx.save_for_backward(final_map)
        ctx.set_materialize_grads(False)  # no zero [T, n] gradients for the maps autograd cannot use
        return final_probs, final_map

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_probs, _grad_map):
        if grad_probs is None:
            return (None,) * 5
        (final_map,) = ctx.saved_tensors
        return ops.masked_product(grad_probs, final_map), None, None, None, None


def apply_router_token_dropping(routing_probs, routing_map, router_topk, capacity_factor, drop_policy="probs",
                                pad_to_capacity=False):
    """(final_probs, final_map) [T, n]: each expert keeps its capacity = get_capacity(T k, n, cf) tokens of highest
    prob ("probs") or its first routed tokens ("position"), ties to the lower token index; pad_to_capacity fills
    every expert to capacity (with unrouted tokens of prob 0). Kept probs are not renormalized; capacity > T
    keeps everything."""
    check_matrix("routing_probs", routing_probs)
    num_tokens, num_experts = routing_probs.shape
    topk = check_int("router_topk", router_topk, 1, num_experts)
    return drop_to_capacity(routing_probs, routing_map, get_capacity(num_tokens * topk, num_experts, capacity_factor),
                            drop_policy, pad_to_capacity)


def drop_to_capacity(routing_probs, routing_map, capacity, drop_policy="probs", pad_to_capacity=False):
    """apply_router_token_dropping with the capacity (tokens per expert, >= 0) given instead of a capacity factor:
    for capacities that do not come from get_capacity (MoELayer's capacity from the critical bound)."""
    check_matrix("routing_probs", routing_probs)
    check_matrix("routing_map", routing_map, *routing_probs.shape, dtypes=None)
    if drop_policy not in ("probs", "position"):
        raise ValueError(f"drop_policy must be 'probs' or 'position' (got {drop_policy!r})")
    num_tokens = routing_probs.shape[0]
    capacity = check_int("capacity", capacity, 0)
    if capacity > num_tokens:
        final_map = torch.ones_like(routing_map, dtype=torch.bool) if pad_to_capacity else routing_map.bool().clone()
        return routing_probs * final_map, final_map
    return _DropTokens.apply(routing_probs, routing_map, capacity, drop_policy, bool(pad_to_capacity))


class _GatherRows(torch.autograd.Function):
    """out[r] = tokens[t] for each pair (t, r); backward: the sum of a token's rows."""

    @staticmethod
    def forward(ctx, tokens, slots, experts, rows):
        ctx.save_for_backward(slots, experts)
        return ops.gather_rows(tokens, slots, experts, rows)

    @staticmethod
    def backward(ctx, grad):
        slots, experts = ctx.saved_tensors
        return ops.combine_rows(grad, slots, experts, None, slots.shape[0]), None, None, None


class _CombineRows(torch.autograd.Function):
    """y[t] = sum of t's rows, weighted when weights are given; backward through rows and weights."""

    @staticmethod
    def forward(ctx, rows, weights, slots, experts, num_tokens):
        ctx.rows = rows.shape[0]
        ctx.save_for_backward(rows if weights is not None else None, weights, slots, experts)  # rows: for dL/dw only
        return ops.combine_rows(rows, slots, experts, weights, num_tokens)

    @staticmethod
    def backward(ctx, grad):
        rows, weights, slots, experts = ctx.saved_tensors
        if weights is None:
            return ops.gather_rows(grad, slots, experts, ctx.rows), None, None, None, None
        grad_rows, grad_weights = ops.combine_rows_backward(rows, slots, experts, weights, grad)
        return (grad_rows if ctx.needs_input_grad[0] else None,
                grad_weights if ctx.needs_input_grad[1] else None, None, None, None)


class _PairWeights(torch.autograd.Function):
    """weights[t][j] = probs[t, expert of the pair's row]; backward: scattered back into [T, n]."""

    @staticmethod
    def forward(ctx, probs, slots, row_expert, double_precision):
        ctx.save_for_backward(probs, slots, row_expert)
        return ops.pair_weights(probs, slots, row_expert, double_precision)

    @staticmethod
    def backward(ctx, grad):
        probs, slots, row_expert = ctx.saved_tensors
        return ops.pair_weights_backward(grad, slots, row_expert, probs), None, None, None


class _Pairs:
    """What permute learned about its rows, kept on sorted_indices for unpermute (Megatron-Core passes the same
    tensor): each token's rows, each row's expert, and what they were built from (checked before reuse)."""

    def __init__(self, sorted_indices, num_tokens, routing_map, drop_and_pad, slots, experts, row_expert, exact):
        self.version, self.num_tokens = sorted_indices._version, num_tokens
        self.routing_map, self.map_version = routing_map, routing_map._version
        self.drop_and_pad, self.slots, self.experts, self.row_expert = drop_and_pad, slots, experts, row_expert
        self.exact = exact  # the rows are exactly the map's entries (what unpermute's probs need when dropless)

    @staticmethod
    def trackable(*tensors):
        """Whether version counters exist (tensors made under torch.inference_mode() have none)."""
        return not any(t.is_inference() for t in tensors)

    @staticmethod
    def of(sorted_indices, num_tokens):
        if not _Pairs.trackable(sorted_indices):
            return None
        pairs = getattr(sorted_indices, "_locmoe_pairs", None)
        if pairs is None or pairs.version != sorted_indices._version or pairs.num_tokens != num_tokens:
            return None
        return pairs

    def row_expert_for(self, routing_map, drop_and_pad):
        same_map = routing_map is self.routing_map and _Pairs.trackable(routing_map) and \
            routing_map._version == self.map_version
        if same_map and drop_and_pad == self.drop_and_pad and (drop_and_pad or self.exact):
            return self.row_expert
        return None


def _num_out_tokens(num_out_tokens, routing_map, limit):
    if num_out_tokens is None:  # every routed entry (older Megatron-Core permutes need none; newer assert one)
        return int(routing_map.bool().sum())
    return check_int("num_out_tokens", num_out_tokens, 0, limit)


def permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False,
            tokens_per_expert=None, align_size=0):
    """(permuted_tokens, permuted_probs, sorted_indices, None, tokens_per_expert), as Megatron-Core's permute.

    Dropless: rows grouped by expert, each expert's tokens in token order (the map's entries in expert-major order,
    cut at num_out_tokens; None: every routed entry). drop_and_pad: capacity = num_out_tokens // n rows per
    expert, its routed tokens first. permuted_probs[r] = probs[sorted_indices[r], expert of row r] (None without
    probs). `fused` is accepted and ignored; align_size > 0 raises.
    """
    check_matrix("tokens", tokens)
    num_tokens = tokens.shape[0]
    check_matrix("routing_map", routing_map, rows=num_tokens, dtypes=None)
    num_experts = routing_map.shape[1]
    if probs is not None:
        check_matrix("probs", probs, num_tokens, num_experts)
    if align_size and align_size > 0:
        raise ValueError("align_size > 0 (padding each expert's rows for fp8/fp4) is not supported by locmoe_torch")
    rows = _num_out_tokens(num_out_tokens, routing_map, num_tokens * num_experts)
    if drop_and_pad and rows // num_experts > num_tokens:
        raise ValueError(f"with drop_and_pad, num_out_tokens // num_experts must be <= num_tokens = {num_tokens}")
    sorted_indices, row_expert, routed = ops.permute_index(routing_map, rows, bool(drop_and_pad))
    slots, experts = ops.token_slots(sorted_indices, num_tokens)
    if _Pairs.trackable(sorted_indices, routing_map):
        sorted_indices._locmoe_pairs = _Pairs(sorted_indices, num_tokens, routing_map, bool(drop_and_pad), slots,
                                              experts, row_expert, rows == routed)
    permuted = _GatherRows.apply(tokens, slots, experts, sorted_indices.shape[0])
    if probs is None:
        permuted_probs = None
    elif probs.is_contiguous():  # one gather from the flat view: cheaper than 2-D advanced indexing
        permuted_probs = probs.view(-1).index_select(0, sorted_indices * num_experts + row_expert)
    else:
        permuted_probs = probs[sorted_indices, row_expert]
    return permuted, permuted_probs, sorted_indices, None, tokens_per_expert


def unpermute(permuted_tokens, sorted_indices, restore_shape, probs=None, routing_map=None, fused=False,
              drop_and_pad=False, pad_offsets=None):
    """[T, hidden] in permuted_tokens' dtype: the sum of each token's permuted rows, times its prob for that row's
    expert when probs are given (Megatron-Core's unpermute). Rows are added in row order (expert order); bfloat16
    and float16 rows are summed in float and rounded once."""
    check_matrix("permuted_tokens", permuted_tokens)
    if len(restore_shape) != 2:
        raise ValueError(f"restore_shape must be [num_tokens, hidden] (got {tuple(restore_shape)})")
    num_tokens, hidden = (int(s) for s in restore_shape)
    if permuted_tokens.shape[1] != hidden:
        raise ValueError(f"permuted_tokens must have hidden = {hidden} columns (got {tuple(permuted_tokens.shape)})")
    if not isinstance(sorted_indices, torch.Tensor) or sorted_indices.dim() != 1 or \
            sorted_indices.shape[0] != permuted_tokens.shape[0]:
        raise ValueError("sorted_indices must be 1-D with one entry per row of permuted_tokens")
    pairs = _Pairs.of(sorted_indices, num_tokens)
    if pairs is not None:
        slots, experts = pairs.slots, pairs.experts
    else:
        slots, experts = ops.token_slots(sorted_indices, num_tokens)
    weights = None
    if probs is not None:
        if routing_map is None:
            raise ValueError("routing_map must be given with probs (to find each row's expert)")
        check_matrix("probs", probs, rows=num_tokens)
        num_experts = probs.shape[1]
        check_matrix("routing_map", routing_map, num_tokens, num_experts, dtypes=None)
        rows = sorted_indices.shape[0]
        row_expert = pairs.row_expert_for(routing_map, bool(drop_and_pad)) if pairs is not None else None
        if row_expert is None and drop_and_pad:
            if rows % num_experts:
                raise ValueError(f"with drop_and_pad, permuted rows ({rows}) must be a multiple of num_experts")
            row_expert = torch.arange(rows) // max(rows // num_experts, 1)
        elif row_expert is None:
            counts = routing_map.bool().sum(dim=0)
            if int(counts.sum()) != rows:
                raise ValueError(f"routing_map must have one true entry per permuted row ({rows}; got "
                                 f"{int(counts.sum())})")
            row_expert = torch.repeat_interleave(torch.arange(num_experts), counts)
        double = torch.float64 in (probs.dtype, permuted_tokens.dtype)
        weights = _PairWeights.apply(probs, slots, row_expert, double)
    return _CombineRows.apply(permuted_tokens, weights, slots, experts, num_tokens)
