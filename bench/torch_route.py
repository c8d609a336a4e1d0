#!/usr/bin/env python3
"""The router step of bench/bench_route.cpp (route_step) in PyTorch CPU ops, written the way DeepSpeed
(topkgating) and Megatron-Core (router + moe_utils) write it, timed with time.perf_counter.

Per step, on logits [T x n] (a leaf tensor with requires_grad, N(0, 1), seeded):
  route    p = softmax(logits); topk(p, k) -> weights, indices
  assign   mask = one_hot(indices, n).sum(1) [T x n]; locations = cumsum(mask, 0) - 1 (position policy);
           kept = mask * (locations < C), C = ceil(T k 1.25 / n); per choice: expert (-1 dropped), slot, weight
  losses   aux = 0.01 * n / k * sum_i mean_t(p_ti) * f_i, f_i = mean_t mask_ti (before capacity drops)
           z   = 1e-3 * mean_t logsumexp(l_t)^2
           loc = 0.01 * mean_r KL(D_c(r) || D_l(r)) over R = 16 source ranks (tokens in contiguous blocks of
                 T / R), D_c(r) = mean softmax over r's tokens, D_l(r) = (1 - eps) uniform over the experts on
                 r's node + eps / n, eps = 0.01 (8 ranks per node, experts in blocks over the ranks)
           (aux + z + loc).backward() -> logits.grad (zeroed each step)
Reports, per (T, n, k), the median seconds per step over --repeat steps after --warmup steps, and tokens/s:
wall-clock (time.perf_counter) and, for shared machines, the process's CPU time (time.process_time).
Single-threaded by default (torch.set_num_threads(1)); --threads N for more.
Memory: every PyTorch op allocates its output (megabytes here). glibc's malloc returns such blocks to the
system (mmap/trim) and the next step faults them in again, which on a VM can cost more than the arithmetic
and varies with the allocator's state (the first shape measured in a process was up to 10x slower).
--malloc reuse (the default) sets glibc's mmap threshold to 32 MiB and its trim threshold to 1 GiB
(mallopt), so that after the warm-up the steps reuse freed memory, as a caching allocator would: PyTorch's
steady state, the comparison least favourable to locmoe (whose buffers are allocated once). --malloc default
leaves glibc as it is. Usage:
    /usr/bin/python3 bench/torch_route.py [--threads 1] [--repeat 30] [--warmup 5] [--malloc reuse] [--json]
If PyTorch is not importable, prints a line saying so and exits 0."""
import argparse
import json
import math
import statistics
import sys
import time

RANKS, RANKS_PER_NODE = 16, 8
CAPACITY_FACTOR = 1.25
AUX_COEFF, Z_COEFF, LOC_COEFF, LOC_EPS = 0.01, 1e-3, 0.01, 0.01


def local_target(torch, n):
    """D_l [R x n]: (1 - eps) uniform over the experts on the rank's node, + eps / n (topology::uniform)."""
    rank_of_expert = torch.arange(n) * RANKS // n  # block placement: expert e on rank floor(e R / n)
    node_of_expert = rank_of_expert // RANKS_PER_NODE
    node_of_rank = torch.arange(RANKS) // RANKS_PER_NODE
    local = (node_of_rank[:, None] == node_of_expert[None, :]).float()  # [R x n]
    return (1 - LOC_EPS) * local / local.sum(1, keepdim=True) + LOC_EPS / n


def make_step(torch, tokens, n, k):
    F = torch.nn.functional
    capacity = math.ceil(tokens * k * CAPACITY_FACTOR / n)
    log_target = local_target(torch, n).log()  # [R x n], constant

    def step(logits):
        # route (DeepSpeed topkgating / Megatron-Core softmax-before-Top-k)
        probs = F.softmax(logits, dim=1)
        weights, indices = torch.topk(probs, k, dim=1)
        # assign: expert mask, positions by cumsum in token order, capacity mask (position policy)
        mask = F.one_hot(indices, n).sum(1)  # [T x n], int64
        locations = torch.cumsum(mask, dim=0) - 1
        kept = mask * torch.lt(locations, capacity)
        kept_choice = torch.gather(kept, 1, indices).bool()  # [T x k]
        expert = torch.where(kept_choice, indices, torch.full_like(indices, -1))
        slot = torch.where(kept_choice, torch.gather(locations, 1, indices), torch.full_like(indices, -1))
        kept_weight = weights.detach() * kept_choice  # the dispatch weights (no gradient through Top-k here)
        # losses
        f = mask.float().mean(0)  # fraction of tokens routed to each expert, before capacity
        aux = AUX_COEFF * n / k * torch.sum(probs.mean(0) * f)
        z = Z_COEFF * torch.mean(torch.square(torch.logsumexp(logits, dim=1)))
        d_c = probs.view(RANKS, tokens // RANKS, n).mean(1)  # [R x n]
        kl = torch.sum(d_c * (torch.log(d_c) - log_target), dim=1)
        loc = LOC_COEFF * kl.mean()
        loss = aux + z + loc
        loss.backward()
        return expert, slot, kept_weight, loss.detach()

    return step


def keep_freed_memory():
    """glibc: keep freed blocks up to 32 MiB in the heap and never trim it. Returns whether it applied."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def measure(torch, tokens, n, k, warmup, repeat, seed):
    gen = torch.Generator().manual_seed(seed + tokens * 1000003 + n)
    logits = torch.randn(tokens, n, generator=gen, dtype=torch.float32).requires_grad_(True)
    step = make_step(torch, tokens, n, k)
    times, cpu_times = [], []
    for i in range(warmup + repeat):
        start, cpu_start = time.perf_counter(), time.process_time()
        if logits.grad is not None:
            logits.grad.zero_()
        step(logits)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if i >= warmup:
            times.append(elapsed)
            cpu_times.append(cpu)
    median, cpu_median = statistics.median(times), statistics.median(cpu_times)
    return {"T": tokens, "n": n, "k": k, "threads": torch.get_num_threads(), "repeat": repeat,
            "median_s": median, "min_s": min(times), "tokens_per_s": tokens / median,
            "cpu_median_s": cpu_median, "cpu_tokens_per_s": tokens / cpu_median}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, nargs="+", default=[16384])
    p.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    p.add_argument("--k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc", choices=("reuse", "default"), default="reuse",
                   help="reuse: glibc keeps freed memory (steady state, see above); default: glibc as it is")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    a = p.parse_args()
    try:
        import torch
    except ImportError:
        print("torch_route.py: PyTorch not available, skipped")
        return 0
    torch.set_num_threads(a.threads)
    malloc = "reuse" if a.malloc == "reuse" and keep_freed_memory() else "default"
    rows = []
    for tokens in a.tokens:
        if tokens % RANKS:
            p.error(f"T = {tokens} must be a multiple of {RANKS} (tokens in contiguous blocks per rank)")
        for n in a.experts:
            for k in a.k:
                rows.append(measure(torch, tokens, n, k, a.warmup, a.repeat, a.seed))
    if a.json:
        print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "malloc": malloc,
                          "results": rows}, indent=1))
        return 0
    print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} thread(s), malloc {malloc}, "
          f"median of {a.repeat} steps")
    print(f"{'T':>6} {'n':>4} {'k':>2} {'ms/step':>10} {'tokens/s':>12} {'CPU ms/step':>12}")
    for r in rows:
        print(f"{r['T']:>6} {r['n']:>4} {r['k']:>2} {r['median_s'] * 1e3:>10.3f} {r['tokens_per_s']:>12.4g} "
              f"{r['cpu_median_s'] * 1e3:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
