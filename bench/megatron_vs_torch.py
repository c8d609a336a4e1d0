#!/usr/bin/env python3
"""One routing step as Megatron-Core runs it, forward + backward, with locmoe_torch against plain torch.

The step (Megatron-Core's TopKRouter + the alltoall dispatcher's local permutation, non-fused paths):
    probs, map   = topk_routing_with_score_function(logits, k)            (softmax after top-k, the default)
    map_aux, s   = compute_routing_scores_for_aux_loss(logits, k, "softmax")
    aux          = switch_load_balancing_loss_func(s, map_aux.sum(0), T, k, n, 1e-2)
    z            = z_loss_func(logits, 1e-3)
    probs, map   = apply_router_token_dropping(probs, map, k, capacity_factor, "probs")
    permuted, .. = permute(tokens, map, probs, num_out_tokens=map.sum())
    y            = unpermute(permuted, sorted_indices, tokens.shape, probs, map)      (no expert computation)
    backward: dL/dy = upstream, plus aux + z                     gradients to logits and tokens
"plain torch" is that step written with torch's own operators as Megatron-Core writes them (in this file); the
locmoe side calls locmoe_torch's functions of the same names. Both run in this process, alternately, with
torch.set_num_threads(threads) (locmoe_torch's pool follows it). Prints tokens/s of each, and their ratio
(target: >= 5), and the time of locmoe's row work alone (permute + unpermute + backward on a routing computed
beforehand: memory-bound, near this machine's copy speed) with the bound it sets on the ratio. Usage:
    PYTHONPATH=build/default/python /usr/bin/python3 bench/megatron_vs_torch.py [--threads 1 2] [--rounds 5]
"""
import argparse
import json
import math
import statistics
import time

import torch

import locmoe_torch as lt


# ---- the step in plain torch, as Megatron-Core's moe_utils.py computes it ------------------------------------------

def torch_routing(logits, topk):
    scores, top = torch.topk(logits, k=topk, dim=1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(logits)
    return (torch.zeros_like(logits).scatter(1, top, probs),
            torch.zeros_like(logits).int().scatter(1, top, 1).bool())


def torch_aux_scores(logits, topk):
    scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top = torch.topk(scores, k=topk, dim=1).indices
    return torch.zeros_like(logits).int().scatter(1, top, 1).bool(), scores


def torch_aux_loss(probs, tokens_per_expert, total, topk, n, coeff):
    return torch.sum(probs.sum(dim=0) * tokens_per_expert) * (n * coeff / (topk * total * total))


def torch_z_loss(logits, coeff):
    return torch.mean(torch.square(torch.logsumexp(logits, dim=-1))) * coeff


def torch_dropping(probs, routing_map, topk, cf):
    T, n = probs.shape
    capacity = math.ceil((T * topk / n) * cf)
    if capacity > T:
        return probs, routing_map
    top = torch.topk(probs, k=capacity, dim=0, sorted=False).indices
    mask = torch.zeros_like(probs).scatter(0, top, 1).bool()
    final = torch.logical_and(routing_map, mask)
    return probs * final, final


def torch_permute(tokens, routing_map, probs, num_out_tokens):
    T = tokens.shape[0]
    flat = routing_map.bool().T.contiguous().reshape(-1).argsort(descending=True)[:num_out_tokens]
    sorted_indices = flat % T
    permuted_probs = probs.T.contiguous().reshape(-1)[flat]
    return tokens.index_select(0, sorted_indices), permuted_probs, sorted_indices


def torch_unpermute(permuted, sorted_indices, shape, probs, routing_map):
    weights = probs.T.contiguous().masked_select(routing_map.T.contiguous())
    permuted = permuted * weights.unsqueeze(-1)
    out = torch.zeros(shape, dtype=permuted.dtype)
    out.scatter_add_(0, sorted_indices.unsqueeze(1).expand(-1, shape[1]), permuted)
    return out


def torch_step(logits, tokens, upstream, topk, cf):
    T, n = logits.shape
    probs, routing_map = torch_routing(logits, topk)
    aux_map, scores = torch_aux_scores(logits, topk)
    aux = torch_aux_loss(scores, aux_map.sum(0), T, topk, n, 1e-2)
    z = torch_z_loss(logits, 1e-3)
    probs, routing_map = torch_dropping(probs, routing_map, topk, cf)
    permuted, _, sorted_indices = torch_permute(tokens, routing_map, probs, int(routing_map.sum()))
    y = torch_unpermute(permuted, sorted_indices, tokens.shape, probs, routing_map)
    torch.autograd.backward([y, aux + z], [upstream, None])


def locmoe_step(logits, tokens, upstream, topk, cf):
    T, n = logits.shape
    probs, routing_map = lt.topk_routing_with_score_function(logits, topk)
    aux_map, scores = lt.compute_routing_scores_for_aux_loss(logits, topk, "softmax")
    aux = lt.switch_load_balancing_loss_func(scores, aux_map.sum(0), T, topk, n, 1e-2)
    z = lt.z_loss_func(logits, 1e-3)
    probs, routing_map = lt.apply_router_token_dropping(probs, routing_map, topk, cf, "probs")
    permuted, _, sorted_indices, _, _ = lt.permute(tokens, routing_map, probs, int(routing_map.sum()))
    y = lt.unpermute(permuted, sorted_indices, tokens.shape, probs, routing_map)
    torch.autograd.backward([y, aux + z], [upstream, None])


def locmoe_rows_only(routed, tokens, upstream, rows):
    """The row work of locmoe_step alone (permute, unpermute, their backward), on a routing computed beforehand: the
    part bound by memory bandwidth. torch's step time over this is the most any router could reach at this point."""
    probs, routing_map = routed
    permuted, _, sorted_indices, _, _ = lt.permute(tokens, routing_map, probs, rows)
    y = lt.unpermute(permuted, sorted_indices, tokens.shape, probs, routing_map)
    y.backward(upstream)


def keep_freed_memory(prefault_bytes=3 << 29):
    """glibc: serve every allocation from the heap (no mmap), never trim it, and grow it once, up front, by
    `prefault_bytes` (1.5 GiB: under the trim threshold, which glibc caps at 2^31 - 1) of touched memory, so that the steps reuse their memory as a caching allocator would instead of
    page-faulting fresh 64-128 MiB tensors (both sides alike; see docs/benchmarks.md). Without the up-front growth
    the heap keeps growing for a while as the two sides' allocations fragment it, and a step that lands on fresh
    pages pays about 5 ms per 16 MiB. Returns whether it applied."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, (1 << 31) - 1)):
            return False
        libc.malloc.restype = ctypes.c_void_p
        block = libc.malloc(ctypes.c_size_t(prefault_bytes))
        if block:
            ctypes.memset(block, 1, prefault_bytes)
            libc.free(ctypes.c_void_p(block))
        return True
    except (OSError, AttributeError):
        return False


def rows_seconds(inputs, topk, cf, repeat):
    logits, tokens, upstream = inputs
    probs, routing_map = lt.topk_routing_with_score_function(logits, topk)
    probs, routing_map = lt.apply_router_token_dropping(probs, routing_map, topk, cf, "probs")
    routed, rows = (probs.detach(), routing_map), int(routing_map.sum())
    best = []
    for _ in range(repeat):
        t, p = tokens.detach().clone().requires_grad_(), routed[0].clone().requires_grad_()
        start = time.perf_counter()
        locmoe_rows_only((p, routed[1]), t, upstream, rows)
        best.append(time.perf_counter() - start)
    return min(best)


def seconds(step, inputs, topk, cf, repeat):
    best = []
    for _ in range(repeat):
        logits, tokens, upstream = (t.detach().clone().requires_grad_(t is not inputs[2]) for t in inputs)
        start = time.perf_counter()
        step(logits, tokens, upstream, topk, cf)
        best.append(time.perf_counter() - start)
    return min(best)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    p.add_argument("--topk", type=int, nargs="+", default=[1, 2])
    p.add_argument("--capacity-factor", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median of their best times")
    p.add_argument("--repeat", type=int, default=3, help="steps per round (the best is kept)")
    p.add_argument("--target", type=float, default=5.0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--malloc", choices=("reuse", "default"), default="reuse")
    a = p.parse_args()
    malloc = "reuse" if a.malloc == "reuse" and keep_freed_memory() else "default"
    results = []
    for threads in a.threads:
        torch.set_num_threads(threads)
        for n in a.experts:
            for k in a.topk:
                g = torch.Generator().manual_seed(1)
                inputs = (torch.randn(a.tokens, n, generator=g), torch.randn(a.tokens, a.hidden, generator=g),
                          torch.randn(a.tokens, a.hidden, generator=g))
                ours, theirs, rows = [], [], []
                seconds(locmoe_step, inputs, k, a.capacity_factor, 1)  # warm-up: pools, allocator
                seconds(torch_step, inputs, k, a.capacity_factor, 1)
                for _ in range(a.rounds):
                    ours.append(seconds(locmoe_step, inputs, k, a.capacity_factor, a.repeat))
                    theirs.append(seconds(torch_step, inputs, k, a.capacity_factor, a.repeat))
                    rows.append(rows_seconds(inputs, k, a.capacity_factor, a.repeat))
                t_ours, t_theirs, t_rows = (statistics.median(x) for x in (ours, theirs, rows))
                results.append(dict(threads=threads, T=a.tokens, hidden=a.hidden, n=n, k=k,
                                    locmoe_tokens_per_s=a.tokens / t_ours, torch_tokens_per_s=a.tokens / t_theirs,
                                    ratio=t_theirs / t_ours, rows_only_ms=t_rows * 1e3, bound=t_theirs / t_rows))
    if a.json:
        print(json.dumps(dict(torch=torch.__version__, malloc=malloc, capacity_factor=a.capacity_factor,
                              results=results), indent=1))
        return
    print(f"Megatron-Core routing step, forward + backward; PyTorch {torch.__version__}, malloc {malloc}, capacity factor "
          f"{a.capacity_factor:g}, median of {a.rounds} rounds (best of {a.repeat} steps each)")
    print("rows ms: locmoe's permute + unpermute + their backward alone (memory-bound); bound: torch's step time over "
          "it, the ratio if routing took no time")
    print(f"{'threads':>7} {'T':>6} {'hidden':>6} {'n':>3} {'k':>2} {'locmoe tok/s':>13} {'torch tok/s':>12} "
          f"{'ratio':>6} {'rows ms':>8} {'bound':>6}")
    for r in results:
        flag = "" if r["ratio"] >= a.target else f"  (below {a.target:g})"
        print(f"{r['threads']:>7} {r['T']:>6} {r['hidden']:>6} {r['n']:>3} {r['k']:>2} "
              f"{r['locmoe_tokens_per_s']:>13.4g} {r['torch_tokens_per_s']:>12.4g} {r['ratio']:>6.2f} "
              f"{r['rows_only_ms']:>8.1f} {r['bound']:>6.2f}{flag}")


if __name__ == "__main__":
    main()
