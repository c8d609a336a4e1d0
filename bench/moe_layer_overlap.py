#!/usr/bin/env python3
"""Step time of locmoe_torch.MoELayer on gloo with and without the overlap of exchange and experts.

R processes (torch.multiprocessing, gloo over loopback; --ranks-per-node groups them into nodes), each with its own
tokens; one step = forward + backward of the layer (dense gate, top-k, the GroupedFFN experts). For each setting the
layer runs --steps steps after one warm-up; the step time of a setting is the median over steps of the slowest
rank's time, and every setting is measured in each of --rounds rounds, interleaved, to spread the machine's noise.
Each setting runs twice: with the FFN experts, and with experts that only scale their rows ("scale": the step
without expert compute, so routing and exchange alone; the FFN step minus it is roughly the experts' time).
Prints a table and, with --json, one JSON object. Usage:
    PYTHONPATH=build/default/python /usr/bin/python3 bench/moe_layer_overlap.py [--chunks 1 2 4] [--ranks 4]

Loopback gloo moves the rows with the same CPU cores that run the experts, at memory speed: the exchange is then a
small share of the step and the overlap has little to hide. To see it against a slower link, throttle the loopback
(Linux, root) while the benchmark runs:
    tc qdisc add dev lo root tbf rate 100mbit burst 1mb latency 2s    # and afterwards: tc qdisc del dev lo root
"""
import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from locmoe_torch import MoELayer


class Scale(torch.nn.Module):
    """Experts that only scale their rows (one parameter): the step is then routing and exchange alone."""

    def __init__(self):
        super().__init__()
        self.s = torch.nn.Parameter(torch.ones(()))

    def forward(self, rows, counts):
        return rows * self.s


def worker(rank, args, init_file, out_dir):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.ranks,
                            timeout=timedelta(seconds=600))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_()
    upstream = torch.randn(args.tokens, args.hidden, generator=g)
    settings = [(kind, exchange, chunks) for kind in ("ffn", "scale") for exchange in args.exchange
                for chunks in args.chunks]
    layers = {s: MoELayer(args.hidden, args.ffn, args.experts, topk=args.topk, gate="dense",
                          ranks_per_node=args.ranks_per_node, exchange=s[1], chunks=s[2], seed=1,
                          experts=Scale() if s[0] == "scale" else None)
              for s in settings}
    times = {s: [] for s in settings}
    for round_ in range(args.rounds):
        for s in settings:
            layer = layers[s]
            for step in range(args.steps + (1 if round_ == 0 else 0)):
                dist.barrier()
                start = time.perf_counter()
                y = layer(x)
                ((y * upstream).sum() + layer.aux_loss).backward()
                elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
                if round_ > 0 or step > 0:
                    times[s].append(elapsed.item())
                x.grad = None
                layer.zero_grad(set_to_none=True)
    if rank == 0:
        sent = layers[settings[0]].link_bytes(args.hidden * 4)
        torch.save({"times": times, "bytes": sent}, os.path.join(out_dir, "result.pt"))
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--exchange", nargs="+", default=["flat", "two_level"], choices=["flat", "two_level"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args, os.path.join(tmp, "init"), tmp), nprocs=args.ranks, join=True)
        result = torch.load(os.path.join(tmp, "result.pt"))
    rows = []
    for (kind, exchange, chunks), samples in result["times"].items():
        first = result["times"].get((kind, exchange, 1))
        base = statistics.median(first) if first else None
        median = statistics.median(samples)
        rows.append({"experts": kind, "exchange": exchange, "chunks": chunks, "step_ms": 1e3 * median,
                     "vs_1_chunk": base / median if base else None})
    config = {k: v for k, v in vars(args).items() if k != "json"}
    config["cores"] = os.cpu_count()
    if args.json:
        print(json.dumps({"config": config, "rank0_bytes": result["bytes"], "results": rows}, indent=1))
        return
    print(f"{args.ranks} ranks ({args.ranks_per_node} per node), {args.tokens} tokens/rank, hidden {args.hidden}, "
          f"ffn {args.ffn}, {args.experts} experts, top-{args.topk}, {args.threads} thread(s)/rank, "
          f"{os.cpu_count()} cores; rank 0's bytes: {result['bytes']}")
    print(f"{'experts':<8} {'exchange':<10} {'chunks':>6} {'step ms':>9} {'1 chunk / this':>15}")
    for r in rows:
        ratio = f"{r['vs_1_chunk']:.3f}" if r["vs_1_chunk"] else "-"
        print(f"{r['experts']:<8} {r['exchange']:<10} {r['chunks']:>6} {r['step_ms']:>9.1f} {ratio:>15}")


if __name__ == "__main__":
    main()
