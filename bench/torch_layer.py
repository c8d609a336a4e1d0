#!/usr/bin/env python3
"""The layer step of bench/bench_layer.cpp (layer_step) in PyTorch CPU ops, written the way Megatron-Core writes
its router and token dispatcher (topk routing, aux loss, token dropping by position, permute and unpermute
through autograd), timed with time.perf_counter. Per step, on x [T x d] (a leaf with requires_grad, float32 or
bfloat16, seeded):
  gate     logits = relu(mean of x over n contiguous blocks of d / n)   (LocMoE's GrAP gate, paper eq. 4)
  route    p = softmax(logits); topk(p, k) -> weights, indices
  assign   positions by cumsum of the one-hot mask in token order; kept where position < C = ceil(T k 1.25 / n)
  permute  buffer [n C x d] = x rows at e C + position (index_copy), the experts excluded
  unpermute y = zeros.index_add(token, buffer[row] * weight)                (Megatron-Core's scatter_add)
  losses   aux = 0.01 n / k sum_i mean_t(p_ti) f_i; z = 1e-3 mean_t lse^2; loc = 0.01 KL(D_c || D_l) for this
           rank's tokens (rank 0 of 16, 8 per node, experts in blocks: locmoe's topology::uniform(16, 8, n))
  backward (sum(y * dY) + aux + z + loc).backward()  -> x.grad
Prints the median seconds per step over --repeat steps after --warmup, per (T, d, n, k, dtype); --json for a
JSON object. Single-threaded by default. --malloc reuse (the default) keeps freed memory in glibc's heap, as a
caching allocator would (see bench/torch_route.py). If PyTorch is not importable, prints a line and exits 0.
Usage: /usr/bin/python3 bench/torch_layer.py [--threads 1] [--repeat 10] [--warmup 3] [--json]"""
import argparse
import json
import math
import statistics
import sys
import time

from torch_route import keep_freed_memory

RANKS, RANKS_PER_NODE, RANK = 16, 8, 0
CAPACITY_FACTOR = 1.25
AUX_COEFF, Z_COEFF, LOC_COEFF, LOC_EPS = 0.01, 1e-3, 0.01, 0.01


def make_step(torch, tokens, d, n, k):
    F = torch.nn.functional
    capacity = math.ceil(tokens * k * CAPACITY_FACTOR / n)
    rank_of_expert = torch.arange(n) * RANKS // n
    local = (rank_of_expert // RANKS_PER_NODE == RANK // RANKS_PER_NODE).float()
    log_target = ((1 - LOC_EPS) * local / local.sum() + LOC_EPS / n).log()

    def step(x, dy):
        logits = F.relu(x.view(tokens, n, d // n).mean(-1, dtype=torch.float32))
        probs = F.softmax(logits, dim=1)
        weights, indices = torch.topk(probs, k, dim=1)
        mask = F.one_hot(indices, n).sum(1)
        locations = torch.cumsum(mask, dim=0) - 1
        position = torch.gather(locations, 1, indices)  # [T x k]
        kept = position < capacity
        token = torch.arange(tokens).unsqueeze(1).expand(tokens, k)[kept]
        row = (indices * capacity + position)[kept]
        buffer = torch.zeros(n * capacity, d, dtype=x.dtype).index_copy(0, row, x[token])
        routed = buffer[row] * weights[kept].unsqueeze(1).to(x.dtype)
        y = torch.zeros(tokens, d, dtype=x.dtype).index_add(0, token, routed)
        f = mask.float().mean(0)
        aux = AUX_COEFF * n / k * torch.sum(probs.mean(0) * f)
        z = Z_COEFF * torch.mean(torch.square(torch.logsumexp(logits, dim=1)))
        d_c = probs.mean(0)
        loc = LOC_COEFF * torch.sum(d_c * (torch.log(d_c) - log_target))
        loss = (y.float() * dy).sum() + aux + z + loc
        loss.backward()
        return loss.detach()

    return step


def measure(torch, tokens, d, n, k, dtype, warmup, repeat, seed):
    gen = torch.Generator().manual_seed(seed + tokens * 31 + n)
    x = torch.randn(tokens, d, generator=gen).to(dtype).requires_grad_(True)
    dy = torch.randn(tokens, d, generator=gen) * 1e-3
    step = make_step(torch, tokens, d, n, k)
    times = []
    for i in range(warmup + repeat):
        start = time.perf_counter()
        x.grad = None
        step(x, dy)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"T": tokens, "d": d, "n": n, "k": k, "dtype": "bf16" if dtype == torch.bfloat16 else "f32",
            "median_s": median, "tokens_per_s": tokens / median}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=5120)
    p.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    p.add_argument("--k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtypes", nargs="+", default=["f32", "bf16"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc", choices=("reuse", "default"), default="reuse")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    try:
        import torch
    except ImportError:
        print("torch_layer.py: PyTorch not available, skipped")
        return 0
    torch.set_num_threads(a.threads)
    malloc = "reuse" if a.malloc == "reuse" and keep_freed_memory() else "default"
    rows = [measure(torch, a.tokens, a.hidden, n, k, {"f32": torch.float32, "bf16": torch.bfloat16}[t], a.warmup,
                    a.repeat, a.seed) for t in a.dtypes for n in a.experts for k in a.k]
    if a.json:
        print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "malloc": malloc,
                          "results": rows}, indent=1))
        return 0
    print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} thread(s), malloc {malloc}, median of {a.repeat}")
    for r in rows:
        print(f"T {r['T']} d {r['d']} n {r['n']:>3} k {r['k']} {r['dtype']:>4}: {r['median_s'] * 1e3:9.1f} ms/step, "
              f"{r['tokens_per_s']:10.4g} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
