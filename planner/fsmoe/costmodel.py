"""FSMoE cost model: every stage of an expert-parallel MoE layer as an alpha-beta model.

Stages (fsmoe.md): 0 inter-node all-to-all (dispatch; the combine is a second one), 1 intra-node all-gather,
2 expert GEMM, 3 intra-node reduce-scatter, 4 gradient all-reduce of the dense parameters.
One chunk of r of stage i costs ``alpha_i + work_i / r`` ms, where ``work_i = beta_i * n_i`` is the whole
workload's streaming time. With f = k * capacity_factor (router statistics: their measured k after drops as it
is), tokens per GPU T = B*L, hidden M, FFN H, EP size P:

    n0 = f*T*M/P    n1 = n3 = f*T*M    n2 = g*f*T*M*H/P  (g = 2 GELU MLP, 3 SwiGLU)   (elements)

Layouts (:func:`topology`): flat EP (whole experts per GPU, one all-to-all; stages 1 and 3 empty); FSMoE's
hierarchical one (EP over nodes, each expert sharded over a node's GPUs: all stages; the runtime's
``train_moe --expert-shards G``); the runtime's two-step exchange (``two_step``: whole experts per GPU, stages 1
and 3 are the intra-node all-to-all steps, stage 0 the inter-node one).

Two sources for alpha/beta:
- ``published``: FSMoE's fitted constants (ms, per element), taken as they are;
- ``profile``: a ClusterProfile's collective fits (per byte, bf16 = 2 bytes per element) and GEMM rate.
  The inter-node all-to-all uses the fit at the full world size (every GPU of every node exchanges with its
  peers at once, so the NICs see a full all-to-all); all-gather/reduce-scatter use the intra-node fit at
  gpus_per_node; the expert GEMM runs at the profile's GEMM rate on the GPU's real multiply-add count
  (f*T*g*M*H, see ``_expert_macs_per_gpu``) with ``GEMM_ALPHA_MS`` launch overhead per chunk (an assumption: the
  profile has no GEMM latency term); the gradient all-reduce of the replicated (dense + shared-expert) parameters
  spans every GPU: the all_reduce fit on that many ranks, or, when the profile's all_reduce fits stop below it,
  :meth:`ClusterProfile.collective_two_level`'s intra + inter-node estimate (named in the stage notes; an error
  when the profile has no inter-node fit).

Expert gradients: with EP over every GPU each expert exists once and needs no all-reduce. With EP size K inside a
data-parallel world of D GPUs (``topology(..., ep_size=K)``) each expert has D/K copies whose gradients are
all-reduced over them (:func:`expert_grad_allreduce_ms`; across nodes priced by the inter-node bytes all of a
node's groups move together). The runtime launches them in buckets (:func:`expert_grad_buckets`, the rule of
``runtime.moe.ep.ExpertGradReducer``) while the backward goes on; the planner overlaps them with the rest of the
backward (planner.fsmoe.planning, :func:`planner.fsmoe.model.exposed_comm_ms`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adasched.profiler.io import InputError
from adasched.profiler.profile import ClusterProfile

from ..plan import MAX_LAYERS

__all__ = ["MoEConfig", "StageCosts", "stage_costs", "ELEMENT_BYTES", "GEMM_ALPHA_MS", "Topology", "topology",
           "expert_params_per_gpu", "expert_grad_allreduce_ms", "expert_grad_buckets", "EXPERT_GRAD_BUCKET_ELEMENTS"]

ELEMENT_BYTES = 2  # bf16 activations and gradients
GEMM_ALPHA_MS = 0.02  # per-chunk GEMM launch/tail overhead assumed for profile-derived costs (ms)
#: the runtime's expert-gradient bucket (``runtime.moe.ep.ExpertGradReducer``'s default ``bucket_elements``, which
#: train_moe uses): a bucket's all-reduce is launched once this many ready elements wait (elements)
EXPERT_GRAD_BUCKET_ELEMENTS = 1 << 22
STAGES = ("a2a", "allgather", "gemm", "reducescatter", "allreduce")


#: Upper bounds of a config's sizes (far above any real model; a config file's 10**400 overflowed float() in the
#: cost model, a billion layers hung the gradient-slice planning, an infinite capacity factor made NaN stage times);
#: num_layers is bounded by adasched.planner.plan.MAX_LAYERS, as the launchers' --layers
MAX_MOE_SIZE = 2 ** 20        # hidden, ffn_hidden, batch
MAX_MOE_EXPERTS = 2 ** 16     # experts, shared_experts
MAX_MOE_SEQ_LEN = 2 ** 24     # tokens per sequence
MAX_CAPACITY_FACTOR = 1024.0  # a factor above experts / top_k already keeps every token
MAX_DENSE_PARAMS = 2 ** 40    # replicated parameters per layer


class MoEConfig(BaseModel):
    """One MoE layer configuration (and the model it sits in, for the gradient all-reduce). Strict: a bool is not a
    size, "8" is not a number (an int is a valid float)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    hidden: int = Field(gt=0, le=MAX_MOE_SIZE, description="M, model hidden size")
    ffn_hidden: int = Field(gt=0, le=MAX_MOE_SIZE, description="H, expert FFN hidden size")
    experts: int = Field(gt=0, le=MAX_MOE_EXPERTS, description="E")
    # floors well above 0: top_k 1e-200 x capacity 1e-200 underflowed to a layer of 0 ms, and the plan's ratios
    # divided by it (a traceback after the plan was written)
    top_k: float = Field(ge=1e-3, allow_inf_nan=False,
                         description="k; a float for dynamic routing = expected experts per token")
    capacity_factor: float = Field(default=1.0, ge=1e-3, le=MAX_CAPACITY_FACTOR, allow_inf_nan=False,
                                   description="1.0 with dropless routing")
    batch: int = Field(gt=0, le=MAX_MOE_SIZE, description="B, sequences per GPU")
    seq_len: int = Field(gt=0, le=MAX_MOE_SEQ_LEN, description="L, tokens per sequence")
    activation: Literal["swiglu", "gelu"] = "gelu"
    shared_experts: int = Field(default=0, ge=0, le=MAX_MOE_EXPERTS)
    dropless: bool = False
    num_layers: int = Field(default=1, gt=0, le=MAX_LAYERS,
                            description="MoE layers in the model (for gradient slicing)")
    dense_params_per_layer: int | None = Field(default=None, ge=0, le=MAX_DENSE_PARAMS,
                                               description="attention etc.; default 4*M^2")
    mean_k_per_layer: list[float] | None = Field(
        default=None, description="router statistics: assignments per token after capacity drops, per layer "
                                  "(train_moe --router-stats-out); the capacity factor is already in them")

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        if self.top_k > self.experts:
            raise ValueError(f"top_k {self.top_k} is larger than the number of experts {self.experts}")
        if self.mean_k_per_layer is not None:
            if len(self.mean_k_per_layer) != self.num_layers:
                raise ValueError(f"mean_k_per_layer has {len(self.mean_k_per_layer)} entries, num_layers is {self.num_layers}")
            if any(not (1e-3 <= k <= self.experts) for k in self.mean_k_per_layer):  # top_k's floor, same reason
                raise ValueError("mean_k_per_layer: every entry must lie in [0.001, experts]")
        return self

    @property
    def g(self) -> int:
        return 3 if self.activation == "swiglu" else 2

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def k_of_layer(self, layer: int) -> float:
        return self.mean_k_per_layer[layer] if self.mean_k_per_layer else self.top_k

    def f(self, layer: int = 0) -> float:
        """Assignments per token the layer moves and computes: k x capacity factor (the capacity buffer, FSMoE's
        f) from the config, or the measured mean k after drops from router statistics as it is (the runtime moves
        the kept assignments only; multiplying them by the capacity factor again counted it twice).

        A factor above 1 is priced as FSMoE prices it: the buffer, the most the capacity lets the busiest expert
        receive. The runtime does not pad to capacity: with balanced routing it moves k per token, fewer than this
        f (the plan's stage notes say so; ``--router-stats`` plans the measured k instead)."""
        if self.mean_k_per_layer:
            return self.mean_k_per_layer[layer]
        return self.top_k * (1.0 if self.dropless else self.capacity_factor)

    @property
    def dense_params(self) -> int:
        return self.dense_params_per_layer if self.dense_params_per_layer is not None else 4 * self.hidden * self.hidden

    @property
    def replicated_params(self) -> int:
        """Parameters every data-parallel rank holds and all-reduces per layer: the dense ones plus the shared
        experts' (g*M*H each; the runtime reduces them with the dense gradients)."""
        return self.dense_params + self.shared_experts * self.g * self.hidden * self.ffn_hidden


@dataclass(frozen=True)
class Topology:
    gpus: int
    gpus_per_node: int
    ep_size: int
    """P: ranks an expert-parallel all-to-all spans (nodes for hierarchical, all GPUs for flat)."""
    hierarchical: bool
    """True: EP across nodes + expert sharding inside a node (all-gather/reduce-scatter stages; FSMoE's layout,
    the runtime's ``ExpertParallel.create_groups(..., expert_shards=G)``); False: every GPU holds whole experts."""
    two_step: bool = False
    """Whole experts per GPU (as flat EP), every exchange in two all-to-all steps: inside the node, then between
    the nodes (the runtime's ``train_moe --hierarchical``, ``runtime.moe.ep``'s hierarchical path); the node
    size of the exchange is :attr:`exchange_gpus_per_node`."""
    exchange_node: int | None = None
    """Two-step only: the node size the exchange splits an EP group by (``plan moe --gpus-per-node``, the runtime's
    ``--gpus-per-node``); None = :attr:`gpus_per_node`. It shapes the exchange only: :attr:`gpus_per_node` stays
    the cluster's (the profile's), which prices the gradient all-reduces."""

    @property
    def exchange_gpus_per_node(self) -> int:
        """Ranks of one EP group per node in the two-step exchange: min(node size, ep_size), as the runtime
        splits its EP group (``train_moe``: ``min(--gpus-per-node, --ep-size)``); 1 when not two-step."""
        return min(self.exchange_node or self.gpus_per_node, self.ep_size) if self.two_step else 1

    @property
    def a2a_in_one_node(self) -> bool:
        """The all-to-all never leaves a node: one node in all, or flat EP groups of K contiguous ranks, K dividing
        the node size."""
        return self.gpus <= self.gpus_per_node or (not self.hierarchical and not self.two_step
                                                   and self.gpus_per_node % self.ep_size == 0)

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node

    @property
    def expert_copies(self) -> int:
        """Copies of each expert (shard) in the data-parallel world: gpus / EP size for flat EP (1 when EP spans
        every GPU), gpus / (EP size * gpus_per_node) when a node shards its experts."""
        return self.gpus // (self.ep_size * (self.gpus_per_node if self.hierarchical else 1))


def topology(cfg: MoEConfig, gpus: int, gpus_per_node: int, ep_size: int | None = None, *,
             two_step: bool = False, exchange_gpus_per_node: int | None = None) -> Topology:
    """Flat EP when there are at least as many experts as GPUs (GShard grid: E = #GPUs); otherwise EP over the
    nodes with each node's GPUs sharding its experts (Mixtral: 8 experts on 8 nodes).

    ``ep_size`` K (``adasched plan moe --ep-size``; the runtime's ``train_moe --ep-size``): flat EP over groups of
    K contiguous ranks inside the data-parallel world of ``gpus`` D, every GPU holding E/K whole experts, each
    expert on D/K GPUs (the dense gradients are all-reduced over D, the expert ones over the D/K copies).

    ``two_step`` (``adasched plan moe --two-step-a2a``; the runtime's ``train_moe --hierarchical``): the same
    whole-expert layout (EP size K, default every GPU), each exchange in two all-to-all steps through nodes of
    min(G, K) ranks of the EP group (:attr:`Topology.exchange_gpus_per_node`), G = ``exchange_gpus_per_node``
    (``--gpus-per-node``; default: ``gpus_per_node``). ``gpus_per_node`` is the cluster's node size (the
    profile's) in every layout: the expert-gradient all-reduce is priced with it, whatever the exchange's G."""
    if gpus < 1 or gpus & (gpus - 1):
        raise InputError("--gpus", f"must be a power of two >= 1, got {gpus}")
    gpn = min(gpus_per_node, gpus)
    if exchange_gpus_per_node is not None and not two_step:
        raise InputError("--gpus-per-node", "only with --two-step-a2a (the other layouts take the profile's)")
    if two_step:
        k = gpus if ep_size is None else ep_size
        if k < 2:
            raise InputError("--two-step-a2a", f"EP size {k} exchanges nothing (it needs --ep-size >= 2)")
        if exchange_gpus_per_node is not None and exchange_gpus_per_node < 1:
            raise InputError("--gpus-per-node", f"{exchange_gpus_per_node} must be >= 1")
        g = min(exchange_gpus_per_node or gpn, gpus)
        if k % min(g, k):
            raise InputError("--gpus-per-node", f"{g} does not divide the EP size {k} (the two-step exchange "
                                                f"splits an EP group into nodes)")
        if ep_size is None and cfg.experts % k:       # the default EP size is every GPU: name what sets it
            raise InputError("--gpus", f"{cfg.name}: {cfg.experts} experts do not divide evenly over {k} GPUs (the "
                                       f"EP size of --two-step-a2a without --ep-size)")
        topology(cfg, gpus, gpn, k)                   # the flat layout's checks (--ep-size divides, experts)
        return Topology(gpus, gpn, k, hierarchical=False, two_step=True, exchange_node=g)
    if ep_size is not None:
        if ep_size < 1 or gpus % ep_size:
            raise InputError("--ep-size", f"{ep_size} does not divide --gpus {gpus}")
        if cfg.experts % ep_size:
            raise InputError("--ep-size", f"{cfg.name}: {cfg.experts} experts do not divide evenly over EP size "
                                          f"{ep_size}")
        return Topology(gpus, gpn, ep_size, hierarchical=False)
    if cfg.experts >= gpus:
        if cfg.experts % gpus:
            raise InputError("--gpus", f"{cfg.name}: {cfg.experts} experts do not divide evenly over {gpus} GPUs")
        return Topology(gpus, gpn, gpus, hierarchical=False)
    # EP over nodes: the largest EP size dividing both the experts and the nodes (min(experts, nodes) gave EP 6
    # for 6 experts on 8 nodes - a plan that failed its own verification - and refused 12 experts on 8 nodes)
    if gpus % gpn:  # (nodes of 6 on 16 GPUs: "EP 2 x 6 GPUs" covered 12 of them, and verified)
        raise InputError("--gpus", f"{gpus} GPUs are not whole nodes of {gpn} (the profile's gpus_per_node), which "
                                   f"the default layout shards each expert over; pass --ep-size (flat EP)")
    if cfg.ffn_hidden % gpn:  # the runtime shards the expert's columns evenly (runtime.moe.layer.shard_columns)
        raise InputError("--config", f"{cfg.name}: ffn_hidden {cfg.ffn_hidden} does not split evenly over a node's "
                                   f"{gpn} GPUs (the default layout shards each expert over a node); pass --ep-size")
    nodes = gpus // gpn
    ep = math.gcd(cfg.experts, nodes) if nodes > 1 else 1
    return Topology(gpus, gpn, ep, hierarchical=True)


@dataclass(frozen=True)
class StageCosts:
    """alpha (ms per chunk) and work (ms for the whole workload) of the five stages, for one layer."""

    alpha: tuple[float, float, float, float, float]
    work: tuple[float, float, float, float, float]
    source: str
    notes: tuple[str, ...] = field(default=())
    dw: tuple[float, float] | None = None
    """Backward costs only: (alpha, work) of the weight-gradient part of stage 2, when known separately (a
    measurement); None = half of stage 2 (dX and dW are GEMMs of the same size)."""
    shared: tuple[float, float] = (0.0, 0.0)
    """(alpha, work) ms of the shared experts (a dense MLP on the GPU's own tokens, no exchange, not chunked)."""
    two_step: bool = False
    """Stages 1 and 3 are the intra-node steps of a two-step all-to-all (``Topology.two_step``): the dispatch runs
    intra-node then inter-node, the combine inter-node then intra-node (planner.fsmoe.model)."""

    @property
    def shared_ms(self) -> float:
        return self.shared[0] + self.shared[1] if self.shared[1] > 0 else 0.0

    def resource_busy_ms(self, r: int = 1) -> dict[str, float]:
        """Busy ms of each resource over the r chunks: the inter-node link (dispatch + combine), the intra-node one
        (all-gather + reduce-scatter of sharded experts) and the compute (experts + shared experts)."""
        return {"inter": 2 * self.chunk_ms(0, r) * r if self.work[0] > 0 else 0.0,
                "intra": (self.chunk_ms(1, r) + self.chunk_ms(3, r)) * r,
                "compute": self.chunk_ms(2, r) * r + self.shared_ms}

    def chunk_ms(self, stage: int, r: int) -> float:
        if self.work[stage] == 0 and stage in (1, 3):
            return 0.0
        return self.alpha[stage] + self.work[stage] / r

    def dw_chunk_ms(self, r: int) -> float:
        """One chunk's weight-gradient share of the backward expert compute (see ``dw``)."""
        if self.dw is None:
            return self.chunk_ms(2, r) / 2.0
        return min(self.chunk_ms(2, r), self.dw[0] + self.dw[1] / r)

    def backward(self) -> "StageCosts":
        """Backward: data and weight gradients double the expert GEMM (alpha2 and beta2)."""
        a = list(self.alpha)
        w = list(self.work)
        a[2] *= 2
        w[2] *= 2
        return StageCosts(tuple(a), tuple(w), self.source + " (backward)", self.notes,  # type: ignore[arg-type]
                          dw=self.dw, shared=(2 * self.shared[0], 2 * self.shared[1]), two_step=self.two_step)

    @property
    def a2a_ms(self) -> float:
        """One un-chunked all-to-all (ms)."""
        return self.alpha[0] + self.work[0]


def _workloads(cfg: MoEConfig, topo: Topology, layer: int) -> tuple[float, float, float, float, float]:
    f = cfg.f(layer)
    T, M, H, P = cfg.tokens, cfg.hidden, cfg.ffn_hidden, topo.ep_size
    if topo.two_step:
        # each step moves a rank's f*T*M rows; in FSMoE's units the inter-node step spans the EP group's N nodes
        # (n0 = f*T*M/N, as P = nodes in its layout) and the intra-node all-to-all of f*T*M per rank receives what
        # an all-gather of f*T*M/G does ((G-1)/G of it)
        G = topo.exchange_gpus_per_node
        N = P // G
        n0 = f * T * M / N if N > 1 else 0.0
        n13 = f * T * M / G if G > 1 else 0.0
        return (n0, n13, cfg.g * f * T * M * H / P, n13, float(cfg.replicated_params))
    n0 = f * T * M / P if topo.ep_size > 1 else 0.0
    n13 = f * T * M if topo.hierarchical and topo.gpus_per_node > 1 else 0.0
    n2 = cfg.g * f * T * M * H / P
    n4 = float(cfg.replicated_params)
    return (n0, n13, n2, n13, n4)


def _shared_macs_per_gpu(cfg: MoEConfig) -> float:
    """Multiply-adds of the shared experts on one GPU: each runs on the GPU's own T tokens (no communication),
    g*M*H per token."""
    return cfg.shared_experts * cfg.g * cfg.tokens * cfg.hidden * cfg.ffn_hidden


def _shared_n(cfg: MoEConfig, topo: Topology) -> float:
    """The shared experts in the paper's n2 units: against the routed f*T*g*M*H they carry the same 1/P."""
    return _shared_macs_per_gpu(cfg) / topo.ep_size


def _expert_macs_per_gpu(cfg: MoEConfig, topo: Topology, layer: int) -> float:
    """Multiply-adds of the expert MLPs on one GPU, counted from the layout (for profile-derived costs).

    Flat EP: T*P tokens x f routed rows spread evenly over P GPUs -> f*T rows per GPU, g*M*H each.
    Hierarchical: a node's sharded experts receive f*T*gpus_per_node rows, every GPU of the node multiplies all
    of them by its 1/gpus_per_node shard -> again f*T*g*M*H. (The paper's n2 carries a further 1/P, which
    belongs with its own fitted beta_2 and B*L convention; a GEMM rate needs the real count.) Routed experts
    only: the shared ones are costed separately (``StageCosts.shared``)."""
    return cfg.g * cfg.f(layer) * cfg.tokens * cfg.hidden * cfg.ffn_hidden


def capacity_note(cfg: MoEConfig) -> str | None:
    """The stage note of a capacity factor above 1 planned from the config (see :meth:`MoEConfig.f`), else None."""
    if cfg.mean_k_per_layer or cfg.dropless or cfg.capacity_factor <= 1.0:
        return None
    return (f"f = k x capacity factor = {cfg.top_k:g} x {cfg.capacity_factor:g}: FSMoE's capacity buffer, the most the "
            f"busiest expert may receive; the runtime does not pad to capacity (balanced routing moves {cfg.top_k:g} per "
            f"token): --router-stats plans the measured k")


def stage_costs(cfg: MoEConfig, topo: Topology, *, source: Literal["published", "profile"],
                profile: ClusterProfile | None = None, layer: int = 0) -> StageCosts:
    costs = _stage_costs(cfg, topo, source=source, profile=profile, layer=layer)
    note = capacity_note(cfg)
    return costs if note is None else replace(costs, notes=(*costs.notes, note))


def _stage_costs(cfg: MoEConfig, topo: Topology, *, source: Literal["published", "profile"],
                 profile: ClusterProfile | None = None, layer: int = 0) -> StageCosts:
    from adasched.profiler.builtins import FSMOE_ALPHA_MS, FSMOE_BETA_MS

    n = _workloads(cfg, topo, layer)
    if source == "published":
        alpha = tuple(a if n[i] > 0 else 0.0 for i, a in enumerate(FSMOE_ALPHA_MS))
        work = tuple(b * n[i] for i, b in enumerate(FSMOE_BETA_MS))
        # the shared MLP is charged its work term only: the fitted alpha_2 (0.592 ms) is the per-invocation
        # constant of FSMoE's expert stage (grouped GEMM and its layout work), not of one dense MLP; charging it
        # would mostly reward hiding it (conservative for the overlap, see BENCHMARKS `moe`)
        ns = _shared_n(cfg, topo)
        notes: list[str] = []
        if n[0] > 0 and not topo.hierarchical:
            # FSMoE's beta_0 is per element of n0 = f*T*M/P, fitted in its own layout (P = nodes); taken as it is
            # for another layout it prices the same bytes differently (hunt: flat EP 64 at 1/8 of two-step's)
            peers = topo.ep_size // topo.exchange_gpus_per_node
            what = "nodes" if topo.two_step else "GPUs"
            notes.append(f"a2a: FSMoE's n0 = f*T*M/P with P = {peers} {what} (its fit's layout has P = nodes); "
                         "flat and two-step exchanges are not comparable with these constants: --stages profile")
        if n[0] > 0 and topo.a2a_in_one_node:
            notes.append("a2a: FSMoE's inter-node constants price an exchange inside one node (the paper fitted "
                         "no intra-node all-to-all): --stages profile prices the node's links")
        return StageCosts(alpha, work, "published FSMoE constants (fsmoe.md)", tuple(notes),  # type: ignore[arg-type]
                          shared=(0.0, FSMOE_BETA_MS[2] * ns) if ns > 0 else (0.0, 0.0), two_step=topo.two_step)
    if profile is None:
        raise ValueError("stage_costs(source='profile') needs a profile")
    # (one GPU exchanges and all-reduces nothing: a one-GPU `adasched profile` has no collectives, and was refused)
    profile.require("gemm_tflops", *(("collectives",) if topo.gpus > 1 else ()), who="the FSMoE planner")
    if topo.gpus > profile.world_size:
        raise InputError("--gpus", f"{topo.gpus} GPUs but {profile.where} describes {profile.world_size}")
    notes = []
    alpha = [0.0] * 5
    work = [0.0] * 5
    if n[0] > 0:
        # every GPU sends its P-way share to the other nodes at once: the all-to-all fit of the ranks one exchange
        # spans - P nodes' GPUs for FSMoE's layout (all of them when P = nodes; with P below the node count the
        # expert copies exchange apart, as flat groups do: the full-world fit priced P = 2 of 8 nodes 2.1x the
        # flat layout's groups of 2 nodes, which send the same bytes off each node), K ranks for flat EP
        group = topo.ep_size * topo.gpus_per_node if topo.hierarchical else topo.ep_size
        fit = profile.collective("all_to_all", group)
        spans = topo.ep_size // topo.exchange_gpus_per_node       # ranks (nodes for two-step) n0 was divided by
        per_rank_bytes = n[0] * spans * ELEMENT_BYTES
        alpha[0] = fit.alpha_ms
        work[0] = fit.beta_ms_per_byte * per_rank_bytes
        notes.append(f"a2a: all_to_all fit on {fit.group_size} ranks ({fit.source})")
    if n[1] > 0 and topo.two_step:
        # the intra-node step: an all-to-all of a rank's f*T*M rows (= n1 * G elements) among the node's G ranks
        G = topo.exchange_gpus_per_node
        fit = profile.collective("all_to_all", G)
        for i in (1, 3):
            alpha[i] = fit.alpha_ms
            work[i] = fit.beta_ms_per_byte * n[i] * G * ELEMENT_BYTES
        notes.append(f"intra-node all_to_all step: fit on {fit.group_size} ranks ({fit.source})")
    elif n[1] > 0:
        # n1 = n3 = f*T*M is one rank's shard: all_gather's input, reduce_scatter's output; a CollectiveFit's
        # bytes are the tensor each rank passes in (reduce_scatter: the whole unreduced buffer, G shards)
        for i, op, shards in ((1, "all_gather", 1), (3, "reduce_scatter", topo.gpus_per_node)):
            fit = profile.collective(op, topo.gpus_per_node)
            alpha[i] = fit.alpha_ms
            work[i] = fit.beta_ms_per_byte * n[i] * shards * ELEMENT_BYTES
            notes.append(f"{op}: fit on {fit.group_size} ranks ({fit.source})")
    flops = 2.0 * _expert_macs_per_gpu(cfg, topo, layer)
    alpha[2] = GEMM_ALPHA_MS
    work[2] = flops / (profile.gemm_tflops * 1e9)  # TFLOP/s -> FLOP per ms
    notes.append(f"gemm: {profile.gemm_tflops} TFLOP/s (the profile's dense GEMM rate, not calibrated to expert "
                 f"GEMM shapes) + {GEMM_ALPHA_MS} ms per chunk (assumed launch overhead)")
    if topo.gpus > 1:
        fit = _dense_allreduce_fit(profile, topo)
        alpha[4] = fit.alpha_ms
        work[4] = fit.beta_ms_per_byte * n[4] * ELEMENT_BYTES
        notes.append(f"all_reduce: {fit.group_size} ranks, {fit.source}" if fit.source.startswith("two-level")
                     else f"all_reduce: fit on {fit.group_size} ranks ({fit.source})")
    else:  # (the notes said "all_reduce: fit on 64 ranks" for a one-GPU plan)
        notes.append("all_reduce: none (one GPU: no data-parallel gradients)")
    shared_macs = _shared_macs_per_gpu(cfg)
    shared = (GEMM_ALPHA_MS, 2.0 * shared_macs / (profile.gemm_tflops * 1e9)) if shared_macs else (0.0, 0.0)
    return StageCosts(tuple(alpha), tuple(work), f"profile {profile.name}", tuple(notes),  # type: ignore[arg-type]
                      shared=shared, two_step=topo.two_step)


def _dense_allreduce_fit(profile: ClusterProfile, topo: Topology):
    """The all_reduce over every GPU (the replicated gradients): the fit covering ``topo.gpus`` ranks, else the
    profile's two-level estimate (was: the largest fit, e.g. an 8-GPU NVLink one for 64 GPUs on two nodes' worth
    of links)."""
    if not profile.group_sizes("all_reduce"):
        raise InputError(profile.where, "has no all_reduce fit (the FSMoE planner needs "
                                                      "collectives.all_reduce for the gradient all-reduce stage)")
    return profile.collective_two_level("all_reduce", topo.gpus)


def expert_params_per_gpu(cfg: MoEConfig, topo: Topology) -> float:
    """Routed-expert parameters one GPU holds over all MoE layers: E * g*M*H per layer spread over the
    gpus / expert_copies GPUs that hold one copy of them."""
    return cfg.num_layers * cfg.experts * cfg.g * cfg.hidden * cfg.ffn_hidden * topo.expert_copies / topo.gpus


def expert_grad_buckets(per_position: list[float], bucket_elements: float = EXPERT_GRAD_BUCKET_ELEMENTS
                        ) -> tuple[list[float], float]:
    """The runtime's launch rule for the expert-gradient all-reduce (``ExpertGradReducer``): a layer's expert
    gradients become ready when its MoE backward ends (``per_position``: elements per layer, backward order);
    once at least ``bucket_elements`` ready elements wait, all of them are launched. Returns (elements launched at
    the end of each position's MoE backward, elements left for ``finish()`` after the backward). Per layer: the
    runtime's hooks fire per parameter, w1's before w2's, and its ready prefix (backward order: w2 first) grows only
    at w2's, so a layer's two gradients go out together, as counted here
    (tests/runtime/moe/test_expert_grad_buckets_match_planner.py)."""
    launched, waiting = [], 0.0
    for x in per_position:
        waiting += x
        if waiting > 0 and waiting >= bucket_elements:
            launched.append(waiting)
            waiting = 0.0
        else:
            launched.append(0.0)
    return launched, waiting


def expert_grad_allreduce_ms(cfg: MoEConfig, topo: Topology, *, source: Literal["published", "profile"],
                             profile: ClusterProfile | None = None, elements: float | None = None
                             ) -> tuple[float, str]:
    """(ms, note) of the all-reduce of the expert gradients (bf16, one GPU's share :func:`expert_params_per_gpu`,
    X bytes, or ``elements`` of it: one bucket) over the ``topo.expert_copies`` copies of each expert; (0, "")
    with one copy.

    Every GPU reduces its own X at the same time. Inside one node (world <= gpus_per_node): the all_reduce of X
    on that many ranks (NVLink: concurrent groups do not share a GPU's links). Across nodes the copies sit K ranks
    apart and a node's GPUs belong to c = min(K, G) different expert-data-parallel groups (G = gpus_per_node; all G
    for a node-sharded layout), all crossing the node's inter-node links together: c rings of X each leave the
    node 2 (n-1)/n X, as one all-reduce of c X over all D GPUs does (2 (D-1)/D c X), so that is the price: the
    all_reduce on D ranks (:meth:`ClusterProfile.collective_two_level` beyond the fits) of c X bytes, or FSMoE's
    stage-4 constants (a data-parallel all-reduce of its testbed, per element) for c X / 2 elements. (The flat
    fit on D/K ranks for X alone charged a node's inter-node traffic ~c times too little: EP 8 of 64 cost 1/8 of
    EP 1, whose all-reduce moves the same bytes through each node.)"""
    copies = topo.expert_copies
    if copies <= 1:
        return 0.0, ""
    elements = expert_params_per_gpu(cfg, topo) if elements is None else elements
    across = topo.gpus > topo.gpus_per_node
    conc = (topo.gpus_per_node if topo.hierarchical else min(topo.ep_size, topo.gpus_per_node)) if across else 1
    what = (f"expert-gradient all-reduce over {copies} copies"
            + (f" ({conc} group{'s' * (conc != 1)} per node at once: one all-reduce of {conc} "
               f"shard{'s' * (conc != 1)} over {topo.gpus} GPUs)"
               if across else ""))
    if source == "published":
        from adasched.profiler.builtins import FSMOE_ALPHA_MS, FSMOE_BETA_MS

        return FSMOE_ALPHA_MS[4] + FSMOE_BETA_MS[4] * conc * elements, f"{what}: published stage-4 constants"
    if profile is None:
        raise ValueError("expert_grad_allreduce_ms(source='profile') needs a profile")
    fit = (profile.collective_two_level("all_reduce", topo.gpus) if across
           else profile.collective("all_reduce", copies))
    return fit.time_ms(conc * elements * ELEMENT_BYTES), (
        f"{what}: all_reduce on {fit.group_size} ranks ({fit.source})")


def clamp_r_candidates(max_r: int = 16) -> list[int]:
    return [2**i for i in range(int(math.log2(max_r)) + 1)]
