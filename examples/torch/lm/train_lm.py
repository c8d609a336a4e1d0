#!/usr/bin/env python3
"""A small decoder-only MoE language model trained on the Brown corpus with locmoe_torch.MoELayer (issue 14).

Work in progress: this first version trains one router setting per run on R gloo processes (expert parallelism
over torch.distributed, data parallelism for everything but the experts) and reports the validation loss curve
and the bytes each rank's exchange sent per link class. The Hash and RRE routers, node-limited top-k, the capacity
from the critical bound and the report of the issue (--json/--csv over every router and sharding) come next.

    PYTHONPATH=build/default/python /usr/bin/python3 examples/torch/lm/train_lm.py --router locmoe --ranks 4 \\
        --ranks-per-node 2 --sharding node_skewed --steps 200

Model: token embedding + learned positions, `--layers` pre-norm blocks of causal self-attention and an MoE FFN
(MoELayer: `--experts` experts of `--ffn` hidden units, top-`--topk`), final norm, output tied to the embedding.
Each rank trains on its own shard of the training texts (brown.shard), batches of `--batch` windows of
`--context` tokens; the validation loss is computed by every rank on the same fixed windows of the held-out texts.
"""
import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import brown  # this folder: Python puts the script's folder first on sys.path
import locmoe_torch as lt

ROUTERS = {  # MoELayer settings per router; the locality coefficient mu comes from --mu (the paper gives none)
    "switch": dict(gate="dense", aux_loss_coeff=1e-2),
    "locmoe": dict(gate="grap", aux_loss_coeff=1e-2),
}


class Block(torch.nn.Module):
    def __init__(self, width, heads, moe):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attention = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.moe = moe

    def forward(self, x, mask):
        h = self.norm1(x)
        x = x + self.attention(h, h, h, attn_mask=mask, need_weights=False)[0]
        b, t, w = x.shape
        return x + self.moe(self.norm2(x).reshape(b * t, w)).reshape(b, t, w)


class LanguageModel(torch.nn.Module):
    def __init__(self, vocab, width, heads, layers, context, make_moe):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, width)
        self.position = torch.nn.Parameter(torch.zeros(context, width))
        self.blocks = torch.nn.ModuleList([Block(width, heads, make_moe(i)) for i in range(layers)])
        self.norm = torch.nn.LayerNorm(width)
        torch.nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, ids):
        t = ids.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        x = self.embedding(ids) + self.position[:t]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x) @ self.embedding.weight.T

    def aux_loss(self):
        return sum(block.moe.aux_loss for block in self.blocks)


def windows(ids, context, count, generator):
    """`count` random windows of context + 1 tokens from the id stream."""
    starts = torch.randint(0, len(ids) - context - 1, (count,), generator=generator)
    return torch.stack([ids[s:s + context + 1] for s in starts.tolist()])


def run(rank, a):
    if a.ranks > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(a.port))
        dist.init_process_group("gloo", rank=rank, world_size=a.ranks)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    texts = brown.load(a.corpus)
    training, validation = brown.split(texts, seed=a.seed)
    vocab = brown.Vocabulary(training, a.vocab)
    shard = brown.shard(training, a.ranks, a.ranks_per_node, a.sharding, seed=a.seed)[rank]
    train_ids = torch.tensor([i for t in shard for i in vocab.encode(t)])
    val_ids = torch.tensor([i for t in validation for i in vocab.encode(t)])
    settings = dict(ROUTERS[a.router])
    if a.router == "locmoe":
        settings["locality_loss_coeff"] = a.mu

    def make_moe(layer):
        return lt.MoELayer(a.width, a.ffn, a.experts, topk=a.topk, capacity_factor=a.capacity_factor,
                           ranks_per_node=a.ranks_per_node, seed=a.seed + 1000 * layer, **settings)

    model = LanguageModel(len(vocab), a.width, a.heads, a.layers, a.context, make_moe)
    shared = [p for n, p in model.named_parameters() if ".experts." not in n]
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr)
    g = torch.Generator().manual_seed(a.seed * 7919 + rank)
    val = windows(val_ids, a.context, a.val_windows, torch.Generator().manual_seed(a.seed))
    curve, link = [], {"same_rank": 0, "intra_node": 0, "inter_node": 0}
    start = time.perf_counter()
    for step in range(1, a.steps + 1):
        batch = windows(train_ids, a.context, a.batch, g)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        (loss + model.aux_loss()).backward()
        if a.ranks > 1:  # data parallel for everything but the experts (each rank's own)
            for p in shared:
                dist.all_reduce(p.grad)
                p.grad /= a.ranks
        optimizer.step()
        for block in model.blocks:
            for k, v in block.moe.link_bytes(a.width * 4).items():
                link[k] += v
        if step % a.eval_every == 0 or step == a.steps:
            with torch.no_grad():
                out = model(val[:, :-1])
                v = float(F.cross_entropy(out.reshape(-1, out.shape[-1]), val[:, 1:].reshape(-1)))
            curve.append((step, v))
            if rank == 0:
                print(f"step {step:5d}  train {float(loss):.3f}  val {v:.3f}  ppl {math.exp(v):.1f}  "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
    if rank == 0:
        total = sum(link.values())
        print(f"rank 0 sent {total / 2**20:.1f} MiB of rows: inter-node share {link['inter_node'] / max(total, 1):.3f}")
    if a.ranks > 1:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--router", choices=sorted(ROUTERS), default="locmoe")
    p.add_argument("--mu", type=float, default=0.1, help="LocMoE's locality coefficient (the paper gives none)")
    p.add_argument("--sharding", choices=("iid", "node_skewed"), default="node_skewed")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="windows per rank and step")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--port", type=int, default=29533)
    p.add_argument("--corpus", default=None, help="the folder with cats.txt (default: see brown.py)")
    a = p.parse_args()
    if a.ranks < 1 or a.ranks_per_node < 1 or a.ranks % a.ranks_per_node or a.experts % a.ranks:
        p.error("--ranks must be a multiple of --ranks-per-node, and --experts a multiple of --ranks")
    if a.ranks == 1:
        run(0, a)
    else:
        torch.multiprocessing.spawn(run, args=(a,), nprocs=a.ranks, join=True)


if __name__ == "__main__":
    main()
