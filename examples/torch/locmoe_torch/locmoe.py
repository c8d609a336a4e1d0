"""LocMoE's own pieces (arXiv 2401.13920) in the style of the Megatron-Core functions: the GrAP gate (eq. 4) and
the locality loss (eq. 6), on locmoe's kernels, with autograd."""
import math

import torch

from ._ops import check_int, check_matrix, ops

__all__ = ["grap_gating", "locality_loss_func"]


class _Grap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, bias, num_experts, relu):
        logits = ops.grap_logits(hidden, num_experts, bias, relu)
        ctx.save_for_backward(logits)
        ctx.hidden = (hidden.shape[1], hidden.dtype)
        ctx.relu = relu
        return logits

    @staticmethod
    def backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        hidden_size, dtype = ctx.hidden
        grad_hidden = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = ops.grap_backward(logits, grad, hidden_size, ctx.relu).to(dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = (grad * (logits > 0) if ctx.relu else grad).sum(dim=0)
        return grad_hidden, grad_bias, None, None


def grap_gating(hidden, num_experts, bias=None, relu=True):
    """LocMoE's GrAP gate (paper eq. 4): logits [T, n] = ReLU(w_i . x + b_i), w_i the mean over feature block i,
    blocks [floor(i d / n), floor((i + 1) d / n)) (locmoe/gating.hpp). float32 logits (float64 for float64 hidden);
    gradients to hidden and bias. hidden [T, d] of float32, float64, bfloat16 or float16; 1 <= n <= d."""
    check_matrix("hidden", hidden)
    num_experts = check_int("num_experts", num_experts, 1, hidden.shape[1])
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (num_experts,)):
        raise ValueError(f"bias must be a tensor of shape [{num_experts}] (num_experts)")
    if bias is not None:
        bias = bias.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    return _Grap.apply(hidden, bias, num_experts, bool(relu))


def locality_loss_func(probs, routing_map, num_ranks, ranks_per_node, rank, locality_coeff, smoothing=0.01):
    """LocMoE's locality loss for this rank's tokens (paper eq. 6): coeff * KL(D_c || D_l), D_c = the mean of the
    softmax probs [T, n] over the tokens that route (a row of routing_map with an entry), D_l = (1 - eps) / L on
    the L experts of this rank's node plus eps / n (experts in blocks over num_ranks ranks, ranks_per_node to a
    node: locmoe's topology::uniform). The paper gives no value for the coefficient. Autograd through probs."""
    check_matrix("probs", probs)
    num_tokens, num_experts = probs.shape
    check_matrix("routing_map", routing_map, num_tokens, num_experts, dtypes=None)
    num_ranks = check_int("num_ranks", num_ranks, 1)
    ranks_per_node = check_int("ranks_per_node", ranks_per_node, 1, num_ranks)
    rank = check_int("rank", rank, 0, num_ranks - 1)
    if not (isinstance(smoothing, (int, float)) and 0 < smoothing <= 1):
        raise ValueError(f"smoothing must be in (0, 1] (got {smoothing})")
    if not math.isfinite(float(locality_coeff)):
        raise ValueError(f"locality_coeff must be finite (got {locality_coeff})")
    dtype = torch.float64 if probs.dtype == torch.float64 else torch.float32
    target = ops.locality_target(num_ranks, ranks_per_node, num_experts, rank, float(smoothing)).to(dtype)
    valid = routing_map.bool().any(dim=1)
    count = int(valid.sum())
    if count == 0:
        return probs.sum() * 0
    local = probs.to(dtype)[valid].mean(dim=0)
    return float(locality_coeff) * torch.sum(torch.xlogy(local, local) - torch.xlogy(local, target))
