#!/usr/bin/env python3
"""The paper's experiment, really trained: a small decoder-only MoE language model on the Brown corpus, expert
parallel over torch.distributed (gloo), under each router and data sharding, reporting validation loss and the
bytes each router sends over each link class (issue 14; results and how to read them: docs/training.md).

    PYTHONPATH=build/default/python /usr/bin/python3 examples/torch/lm/train_lm.py            # the default sweep
    ... train_lm.py --runs locmoe-0.1/node_skewed/1.25 switch/iid/critical --steps 100 --json
    ... train_lm.py --smoke --json                                                              # the test suite's

Model: token embedding + learned positions, `--layers` pre-norm blocks of causal self-attention and an MoE FFN
(locmoe_torch.MoELayer: `--experts` experts of `--ffn` hidden units), final norm, output tied to the embedding.
`--ranks` processes as nodes of `--ranks-per-node` (default 4 as 2 x 2); experts in blocks over the ranks; every
parameter but the experts is data parallel (gradients averaged). Each rank trains on its own shard of the training
texts, `--batch` windows of `--context` tokens a step; the validation loss is the mean over fixed windows of the
held-out texts (the same on every rank), every `--eval-every` steps.

A run is ROUTER/SHARDING/CAPACITY:
  ROUTER     switch        dense gate, top-1, aux loss 1e-2 (Fedus et al.)
             hash          balanced hash of the token id (Roller et al.; table from the training unigram counts)
             rre           PanGu-Sigma's Random Routed Experts: the text's genre group picks an expert group
                           (group g = node g's experts), a fixed hash of the token id the expert in it
             locmoe-MU     GrAP gate, top-1, aux loss 1e-2, locality loss coefficient MU (the paper gives none)
             node_limited  dense gate, top-2 inside the best node (num_groups = nodes, group_topk = 1), aux 1e-2
  SHARDING   iid (texts dealt round-robin) or node_skewed (each genre whole on one node; brown.shard)
  CAPACITY   a capacity factor (Megatron-Core's get_capacity per rank and expert), or "critical": the paper's
             critical capacity, critical_capacity(d, n, delta) with delta the 5% quantile of |cos| of the step's
             tokens to their expert's gate weight, over all ranks (MoELayer's capacity_factor="critical")
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import brown  # this folder: Python puts the script's folder first on sys.path
import report
import locmoe_torch as lt
from locmoe_torch.exchange import TrafficMeter

ROUTERS = ("switch", "hash", "rre", "locmoe", "node_limited")
# about 30 minutes on 2 cores: every router on both shardings, LocMoE's mu swept where locality can pay (node-skewed
# data), and the critical capacity against the factor 1.25 for the two learned top-1 routers
DEFAULT_RUNS = ([f"{r}/iid/1.25" for r in ("switch", "hash", "rre", "locmoe-0.1", "node_limited")]
                + [f"{r}/node_skewed/1.25" for r in ("switch", "hash", "rre", "locmoe-0.01", "locmoe-0.1", "locmoe-1",
                                                     "node_limited")]
                + ["switch/node_skewed/critical", "locmoe-0.1/node_skewed/critical"])
SMOKE_RUNS = ["switch/iid/1.25", "hash/node_skewed/1.25", "rre/node_skewed/1.25", "locmoe-0.1/node_skewed/1.25",
              "node_limited/node_skewed/1.25", "locmoe-0.1/iid/critical"]


def parse_run(spec):
    """"ROUTER/SHARDING/CAPACITY" -> dict(router, mu, sharding, capacity), or ValueError naming the rule."""
    parts = spec.split("/")
    if len(parts) != 3:
        raise ValueError(f"run {spec!r} must be ROUTER/SHARDING/CAPACITY")
    router, sharding, capacity = parts
    mu = None
    if router.startswith("locmoe-"):
        router, mu = "locmoe", _number(router[len("locmoe-"):], spec, "mu")
        if not (math.isfinite(mu) and mu >= 0):
            raise ValueError(f"run {spec!r}: mu must be a finite number >= 0")
    if router not in ROUTERS:
        raise ValueError(f"run {spec!r}: router must be one of {', '.join(ROUTERS)} (locmoe as locmoe-MU)")
    if router == "locmoe" and mu is None:
        raise ValueError(f"run {spec!r}: give LocMoE's mu as locmoe-MU (the paper gives no value)")
    if sharding not in ("iid", "node_skewed"):
        raise ValueError(f"run {spec!r}: sharding must be iid or node_skewed")
    if capacity != "critical":
        capacity = _number(capacity, spec, "capacity")
        if not (math.isfinite(capacity) and capacity > 0):
            raise ValueError(f"run {spec!r}: capacity must be a factor > 0 or 'critical'")
    elif router in ("hash", "rre"):
        raise ValueError(f"run {spec!r}: the critical capacity needs a gate with weights (not {router})")
    return dict(spec=spec, router=router, mu=mu, sharding=sharding, capacity=capacity)


def _number(text, spec, name):
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"run {spec!r}: {name} must be a number (got {text!r})") from None


def layer_settings(run, a, hash_table):
    nodes = a.ranks // a.ranks_per_node
    # softmax over all n experts before the top-k (use_pre_softmax): the chosen experts' probs scale their outputs,
    # so the language-model loss reaches the gate (Switch Transformer's p_i(x) E_i(x); the paper's eq. 1-2:
    # y = R E(x), R from softmax(G)). With Megatron-Core's default (softmax over the k chosen) a top-1 prob is
    # always 1 and only the aux losses train the gate.
    common = dict(capacity_factor=run["capacity"], ranks_per_node=a.ranks_per_node, use_pre_softmax=True)
    return {
        "switch": dict(gate="dense", aux_loss_coeff=1e-2),
        "hash": dict(gate="hash", aux_loss_coeff=0.0, hash_table=hash_table),
        "rre": dict(gate="rre", aux_loss_coeff=0.0, rre_groups=nodes),
        "locmoe": dict(gate="grap", aux_loss_coeff=1e-2, locality_loss_coeff=run["mu"] or 0.0),
        "node_limited": dict(gate="dense", aux_loss_coeff=1e-2, topk=2, num_groups=nodes, group_topk=1),
    }[run["router"]] | common


class Block(torch.nn.Module):
    def __init__(self, width, heads, moe):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attention = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.moe = moe

    def forward(self, x, mask, ids, domains):
        h = self.norm1(x)
        x = x + self.attention(h, h, h, attn_mask=mask, need_weights=False)[0]
        b, t, w = x.shape
        return x + self.moe(self.norm2(x).reshape(b * t, w), token_ids=ids, domains=domains).reshape(b, t, w)


class LanguageModel(torch.nn.Module):
    def __init__(self, vocab, width, heads, layers, context, make_moe):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, width)
        self.position = torch.nn.Parameter(torch.zeros(context, width))
        self.blocks = torch.nn.ModuleList([Block(width, heads, make_moe(i)) for i in range(layers)])
        self.norm = torch.nn.LayerNorm(width)
        torch.nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, ids, domains):
        t = ids.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        x = self.embedding(ids) + self.position[:t]
        flat_ids, flat_domains = ids.reshape(-1), domains.reshape(-1)
        for block in self.blocks:
            x = block(x, mask, flat_ids, flat_domains)
        return self.norm(x) @ self.embedding.weight.T

    def aux_loss(self, ranks):
        """The MoE layers' losses for a step whose gate gradients are averaged over `ranks`: the load-balancing
        loss (the global-batch form: summed over the ranks it is the whole batch's) times the ranks, so that the
        average weights the whole batch's loss by its coefficient; the locality loss (a per-rank mean) as it is."""
        return sum(b.moe.aux_loss + (ranks - 1) * b.moe.load_balancing_loss for b in self.blocks)


def stream(texts, vocab, group_of):
    """(ids, domains): the texts' token ids one after another and, per token, its genre's group."""
    ids, domains = [], []
    for t in texts:
        encoded = vocab.encode(t)
        ids.extend(encoded)
        domains.extend([group_of[t.genre]] * len(encoded))
    return torch.tensor(ids), torch.tensor(domains)


def prepare(a):
    """Everything the ranks share: per-sharding rank streams, validation stream, hash table, vocabulary size."""
    texts = brown.load(a.corpus)
    training, validation = brown.split(texts, seed=a.seed)
    vocab = brown.Vocabulary(training, a.vocab)
    group_of = brown.genre_groups(training, a.ranks // a.ranks_per_node)
    counts = torch.bincount(stream(training, vocab, group_of)[0], minlength=len(vocab))
    shards = {mode: [stream(s, vocab, group_of) for s in brown.shard(training, a.ranks, a.ranks_per_node, mode,
                                                                    seed=a.seed)]
              for mode in ("iid", "node_skewed")}
    return dict(vocab=len(vocab), shards=shards, validation=stream(validation, vocab, group_of),
                hash_table=lt.balanced_hash_table(counts, a.experts))


def windows(ids, domains, context, count, generator):
    """`count` random windows of context + 1 tokens (ids, domains)."""
    starts = torch.randint(0, len(ids) - context - 1, (count,), generator=generator).tolist()
    return (torch.stack([ids[s:s + context + 1] for s in starts]),
            torch.stack([domains[s:s + context + 1] for s in starts]))


def worker(rank, a, run, data, out_path):
    if a.ranks > 1:
        dist.init_process_group("gloo", init_method=f"file://{out_path}.init", rank=rank, world_size=a.ranks)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)  # the same shared parameters on every rank
    settings = layer_settings(run, a, data["hash_table"])

    def make_moe(layer):
        return lt.MoELayer(a.width, a.ffn, a.experts, seed=a.seed + 1000 * layer, **settings)

    model = LanguageModel(data["vocab"], a.width, a.heads, a.layers, a.context, make_moe)
    moes = [b.moe for b in model.blocks]
    shared = [p for n, p in model.named_parameters() if ".experts." not in n]
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr)
    ids, domains = data["shards"][run["sharding"]][rank]
    g = torch.Generator().manual_seed(a.seed * 7919 + rank)
    val = windows(*data["validation"], a.context, a.val_windows, torch.Generator().manual_seed(a.seed))
    R, n, L = a.ranks, a.experts, len(moes)
    plan_rows = torch.zeros(R, dtype=torch.int64)    # rows this rank dispatched to each rank, all steps and layers
    loads = torch.zeros(a.steps, L, n, dtype=torch.int64)
    dropped = routed = 0
    capacities, deltas, negatives = [], [], []
    meter = TrafficMeter(R) if R > 1 else None
    curve, train_seconds = [], 0.0

    def step_once():
        x, d = windows(ids, domains, a.context, a.batch, g)
        logits = model(x[:, :-1], d[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        optimizer.zero_grad()
        (loss + model.aux_loss(R)).backward()
        if R > 1:  # data parallel for everything but the experts (each rank's own)
            for p in shared:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= R
        optimizer.step()
        return float(loss)

    def evaluate():
        """Mean loss over the validation windows, `a.batch` at a time: the batch size of training, so that a
        capacity (absolute under "critical") drops as it does in training. Returns (loss, drop rate)."""
        total, dropped, routed = 0.0, 0, 0
        with torch.no_grad():
            for begin in range(0, a.val_windows, a.batch):
                x, d = val[0][begin:begin + a.batch], val[1][begin:begin + a.batch]
                out = model(x[:, :-1], d[:, :-1])
                total += float(F.cross_entropy(out.reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1),
                                               reduction="sum"))
                dropped += sum(m.last_dropped for m in moes)
                routed += sum(int(m.last_load.sum()) for m in moes)
        return total / (a.val_windows * a.context), dropped / max(routed, 1)

    for step in range(1, a.steps + 1):
        start = time.perf_counter()
        if meter is not None:
            with meter:
                loss = step_once()
        else:
            loss = step_once()
        train_seconds += time.perf_counter() - start
        for j, moe in enumerate(moes):
            plan_rows += moe.last_sent
            loads[step - 1, j] = moe.last_load
            dropped, routed = dropped + moe.last_dropped, routed + int(moe.last_load.sum())
            if moe.last_capacity is not None:
                capacities.append(moe.last_capacity)
            if moe.last_delta is not None:
                deltas.append(moe.last_delta)
                negatives.append(moe.last_negative_share)
        if step % a.eval_every == 0 or step == a.steps:
            val_loss, val_drops = evaluate()
            curve.append((step, val_loss))
            if rank == 0:
                last = loads[step - 1].double()  # this rank's loads: the progress line shows rank 0's view
                print(f"  {run['spec']}: step {step:4d}  train {loss:.3f}  val {curve[-1][1]:.3f}  rank 0's max/mean "
                      f"{float((last.amax(dim=1) / last.mean(dim=1)).mean()):.2f}  {train_seconds:.0f} s",
                      file=sys.stderr, flush=True)
    timing = {}
    for chunks in (1, 2):  # step time without and with the exchange/compute overlap (MoELayer chunks)
        for moe in moes:
            moe.chunks = chunks
        start = time.perf_counter()
        for _ in range(a.timing_steps):
            step_once()
        timing[chunks] = (time.perf_counter() - start) / max(a.timing_steps, 1)
    # gather what every rank saw
    plan = torch.stack(_all_gather(plan_rows, R))                      # [source, destination] rows
    measured = torch.stack(_all_gather(meter.sent, R)) if meter else plan * 0
    totals = torch.tensor([dropped, routed], dtype=torch.int64)
    cap = torch.tensor([sum(capacities), len(capacities)], dtype=torch.float64)
    dsum = torch.tensor([sum(deltas), len(deltas), sum(negatives)], dtype=torch.float64)
    if R > 1:
        for t in (loads, totals, cap, dsum):
            dist.all_reduce(t)
    if rank == 0:
        row_bytes = a.width * 4  # float32 rows
        # every dispatched row travels four times a step: to its expert and back, forward and backward
        plan_check = bool(torch.equal(measured, 2 * (plan + plan.T) * row_bytes)) if meter else None
        rows_per_step = plan.double() / (a.steps * L)   # one layer's dispatch, per step
        share = report.by_link_class(plan, a.ranks_per_node)
        mean = loads.double().mean(dim=2)
        result = dict(run, steps=a.steps, val_loss=curve, final_val_loss=curve[-1][1],
                      final_perplexity=report.perplexity(curve[-1][1]),
                      bytes_per_step={k: v / a.steps
                                      for k, v in report.by_link_class(measured, a.ranks_per_node).items()},
                      plan_check=plan_check,
                      inter_node_share=share["inter_node"] / max(sum(share.values()), 1),
                      max_mean_load=float((loads.double().amax(dim=2) / mean.clamp(min=1e-30)).mean()),
                      drop_rate=float(totals[0]) / max(float(totals[1]), 1),
                      val_drop_rate=val_drops,
                      dispatch_rows_per_step=rows_per_step.tolist(),
                      mean_capacity=float(cap[0] / cap[1]) if cap[1] else None,
                      mean_delta=float(dsum[0] / dsum[1]) if dsum[1] else None,
                      negative_cosine_share=float(dsum[2] / dsum[1]) if dsum[1] else None,
                      tokens_per_second=a.steps * a.batch * a.context * R / train_seconds,
                      step_seconds=timing[1], step_seconds_overlap=timing[2],
                      modelled_all_to_all_seconds=report.modelled_all_to_all(rows_per_step, a.ranks_per_node,
                                                                            a.token_bytes))
        with open(out_path, "w") as f:
            json.dump(result, f)
    if R > 1:
        dist.destroy_process_group()


def _all_gather(t, R):
    if R == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(R)]
    dist.all_gather(out, t.contiguous())
    return out


def train(run, a, data, index):
    """The run's report, or the run with an `error` (the message of the process that failed) when a process
    raised: one failed run does not lose the others (spawn stops the run's other processes)."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, f"run{index}.json")
        try:
            if a.ranks == 1:
                worker(0, a, run, data, out_path)
            else:
                torch.multiprocessing.spawn(worker, args=(a, run, data, out_path), nprocs=a.ranks, join=True)
        except Exception as e:  # noqa: BLE001 (the report names it; the sweep goes on)
            lines = [l for l in str(e).strip().splitlines() if l.strip()]
            return dict(run, error=lines[-1] if lines else type(e).__name__)
        with open(out_path) as f:
            return json.load(f)


def arguments(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=None, help="ROUTER/SHARDING/CAPACITY ... (default: the sweep below)")
    p.add_argument("--smoke", action="store_true", help="a few steps of a tiny model, every router (the test suite)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON report of every run")
    out.add_argument("--csv", action="store_true", help="print the report as CSV, a row per run")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="windows per rank and step")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--val-windows", type=int, default=128)
    p.add_argument("--timing-steps", type=int, default=5, help="steps timed with and without overlap after training")
    p.add_argument("--token-bytes", type=int, default=10240, help="bytes of a row in the modelled All-to-All")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--corpus", default=None, help="the folder with cats.txt (default: see brown.py)")
    a = p.parse_args(argv)
    if a.smoke:
        a.vocab, a.width, a.ffn, a.heads, a.context, a.batch = 512, 32, 32, 2, 16, 4
        a.steps, a.eval_every, a.val_windows, a.timing_steps = 4, 2, 8, 1
        a.runs = a.runs or SMOKE_RUNS
    a.runs = a.runs or DEFAULT_RUNS
    if a.ranks < 1 or a.ranks_per_node < 1 or a.ranks % a.ranks_per_node:
        p.error("--ranks must be a positive multiple of --ranks-per-node")
    if a.experts % a.ranks:
        p.error("--experts must be a multiple of --ranks")
    for name in ("steps", "eval_every", "batch", "context", "val_windows", "token_bytes", "heads", "layers",
                 "experts", "width", "ffn", "threads", "timing_steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.vocab < 3:
        p.error("--vocab must be >= 3 (<unk>, <eos> and a word)")
    if a.width % a.heads:
        p.error("--width must be a multiple of --heads")
    try:
        a.parsed = [parse_run(r) for r in a.runs]
    except ValueError as e:
        p.error(str(e))
    if any(r["router"] == "node_limited" for r in a.parsed) and a.experts % (a.ranks // a.ranks_per_node):
        p.error("node_limited needs --experts divisible by the nodes")
    return a


def main(argv=None):
    a = arguments(argv)
    data = prepare(a)
    runs = []
    for i, run in enumerate(a.parsed):
        print(f"run {i + 1}/{len(a.parsed)}: {run['spec']}", file=sys.stderr, flush=True)
        runs.append(train(run, a, data, i))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)  # the log keeps every finished run
    settings = {k: v for k, v in vars(a).items() if k not in ("parsed", "json", "csv")}
    if a.json:
        print(json.dumps(dict(settings=settings, runs=runs), indent=1))
    elif a.csv:
        print(report.to_csv(runs), end="")
    else:
        print(report.table(runs))
    failed = [r for r in runs if "error" in r]
    for r in failed:
        print(f"run {r['spec']} failed: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
