"""Expert parallelism: dispatch/combine over all_to_all_single with r-chunk pipelining (FSMoE).

Each of the P ranks of the expert-parallel group holds ``E / P`` consecutive experts and its own tokens.
The layer routes its tokens locally, permutes the assignments into (expert, token) order and hands the rows
to :class:`EPExperts` (an autograd.Function):

forward (degree ``r_fwd``)
    1. sizes first: one ``all_gather`` of the (r, E) assignment counts per chunk, so every rank knows every
       split of every exchange (uneven splits, no further size round trips);
    2. the local tokens are cut into ``r`` contiguous token ranges (chunks); every chunk's rows are
       dispatched with ``all_to_all_single(..., async_op=True)`` (all chunks issued up front with
       ``order_fwd="dispatch-first"``; with "interleaved" each chunk's dispatch follows the previous chunk's
       combine, flat path only), together with a small int64 tag per row (source rank, local expert, token);
    3. for each chunk in turn: wait for its dispatch, run the expert MLP (grouped GEMM) on its rows, issue
       its combine asynchronously - so chunk c's compute overlaps chunk c+1's dispatch and chunk c-1's
       combine;
    4. wait for the combines and put the rows back in place.
backward (degree ``r_bwd``, chosen independently)
    the same pipeline on the output gradients with its own chunking. The expert rank finds the saved expert
    inputs/pre-activations of each incoming row by its tag (source, expert, token), so forward and backward chunks
    need not coincide. At the first gap of the backward pipeline (after the first chunk's combine is issued) the
    :class:`GradSliceReducer`, if given, launches the layer's planned slice of the dense-gradient all-reduce as one
    all-reduce (the planner prices one alpha per layer's slice). ``wgrad`` places the expert weight gradients (the
    planner's ``wgrad_bwd``): "fused" computes dW with dX in each chunk's compute (autograd's order: the combine
    waits for it); "per-chunk" computes chunk c's dW right after chunk c's combine is issued (after the dense slice,
    at the first gap); "deferred" computes every dW after the last combine is issued. The split modes issue each
    combine when its dX is done, so dW overlaps the combines. On the hierarchical path a combine's second
    (intra-node) step can only be issued by the host thread once its first step has finished: the pipeline checks
    before every dW, so such a step waits behind at most one chunk's dW (on a GPU the dW kernels are queued
    asynchronously, the host check comes right after).

Hierarchical path (``hierarchical=True``): every exchange runs in two steps, first inside the node
(intra-node all-to-all to the local peer with the destination's local index), then between nodes
(all-to-all among the ranks with the same local index); the combine runs the inverse (inter-node, then
intra-node). Both steps are asynchronous: a per-pass :class:`_Scheduler` issues a chunk's second step as
soon as its first has completed (checked without blocking whenever a step is added and before every chunk's
compute), keeps every group's collectives in the same order on all ranks, and before chunk c's compute makes
sure chunk c+1's inter-node step is in flight, so it overlaps chunk c's compute. Set
``ExpertParallel.events = []`` to record the issue order and the chunk computes.

Expert-sharded path (``ExpertParallel.create_groups(..., expert_shards=S)``, FSMoE's own layout when there are
fewer experts than GPUs): nodes of S ranks each hold 1/S of the FFN width of the node's ``E / P`` experts; the EP
group (P ranks, one per node, the same index in each) exchanges the rows of a chunk in one all-to-all, then the
node's S ranks all-gather what each received (an all_to_all_single sending a rank's block to every peer, uneven
blocks allowed), every rank runs all of them through its shard, and the partial outputs are reduce-scattered back
(an all_to_all_single of the peers' segments, summed in peer order) before the return all-to-all. The backward
runs the same chain on the output gradients (its dX partials reduce-scattered, each shard's dW complete on its
rank). Rows carry their source's index in the domain (the P * S ranks, node-major), so forward and backward
chunks still need not coincide. The two steps are chained by the same scheduler as the hierarchical path, but
the step put in flight ahead of the previous chunk's compute is the all-to-all (the first): no compute waits for
a later chunk's inter-node transfer. The all-gather's send buffer holds S copies of the received block (the
collective takes one input tensor): a transient S x the chunk's received rows per rank, beside the S x output
an all-gather has anyway.

Expert data parallelism (EP smaller than the data-parallel world, :meth:`ExpertParallel.create_groups`): every
expert then has D / P copies, one per EP group; the exchanges stay inside each EP group, and
:class:`ExpertGradReducer` sums each expert's gradient over its copies (the expert-data-parallel group:
asynchronous bucket all-reduces launched from the gradient hooks as soon as a layer's expert gradients exist, so
they overlap the rest of the backward - what the FSMoE planner charges, ``expert_grad_exposed_ms`` -, the rest
at ``finish()``) while the dense gradients are averaged over the whole data-parallel group
(:class:`GradSliceReducer` with ``ep.dp_group``).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from adasched.kernels.moe import (Backend, expert_mlp_backward, expert_mlp_backward_data, expert_mlp_backward_weight,
                                  expert_mlp_forward, make_index)

__all__ = ["ExpertParallel", "EPExperts", "GradSliceReducer", "ExpertGradReducer", "ep_experts",
           "check_pipeline_settings", "shared_expert_index", "WGRAD_MODES", "ORDERS"]

WGRAD_MODES = ("fused", "per-chunk", "deferred")
#: collective issue orders of a pass (the planner's ``order_fwd``/``order_bwd``): every dispatch up front, or
#: chunk c+1's dispatch issued just before chunk c's compute, so each combine follows one dispatch
ORDERS = ("dispatch-first", "interleaved")


# ---------------------------------------------------------------------------------------------------
# groups
# ---------------------------------------------------------------------------------------------------
@dataclass
class ExpertParallel:
    """The expert-parallel group, its data-parallel surroundings and, for the hierarchical path, its intra-/inter-node
    sub-groups.

    Build on every rank at the same point (both constructors create process groups collectively):
    :meth:`create` makes EP over one group (default: the world); :meth:`create_groups` splits the world (or a
    data-parallel group) into EP groups of a given size and the expert-data-parallel groups that join the replicas
    of each expert (Megatron-core's expert_model_parallel / expert_data_parallel groups).

    ``dp_group``/``dp_ranks``: the data-parallel group, whose ranks all hold different data for the same model:
    the dense gradients are averaged over it, the router statistics (expert bias, top-p controller) reduced over
    it. ``expert_dp_group``/``expert_dp_ranks``: the ranks holding the same experts as this one (this rank
    included, in EP-group order); ``expert_dp_group`` is None when there is no other copy.
    """

    group: object
    ranks: list[int]
    rank: int                  # index of this process inside ``ranks``
    num_experts: int
    hierarchical: bool = False
    gpus_per_node: int = 1
    intra_group: object = None
    inter_group: object = None
    stats: dict = field(default_factory=lambda: {"gaps": 0})
    events: list | None = None     # set to [] to record collective issues and chunk computes (tests, traces)
    dp_group: object = None        # None: the EP group itself (what :meth:`create` builds)
    dp_ranks: list[int] | None = None
    expert_dp_group: object = None
    expert_dp_ranks: list[int] | None = None
    shards: int = 1
    """S: ranks sharding each expert (FSMoE's layout: a node's GPUs each hold 1/S of the FFN width of the node's
    experts); 1 = whole experts per rank."""
    shard_group: object = None     # the S ranks sharing this rank's experts (one node); None when S = 1
    shard_rank: int = 0            # index of this process in its shard group
    domain_group: object = None    # the P * S ranks whose tokens meet (EP groups x shard groups); S = 1: ``group``
    domain_ranks: list[int] | None = None

    def __post_init__(self):
        if self.dp_ranks is None:
            self.dp_group, self.dp_ranks = self.group, list(self.ranks)
        if self.expert_dp_ranks is None:
            self.expert_dp_ranks = [self.ranks[self.rank]]
        if self.domain_ranks is None:
            self.domain_group, self.domain_ranks = self.group, list(self.ranks)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def dp_size(self) -> int:
        """Data-parallel size: how many ranks' losses the gradients average (= EP size x expert-DP size)."""
        return len(self.dp_ranks)

    @property
    def expert_dp_size(self) -> int:
        """How many copies of this rank's experts exist (ranks in ``expert_dp_ranks``)."""
        return len(self.expert_dp_ranks)

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.size

    @property
    def num_nodes(self) -> int:
        return self.size // self.gpus_per_node

    @property
    def domain_size(self) -> int:
        """Ranks whose tokens travel among each other: the EP group times the shard group (P * S)."""
        return self.size * self.shards

    @property
    def domain_rank(self) -> int:
        """Index of this process in ``domain_ranks`` (node-major: EP index * S + shard index)."""
        return self.rank * self.shards + self.shard_rank

    def shard_columns(self, ffn: int) -> slice:
        """This rank's slice of an expert's FFN width (the whole width when S = 1); ValueError when S does not
        divide ``ffn``."""
        if ffn % self.shards:
            raise ValueError(f"ffn: {ffn} is not divisible by the expert shards {self.shards}")
        f = ffn // self.shards
        return slice(self.shard_rank * f, (self.shard_rank + 1) * f)

    @classmethod
    def create(cls, num_experts: int, group=None, hierarchical: bool = False, gpus_per_node: int | None = None,
               timeout_s: float = 60.0) -> "ExpertParallel":
        """EP over ``group`` (default: the whole world), which is also the data-parallel group (no expert copies
        elsewhere; for EP smaller than the data-parallel world use :meth:`create_groups`). Raises ValueError naming
        the value when the experts do not divide over the ranks or ``gpus_per_node`` does not divide the group."""
        group = group if group is not None else dist.group.WORLD
        ranks = dist.get_process_group_ranks(group)
        _check_divides(num_experts, len(ranks), hierarchical, gpus_per_node)
        ep = cls(group=group, ranks=ranks, rank=ranks.index(dist.get_rank()), num_experts=num_experts,
                 hierarchical=hierarchical)
        if hierarchical:
            if len(ranks) != dist.get_world_size():
                # each rank would create only its own EP group's node groups: new_group calls that differ between
                # ranks (a reset connection on one rank, a hang on another)
                raise ValueError(f"group: a hierarchical EP group of {len(ranks)} of the {dist.get_world_size()} "
                                 f"ranks; use ExpertParallel.create_groups(num_experts, ep_size={len(ranks)}, "
                                 f"hierarchical=True, ...), which builds every group's node groups on every rank")
            _attach_node_groups(ep, [ranks], gpus_per_node, timedelta(seconds=timeout_s))
        return ep

    @classmethod
    def create_groups(cls, num_experts: int, ep_size: int, group=None, *, hierarchical: bool = False,
                      gpus_per_node: int | None = None, expert_shards: int = 1,
                      timeout_s: float = 60.0) -> "ExpertParallel":
        """Expert data parallelism: split the data-parallel ``group`` (default: the world; size D) into D / ep_size
        contiguous EP groups (ranks [k*ep_size, (k+1)*ep_size) of the group, Megatron-core's default order), each
        holding all ``num_experts`` experts, ``num_experts / ep_size`` per rank; rank i of every EP group holds
        the same experts, so the ranks {k*ep_size + i} form expert-data-parallel group i. Returns this rank's
        :class:`ExpertParallel` with ``dp_group`` = ``group`` and ``expert_dp_group`` attached.

        Collective over the world: every rank calls it with its own data-parallel group (the groups of all ranks
        must be disjoint; they are exchanged once with ``all_gather_object`` when ``group`` is not the world) and
        creates every group of every data-parallel group, in the same order. ``ep_size == D`` gives the EP of
        :meth:`create` (no expert copies); ``ep_size == 1`` replicates every expert on every rank. ValueError
        naming the argument when ``ep_size`` does not divide D, ``num_experts`` is not a multiple of ``ep_size``,
        or ``gpus_per_node`` does not divide ``ep_size`` (with ``expert_shards``: ``ep_size * expert_shards`` not
        dividing D, or ``hierarchical`` too); raised before any group is created, on every rank.

        ``expert_shards`` S > 1 builds FSMoE's expert-sharded layout (the FSMoE planner's ``hierarchical``
        configurations): the data-parallel group splits into domains of ``ep_size * S`` contiguous ranks, each
        domain into ``ep_size`` nodes of S contiguous ranks; the ranks with the same index in every node of a domain
        form an EP group (``ep_size`` ranks, ``num_experts / ep_size`` experts each, one all-to-all across the
        nodes) and each node's S ranks (``shard_group``) hold 1/S of the FFN width of the same experts: a chunk's
        rows are all-gathered inside the node after the all-to-all and the partial outputs reduce-scattered
        before the return all-to-all. Expert copies: one per domain (``expert_dp_group``, D / (ep_size * S))."""
        for name, v in (("ep_size", ep_size), ("expert_shards", expert_shards)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {v!r} must be an int >= 1")
        if expert_shards > 1 and hierarchical:
            raise ValueError("expert_shards: the expert-sharded layout has its own exchange (all-to-all across the "
                             "nodes, all-gather inside them); it does not combine with hierarchical=True")
        S = expert_shards
        group = group if group is not None else dist.group.WORLD
        mine = dist.get_process_group_ranks(group)
        parents = [sorted(mine)]                        # group ranks are in global-rank order (new_group sorts)
        if len(mine) != dist.get_world_size():          # every rank must create every group: learn the others'
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, sorted(mine))
            parents = [list(g) for g in sorted({tuple(g) for g in gathered})]
            seen = [r for g in parents for r in g]
            if len(seen) != len(set(seen)):             # the same verdict on every rank: all raise together
                raise ValueError(f"group: the ranks' data-parallel groups overlap: {parents}")
        sizes = sorted({len(g) for g in parents})
        if any(n % (ep_size * S) for n in sizes):
            what = f"ep_size: {ep_size}" + (f" x expert_shards {S}" if S > 1 else "")
            raise ValueError(f"{what} does not divide the data-parallel size "
                             f"{sizes[0] if len(sizes) == 1 else sizes}")
        _check_divides(num_experts, ep_size, hierarchical, gpus_per_node)
        me = dist.get_rank()
        to = timedelta(seconds=timeout_s)
        ep = edp = None
        ep_groups = []
        D = ep_size * S                                 # ranks of one domain
        for parent in parents:                          # the same calls in the same order on every rank
            for k in range(len(parent) // D):
                domain = parent[k * D:(k + 1) * D]
                dom = shard = None
                if S > 1:
                    dg = dist.new_group(domain, timeout=to)
                    if me in domain:
                        dom = dg
                    for n in range(ep_size):            # the nodes: S contiguous ranks sharding the same experts
                        ranks = domain[n * S:(n + 1) * S]
                        g = dist.new_group(ranks, timeout=to)
                        if me in ranks:
                            shard = (g, ranks.index(me))
                for l in range(S):                      # EP group l: index l of every node (S = 1: the domain)
                    ranks = domain[l::S]
                    g = dist.new_group(ranks, timeout=to)
                    ep_groups.append(ranks)
                    if me in ranks:
                        ep = cls(group=g, ranks=ranks, rank=ranks.index(me), num_experts=num_experts,
                                 hierarchical=hierarchical, dp_group=group, dp_ranks=list(mine))
                        if S > 1:
                            ep.shards, (ep.shard_group, ep.shard_rank) = S, shard
                            ep.domain_group, ep.domain_ranks = dom, list(domain)
            for i in range(D):                          # copies: the same position in every domain
                ranks = parent[i::D]
                g = dist.new_group(ranks, timeout=to) if len(ranks) > 1 else None
                if me in ranks:
                    edp = (g, ranks)
        ep.expert_dp_group, ep.expert_dp_ranks = edp
        if hierarchical:
            _attach_node_groups(ep, ep_groups, gpus_per_node, to)
        return ep


def _int_at_least_1(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {value!r} must be an int >= 1")


def _check_divides(num_experts: int, P: int, hierarchical: bool, gpus_per_node: int | None) -> None:
    # (0 experts gave experts_per_rank 0 and a division by zero later, -8 gave -4, 8.0 a TypeError from torch.randn)
    _int_at_least_1("num_experts", num_experts)
    if num_experts % P:
        raise ValueError(f"num_experts: {num_experts} is not divisible by the expert-parallel size {P}")
    if hierarchical:
        if gpus_per_node is not None:  # (0 read as "not given": one node nobody asked for)
            _int_at_least_1("gpus_per_node", gpus_per_node)
        G = P if gpus_per_node is None else gpus_per_node
        if P % G:
            raise ValueError(f"gpus_per_node: {gpus_per_node} does not divide the expert-parallel size {P}")


def _attach_node_groups(ep: ExpertParallel, ep_groups: list[list[int]], gpus_per_node: int | None, to) -> None:
    """The hierarchical path's groups of every EP group in ``ep_groups`` (collective: every rank creates all of
    them, in order): per node its G local ranks (intra-node), per local index the ranks with that index on every
    node (inter-node); ``ep`` keeps its own."""
    G = ep.size if gpus_per_node is None else gpus_per_node
    ep.gpus_per_node = G
    for ranks in ep_groups:
        P = len(ranks)
        mine = ranks == ep.ranks
        for n in range(P // G):
            g = dist.new_group([ranks[n * G + l] for l in range(G)], timeout=to)
            if mine and ep.rank // G == n:
                ep.intra_group = g
        for l in range(G):
            g = dist.new_group([ranks[n * G + l] for n in range(P // G)], timeout=to)
            if mine and ep.rank % G == l:
                ep.inter_group = g


# ---------------------------------------------------------------------------------------------------
# exchanges (one chunk): flat or hierarchical, forward direction and its exact inverse
# ---------------------------------------------------------------------------------------------------
def _a2a(tensors, send, recv, group):
    """Start all_to_all_single on each tensor (split along dim 0); returns (outputs, works)."""
    outs, works = [], []
    for t in tensors:
        out = t.new_empty((sum(recv),) + tuple(t.shape[1:]))
        works.append(dist.all_to_all_single(out, t.contiguous(), recv, send, group=group, async_op=True))
        outs.append(out)
    return outs, works


class _Step:
    """One asynchronous all-to-all of one chunk on one group.

    ``inputs``: the tensors to send, or (for the second step of a hierarchical exchange) a function of the
    previous step's outputs (``dep``); such a step may only be issued once ``dep`` has completed.
    """

    def __init__(self, group, send, recv, inputs, dep: "_Step | None" = None, label: tuple = ()):
        self.group, self.send, self.recv = group, send, recv
        self.inputs, self.dep, self.label = inputs, dep, label
        self.outs = self.works = None

    @property
    def issued(self) -> bool:
        return self.works is not None

    def completed(self) -> bool:
        """Non-blocking: issued and every transfer finished."""
        return self.issued and all(w.is_completed() for w in self.works)

    def issue(self) -> None:
        ins = self.inputs(self.dep.result()) if self.dep is not None else self.inputs
        self.outs, self.works = _a2a(ins, self.send, self.recv, self.group)
        self.inputs = None                           # drop the send buffers' references once in flight

    def result(self) -> list[torch.Tensor]:
        """Blocking: wait for the transfers (the step must have been issued)."""
        for w in self.works:
            w.wait()
        return self.outs


class _Chain:
    """The steps of one chunk's exchange (one flat step, or two chained steps) and the final reordering of the
    last step's outputs. ``inter``: the inter-node step, the one the pipeline puts in flight ahead of the previous
    chunk's compute (the last step of a hierarchical dispatch, the first of an expert-sharded one, whose
    intra-node all-gather follows whenever :meth:`_Scheduler.progress` finds the all-to-all finished)."""

    def __init__(self, steps: list[_Step], then=None, inter: _Step | None = None):
        self.steps, self.then = steps, then
        self.inter = inter if inter is not None else steps[-1]

    @property
    def last(self) -> _Step:
        return self.steps[-1]


class _Scheduler:
    """Issues the steps of one pipeline pass (forward or backward); a second step is chained to its first by
    polling, so the thread never blocks just to chain the two.

    State machine of a step: QUEUED -> (dependency completed, every earlier step of its group issued) ->
    ISSUED -> (transfers finished) -> COMPLETED. Steps are added in program order, which is the same on
    every rank; a step is issued only after every earlier-added step of the same process group, so every
    group sees its collectives in the same order on all ranks whatever the timing. :meth:`progress` is the
    non-blocking driver (called whenever a step is added and before every chunk's compute): it issues each
    group's queued steps from the front as long as their dependencies have completed (``is_completed``).
    :meth:`drive` is the blocking driver: it issues every step up to the given one in the order added,
    waiting for dependencies as needed; it is used only where the pipeline needs a result (a chunk's
    received rows, and chunk c+1's inter-node step before chunk c's compute). Because it always issues the
    earliest-added unissued step first, a rank that blocks has issued every earlier step, so the step it
    waits on is one every rank can reach: deadlock-free.

    ``log`` (``ExpertParallel.events``; off when None) receives ``(pass, what, chunk, detail)`` tuples:
    ``what="issue"`` with ``detail=(direction, step)`` (direction "dispatch"/"combine", step 1 or 2) for every
    collective issued, and ``what="compute_start"``/``"compute_end"`` (detail None) around every chunk's
    expert compute.
    """

    def __init__(self, pass_name: str, log: list | None):
        self.pass_name, self.log = pass_name, log
        self.queue: list[_Step] = []

    def record(self, what: str, chunk: int, detail=None) -> None:
        if self.log is not None:
            self.log.append((self.pass_name, what, chunk, detail))

    def add(self, chain: _Chain) -> _Chain:
        self.queue.extend(chain.steps)
        self.progress()
        return chain

    def _issue(self, step: _Step) -> None:
        step.issue()
        direction, chunk, index = step.label
        self.record("issue", chunk, (direction, index))

    def progress(self) -> None:
        blocked = set()                                  # groups whose front step cannot go yet
        for step in self.queue:
            key = id(step.group)
            if key in blocked:
                continue
            if step.dep is None or step.dep.completed():
                self._issue(step)
            else:
                blocked.add(key)
        self.queue = [s for s in self.queue if not s.issued]

    def drive(self, upto: _Step) -> None:
        if upto.issued:
            return
        while self.queue:
            step = self.queue.pop(0)
            self._issue(step)                            # blocks in dep.result() if the dependency is running
            if step is upto:
                break

    def wait(self, chain: _Chain) -> list[torch.Tensor]:
        self.drive(chain.last)
        outs = chain.last.result()
        return chain.then(outs) if chain.then else outs


class _Exchange:
    """Moves rows grouped by destination rank. ``R`` is the (P_src, P_dst) row-count matrix of this chunk."""

    def __init__(self, ep: ExpertParallel, R: list[list[int]]):
        self.ep, self.R = ep, R
        q, P = ep.rank, ep.size
        if ep.shards > 1:
            # R is (domain source, EP destination); source n'*S + l' sends to node d's rank with the same index l'
            S, me, lq = ep.shards, ep.domain_rank, ep.shard_rank
            self.send = [R[me][d] for d in range(P)]
            self.recv = [R[n * S + lq][q] for n in range(P)]
            self.node_rows = [sum(R[n * S + l][q] for n in range(P)) for l in range(S)]  # what each peer received
            return
        if not ep.hierarchical:
            self.send = [R[q][d] for d in range(P)]
            self.recv = [R[s][q] for s in range(P)]
            return
        G, Nn = ep.gpus_per_node, ep.num_nodes
        nq, lq = divmod(q, G)
        # phase 1 (intra-node): my rows, by destination (n, l), reordered to (l, n); peer l gets local index l
        dest = torch.repeat_interleave(torch.arange(P), torch.tensor([R[q][d] for d in range(P)]))
        self.perm1 = torch.argsort((dest % G) * Nn + dest // G, stable=True)
        self.send1 = [sum(R[q][n * G + l] for n in range(Nn)) for l in range(G)]
        self.recv1 = [sum(R[nq * G + l][n * G + lq] for n in range(Nn)) for l in range(G)]
        # phase 2 (inter-node): blocks from local peers l, each by destination node n, reordered to (n, l)
        node = torch.cat([torch.repeat_interleave(torch.arange(Nn), torch.tensor([R[nq * G + l][n * G + lq]
                                                                                   for n in range(Nn)]))
                          for l in range(G)]) if P else torch.zeros(0, dtype=torch.long)
        self.perm2 = torch.argsort(node, stable=True)
        self.send2 = [sum(R[nq * G + l][n * G + lq] for l in range(G)) for n in range(Nn)]
        self.recv2 = [sum(R[n * G + l][q] for l in range(G)) for n in range(Nn)]

    def dispatch(self, tensors, chunk: int) -> _Chain:
        """Rows (grouped by destination rank) to their expert ranks: one step, or intra- then inter-node."""
        ep = self.ep
        if ep.shards > 1:                            # across the nodes, then all-gathered inside the node
            S, mine = ep.shards, self.node_rows[ep.shard_rank]
            s1 = _Step(ep.group, self.send, self.recv, tensors, label=("dispatch", chunk, 1))
            s2 = _Step(ep.shard_group, [mine] * S, self.node_rows, lambda got: [torch.cat([t] * S) for t in got],
                       dep=s1, label=("dispatch", chunk, 2))
            return _Chain([s1, s2], inter=s1)
        if not ep.hierarchical:
            return _Chain([_Step(ep.group, self.send, self.recv, tensors, label=("dispatch", chunk, 1))])
        p1, p2 = self.perm1, self.perm2
        s1 = _Step(ep.intra_group, self.send1, self.recv1, [t[p1.to(t.device)] for t in tensors],
                   label=("dispatch", chunk, 1))
        s2 = _Step(ep.inter_group, self.send2, self.recv2, lambda mid: [t[p2.to(t.device)] for t in mid],
                   dep=s1, label=("dispatch", chunk, 2))
        return _Chain([s1, s2])

    def combine(self, tensors, chunk: int) -> _Chain:
        """Exact inverse of :meth:`dispatch`: rows in received order go back to where they came from
        (inter-node first, then intra-node)."""
        ep = self.ep
        if ep.shards > 1:                            # partial sums reduce-scattered inside the node, then back
            S, mine = ep.shards, self.node_rows[ep.shard_rank]
            c1 = _Step(ep.shard_group, self.node_rows, [mine] * S, tensors, label=("combine", chunk, 1))
            c2 = _Step(ep.group, self.recv, self.send,
                       lambda got: [t.reshape((S, mine) + tuple(t.shape[1:])).sum(0) for t in got],
                       dep=c1, label=("combine", chunk, 2))
            return _Chain([c1, c2])
        if not ep.hierarchical:
            return _Chain([_Step(ep.group, self.recv, self.send, tensors, label=("combine", chunk, 1))])
        p1, p2 = self.perm1, self.perm2
        c1 = _Step(ep.inter_group, self.recv2, self.send2, tensors, label=("combine", chunk, 1))
        c2 = _Step(ep.intra_group, self.recv1, self.send1, lambda mid: [_unpermute_rows(t, p2) for t in mid],
                   dep=c1, label=("combine", chunk, 2))
        return _Chain([c1, c2], lambda outs: [_unpermute_rows(t, p1) for t in outs])


def _unpermute_rows(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t)
    out[perm.to(t.device)] = t
    return out


def _pipeline(ep: ExpertParallel, pass_name: str, exch: list[_Exchange], sends, compute, after_chunk=None,
              after_all=None, order: str = "dispatch-first", before_first=None):
    """Run one pass: dispatch the chunks, then per chunk wait / compute / combine; returns each chunk's
    combined rows. ``compute(c, received tensors) -> tensor to send back``; ``after_chunk(c, progress)`` runs in
    the gap after chunk c's combine is issued; ``after_all(progress)`` after the last combine is issued, before
    waiting; ``before_first(progress)`` once the first dispatches are issued, before waiting for chunk 0 (the
    shared expert's work, which needs no exchange). ``progress()`` issues every collective step that has become
    ready (the hierarchical path's second steps): hooks that compute call it between pieces of work, so no step
    waits behind more than one piece.
    ``order``: "dispatch-first" issues every chunk's dispatch up front (links: d0 d1 ... d(r-1) c0 c1 ...);
    "interleaved" issues d0 and d1, then chunk c+2's dispatch right after chunk c's combine, before the gap's
    work (links: d0 d1 c0 d2 c1 d3 ...), so an early combine does not queue behind every later dispatch. Flat
    exchanges only: on the hierarchical path a combine's intra-node step can follow its inter-node step only
    once that has finished, and making chunk c+1's dispatch ready before chunk c's compute would then wait for
    chunk c-1's whole combine (one host thread); ``ep_experts`` rejects that combination.

    Before chunk c's compute the pipeline makes sure chunk c+1's inter-node step is issued (hierarchical path:
    the dispatch's second step, waiting for its intra-node step if that is still running; expert-sharded path:
    its first step, so chunk c's compute never waits for chunk c+1's all-to-all - the intra-node all-gather that
    follows it is issued by ``progress()`` once the all-to-all has finished, at the latest when chunk c+1's rows
    are needed), so chunk c+1's transfer overlaps chunk c's compute even when nothing can issue collectives while
    the compute runs (one host thread).
    """
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: must be one of {', '.join(ORDERS)}")
    sched = _Scheduler(pass_name, ep.events)
    r = len(exch)
    disp: list[_Chain | None] = [None] * r
    for c in range(r if order == "dispatch-first" else min(2, r)):
        disp[c] = sched.add(exch[c].dispatch(sends[c], c))
    if before_first is not None:
        # two-step paths: chunk 0's inter-node step must be in flight before the host turns to the shared work
        # (it can only be issued by this thread; on a GPU its input would otherwise queue behind that work)
        sched.drive(disp[0].inter)
        sched.record("shared_start", -1)
        before_first(sched.progress)
        sched.record("shared_end", -1)
    back = []
    for c, ex in enumerate(exch):
        got = sched.wait(disp[c])
        if c + 1 < r:
            sched.drive(disp[c + 1].inter)
        sched.progress()
        sched.record("compute_start", c)
        out = compute(c, got)
        sched.record("compute_end", c)
        back.append(sched.add(ex.combine([out], c)))
        if c + 2 < r and disp[c + 2] is None:               # interleaved: d(c+2) right after combine c
            disp[c + 2] = sched.add(exch[c + 2].dispatch(sends[c + 2], c + 2))
        if after_chunk is not None:
            after_chunk(c, sched.progress)
    if after_all is not None:
        after_all(sched.progress)
    return [sched.wait(b)[0] for b in back]


# ---------------------------------------------------------------------------------------------------
# gradient reduction: dense gradients in planned slices, expert gradients over their copies
# ---------------------------------------------------------------------------------------------------
class GradSliceReducer:
    """All-reduces the dense (replicated) gradients in planned slices during the MoE backward pipeline.

    ``params``: the dense parameters in forward order; the flat gradient vector is taken in backward order
    (reversed). ``slices[j]``: elements to reduce during the j-th MoE layer's backward (backward order, as in
    the FSMoE plan's ``grad_slices``). A slice is launched only as far as gradients exist (prefix rule: the
    post-accumulate-grad hooks mark parameters ready). :meth:`finish` reduces whatever is left, waits, and
    writes the averaged (``average=True``) gradients back. ``launched_in_gaps`` counts elements launched
    inside MoE gaps (for tests and logs).

    One backward per :meth:`finish`. Gradient accumulation over micro-batches: run every micro-batch's backward
    but the last under :meth:`no_sync` (as with DDP), then the last one launches the slices of the accumulated
    gradients. A gradient that accumulates into elements already launched (a second backward before
    :meth:`finish` outside ``no_sync``) raises RuntimeError: that slice's reduced value would be stale and
    :meth:`finish` would write it over the accumulated gradient (it did, silently).

    The backward graph must be the same on every rank (as for DDP without ``find_unused_parameters``): what is
    launched in a gap depends on which gradients exist there, so a parameter with a gradient on some ranks only
    would pair different all-reduces across ranks. A parameter with no gradient on every rank is reduced as zeros.

    ``group``: where the gradients are summed (default: the world; with :meth:`ExpertParallel.create_groups` pass
    ``ep.dp_group``); ``average`` divides the sums by ``divisor`` (default: the group's size).
    ``bucket_elements``: also launch, from the gradient hooks, the ready prefix whenever it holds at least this
    many unlaunched elements (DDP-style buckets, independent of the MoE gaps); None (default): gaps and
    :meth:`finish` only.
    """

    _KIND = "dense"  # (what the accumulation error calls a parameter)

    def __init__(self, params, slices, group=None, average: bool = True, *, divisor: float | None = None,
                 bucket_elements: int | None = None):
        if bucket_elements is not None and (isinstance(bucket_elements, bool) or not isinstance(bucket_elements, int)
                                            or bucket_elements < 1):
            raise ValueError(f"bucket_elements: {bucket_elements!r} must be an int >= 1 or None")
        if divisor is not None and not divisor > 0:
            raise ValueError(f"divisor: {divisor!r} must be > 0")
        self.params = [p for p in reversed(list(params)) if p.requires_grad]
        self.sizes = [p.numel() for p in self.params]
        self.slices = [float(s) for s in slices]
        bad = next((s for s in self.slices if not (math.isfinite(s) and s >= 0)), None)
        if bad is not None:  # (NaN failed inside the first backward, naming nothing; a negative one was taken)
            raise ValueError(f"slices: {bad} must be a finite number >= 0 (elements reduced in a gap)")
        self.group = group if group is not None else dist.group.WORLD
        self.average = average
        self.divisor = divisor
        self.bucket_elements = bucket_elements
        self._offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self._enabled = True
        self._ready = [False] * len(self.params)
        self._hooks = [p.register_post_accumulate_grad_hook(self._mark(i)) for i, p in enumerate(self.params)]
        self._reset()

    def _reset(self):
        self._ready = [False] * len(self.params)
        self._done = 0            # flat elements launched
        self._layer = -1
        self._layer_budget_end = 0.0
        self._layer_start = 0.0
        self._pending = []        # (start, end, buffer, work)
        self.launched_in_gaps = 0

    def _mark(self, i):
        def hook(_p):
            if not self._enabled:
                return
            if self._ready[i] and self._offsets[i] < self._done:
                raise RuntimeError(
                    f"{type(self).__name__}: {self._KIND} parameter {i} (backward order) accumulated another "
                    f"gradient after its "
                    "slice was all-reduced; for gradient accumulation run the earlier micro-batches' backward "
                    "under reducer.no_sync(), or call finish() after every backward")
            self._ready[i] = True
            if self.bucket_elements is not None:
                upto = self._ready_prefix()
                if upto - self._done >= self.bucket_elements:
                    self._launch(upto)
        return hook

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside launch nothing and mark nothing (gradient accumulation, like DDP's no_sync)."""
        prev, self._enabled = self._enabled, False
        try:
            yield self
        finally:
            self._enabled = prev

    @property
    def launched_elements(self) -> int:
        """Gradient elements whose all-reduce has been launched since the last :meth:`finish` (tests, logs)."""
        return self._done

    def _ready_prefix(self) -> int:
        n = 0
        for ok, s in zip(self._ready, self.sizes):
            if not ok:
                break
            n += s
        return n

    def begin_layer(self) -> None:
        """Called once at the start of each MoE layer's backward."""
        if not self._enabled:
            return
        self._layer += 1
        self._layer_start = self._layer_budget_end
        extra = self.slices[self._layer] if self._layer < len(self.slices) else 0.0
        self._layer_budget_end = self._layer_start + extra

    def gap(self) -> None:
        """A gap of the MoE backward pipeline: launch what is left of this layer's slice, as far as its gradients
        exist. The first gap launches the whole slice as ONE all-reduce, as the planner prices it (alpha4 + beta4 x
        per layer: spreading it over the r_bwd chunk gaps paid (r_bwd - 1) more latencies, which the plan did not
        count); a later gap launches only what was not ready at the first (a slice beyond the prefix rule)."""
        if not self._enabled:
            return
        upto = min(int(round(self._layer_budget_end)), self._ready_prefix(), sum(self.sizes))
        if upto > self._done:
            self.launched_in_gaps += upto - self._done
            self._launch(upto)

    def _launch(self, upto: int) -> None:
        start = self._done
        pieces, off = [], 0
        for p, s in zip(self.params, self.sizes):
            lo, hi = max(start, off), min(upto, off + s)
            if lo < hi:
                if p.grad is None:   # no gradient this step on this rank (unused here): it contributes zeros, as
                    p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)  # DDP does
                elif not p.grad.is_contiguous():
                    # a transposed or channels_last gradient: reshape(-1) copies it, and finish() wrote the
                    # averaged values into that copy (every rank kept its own gradient)
                    p.grad = p.grad.contiguous()
                pieces.append(p.grad.view(-1)[lo - off:hi - off])
            off += s
        buf = torch.cat(pieces).contiguous()
        self._pending.append((start, upto, buf, dist.all_reduce(buf, group=self.group, async_op=True)))
        self._done = upto

    def finish(self) -> None:
        """Launch the rest, wait for every slice, write the reduced gradients back; ready for the next step."""
        total = sum(self.sizes)
        if self._done < total:
            self._launch(total)
        divisor = self.divisor if self.divisor is not None else dist.get_world_size(self.group)
        for start, end, buf, work in self._pending:
            work.wait()
            if self.average:
                buf /= divisor
            off = 0
            for p, s in zip(self.params, self.sizes):
                lo, hi = max(start, off), min(end, off + s)
                if lo < hi:
                    p.grad.view(-1)[lo - off:hi - off].copy_(buf[lo - start:hi - start])  # (contiguous: in place)
                off += s
        self._reset()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


class ExpertGradReducer(GradSliceReducer):
    """The expert weight gradients of an expert-parallel model: summed over the expert-data-parallel group (the
    ranks holding the same experts, ``ep.expert_dp_group``) and divided by the data-parallel size ``ep.dp_size``.

    Why that divisor: each rank's loss is a mean over its own tokens, and an expert's gradient on its EP rank
    already sums the contributions of every rank of the EP group (their tokens came to it; with expert shards, of
    every rank of the domain); the sum over the
    expert copies then covers every data-parallel rank once, so dividing by the data-parallel size gives the
    gradient of the mean loss - what the dense gradients get (Megatron-core's expert gradient scaling,
    1 / data-parallel size). Without copies (:meth:`ExpertParallel.create`) it only divides, no collective.

    Buckets (``bucket_elements``, in backward order) are all-reduced asynchronously from the gradient hooks as
    soon as they are complete, overlapping the rest of the backward; :meth:`finish` launches the rest, waits and
    writes the reduced gradients back; :meth:`no_sync` for gradient accumulation, as :class:`GradSliceReducer`
    (the same rules: one backward per :meth:`finish` outside ``no_sync``, the same backward graph on every rank).
    Nothing runs in the forward. ``params``: the expert parameters (forward order), e.g. the ``"expert"`` ones of
    :func:`adasched.runtime.moe.layer.split_parameters`.
    """

    _KIND = "expert"

    def __init__(self, params, ep: ExpertParallel, *, bucket_elements: int | None = 1 << 22, average: bool = True):
        super().__init__(params, (), group=ep.expert_dp_group, average=average, divisor=ep.dp_size,
                         bucket_elements=bucket_elements)
        self.group = ep.expert_dp_group                 # None: no other copy of these experts
        if self.group is None:                          # nothing to sum: no buckets, finish() scales in place
            self.bucket_elements = None

    def finish(self) -> None:
        """Without copies (EP over the whole data-parallel group) only the 1 / ``dp_size`` scaling, in place on each
        gradient (no staging buffers: they held a second copy of every expert gradient until here); else as
        :meth:`GradSliceReducer.finish`."""
        if self.group is not None:
            return super().finish()
        for p in self.params:
            if p.grad is None:                          # no gradient on this rank: zeros, as with copies
                p.grad = torch.zeros_like(p)
            if self.average:
                p.grad.div_(self.divisor)
        self._reset()


# ---------------------------------------------------------------------------------------------------
# the pipelined expert computation
# ---------------------------------------------------------------------------------------------------
@dataclass
class _Meta:
    ep: ExpertParallel
    token_idx: torch.Tensor     # (N,) local token of each sorted row
    expert_idx: torch.Tensor    # (N,) global expert of each sorted row
    num_tokens: int
    r_fwd: int
    r_bwd: int
    activation: str
    backend: Backend
    reducer: GradSliceReducer | None = None
    wgrad: str = "fused"
    order_fwd: str = "dispatch-first"
    order_bwd: str = "dispatch-first"
    shared_index: object = None   # MoEIndex of the shared expert (all T rows, one group), when there is one


def _chunks(meta: _Meta, r: int):
    """Per chunk: row indices (in sorted order) and the full (P_src, r, P_dst) row-count matrix."""
    ep, T = meta.ep, meta.num_tokens
    chunk_of_row = (meta.token_idx * r) // max(T, 1)
    rows = [torch.nonzero(chunk_of_row == c, as_tuple=True)[0] for c in range(r)]
    dest = meta.expert_idx // ep.experts_per_rank
    local = torch.zeros(r, ep.size, dtype=torch.int64, device=meta.token_idx.device)
    local.index_put_((chunk_of_row, dest), torch.ones_like(dest), accumulate=True)
    # sizes first: every rank learns every (source, chunk, destination) count (r is equal on all ranks); with
    # expert shards the sources are the whole domain (a node all-gathers what its ranks received)
    n_src = ep.domain_size
    gathered = [torch.empty_like(local) for _ in range(n_src)]
    dist.all_gather(gathered, local, group=ep.domain_group)
    full = torch.stack(gathered).tolist()                      # [src][chunk][dst]
    mats = [[[full[s][c][d] for d in range(ep.size)] for s in range(n_src)] for c in range(r)]
    return rows, mats


def _tags(meta: _Meta, rows: torch.Tensor) -> torch.Tensor:
    ep = meta.ep
    src = torch.full_like(rows, ep.domain_rank)
    return torch.stack([src, meta.expert_idx[rows] % ep.experts_per_rank, meta.token_idx[rows]], 1)


def _group_by_expert(tags: torch.Tensor, E_local: int, P: int, key_base: int):
    """Order incoming rows by (local expert, source, token); returns (order, counts, keys in that order)."""
    key = (tags[:, 1] * P + tags[:, 0]) * key_base + tags[:, 2]
    order = torch.argsort(key)
    counts = torch.bincount(tags[order, 1], minlength=E_local)
    return order, counts, key[order]


class EPExperts(torch.autograd.Function):
    """(x_rows (N,H) sorted by (expert, token), w1, w2 local shards) -> expert outputs y_rows (N,H); with a
    shared expert (its input sx (T,H) = the layer's tokens, weights sw1 (1,H,.), sw2 (1,F,H)) also its output
    (T,H), computed (and in the backward differentiated) while the first dispatches are in flight."""

    @staticmethod
    def forward(ctx, x_rows, w1, w2, meta: _Meta, sx=None, sw1=None, sw2=None):
        ep = meta.ep
        E_local, P = ep.experts_per_rank, ep.domain_size
        key_base = 1 << 40
        rows, mats = _chunks(meta, meta.r_fwd)
        exch = [_Exchange(ep, m) for m in mats]
        saved_x, saved_a, saved_key = [], [], []
        shared = {}

        def shared_forward(progress):
            shared["y"], shared["a"] = expert_mlp_forward(sx, sw1, sw2, meta.shared_index, meta.activation,
                                                          meta.backend)

        def compute(c, got):
            xr, tags = got
            order, counts, keys = _group_by_expert(tags, E_local, P, key_base)
            xs = xr[order]
            idx = make_index(torch.zeros(xs.shape[0], dtype=torch.int64, device=xs.device), counts, 1)
            ys, a = expert_mlp_forward(xs, w1, w2, idx, meta.activation, meta.backend)
            saved_x.append(xs)
            saved_a.append(a)
            saved_key.append(keys)
            return _unpermute_rows(ys, order)

        outs = _pipeline(ep, "forward", exch, [[x_rows[rw], _tags(meta, rw)] for rw in rows], compute,
                         order=meta.order_fwd, before_first=shared_forward if sx is not None else None)
        y = x_rows.new_empty(x_rows.shape[0], w2.shape[2])
        for rw, o in zip(rows, outs):
            y[rw] = o
        key = torch.cat(saved_key)
        korder = torch.argsort(key)
        ctx.save_for_backward(torch.cat(saved_x)[korder], torch.cat(saved_a)[korder], key[korder], w1, w2,
                              *((sx, shared["a"], sw1, sw2) if sx is not None else ()))
        ctx.meta = meta
        return y if sx is None else (y, shared["y"])

    @staticmethod
    def backward(ctx, gy, gy_shared=None):
        x_s, a_s, key_s, w1, w2, *sh = ctx.saved_tensors
        meta = ctx.meta
        ep = meta.ep
        E_local, P = ep.experts_per_rank, ep.domain_size
        key_base = 1 << 40
        gy = gy.contiguous()
        rows, mats = _chunks(meta, meta.r_bwd)
        exch = [_Exchange(ep, m) for m in mats]
        if meta.reducer is not None:
            meta.reducer.begin_layer()
        # the chunks' dW summed in float32 for 16-bit weights (autocast): a bf16 sum rounded once per chunk, the
        # expert gradients' error grew with r_bwd (0.62 % at 1 chunk, 0.93 % at 32 against an fp32 reference)
        # (one chunk has nothing to sum: its dW stays in the weights' dtype, no float32 buffers)
        acc = torch.float32 if w1.dtype in (torch.float16, torch.bfloat16) and len(exch) > 1 else w1.dtype
        dw1 = torch.zeros_like(w1, dtype=acc)
        dw2 = torch.zeros_like(w2, dtype=acc)

        pending = []  # weight-gradient inputs of chunks whose dW has not run yet (split modes)
        sched_log = ep.events

        def weight_grads(progress):
            while pending:
                progress()  # e.g. a finished combine's intra-node step goes out before this dW, not after
                c, saved = pending.pop(0)
                if sched_log is not None:
                    sched_log.append(("backward", "wgrad", c, None))
                d1, d2 = expert_mlp_backward_weight(saved, E_local)
                dw1.add_(d1)
                dw2.add_(d2)

        def compute(c, got):
            g, tags = got
            order, counts, keys = _group_by_expert(tags, E_local, P, key_base)
            pos = torch.searchsorted(key_s, keys)
            idx = make_index(torch.zeros(keys.shape[0], dtype=torch.int64, device=keys.device), counts, 1)
            if meta.wgrad == "fused":
                dx, d1, d2 = expert_mlp_backward(x_s[pos], a_s[pos], g[order], w1, w2, idx,
                                                 meta.activation, meta.backend)
                dw1.add_(d1)
                dw2.add_(d2)
            else:
                dx, saved = expert_mlp_backward_data(x_s[pos], a_s[pos], g[order], w1, w2, idx,
                                                     meta.activation, meta.backend)
                pending.append((c, saved))
            return _unpermute_rows(dx, order)

        def gap(c, progress):
            if meta.reducer is not None:  # the dense slice first: its all-reduce then runs during the dW
                ep.stats["gaps"] += 1
                meta.reducer.gap()
            if meta.wgrad == "per-chunk":
                weight_grads(progress)

        shared_grads = []

        def shared_backward(progress):
            sx, sa, sw1, sw2 = sh
            dsx, saved = expert_mlp_backward_data(sx, sa, gy_shared, sw1, sw2, meta.shared_index, meta.activation,
                                                  meta.backend)
            progress()
            need_w = ctx.needs_input_grad[5] or ctx.needs_input_grad[6]
            shared_grads.extend([dsx, *(expert_mlp_backward_weight(saved, 1) if need_w else (None, None))])

        outs = _pipeline(ep, "backward", exch, [[gy[rw], _tags(meta, rw)] for rw in rows], compute, gap,
                         after_all=weight_grads, order=meta.order_bwd,
                         before_first=shared_backward if sh else None)
        gx = gy.new_empty(gy.shape[0], w1.shape[1])
        for rw, o in zip(rows, outs):
            gx[rw] = o
        return (gx, dw1.to(w1.dtype), dw2.to(w2.dtype), None, *(shared_grads if sh else (None, None, None)))


def ep_experts(x_rows, w1, w2, token_idx, expert_idx, num_tokens: int, ep: ExpertParallel, *,
               r_fwd: int = 1, r_bwd: int = 1, activation: str = "swiglu", backend: Backend = "auto",
               reducer: GradSliceReducer | None = None, wgrad: str = "fused", order_fwd: str = "dispatch-first",
               order_bwd: str = "dispatch-first", shared=None):
    """Expert outputs for this rank's sorted assignment rows, computed by the experts' owner ranks.
    ``wgrad``: where the backward computes the expert weight gradients; ``order_fwd``/``order_bwd``: the
    collective issue order of each pass (module docstring, ``_pipeline``). ``shared=(x (T,H), w1 (1,H,.),
    w2 (1,F,H))``: a shared expert on this rank's tokens, computed while the first dispatches are in flight
    (forward and backward); then returns (routed rows, shared output)."""
    for name, r in (("r_fwd", r_fwd), ("r_bwd", r_bwd)):  # (2.5 or "2" was a TypeError further in)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{name}: {r!r} must be an int >= 1 (chunks per exchange)")
    check_pipeline_settings(ep, wgrad=wgrad, order_fwd=order_fwd, order_bwd=order_bwd)
    meta = _Meta(ep, token_idx, expert_idx, num_tokens, r_fwd, r_bwd, activation, backend, reducer, wgrad,
                 order_fwd, order_bwd)
    if shared is None:
        return EPExperts.apply(x_rows, w1, w2, meta)
    sx, sw1, sw2 = shared
    meta.shared_index = shared_expert_index(sx.shape[0], sx.device)
    return EPExperts.apply(x_rows, w1, w2, meta, sx, sw1, sw2)


def check_pipeline_settings(ep: ExpertParallel | None, *, wgrad: str | None = None, order_fwd: str | None = None,
                            order_bwd: str | None = None) -> None:
    """ValueError naming the setting when ``wgrad`` / an issue order is unknown, or "interleaved" is asked of a
    hierarchical or expert-sharded exchange (one host thread would make chunk c's compute wait for chunk c-1's
    two-step combine)."""
    if wgrad is not None and wgrad not in WGRAD_MODES:
        raise ValueError(f"wgrad={wgrad!r}: must be one of {', '.join(WGRAD_MODES)}")
    for name, o in (("order_fwd", order_fwd), ("order_bwd", order_bwd)):
        if o is None:
            continue
        if o not in ORDERS:
            raise ValueError(f"{name}={o!r}: must be one of {', '.join(ORDERS)}")
        if o == "interleaved" and ep is not None and (ep.hierarchical or ep.shards > 1):
            path = "hierarchical" if ep.hierarchical else "expert-sharded"
            raise ValueError(f"{name}='interleaved' needs the flat exchange: on the {path} path chunk c's "
                             "compute would wait for chunk c-1's whole two-step combine (use 'dispatch-first')")


def shared_expert_index(num_tokens: int, device) -> "object":
    """The grouped-GEMM index of a shared expert: one group holding every token, in token order."""
    return make_index(torch.arange(num_tokens, device=device), torch.tensor([num_tokens], device=device),
                      num_tokens)
