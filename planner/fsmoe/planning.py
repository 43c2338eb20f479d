"""End to end: configurations + profile -> MoEPlan (r per direction per layer, gradient slices, baselines)."""
from __future__ import annotations

import time
from typing import Literal

from adasched.profiler.profile import ClusterProfile

from ..plan import inputs_digest, profile_ref
from ..solver import SolveParams
from .baselines import BASELINES, baseline_fwd_bwd_ms
from .costmodel import (EXPERT_GRAD_BUCKET_ELEMENTS, MoEConfig, expert_grad_allreduce_ms, expert_grad_buckets, expert_params_per_gpu,
                        stage_costs, topology)
from .model import WGRAD_MODES, choose_r, exposed_comm_ms, solve_slices
from .plan import MoEConfigPlan, MoELayerPlan, MoEPlan, StageCostsRecord

__all__ = ["dense_block_ms", "plan_config", "plan_moe"]


def dense_block_ms(cfg: MoEConfig, profile: ClusterProfile) -> tuple[float, float]:
    """(forward, backward) ms of one layer's attention block on one GPU, from the profile's attention and
    linear fits (scaled by hidden size; the linear fit is for the 7B layer's QKV+O+MLP, of which the
    attention projections 4*M^2 are taken). 0 when the profile has neither. Backward = 2/3 of fwd+bwd.
    Each fit's constant ``b_ms`` is charged once per layer, as FlexSP's and the LoRA cost models do (the batch
    runs in one call): the attention constant was multiplied by the sequences and the width ratio (20 % of the
    h100-sxm attention term at batch 4; 49 % on a measured CPU profile) and the linear one dropped."""
    total = 0.0
    if profile.attention is not None:
        a = profile.attention
        per_seq = a.time_ms(cfg.seq_len) - a.b_ms
        total += cfg.batch * per_seq * cfg.hidden / (a.heads * a.head_dim) + a.b_ms
    if profile.linear is not None:
        li = profile.linear
        share = 4 * li.hidden**2 / (4 * li.hidden**2 + 3 * li.hidden * li.ffn_hidden)
        total += cfg.tokens * li.ms_per_token * share * (cfg.hidden / li.hidden) ** 2 + li.b_ms
    return total / 3.0, 2.0 * total / 3.0


def shared_link(sim) -> str:
    """The stream of a simulated MoE pipeline whose link the gradient all-reduces share: the inter-node exchange
    ("inter": the flat all-to-all, or the inter-node step), or, where the exchange never leaves the node (FSMoE's
    sharded layout on one node, a two-step exchange whose EP group is one node), the intra-node one (its
    all-gather / reduce-scatter or intra-node all-to-all on NVLink, where the all-reduce then runs too)."""
    return "inter" if sim.busy_ms(stream="inter") > 0 else "intra"


def forward_case(fwd, r: int) -> str:
    """The forward's bound at ``r`` chunks, by the busiest resource: the inter-node all-to-all ("a2a-bound (T_A)"),
    the experts' compute ("compute-bound (T_B)") or the intra-node all-gather / reduce-scatter of sharded experts.
    (Only T_A's validity condition was read - a2a against compute - and Mixtral on 64 GPUs, whose all-gather and
    reduce-scatter dominate, was labelled a2a-bound while `bench moe` called it intra-bound.)"""
    busy = fwd.resource_busy_ms(r)
    return {"inter": "a2a-bound (T_A)", "intra": "intra-node-bound (all-gather / reduce-scatter)",
            "compute": "compute-bound (T_B)"}[max(busy, key=busy.get)]


def plan_config(cfg: MoEConfig, gpus: int, profile: ClusterProfile, *, stages: Literal["profile", "published"],
                params: SolveParams, ep_size: int | None = None, two_step: bool = False,
                gpus_per_node: int | None = None) -> MoEConfigPlan:
    """One configuration on ``gpus`` GPUs (the data-parallel world: dense gradients all-reduced over all of them);
    ``ep_size``: flat EP groups of that many ranks inside it (default: :func:`topology`'s layout); ``two_step``:
    those groups exchange in two all-to-all steps (the runtime's hierarchical path) through nodes of
    ``gpus_per_node`` (default: the profile's; the exchange's split only - the cluster's node size, which prices
    the gradient all-reduces, stays the profile's)."""
    topo = topology(cfg, gpus, profile.gpus_per_node, ep_size, two_step=two_step,
                    exchange_gpus_per_node=gpus_per_node)
    dense_f, dense_b = dense_block_ms(cfg, profile)
    layers: list[MoELayerPlan] = []
    moe_bwd_idle: list[float] = []
    base_layers = {name: [] for name in BASELINES}
    first = None
    for layer in range(cfg.num_layers):
        if layer > 0 and cfg.mean_k_per_layer is None:
            layers.append(layers[0].model_copy(update={"layer": layer}))
            moe_bwd_idle.append(moe_bwd_idle[0])
            for name in BASELINES:
                base_layers[name].append(base_layers[name][0])
            continue
        fwd = stage_costs(cfg, topo, source=stages, profile=profile, layer=layer)
        bwd = fwd.backward()
        first = first or fwd
        # the runtime interleaves dispatches and combines on flat exchanges only (runtime.moe.ep._pipeline)
        io = ("dispatch-first",) if topo.hierarchical or topo.two_step else ("dispatch-first", "interleaved")
        bf, per_r_f = choose_r(fwd, issue_orders=io)
        bb, per_r_b = choose_r(bwd, wgrad_modes=WGRAD_MODES, issue_orders=io)
        bb_fused, _ = choose_r(bwd, issue_orders=io)
        case = forward_case(fwd, bf.r)
        layers.append(MoELayerPlan(
            layer=layer, mean_k=cfg.k_of_layer(layer), r_fwd=bf.r, r_bwd=bb.r, order_fwd=bf.order, order_bwd=bb.order,
            wgrad_bwd=bb.wgrad, fwd_ms=bf.time_ms, bwd_ms=bb.time_ms, bwd_fused_wgrad_ms=bb_fused.time_ms, case_fwd=case,
            time_by_r_fwd={str(k): v for k, v in per_r_f.items()}, time_by_r_bwd={str(k): v for k, v in per_r_b.items()},
        ))
        moe_bwd_idle.append(max(0.0, bb.time_ms - bb.sim.busy_ms(stream=shared_link(bb.sim))))
        for name, r in BASELINES.items():
            base_layers[name].append(sum(baseline_fwd_bwd_ms(fwd, bwd, r)))
    assert first is not None
    # gradient slices over the backward order (last layer first): its gap = idle inter link in the MoE backward
    # pipeline + the dense block's backward (links idle); its dense gradients exist after it finished.
    order = list(range(cfg.num_layers))[::-1]
    gaps = [moe_bwd_idle[i] + dense_b for i in order]
    # dense gradients to all-reduce: none on one GPU (no data parallelism) or without replicated parameters -
    # before, one GPU was charged the 64-rank all-reduce fit (most of a Mixtral iteration) and a model of
    # MoE layers only divided by zero in the slice fill
    dense_grads = float(cfg.replicated_params) if topo.gpus > 1 else 0.0
    produced = [dense_grads] * cfg.num_layers
    a4 = first.alpha[4]
    b4 = first.work[4] / max(cfg.replicated_params, 1)
    sl = solve_slices(gaps, produced, a4, b4, params)
    at_end = a4 + b4 * sum(produced) if dense_grads > 0 else 0.0
    # expert gradients of EP groups smaller than the world (0 when EP spans every GPU): all-reduced over their
    # copies in the runtime's buckets, launched when a layer's MoE backward ends (its expert gradients exist) and
    # overlapping the rest of the backward: its dense block's backward, then the later layers' idle link time, which
    # the dense slices use too (exposed_comm_ms: the link as one queue over its idle time). The baselines run the
    # same reducer: the same buckets, overlapping their dense blocks' backward only (their dense gradients after
    # the backward). Charging them one all-reduce at the end instead made a plan with the baseline's own layer
    # schedule 23 bucket latencies slower than it (nothing to hide: 24 buckets against 1 all-reduce)
    _, expert_note = expert_grad_allreduce_ms(cfg, topo, source=stages, profile=profile)
    per_layer = expert_params_per_gpu(cfg, topo) / cfg.num_layers
    launched, rest = expert_grad_buckets([per_layer] * cfg.num_layers)

    def bucket_ms(x: float) -> float:
        return expert_grad_allreduce_ms(cfg, topo, source=stages, profile=profile, elements=x)[0] if x > 0 else 0.0

    expert_ms = [bucket_ms(x) for x in launched]
    expert_rest_ms = bucket_ms(rest)
    periods = []
    for j, i in enumerate(order):
        periods.append((a4 + b4 * sl.slices[j] if sl.slices[j] > 0 else 0.0, moe_bwd_idle[i]))
        periods.append((expert_ms[j], dense_b))
    exposed = exposed_comm_ms(periods, at_end_ms=sl.exposed_ms + expert_rest_ms)
    expert_exposed = max(0.0, exposed - sl.exposed_ms)
    moe_total = sum(l.fwd_ms + l.bwd_ms for l in layers)
    dense_total = cfg.num_layers * (dense_f + dense_b)
    iteration = moe_total + dense_total + sl.exposed_ms + expert_exposed
    expert_base = exposed_comm_ms([(x, dense_b) for x in expert_ms], at_end_ms=expert_rest_ms)
    iter_base = {name: sum(v) + dense_total + at_end + expert_base for name, v in base_layers.items()}
    if expert_note:
        expert_note += (f"; {sum(1 for x in launched if x > 0) + (rest > 0)} bucket(s) of >= "
                        f"{EXPERT_GRAD_BUCKET_ELEMENTS} elements overlapping the backward: "
                        f"{expert_exposed:.4g} of {sum(expert_ms) + expert_rest_ms:.4g} ms exposed")
    return MoEConfigPlan(
        name=cfg.name, config=cfg.model_dump(mode="json"), ep_size=topo.ep_size, hierarchical=topo.hierarchical,
        two_step_a2a=topo.two_step, gpus_per_node=topo.gpus_per_node,
        exchange_gpus_per_node=topo.exchange_gpus_per_node if topo.two_step else None,
        expert_copies=topo.expert_copies, expert_grad_allreduce_ms=sum(expert_ms) + expert_rest_ms,
        expert_grad_exposed_ms=expert_exposed,
        a2a_ms=first.a2a_ms, layers=layers, fwd_bwd_ms=layers[0].fwd_ms + layers[0].bwd_ms,
        baselines_fwd_bwd_ms={name: v[0] for name, v in base_layers.items()},
        grad_slices=sl.slices, grad_exposed_ms=sl.exposed_ms, grad_exposed_at_end_ms=at_end,
        iteration_ms=iteration, iteration_baselines_ms=iter_base, slice_solver_status=sl.outcome.status,
        slice_solver_backend=sl.outcome.backend,
        stage_source=first.source, stage_notes=list(first.notes) + ([expert_note] if expert_note else []),
        layer0_stage_costs=StageCostsRecord.of(first),
    )


def plan_moe(configs: list[MoEConfig], gpus: int, profile: ClusterProfile, *,
             stages: Literal["profile", "published"] = "profile", params: SolveParams | None = None,
             progress=None, ep_size: int | None = None, two_step: bool = False,
             gpus_per_node: int | None = None) -> MoEPlan:
    """Every configuration on ``gpus`` GPUs; ``ep_size`` (``--ep-size``): flat EP groups of that size inside them;
    ``two_step`` (``--two-step-a2a``) with ``gpus_per_node`` (``--gpus-per-node``, default: the profile's): the
    runtime's two-step exchange. The layout is recorded in the plan (``MoEPlan.ep_size_option``, each
    configuration's ep_size / hierarchical / two_step_a2a / gpus_per_node) for the runtime's check."""
    params = params or SolveParams(time_limit=2.0)
    if gpus > profile.world_size:
        from adasched.profiler.io import InputError

        raise InputError("--gpus", f"{gpus} GPUs but profile {profile.name!r} describes {profile.world_size}")
    t0 = time.perf_counter()
    out = []
    for cfg in configs:
        out.append(plan_config(cfg, gpus, profile, stages=stages, params=params, ep_size=ep_size, two_step=two_step,
                               gpus_per_node=gpus_per_node))
        if progress:
            progress()
    dt = time.perf_counter() - t0
    from ..plan import SolverRecord

    statuses = {c.slice_solver_status for c in out}
    status = "optimal" if statuses <= {"optimal"} else ("feasible" if "feasible" in statuses else "heuristic")
    milp = any(c.slice_solver_backend != "exact" for c in out)  # (the fallback ran: the record names CBC)
    record = SolverRecord(backend="exact-eval" + ("+pulp-cbc" if milp else ""), status=status, solve_seconds=round(dt, 6),
                          time_limit=params.time_limit, seed=params.seed, threads=params.threads,
                          note="r by exhaustive exact evaluation over {1,2,4,8,16} (doubled past 16 while "
                               "faster), per layer on its own fwd / bwd time; gradient slices by a greedy fill "
                               "proved optimal by a matching upper bound (the slice MILP, pulp-cbc, only where the "
                               "bound would not match) given those r - not r and slices jointly on the iteration "
                               "(a slower backward can leave the all-reduce more idle link)")
    predicted = sum(c.fwd_bwd_ms for c in out)
    baselines = {name: sum(c.baselines_fwd_bwd_ms[name] for c in out) for name in BASELINES}
    return MoEPlan(
        inputs_digest=inputs_digest([c.model_dump(mode="json") for c in configs], gpus, stages, profile,
                                    *([ep_size] if ep_size is not None else []),
                                    *([("two-step", gpus_per_node)] if two_step else [])),
        profile=profile_ref(profile), solver=record, predicted_ms=predicted, baselines_ms=baselines,
        gpus=gpus, gpus_per_node=profile.gpus_per_node, ep_size_option=ep_size, configs=out,
    )
