"""MoELayer's expert-parallel exchange: the routes rows take between the ranks (flat, or two-level over node
sub-groups), each run one all_to_all_single at a time with async_op, and the pipeline that sends chunk c + 1's rows
while the experts compute chunk c (the paper's section 3.2 overlap), forward and backward.

Every rank issues its collectives in the same program order whatever its data (a step with no rows is still a
collective), so the ranks of each group match them without a barrier.
"""
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable


class Step:
    """One all_to_all_single: the rows reordered by `order` (None: as they are), `send[i]` rows to rank i of `group`,
    `recv[i]` rows from it."""
    __slots__ = ("order", "send", "recv", "group")

    def __init__(self, order, send, recv, group):
        self.order, self.send, self.recv, self.group = order, list(send), list(recv), group


class Route:
    """Rows through `steps` in turn, then reordered by `final` (None: as they arrive)."""
    __slots__ = ("steps", "final")

    def __init__(self, steps, final=None):
        self.steps, self.final = steps, final


def blocks(sizes):
    """Index ranges [offset, offset + size) of consecutive blocks of the given sizes (a 1-D integer tensor)."""
    offsets = (torch.cumsum(sizes, 0) - sizes).tolist()
    return [torch.arange(o, o + z) for o, z in zip(offsets, sizes.tolist())]


def _gather(pieces):
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)


def flat_routes(sends, rank, group):
    """(to the experts, back) for `sends` [R x R] (rows from each rank to each): one all_to_all_single each way."""
    return (Route([Step(None, sends[rank].tolist(), sends[:, rank].tolist(), group)]),
            Route([Step(None, sends[:, rank].tolist(), sends[rank].tolist(), group)]))


def two_level_routes(sends, rank, ranks_per_node, node_group, peer_group):
    """(to the experts, back) in two steps each (see layer.py's module comment); the rows arrive in the order of
    flat_routes. Rank (node, local) is rank node * ranks_per_node + local."""
    G = ranks_per_node
    N = sends.shape[0] // G
    node, local = divmod(rank, G)
    c = sends.view(N, G, N, G)  # c[sn, sl, dn, dl]: rows from rank (sn, sl) to rank (dn, dl)
    mine, from_peers = c[node, local], c[node, :, :, local]  # [dn, dl] and [sl, dn]
    # to the experts. Step 1, within the node: to peer l my rows for (dn, l), every dn in order (mine are (dn, dl)).
    rows = blocks(mine.reshape(-1))
    step1 = Step(_gather([rows[dn * G + l] for l in range(G) for dn in range(N)]), mine.sum(dim=0),
                 from_peers.sum(dim=1), node_group)
    # step 2, across the nodes among ranks of my local index: to node dn the rows of every peer sl for (dn, local)
    rows = blocks(from_peers.reshape(-1))  # as gathered: (sl, dn)
    step2 = Step(_gather([rows[sl * N + dn] for dn in range(N) for sl in range(G)]), from_peers.sum(dim=0),
                 c[:, :, node, local].sum(dim=1), peer_group)
    to_experts = Route([step1, step2])
    # back: the same two steps mirrored (results by source rank, to the source's node, then to the source)
    step_a = Step(None, c[:, :, node, local].sum(dim=1), from_peers.sum(dim=0), peer_group)
    rows = blocks(from_peers.T.reshape(-1))  # as gathered: (dn, sl)
    step_b = Step(_gather([rows[dn * G + sl] for sl in range(G) for dn in range(N)]), from_peers.sum(dim=1),
                  mine.sum(dim=0), node_group)
    rows = blocks(mine.T.reshape(-1))  # as gathered: (l, dn)
    return to_experts, Route([step_a, step_b], _gather([rows[l * N + dn] for dn in range(N) for l in range(G)]))


class TrafficMeter:
    """Bytes this process's exchange really sent to each rank of the world (`sent` [world] int64): the sizes of the
    rows handed to all_to_all_single, counted while the meter is on (`with meter:`), forward and backward alike.
    Rows a rank sends itself count at its own index (all_to_all_single copies them locally)."""

    _active = []

    def __init__(self, world_size):
        self.sent = torch.zeros(world_size, dtype=torch.int64)

    def __enter__(self):
        TrafficMeter._active.append(self)
        return self

    def __exit__(self, *exc):
        TrafficMeter._active.remove(self)

    @staticmethod
    def record(step, sending):
        if not TrafficMeter._active:
            return
        row_bytes = sending.element_size() * (sending.shape[1] if sending.dim() > 1 else 1)
        ranks = dist.get_process_group_ranks(step.group)
        for meter in TrafficMeter._active:
            for i, rows in enumerate(step.send):
                meter.sent[ranks[i]] += rows * row_bytes


class Transfer:
    """One chunk's rows along a Route, one step in flight at a time."""

    def __init__(self, rows, route):
        self.route, self.taken, self.rows, self.sending, self.work = route, 0, rows, None, None
        self._issue()

    def _issue(self):
        step = self.route.steps[self.taken]
        self.taken += 1
        rows = self.rows if step.order is None else self.rows.index_select(0, step.order)
        self.sending = rows.contiguous()  # kept alive until the step completes
        TrafficMeter.record(step, self.sending)
        self.rows = rows.new_empty((sum(step.recv), rows.shape[1]))
        self.work = dist.all_to_all_single(self.rows, self.sending, step.recv, step.send, group=step.group,
                                           async_op=True)

    def advance(self):
        """Wait for the step in flight and start the next (nothing when the last one has been started)."""
        if self.taken < len(self.route.steps):
            self.work.wait()
            self._issue()

    def result(self):
        while self.taken < len(self.route.steps):
            self.advance()
        self.work.wait()
        self.sending = None
        return self.rows if self.route.final is None else self.rows.index_select(0, self.route.final)


class Chunk:
    """Chunk c of a step: `rows` the positions of its rows among this rank's rows (None: all of them), its routes
    to the experts and back, and on arrival `order` (received rows -> expert-major) and `counts` (rows per local
    expert)."""
    __slots__ = ("rows", "to_experts", "back", "order", "inverse", "counts")

    def __init__(self, rows, to_experts, back, order, counts):
        self.rows, self.to_experts, self.back, self.counts = rows, to_experts, back, counts
        self.order, self.inverse = order, torch.argsort(order)


def _pieces(tensor, chunks):
    return [tensor if c.rows is None else tensor.index_select(0, c.rows) for c in chunks]


def _assemble(pieces, chunks):
    if len(chunks) == 1 and chunks[0].rows is None:
        return pieces[0]
    out = pieces[0].new_empty((sum(p.shape[0] for p in pieces), pieces[0].shape[1]))
    for piece, chunk in zip(pieces, chunks):
        out.index_copy_(0, chunk.rows, piece)
    return out


def _overlapped(inputs, chunks, compute):
    """For each chunk c: inputs[c] to the experts, compute(c, rows), the result back. Chunk c + 1 starts travelling
    before chunk c is computed, and chunk c's result travels back while chunk c + 1 is computed: at most two
    chunks go each way at a time."""
    going, coming = [Transfer(inputs[0], chunks[0].to_experts)], []
    for c, chunk in enumerate(chunks):
        if c + 1 < len(chunks):
            going.append(Transfer(inputs[c + 1], chunks[c + 1].to_experts))
        arrived = going[c].result()
        if c + 1 < len(chunks):
            going[c + 1].advance()  # its second step, if it has one, travels during this chunk's computation
        for earlier in coming:
            earlier.advance()
        coming.append(Transfer(compute(c, arrived), chunk.back))
    return [transfer.result() for transfer in coming]


class ExpertPipeline(torch.autograd.Function):
    """rows (this rank's, in destination order) -> the experts' outputs for them, in the same order, chunk by chunk.
    The backward sends the output gradients the way the rows went, differentiates each chunk's experts, and sends the
    input gradients back; the parameters' gradients are summed over the chunks in chunk order.

    Each chunk's expert graph is kept until this node is freed (so that backward(retain_graph=True) can run twice).
    Only `params` get gradients: a tensor the experts use that is not among them (a weight tied to one outside the
    experts module) gets none from the experts. Not twice differentiable."""

    @staticmethod
    def forward(ctx, experts, chunks, record, rows, *params):
        ctx.chunks, ctx.record = chunks, record
        inputs, outputs = [], []

        def compute(c, arrived):
            chunk = chunks[c]
            x = arrived.index_select(0, chunk.order)
            if record:
                x = x.detach().requires_grad_()
                with torch.enable_grad():
                    y = experts(x, chunk.counts)
                inputs.append(x)
                outputs.append(y)
            else:
                y = experts(x, chunk.counts)
            return y.detach().index_select(0, chunk.inverse)

        results = _overlapped(_pieces(rows, chunks), chunks, compute)
        ctx.inputs, ctx.outputs, ctx.params = inputs, outputs, params
        return _assemble(results, chunks)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if not ctx.record:
            raise RuntimeError("MoELayer: the step ran without autograd and cannot be differentiated")
        chunks, params = ctx.chunks, ctx.params
        param_grads = [None] * len(params)

        def differentiate(c, arrived):
            chunk = chunks[c]
            grad_y = arrived.index_select(0, chunk.order)
            x, y = ctx.inputs[c], ctx.outputs[c]
            grad_x = None
            if y.requires_grad:  # else the experts' output depends on nothing differentiable (e.g. no rows)
                wanted = [x] + [p for p in params if p.requires_grad]
                got = iter(torch.autograd.grad(y, wanted, grad_y, retain_graph=True, allow_unused=True))
                grad_x = next(got)
                for i, p in enumerate(params):
                    g = next(got) if p.requires_grad else None
                    if g is not None:
                        param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
            if grad_x is None:  # experts that ignore their input
                grad_x = torch.zeros_like(x)
            return grad_x.index_select(0, chunk.inverse)

        results = _overlapped(_pieces(grad.contiguous(), chunks), chunks, differentiate)
        return (None, None, None, _assemble(results, chunks), *param_grads)
