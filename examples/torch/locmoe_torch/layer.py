"""An expert-parallel MoE layer on locmoe_torch's routing functions and torch.distributed.

Each rank routes its own tokens, sends every routed row to the rank of its expert with all_to_all_single (the
counts first, then the rows), runs its local experts, and sends the results back; the backward runs the two
exchanges in reverse. Experts are placed in blocks (expert e on rank floor(e R / n), Megatron-Core's and
DeepSpeed's placement), so the permuted rows are already grouped by destination rank.

exchange="two_level" sends the rows in two steps instead of one (the paper's section 3.2 group-wise exchange,
over node sub-groups): within each node, every rank first gathers the rows its node sends to the ranks of the
same local index on every node; then the ranks of one local index exchange across the nodes. Each row crosses the
inter-node links once, in one message per pair of nodes and local index, and arrives in the same order as with the
flat exchange, so the results are the same bit for bit.

Two-level sub-groups are made once per (world, ranks_per_node) and shared by every layer; torch.distributed makes
every rank of the world take part in making a group, so every rank must build its layers in the same order, and
two_level needs the default (world) process group.

chunks=C > 1 overlaps the exchange with the experts (the paper's section 3.2): every block of rows one rank sends
another is cut into C chunks; chunk c + 1's rows travel (all_to_all_single with async_op) while the experts compute
chunk c, and chunk c's results travel back while chunk c + 1 is computed; the backward does the same with the
gradients. Outputs and input gradients are those of C = 1 bit for bit when the experts compute each row
independently of the others (true of GroupedFFN on a BLAS whose rows of a product do not depend on how many rows
it is given, as Debian's reference BLAS; a blocked BLAS may round differently for a different row count); the
experts' parameter gradients are sums over the chunks, equal to C = 1's within rounding. Only the experts module's
own parameters get gradients through the exchange (a weight tied to one outside it gets none from the experts).

CPU tensors and the gloo backend only (locmoe_torch's operators take CPU tensors). The experts' parameters
(`layer.experts`) are this rank's own: keep them out of DistributedDataParallel (which would overwrite them with
rank 0's and average different experts' gradients); their gradients are already sums over the whole batch.
"""
import torch
import torch.distributed as dist

from .exchange import Chunk, ExpertPipeline, flat_routes, two_level_routes
from .locmoe import grap_gating, locality_loss_func
from .megatron import (compute_routing_scores_for_aux_loss, drop_to_capacity, get_capacity, permute,
                       switch_load_balancing_loss_func, topk_routing_with_score_function, unpermute, z_loss_func)
from .routers import empirical_delta, grap_weights, hash_routing, routed_cosines, rre_routing
from ._ops import check_int, ops

__all__ = ["GroupedFFN", "MoELayer"]

_SUB_GROUPS = {}  # (world ranks, ranks_per_node) -> (node groups, peer groups), made once in every process


def _two_level_groups(world, ranks_per_node):
    key = (tuple(world), ranks_per_node)
    if key not in _SUB_GROUPS:
        nodes = len(world) // ranks_per_node
        by_node = [dist.new_group([world[node * ranks_per_node + i] for i in range(ranks_per_node)])
                   for node in range(nodes)]
        by_index = [dist.new_group([world[node * ranks_per_node + local] for node in range(nodes)])
                    for local in range(ranks_per_node)]
        _SUB_GROUPS[key] = (by_node, by_index)
    return _SUB_GROUPS[key]


class GroupedFFN(torch.nn.Module):
    """A rank's local experts: FFN_j(x) = relu(x W1_j) W2_j with `w1` [experts, hidden, ffn] and `w2`
    [experts, ffn, hidden], expert `first + j` initialized from the seed `seed + 1 + first + j` (so that any number of
    ranks holds the same experts). forward(rows, counts): rows expert-major, counts[j] of them for expert j; returns
    the outputs in the same order. Any module with this forward can replace it in MoELayer (`experts=`)."""

    def __init__(self, hidden_size, ffn_hidden_size, first, count, seed=0, dtype=torch.float32):
        super().__init__()
        w1, w2 = [], []
        for e in range(first, first + count):
            g = torch.Generator().manual_seed(seed + 1 + e)
            w1.append(torch.randn(hidden_size, ffn_hidden_size, generator=g, dtype=dtype) / hidden_size ** 0.5)
            w2.append(torch.randn(ffn_hidden_size, hidden_size, generator=g, dtype=dtype) / ffn_hidden_size ** 0.5)
        self.w1 = torch.nn.Parameter(torch.stack(w1))
        self.w2 = torch.nn.Parameter(torch.stack(w2))

    def forward(self, rows, counts):
        outputs, start = [], 0
        for j, count in enumerate(counts):
            chunk = rows[start:start + count].to(self.w1.dtype)
            outputs.append(torch.relu(chunk @ self.w1[j]) @ self.w2[j])
            start += count
        return torch.cat(outputs).to(rows.dtype)


class MoELayer(torch.nn.Module):
    """y = sum over a token's chosen experts of prob * FFN_e(x) (FFN_e(x) = relu(x W1_e) W2_e), experts spread over
    the ranks of `process_group` (default: the world when torch.distributed is initialized, else one rank).

    Router: `gate` "grap" (LocMoE's GrAP gate, eq. 4, with a learned bias) or "dense" (a learned [n, h] weight, the
    Switch gate), then topk_routing_with_score_function (softmax after Top-k by default; `num_groups` and
    `group_topk` give the node-limited Top-k), optional token dropping. Or a router that does not learn: "hash"
    (hash_routing of forward's `token_ids`, through `hash_table` when given) or "rre" (PanGu-Sigma's rre_routing of
    `token_ids` and `domains` over `rre_groups` expert groups); they route top-1 with prob 1 and have no losses.
    Capacity: `capacity_factor` (a number: Megatron-Core's get_capacity(T k, n, cf) per expert and rank) or
    "critical": each step, delta = empirical_delta of |cos| of every rank's tokens to the gate weight of their first
    expert (q = `delta_quantile`), and each rank's capacity is critical_capacity(d, n, delta), the paper's Theorem 1
    bound taken with equality (grap and dense gates only). |cos| because the calculator counts both caps, |cos| >= delta
    (eq. 8); Assumption 3's one-sided cos >= delta has no positive delta once more than a q share of the routed
    cosines are negative, which happens in training (docs/training.md). A delta outside (0, 1), or no cosine at all,
    raises ValueError on every rank alike.
    forward(x [T, hidden], token_ids=None, domains=None) returns y [T, hidden] and sets `self.aux_loss`: the
    load-balancing loss with the counts of all ranks (Megatron-Core's global-batch form: summed over ranks it is the
    loss of the whole batch), plus the z-loss and LocMoE's locality loss of this rank's tokens when their
    coefficients are set (`load_balancing_loss` holds the first alone: a trainer that averages the gate's
    gradients over R data-parallel ranks weights the whole batch's loss by coeff / R unless it multiplies this
    part by R); and the step's statistics: `last_load` [n] (this rank's tokens routed to each expert
    before drops), `last_dropped` (choices dropped), `last_capacity`, `last_delta` (capacity "critical").
    Parameters: the gate's (replicated on every rank: reduce their gradients as data-parallel parameters) and the
    rank's n / R experts, `experts`: a GroupedFFN (`experts.w1` [n/R, hidden, ffn], `experts.w2` [n/R, ffn, hidden])
    unless the caller passes its own module with GroupedFFN's forward(rows, counts). `chunks`: see the module comment.
    """

    def __init__(self, hidden_size, ffn_hidden_size, num_experts, topk=1, gate="grap", score_function="softmax",
                 use_pre_softmax=False, capacity_factor=None, drop_policy="probs", aux_loss_coeff=1e-2,
                 z_loss_coeff=0.0, locality_loss_coeff=0.0, ranks_per_node=1, process_group=None, seed=0,
                 dtype=torch.float32, exchange="flat", chunks=1, experts=None, num_groups=None, group_topk=None,
                 hash_table=None, rre_groups=None, delta_quantile=0.05):
        super().__init__()
        if gate not in ("grap", "dense", "hash", "rre"):
            raise ValueError(f"gate must be 'grap', 'dense', 'hash' or 'rre' (got {gate!r})")
        fixed = gate in ("hash", "rre")
        if fixed and topk != 1:
            raise ValueError(f"gate {gate!r} routes top-1 (got topk = {topk})")
        if gate == "rre":
            rre_groups = check_int("rre_groups", rre_groups, 1, num_experts)
        elif rre_groups is not None:
            raise ValueError(f"rre_groups is for gate 'rre' (got gate {gate!r})")
        if hash_table is not None:
            if gate != "hash":
                raise ValueError(f"hash_table is for gate 'hash' (got gate {gate!r})")
            hash_table = torch.as_tensor(hash_table)
        if (num_groups is None) != (group_topk is None):
            raise ValueError("num_groups and group_topk go together (node-limited top-k): give both or neither")
        if fixed and num_groups is not None:
            raise ValueError(f"num_groups and group_topk are for the learned gates (got gate {gate!r})")
        if drop_policy not in ("probs", "position"):
            raise ValueError(f"drop_policy must be 'probs' or 'position' (got {drop_policy!r})")
        if capacity_factor == "critical":
            if fixed:
                raise ValueError(f"capacity_factor 'critical' needs a gate with weights (grap or dense), not {gate!r}")
            if not (isinstance(delta_quantile, (int, float)) and 0 <= delta_quantile <= 1):
                raise ValueError(f"delta_quantile must be a number in [0, 1] (got {delta_quantile!r})")
        elif capacity_factor is not None:
            get_capacity(1, 1, capacity_factor)  # raises on a factor that is not a finite number >= 0
        self.group = process_group if process_group is not None else (
            dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        self.ranks = dist.get_world_size(self.group) if self.group is not None else 1
        self.rank = dist.get_rank(self.group) if self.group is not None else 0
        if num_experts % self.ranks:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of the ranks ({self.ranks})")
        if not 1 <= topk <= num_experts:
            raise ValueError(f"topk must be in [1, num_experts = {num_experts}] (got {topk})")
        if self.ranks % ranks_per_node:
            raise ValueError(f"ranks_per_node ({ranks_per_node}) must divide the ranks ({self.ranks})")
        if exchange not in ("flat", "two_level"):
            raise ValueError(f"exchange must be 'flat' or 'two_level' (got {exchange!r})")
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be an integer >= 1 (got {chunks!r})")
        self.exchange, self.chunks = exchange, chunks
        self.node_group = self.peer_group = None
        if exchange == "two_level" and self.group is not None and self.ranks > 1:
            if self.group is not dist.group.WORLD and self.ranks != dist.get_world_size():
                raise ValueError("exchange='two_level' needs the default (world) process group")
            by_node, by_index = _two_level_groups(list(range(self.ranks)), ranks_per_node)
            self.node_group = by_node[self.rank // ranks_per_node]
            self.peer_group = by_index[self.rank % ranks_per_node]
        self.hidden_size, self.num_experts, self.topk = hidden_size, num_experts, topk
        self.local_experts = num_experts // self.ranks
        self.gate_kind, self.score_function, self.use_pre_softmax = gate, score_function, use_pre_softmax
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.aux_loss_coeff, self.z_loss_coeff = aux_loss_coeff, z_loss_coeff
        self.locality_loss_coeff, self.ranks_per_node = locality_loss_coeff, ranks_per_node
        self.num_groups, self.group_topk, self.delta_quantile = num_groups, group_topk, delta_quantile
        self.hash_table, self.rre_groups, self.seed = hash_table, rre_groups, seed
        g = torch.Generator().manual_seed(seed)
        if fixed:
            pass
        elif gate == "grap":
            self.gate_bias = torch.nn.Parameter(torch.zeros(num_experts, dtype=dtype))
        else:
            self.gate_weight = torch.nn.Parameter(torch.randn(num_experts, hidden_size, generator=g, dtype=dtype)
                                                  / hidden_size ** 0.5)
        self.experts = experts if experts is not None else GroupedFFN(
            hidden_size, ffn_hidden_size, self.rank * self.local_experts, self.local_experts, seed, dtype)
        self.aux_loss = None
        self.last_counts = None  # [R, n/R] rows this rank received per (source rank, local expert) in the last step
        self.last_sent = None    # [R] rows this rank sent to each rank in the last step (itself included)
        self.last_load = self.last_dropped = self.last_capacity = self.last_delta = None
        self.last_negative_share = None  # capacity "critical": share of the routed cosines below 0
        self._grap_weights = None
        self.load_balancing_loss = None

    def link_bytes(self, row_bytes):
        """Bytes the last step's rows took to this rank itself, to the other ranks of its node and to other nodes
        (each way; the results come back the same way), for rows of `row_bytes` bytes."""
        if self.last_sent is None:
            raise ValueError("link_bytes: run forward first (it reports the last step)")
        sent = self.last_sent.tolist()
        node = self.rank // self.ranks_per_node
        same = sent[self.rank]
        intra = sum(c for d, c in enumerate(sent) if d // self.ranks_per_node == node) - same
        return {"same_rank": same * row_bytes, "intra_node": intra * row_bytes,
                "inter_node": (sum(sent) - same - intra) * row_bytes}

    def logits(self, x):
        if self.gate_kind == "grap":
            return grap_gating(x, self.num_experts, self.gate_bias)
        return x.to(self.gate_weight.dtype) @ self.gate_weight.T

    def gate_weights(self):
        """The gate's weight vectors [n, hidden] (float64): GrAP's block means, or the dense gate's rows."""
        if self.gate_kind == "grap":  # fixed block means: built once
            if self._grap_weights is None:
                self._grap_weights = grap_weights(self.hidden_size, self.num_experts)
            return self._grap_weights
        if self.gate_kind == "dense":
            return self.gate_weight.detach().to(torch.float64)
        raise ValueError(f"gate {self.gate_kind!r} has no weight vectors")

    def route(self, x, token_ids=None, domains=None):
        """(probs, routing_map) [T, n] before capacity, and the logits (None for hash and rre); sets aux_loss."""
        if self.gate_kind in ("hash", "rre"):
            if token_ids is None or (self.gate_kind == "rre" and domains is None):
                raise ValueError(f"gate {self.gate_kind!r} needs forward's token_ids"
                                 + (" and domains" if self.gate_kind == "rre" else ""))
            if token_ids.shape != (x.shape[0],) or (domains is not None and domains.shape != (x.shape[0],)):
                raise ValueError(f"token_ids and domains must be [tokens] = [{x.shape[0]}]")
            self.aux_loss = self.load_balancing_loss = x.new_zeros((), dtype=torch.float32)
            if self.gate_kind == "hash":
                return (*hash_routing(token_ids, self.num_experts, self.seed, self.hash_table), None)
            return (*rre_routing(token_ids, domains, self.num_experts, self.rre_groups, self.seed), None)
        logits = self.logits(x)
        probs, routing_map = topk_routing_with_score_function(logits, self.topk, self.use_pre_softmax,
                                                              num_groups=self.num_groups, group_topk=self.group_topk,
                                                              score_function=self.score_function)
        self.aux_loss = self._losses(logits, routing_map)
        return probs, routing_map, logits

    def _capacity(self, x, probs, routing_map):
        if self.capacity_factor != "critical":
            return get_capacity(x.shape[0] * self.topk, self.num_experts, self.capacity_factor)
        first = torch.where(routing_map.any(dim=1), probs.detach().masked_fill(~routing_map, -1).argmax(dim=1), -1)
        cosines = self._all_ranks(routed_cosines(x, self.gate_weights(), first))
        # every rank sees the same cosines, so every rank takes the same capacity or raises the same error (a rank
        # raising alone would leave the others waiting in the exchange)
        if cosines.numel() == 0:
            raise ValueError("capacity 'critical': no routed token has a cosine (all routed nowhere or of zero norm)")
        self.last_delta = empirical_delta(cosines.abs(), self.delta_quantile)
        self.last_negative_share = float((cosines < 0).double().mean())
        if not 0 < self.last_delta < 1:
            raise ValueError(f"capacity 'critical': the batch's delta ({self.last_delta:.4g}, the "
                             f"{self.delta_quantile} quantile of the routed |cos|) must be in (0, 1)")
        return ops.critical_capacity(self.hidden_size, self.num_experts, self.last_delta)

    def _all_ranks(self, values):
        """The 1-D float64 `values` of every rank of the group, in rank order."""
        if self.group is None or self.ranks == 1:
            return values
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.ranks)]
        dist.all_gather(sizes, torch.tensor([values.numel()]), group=self.group)
        longest = max(int(z) for z in sizes)
        padded = torch.cat([values, values.new_zeros(longest - values.numel())])
        everyone = [torch.empty_like(padded) for _ in range(self.ranks)]
        dist.all_gather(everyone, padded, group=self.group)
        return torch.cat([v[:int(z)] for v, z in zip(everyone, sizes)])

    def forward(self, x, token_ids=None, domains=None):
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"x must be [tokens, {self.hidden_size}] (got {tuple(x.shape)})")
        probs, routing_map, _ = self.route(x, token_ids, domains)
        self.last_load = routing_map.sum(dim=0)
        self.last_dropped, self.last_capacity = 0, None
        if self.capacity_factor is not None:
            self.last_capacity = self._capacity(x, probs, routing_map)
            probs, routing_map = drop_to_capacity(probs, routing_map, self.last_capacity, self.drop_policy)
            self.last_dropped = int(self.last_load.sum() - routing_map.sum())
        permuted, _, sorted_indices, _, _ = permute(x, routing_map)
        tokens_per_expert = routing_map.sum(dim=0)
        expert_out = self._through_experts(permuted, tokens_per_expert)
        return unpermute(expert_out, sorted_indices, x.shape, probs, routing_map)

    def _losses(self, logits, routing_map):
        loss = logits.new_zeros(())
        self.load_balancing_loss = loss
        if self.aux_loss_coeff:
            aux_map, scores = compute_routing_scores_for_aux_loss(logits, self.topk, self.score_function)
            counts = aux_map.sum(dim=0)
            total = torch.tensor(logits.shape[0], dtype=torch.int64)
            if self.group is not None:  # the counts and tokens of every rank
                dist.all_reduce(counts, group=self.group)
                dist.all_reduce(total, group=self.group)
            self.load_balancing_loss = switch_load_balancing_loss_func(scores, counts, float(total), self.topk,
                                                                       self.num_experts, self.aux_loss_coeff)
            loss = loss + self.load_balancing_loss
        if self.z_loss_coeff:
            loss = loss + z_loss_func(logits, self.z_loss_coeff)
        if self.locality_loss_coeff:
            scores = torch.softmax(logits.float(), dim=-1)
            loss = loss + locality_loss_func(scores, routing_map, self.ranks, self.ranks_per_node, self.rank,
                                             self.locality_loss_coeff)
        return loss

    def _through_experts(self, permuted, tokens_per_expert):
        local = self.local_experts
        if self.group is None or self.ranks == 1:
            counts = tokens_per_expert.view(1, local)
            self.last_counts = counts
            self.last_sent = counts.sum(dim=1)
            return self.experts(permuted, tokens_per_expert.tolist())
        # every rank's tokens per expert [R x n] (n integers per rank): what each pair of ranks sends
        everyone = [torch.empty_like(tokens_per_expert) for _ in range(self.ranks)]
        dist.all_gather(everyone, tokens_per_expert.contiguous(), group=self.group)
        per_expert = torch.stack(everyone)
        sends = per_expert.view(self.ranks, self.ranks, local).sum(dim=2)  # [source, destination] rows
        counts = per_expert[:, self.rank * local:(self.rank + 1) * local]  # [source, local expert]
        self.last_counts = counts
        self.last_sent = sends[self.rank]
        params = tuple(self.experts.parameters())
        record = torch.is_grad_enabled() and (permuted.requires_grad or any(p.requires_grad for p in params))
        return ExpertPipeline.apply(self.experts, self._chunks(sends, counts), record, permuted, *params)

    def _routes(self, sends):
        if self.exchange == "two_level":
            return two_level_routes(sends, self.rank, self.ranks_per_node, self.node_group, self.peer_group)
        return flat_routes(sends, self.rank, self.group)

    def _chunks(self, sends, counts):
        """The step's rows in `self.chunks` chunks: chunk c takes rows [floor(c s / C), floor((c + 1) s / C)) of each
        block of s rows that one rank sends to another. On arrival each chunk is put expert-major: for each local
        expert, its rows from each source in source order, then token order (one process's order)."""
        C, me = self.chunks, self.rank
        sent_at = (torch.cumsum(sends[me], 0) - sends[me]).tolist()  # where my block for each rank starts
        # expert_at[s][j]: where local expert j's rows start in source s's block ([s][local] + its end)
        expert_at = torch.cat([torch.zeros(self.ranks, 1, dtype=counts.dtype), torch.cumsum(counts, 1)], 1).tolist()
        chunks = []
        for c in range(C):
            low, high = sends * c // C, sends * (c + 1) // C
            rows = None if C == 1 else torch.cat([
                torch.arange(sent_at[d] + int(low[me, d]), sent_at[d] + int(high[me, d])) for d in range(self.ranks)])
            arriving = (high - low)[:, me]
            arrived_at = (torch.cumsum(arriving, 0) - arriving).tolist()  # where each source's rows land
            first, arriving = low[:, me].tolist(), arriving.tolist()
            pieces, per_expert = [], []
            for j in range(self.local_experts):
                total = 0
                for s in range(self.ranks):  # source s's chunk holds rows [low, high) of its block, expert-major
                    begin = max(first[s], expert_at[s][j])
                    end = min(first[s] + arriving[s], expert_at[s][j + 1])
                    if end > begin:
                        at = arrived_at[s] - first[s]
                        pieces.append(torch.arange(at + begin, at + end))
                        total += end - begin
                per_expert.append(total)
            order = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
            chunks.append(Chunk(rows, *self._routes(high - low), order, per_expert))
        return chunks
