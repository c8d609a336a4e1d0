"""locmoe in PyTorch: Megatron-Core's routing functions computed by locmoe's kernels, and the capacity calculator.

    import locmoe_torch
    probs, routing_map = locmoe_torch.topk_routing_with_score_function(logits, topk=2)

Megatron-Core users swap one import: `from locmoe_torch import megatron as moe_utils` (docs/api.md, "From PyTorch").
CPU tensors: float32, float64, bfloat16, float16. Built by the project's CMake (LOCMOE_TORCH) into <build>/python.
"""
from ._ops import ops as _ops
from . import locmoe, megatron
from .locmoe import grap_gating, locality_loss_func
from .layer import GroupedFFN, MoELayer
from . import routers
from .routers import (balanced_hash_table, empirical_delta, grap_weights, hash_routing, model_exchange_seconds,
                      routed_cosines, rre_routing)
from .megatron import (apply_router_token_dropping, compute_routing_scores_for_aux_loss, get_capacity, permute,
                       switch_load_balancing_loss_func, topk_routing_with_score_function, unpermute, z_loss_func)

__all__ = megatron.__all__ + locmoe.__all__ + routers.__all__ + [
    "GroupedFFN", "MoELayer", "megatron", "critical_capacity", "p_delta", "max_delta_for_capacity"]


def p_delta(d, delta):
    """P(|cos| >= delta) for a uniform direction on the sphere in d dimensions (the paper's eq. 10 term)."""
    return _ops.p_delta(int(d), float(delta))


def critical_capacity(d, n, delta):
    """The critical expert capacity of the paper's Theorem 1: max(1, ceil(1 / (n p_delta(d, delta)))). The paper's bound
    taken with equality: a floor for the capacity under its assumptions, not a guarantee that no token is dropped."""
    return _ops.critical_capacity(int(d), int(n), float(delta))


def max_delta_for_capacity(d, n, capacity):
    """The largest delta whose critical capacity is at most `capacity` (the inverse of critical_capacity)."""
    return _ops.max_delta_for_capacity(int(d), int(n), float(capacity))
