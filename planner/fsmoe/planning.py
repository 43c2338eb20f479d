"""End to end: configurations + profile -> MoEPlan (r per direction per layer, gradient slices, baselines)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from adasched.profiler.profile import ClusterProfile

from ..plan import inputs_digest, profile_ref, relative_gap
from ..solver import SolveParams, heuristic_outcome
from .baselines import BASELINES, baseline_fwd_bwd_ms
from .costmodel import (EXPERT_GRAD_BUCKET_ELEMENTS, MoEConfig, expert_grad_allreduce_ms, expert_grad_buckets, expert_params_per_gpu,
                        stage_costs, topology)
from .model import (WGRAD_MODES, GradSliceResult, PipelineEval, _exposed, _slice_cap, best_per_r, choose_r,
                    exposed_comm_ms, greedy_slices, solve_slices)
from .plan import MoEConfigPlan, MoELayerPlan, MoEPlan, StageCostsRecord

__all__ = ["BwdCandidate", "JointBwdChoice", "bwd_candidates", "choose_bwd_jointly", "dense_block_ms", "plan_config",
           "plan_moe", "queue_fit_slices", "queue_one_slice"]


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


def link_idle_ms(ev) -> float:
    """The idle time a simulated backward pipeline (a ``PipelineEval``) leaves on the link the gradient all-reduces
    share (:func:`shared_link`): what :func:`bwd_candidates` records per layer and the plan's verify re-derives."""
    return max(0.0, ev.time_ms - ev.sim.busy_ms(stream=shared_link(ev.sim)))


def issue_orders(hierarchical_or_two_step: bool) -> tuple[str, ...]:
    """The link issue orders the runtime can run: it interleaves dispatches and combines on flat exchanges only
    (runtime.moe.ep._pipeline)."""
    return ("dispatch-first",) if hierarchical_or_two_step else ("dispatch-first", "interleaved")


def forward_case(fwd, r: int) -> str:
    """The forward's bound at ``r`` chunks, by the busiest resource: the inter-node all-to-all ("a2a-bound (T_A)"),
    the experts' compute ("compute-bound (T_B)") or the intra-node all-gather / reduce-scatter of sharded experts
    (the intra-node all-to-all step of a two-step exchange).
    (Only T_A's validity condition was read - a2a against compute - and Mixtral on 64 GPUs, whose all-gather and
    reduce-scatter dominate, was labelled a2a-bound while `bench moe` called it intra-bound.)"""
    busy = fwd.resource_busy_ms(r)
    intra = ("intra-node-bound (the two-step exchange's intra-node all-to-all)" if fwd.two_step else
             "intra-node-bound (all-gather / reduce-scatter)")  # (a two-step plan runs no all-gather)
    return {"inter": "a2a-bound (T_A)", "intra": intra, "compute": "compute-bound (T_B)"}[max(busy, key=busy.get)]


@dataclass(frozen=True)
class BwdCandidate:
    """One backward schedule a layer may run: the fastest (order, wgrad) at its r (the time ``time_by_r_bwd``
    records for r) and the idle time it leaves on the link the gradient all-reduces share (:func:`shared_link`)."""

    ev: PipelineEval
    idle_ms: float

    @property
    def time_ms(self) -> float:
        return self.ev.time_ms


def bwd_candidates(evaluated: list[PipelineEval], fastest: PipelineEval) -> list[BwdCandidate]:
    """A layer's backward candidates for the joint choice with the gradient slices: of the fastest schedule of each
    r timed (:func:`best_per_r`), the Pareto set over (time: lower is better, idle shared-link time: higher is
    better), fastest first (``fastest``, :func:`choose_r`'s choice, is always the first). A slower schedule at the
    same r is left out: r fixes the link's busy time, so its extra time is all idle link, which hides at most that
    time again (plus, at most, one all-reduce latency); it would also break ``bwd_ms == time_by_r_bwd[r_bwd]``."""
    def cand(ev: PipelineEval) -> BwdCandidate:
        return BwdCandidate(ev, link_idle_ms(ev))

    out = [cand(fastest)]
    for ev in sorted(best_per_r(evaluated).values(), key=lambda e: e.time_ms):  # (stable: ties keep smaller r)
        c = cand(ev)
        if ev.r != fastest.r and c.time_ms >= out[0].time_ms and c.idle_ms > out[-1].idle_ms + 1e-9:
            out.append(c)
    return out


#: joint backward choice: every combination of the layers' candidates is evaluated when there are at most this many
#: (the result is then proved optimal over them); beyond, coordinate descent (see :func:`choose_bwd_jointly`)
EXHAUSTIVE_COMBINATIONS = 4096
#: coordinate descent's budget, in layer-positions of iteration evaluations (each evaluation is O(layers)): a bound
#: on the planning time at 1,024 distinct layers; deterministic (no wall-clock limit)
DESCENT_BUDGET = 1_000_000


#: joint backward choices proved optimal over the candidates
PROVED_CHOICES = ("single", "nothing-exposed", "exhaustive")


@dataclass
class JointBwdChoice:
    choice: list[int]
    """Per layer (forward order), the index of its chosen candidate (0 = its fastest backward)."""
    iteration_ms: float
    method: str
    """"single" (every layer has one candidate), "nothing-exposed" (every layer's fastest hides all
    communication), "exhaustive" or "coordinate-descent"."""
    exhausted_budget: bool = False


def choose_bwd_jointly(cands: list[list[BwdCandidate]], evaluate, *, identical: bool = False,
                       exhaustive_limit: int = EXHAUSTIVE_COMBINATIONS, budget: int = DESCENT_BUDGET
                       ) -> JointBwdChoice:
    """Per layer one backward candidate (``cands[i]``, fastest first), minimising ``evaluate(choice)`` (the
    iteration ms of a choice: a list of candidate indices per layer).

    At most ``exhaustive_limit`` combinations: all of them (optimal over the candidates). Otherwise starts - every
    layer its fastest (the per-layer choice); with ``identical`` layers (the same candidates in every layer) also
    every layer the same candidate, and the first k positions of the backward (the last layers: their gaps come
    before any dense gradient exists) the fastest, the rest one candidate, for every k - then coordinate descent
    from the best start: one layer's candidate changed at a time, the best change kept when it is strictly faster,
    until no layer improves (or ``budget`` layer-evaluations are spent). Never worse than the fastest-per-layer
    choice (it is a start and only strict improvements are taken); a heuristic beyond the exhaustive case."""
    n = len(cands)
    sizes = [len(c) for c in cands]
    fastest = [0] * n
    base = evaluate(fastest)
    if all(s == 1 for s in sizes):
        return JointBwdChoice(fastest, base, "single")
    combos = 1
    for s in sizes:
        combos *= s
        if combos > exhaustive_limit:
            break
    if combos <= exhaustive_limit:
        import itertools

        best, best_t = fastest, base
        for ch in itertools.product(*(range(s) for s in sizes)):
            ch = list(ch)
            if ch == fastest:
                continue
            t = evaluate(ch)
            if t < best_t - 1e-9:
                best, best_t = ch, t
        return JointBwdChoice(best, best_t, "exhaustive")
    spent = n
    best, best_t = fastest, base
    if identical:
        m = sizes[0]
        # layer i sits at backward position n-1-i: "the first k positions fastest" = layers n-k.. fastest
        # (within half the budget: k in steps so that the family costs at most that)
        step = max(1, -(-(m - 1) * n * n // max(budget // 2, 1)))
        for c in range(1, m):
            for k in range(0, n, step):
                ch = [c] * (n - k) + [0] * k
                t = evaluate(ch)
                spent += n
                if t < best_t - 1e-9:
                    best, best_t = ch, t
    exhausted = False
    improved = True
    while improved and not exhausted:
        improved = False
        for i in reversed(range(n)):  # backward order
            move, move_t = None, best_t
            for c in range(sizes[i]):
                if c == best[i]:
                    continue
                if spent + n > budget:
                    exhausted = True
                    break
                ch = best[:i] + [c] + best[i + 1:]
                t = evaluate(ch)
                spent += n
                if t < move_t - 1e-9:
                    move, move_t = ch, t
            if move is not None:
                best, best_t, improved = move, move_t, True
            if exhausted:
                break
    return JointBwdChoice(best, best_t, "coordinate-descent", exhausted)


def dense_allreduce(cfg: MoEConfig, gpus: int, alpha4_ms: float, work4_ms: float
                    ) -> tuple[float, float, list[float], float]:
    """The dense gradients' all-reduce as layer 0's stage 4 prices it (``alpha4_ms`` per call, ``work4_ms`` for one
    layer's replicated parameters): (alpha ms, beta ms per element, elements each layer produces - none on one
    GPU, no data parallelism -, ms when it all runs after the backward). :func:`plan_config` and the plan's
    verify both use it."""
    dense_grads = float(cfg.replicated_params) if gpus > 1 else 0.0
    produced = [dense_grads] * cfg.num_layers
    b4 = work4_ms / max(cfg.replicated_params, 1)
    return alpha4_ms, b4, produced, (alpha4_ms + b4 * sum(produced) if dense_grads > 0 else 0.0)


def iteration_lower_bound(fwd_ms: list[float], cands: list[list[BwdCandidate]], dense_total: float,
                          dense_b: float, last_dense_ms: float, comm_ms: float) -> float:
    """A lower bound on the iteration of every choice of backward candidates (one per layer), as
    :func:`plan_config` prices a choice: its forward and backward pipelines, the dense blocks (``dense_total``) and
    the all-reduce time the backward does not hide, E = max(dense exposed, the link's backlog at the end plus
    what runs after the backward). Two facts bound E, whatever the slices: the last layer of the backward's dense
    gradients exist only after it and the expert buckets' remainder is launched after it (``last_dense_ms``: alpha +
    beta x those elements plus that remainder's all-reduce, always exposed), and the
    link hides at most its idle time, each layer's idle link time in its backward plus its dense block's backward
    (``dense_b``), of all the all-reduce work (``comm_ms``: the dense gradients as one all-reduce - slicing only
    adds latencies - and every expert bucket). So per choice c, iteration(c) >= forward + dense + sum bwd(c) +
    max(last_dense_ms, comm_ms - L dense_b - sum idle(c)), and the minimum over c is at least the larger of
    sum min bwd + last_dense_ms and sum min (bwd - idle) + comm_ms - L dense_b."""
    fastest = sum(min(c.time_ms for c in cs) for cs in cands)
    busy = sum(min(c.time_ms - c.idle_ms for c in cs) for cs in cands)
    return sum(fwd_ms) + dense_total + max(fastest + last_dense_ms, busy + comm_ms - len(cands) * dense_b, fastest)


# ---- dense slices on a link the expert-gradient buckets share ---------------------------------------------
def _queue_unused(idle: list[float], expert_ms: list[float], dense_b: float) -> tuple[list[float], list[float]]:
    """Per period of the backward (position j's MoE backward, idle ``idle[j]``, then its dense block's backward,
    ``dense_b`` idle, where position j's expert bucket of ``expert_ms[j]`` is launched) the idle link time the
    buckets alone leave unused (exposed_comm_ms's queue), and that summed from each period on."""
    unused, backlog = [], 0.0
    for m_idle, e in zip(idle, expert_ms):
        for launched, free in ((0.0, m_idle), (e, dense_b)):
            backlog += launched
            unused.append(max(0.0, free - backlog))
            backlog = max(0.0, backlog - free)
    after = [0.0] * (len(unused) + 1)
    for m in range(len(unused) - 1, -1, -1):
        after[m] = after[m + 1] + unused[m]
    return unused, after


def queue_fit_slices(idle: list[float], expert_ms: list[float], dense_b: float, gaps: list[float],
                     produced: list[float], alpha: float, beta: float) -> list[float]:
    """The greedy slice fill (gap capacity, prefix rule; backward positions) where each slice also fits the idle
    link time the expert buckets and the earlier slices leave unused from its launch on: such a slice delays
    nothing (the final backlog stays the buckets'), so each element it takes is hidden. The queue serves work at
    the earliest idle time: a slice consumes the unused idle time after its launch, earliest first."""
    unused, after = _queue_unused(idle, expert_ms, dense_b)
    out, taken, prefix, used, ptr = [], 0.0, 0.0, 0.0, 0
    for j, g in enumerate(gaps):
        # unused idle time from the slice's launch (period 2j) on: earlier slices consumed from their own launch
        # on, earliest first - every period before `ptr` and `used` of period `ptr`
        if 2 * j > ptr:
            ptr, used = 2 * j, 0.0
        free = after[ptr] - used
        x = max(0.0, min(prefix - taken, _slice_cap(g, alpha, beta), _slice_cap(free, alpha, beta)))
        out.append(x)
        taken += x
        prefix += produced[j]
        w = alpha + beta * x if x > 0 else 0.0
        while w > 0 and ptr < len(unused):
            room = unused[ptr] - used
            if w < room:
                used, w = used + w, 0.0
            else:
                w, ptr, used = w - room, ptr + 1, 0.0
    return out


def queue_one_slice(idle: list[float], expert_ms: list[float], dense_b: float, gaps: list[float],
                    produced: list[float], alpha: float, beta: float) -> list[float]:
    """The one slice that fits the buckets' unused idle time and hides the most: queue_fit_slices's early slices
    each spend an alpha of idle time the later positions share, where one later, larger slice can hide more."""
    _, after = _queue_unused(idle, expert_ms, dense_b)
    best, at, prefix = 0.0, 0, 0.0
    for j, g in enumerate(gaps):
        x = max(0.0, min(prefix, _slice_cap(g, alpha, beta), _slice_cap(after[2 * j], alpha, beta)))
        if x > best:
            best, at = x, j
        prefix += produced[j]
    out = [0.0] * len(gaps)
    if out:
        out[at] = best
    return out


def expert_bucket_ms(cfg: MoEConfig, topo, stages: str, profile: ClusterProfile | None
                     ) -> tuple[list[float], float, list[float], float]:
    """The expert gradients' all-reduce buckets as the runtime's reducer launches them: (elements launched after
    each backward position, the remainder launched after the backward, their ms, the remainder's ms)."""
    per_layer_elements = expert_params_per_gpu(cfg, topo) / cfg.num_layers
    launched, rest = expert_grad_buckets([per_layer_elements] * cfg.num_layers)

    def bucket_ms(x: float) -> float:
        return expert_grad_allreduce_ms(cfg, topo, source=stages, profile=profile, elements=x)[0] if x > 0 else 0.0

    return launched, rest, [bucket_ms(x) for x in launched], bucket_ms(rest)


def link_exposure(idle: list[float], slices: list[float], alpha: float, beta: float, expert_ms: list[float],
                  dense_b: float, at_end_ms: float) -> float:
    """The all-reduce time the backward leaves exposed on the link the dense slices and the expert buckets share
    (positions in backward order: position j's MoE backward leaves ``idle[j]`` of the link idle, where slice j runs,
    then its dense block's backward ``dense_b``, where bucket j runs), plus ``at_end_ms`` launched after it.
    :func:`plan_config` and the plan's verify both price it so."""
    periods = []
    for j, x in enumerate(slices):
        periods.append((alpha + beta * x if x > 0 else 0.0, idle[j]))
        periods.append((expert_ms[j], dense_b))
    return exposed_comm_ms(periods, at_end_ms=at_end_ms)


def plan_config(cfg: MoEConfig, gpus: int, profile: ClusterProfile, *, stages: Literal["profile", "published"],
                params: SolveParams, ep_size: int | None = None, two_step: bool = False,
                gpus_per_node: int | None = None, joint_bwd: bool = True,
                bwd_search: dict | None = None, progress=None) -> MoEConfigPlan:
    """One configuration on ``gpus`` GPUs (the data-parallel world: dense gradients all-reduced over all of them);
    ``ep_size``: flat EP groups of that many ranks inside it (default: :func:`topology`'s layout); ``two_step``:
    those groups exchange in two all-to-all steps (the runtime's hierarchical path) through nodes of
    ``gpus_per_node`` (default: the profile's; the exchange's split only - the cluster's node size, which prices
    the gradient all-reduces, stays the profile's).

    The forward degree of each layer is its fastest; the backward ones (with their order and wgrad placement) are
    chosen jointly with the gradient slices on the iteration (:func:`choose_bwd_jointly`): a slower backward can
    leave the all-reduces more idle link time and shorten the iteration (FSMoE's all-reduce-bound case T_C).
    ``joint_bwd=False``: every layer's fastest backward (the choice before; for comparisons); ``bwd_search``:
    keyword arguments for :func:`choose_bwd_jointly` (``exhaustive_limit``, ``budget``; the tests'); ``progress``:
    called with 1 after each layer of its own cost model is timed (one for layers alike, every layer with router
    statistics)."""
    topo = topology(cfg, gpus, profile.gpus_per_node, ep_size, two_step=two_step,
                    exchange_gpus_per_node=gpus_per_node)
    dense_f, dense_b = dense_block_ms(cfg, profile)
    identical = cfg.mean_k_per_layer is None
    distinct = 1 if identical else cfg.num_layers
    per_layer: list[dict] = []   # the distinct layers' evaluations (layer 0 only when all are the same)
    base_layers = {name: [] for name in BASELINES}
    first = None
    for layer in range(distinct):
        fwd = stage_costs(cfg, topo, source=stages, profile=profile, layer=layer)
        bwd = fwd.backward()
        first = first or fwd
        # the runtime interleaves dispatches and combines on flat exchanges only (runtime.moe.ep._pipeline)
        io = issue_orders(topo.hierarchical or topo.two_step)
        bf, per_r_f = choose_r(fwd, issue_orders=io)
        evaluated: list[PipelineEval] = []
        bb, per_r_b = choose_r(bwd, wgrad_modes=WGRAD_MODES, issue_orders=io, evaluated=evaluated)
        bb_fused, _ = choose_r(bwd, issue_orders=io)
        per_layer.append(dict(bf=bf, per_r_f=per_r_f, per_r_b=per_r_b, bb_fused=bb_fused, case=forward_case(fwd, bf.r),
                              cands=bwd_candidates(evaluated, bb) if joint_bwd else bwd_candidates([], bb)))
        for name, r in BASELINES.items():
            base_layers[name].append(sum(baseline_fwd_bwd_ms(fwd, bwd, r)))
        if progress is not None:
            progress(1)
    if identical:
        for name in BASELINES:
            base_layers[name] *= cfg.num_layers
    assert first is not None
    cands = [per_layer[0 if identical else i]["cands"] for i in range(cfg.num_layers)]
    # gradient slices over the backward order (last layer first): its gap = idle inter link in the MoE backward
    # pipeline + the dense block's backward (links idle); its dense gradients exist after it finished.
    order = list(range(cfg.num_layers))[::-1]
    # dense gradients to all-reduce: none on one GPU (no data parallelism) or without replicated parameters -
    # before, one GPU was charged the 64-rank all-reduce fit (most of a Mixtral iteration) and a model of
    # MoE layers only divided by zero in the slice fill
    a4, b4, produced, at_end = dense_allreduce(cfg, topo.gpus, first.alpha[4], first.work[4])
    dense_grads = produced[0] if produced else 0.0
    # expert gradients of EP groups smaller than the world (0 when EP spans every GPU): all-reduced over their
    # copies in the runtime's buckets, launched when a layer's MoE backward ends (its expert gradients exist) and
    # overlapping the rest of the backward: its dense block's backward, then the later layers' idle link time, which
    # the dense slices use too (exposed_comm_ms: the link as one queue over its idle time). The baselines run the
    # same reducer: the same buckets, overlapping their dense blocks' backward only (their dense gradients after
    # the backward). Charging them one all-reduce at the end instead made a plan with the baseline's own layer
    # schedule 23 bucket latencies slower than it (nothing to hide: 24 buckets against 1 all-reduce)
    _, expert_note = expert_grad_allreduce_ms(cfg, topo, source=stages, profile=profile)
    launched, rest, expert_ms, expert_rest_ms = expert_bucket_ms(cfg, topo, stages, profile)
    fwd_ms = [per_layer[0 if identical else i]["bf"].time_ms for i in range(cfg.num_layers)]
    dense_total = cfg.num_layers * (dense_f + dense_b)

    def exposure(idle: list[float], slices: list[float], dense_exposed: float) -> float:
        return link_exposure([idle[i] for i in order], slices, a4, b4, expert_ms, dense_b,
                             dense_exposed + expert_rest_ms)

    # expert buckets launched during the backward share the link with the dense slices: the slice fill sizes each
    # slice to its gap as if the link were free, and where the buckets' backlog already fills the gaps a slice hid
    # nothing and added its latency (16 GPUs, EP 2: every slice one alpha over not slicing, the plan slower than its
    # fixed-r2 baseline under status "optimal"); there queue_fit_slices and queue_one_slice are tried too, the
    # best kept
    shared = any(x > 0 for x in expert_ms)
    buckets = shared or expert_rest_ms > 0

    def outcome(choice: list[int], exact: bool):
        """(iteration ms, slice result or None, expert exposure ms) of a choice. ``exact``: the slices by
        solve_slices (what the plan records); else by the greedy fill, O(layers), for the search (what solve_slices
        returns once it meets its bound - always, see slice_upper_bound). With expert buckets on the link
        (``shared``) also the fill fitted to their queue and the best single slice, the shortest iteration kept,
        never "optimal"."""
        picked = [cands[i][c] for i, c in enumerate(choice)]
        idle = [p.idle_ms for p in picked]
        gaps = [idle[i] + dense_b for i in order]
        sl = None
        if exact:
            sl = solve_slices(gaps, produced, a4, b4, params)
            slices, dense_exposed = sl.slices, sl.exposed_ms
        else:
            slices = greedy_slices(gaps, produced, a4, b4)
            dense_exposed = _exposed(slices, produced, a4, b4)
        # (no expert buckets - one copy of each expert -: nothing of theirs to expose; the queue's one-ulp residue
        # of a slice that fills its gap exactly read as 1.8e-15 ms of expert exposure, which verify refused; r10)
        expert_exposed = max(0.0, exposure(idle, slices, dense_exposed) - dense_exposed) if buckets else 0.0
        if shared:
            idle_pos = [idle[i] for i in order]
            for fitted in (queue_fit_slices(idle_pos, expert_ms, dense_b, gaps, produced, a4, b4),
                           queue_one_slice(idle_pos, expert_ms, dense_b, gaps, produced, a4, b4)):
                f_dense = _exposed(fitted, produced, a4, b4)
                f_expert = max(0.0, exposure(idle, fitted, f_dense) - f_dense)
                if f_dense + f_expert < dense_exposed + expert_exposed:
                    slices, dense_exposed, expert_exposed = fitted, f_dense, f_expert
            if sl is not None:
                sl = GradSliceResult(slices, dense_exposed, heuristic_outcome(
                    sum(slices), sl.outcome.solve_seconds, params,
                    note="expert buckets share the link: the best of the gap fill, the fill fitted to their queue "
                         "and the one slice that fits it best (no optimality proof)"))
        moe_total = sum(f + p.time_ms for f, p in zip(fwd_ms, picked))
        return moe_total + dense_total + dense_exposed + expert_exposed, sl, expert_exposed

    def iteration_of(choice: list[int]) -> float:
        return outcome(choice, exact=False)[0]

    def finish(choice: list[int]):
        return outcome(choice, exact=True)

    fastest = [0] * cfg.num_layers
    done_fastest = finish(fastest)
    if done_fastest[1].exposed_ms + done_fastest[2] <= 0.0:
        # nothing left exposed with every layer's fastest backward (one GPU: no gradient all-reduce at all): no
        # choice beats it - its MoE time is a lower bound - so it is optimal without a search (the search ran,
        # reported "heuristic" and spent 2.6 s on 1,024 layers for the same plan)
        joint = JointBwdChoice(fastest, done_fastest[0], "nothing-exposed")
    else:
        joint = choose_bwd_jointly(cands, iteration_of, identical=identical, **(bwd_search or {}))
    done = finish(joint.choice) if joint.choice != fastest else done_fastest
    if done_fastest[0] <= done[0]:  # the joint choice is never longer than the fastest-per-layer one
        joint.choice, done = fastest, done_fastest
    iteration, sl, expert_exposed = done
    # always exposed: the last layer's dense gradients (they exist after the backward) and the expert buckets'
    # remainder (launched after it)
    lower = iteration_lower_bound(fwd_ms, cands, dense_total, dense_b,
                                  (a4 + b4 * dense_grads if dense_grads > 0 else 0.0) + expert_rest_ms,
                                  at_end + sum(expert_ms) + expert_rest_ms)
    layers: list[MoELayerPlan] = []
    for i in range(cfg.num_layers):
        d = per_layer[0 if identical else i]
        bf, bb = d["bf"], cands[i][joint.choice[i]]
        layers.append(MoELayerPlan(
            layer=i, mean_k=cfg.k_of_layer(i), r_fwd=bf.r, r_bwd=bb.ev.r, order_fwd=bf.order, order_bwd=bb.ev.order,
            wgrad_bwd=bb.ev.wgrad, fwd_ms=bf.time_ms, bwd_ms=bb.time_ms, bwd_fused_wgrad_ms=d["bb_fused"].time_ms,
            bwd_fastest_ms=cands[i][0].time_ms, bwd_link_idle_ms=bb.idle_ms, case_fwd=d["case"],
            time_by_r_fwd={str(k): v for k, v in d["per_r_f"].items()},
            time_by_r_bwd={str(k): v for k, v in d["per_r_b"].items()},
        ))
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
        iteration_ms=iteration, iteration_lower_bound_ms=lower,
        iteration_baselines_ms=iter_base, slice_solver_status=sl.outcome.status,
        slice_solver_backend=sl.outcome.backend,
        iteration_fastest_bwd_ms=done_fastest[0], bwd_choice=joint.method + (" (budget spent)" * joint.exhausted_budget),
        stage_source=first.source, stage_notes=list(first.notes) + ([expert_note] if expert_note else []),
        layer0_stage_costs=StageCostsRecord.of(first),
    )


def record_bound(configs) -> tuple[float, float]:
    """(objective, bound) of a MoE plan's solver record: the configurations' iterations summed, and theirs where
    the iteration is proved minimal over the candidates (a backward choice in ``PROVED_CHOICES``, slices proved
    optimal), else the iteration's lower bound."""
    objective = sum(c.iteration_ms for c in configs)
    bound = sum(c.iteration_ms if proved_iteration(c) else c.iteration_lower_bound_ms for c in configs)
    return objective, bound


def proved_iteration(c) -> bool:
    """Configuration ``c``'s iteration is proved minimal over its backward candidates: a proved joint choice and
    gradient slices proved optimal."""
    return (c.bwd_choice or "").split(" (")[0] in PROVED_CHOICES and c.slice_solver_status == "optimal"


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
        from adasched.profiler.profile import more_nodes_hint

        raise InputError("--gpus", f"{gpus} GPUs but {profile.where} describes {profile.world_size}; "
                                   + more_nodes_hint(profile, gpus))
    t0 = time.perf_counter()
    out = []
    if progress is not None:  # (advance(n, total=None), as planner.ui.progress yields: one step per timed layer)
        progress(0, total=sum(1 if c.mean_k_per_layer is None else c.num_layers for c in configs))
    for cfg in configs:
        out.append(plan_config(cfg, gpus, profile, stages=stages, params=params, ep_size=ep_size, two_step=two_step,
                               gpus_per_node=gpus_per_node, progress=progress))
    dt = time.perf_counter() - t0
    from ..plan import SolverRecord

    statuses = {c.slice_solver_status for c in out}
    status = "optimal" if statuses <= {"optimal"} else ("feasible" if "feasible" in statuses else "heuristic")
    choices = {c.bwd_choice for c in out}
    if status == "optimal" and not choices <= set(PROVED_CHOICES):
        status = "heuristic"  # the joint backward choice was not proved over every combination
    # the fallback ran: the record names CBC (a queue-fitted fill's "heuristic" backend started no MILP)
    milp = any("pulp" in c.slice_solver_backend for c in out)
    gain = sum((c.iteration_fastest_bwd_ms or c.iteration_ms) - c.iteration_ms for c in out)
    objective, bound = record_bound(out)
    record = SolverRecord(backend="exact-eval" + ("+pulp-cbc" if milp else ""), status=status, solve_seconds=round(dt, 6),
                          objective=objective, bound=bound, gap=relative_gap(objective, bound),
                          time_limit=params.time_limit, seed=params.seed, threads=params.threads,
                          note="forward r per layer by exhaustive exact evaluation over {1,2,4,8,16} (doubled past "
                               "16 while faster), the fastest; backward r (with its order and wgrad placement) "
                               "chosen jointly with the gradient slices on the iteration: per layer the Pareto set "
                               "over (time, idle link time) of the fastest schedule of each r, then every "
                               "combination where there are at most "
                               f"{EXHAUSTIVE_COMBINATIONS} (optimal over them), else coordinate descent from every "
                               "layer's fastest backward (and, for identical layers, uniform and fastest-prefix "
                               "starts; a heuristic, never longer than the per-layer choice); for each choice the "
                               "gradient slices by a greedy fill proved optimal by a matching upper bound (the "
                               "slice MILP, pulp-cbc, only where the bound would not match); where expert-gradient "
                               "buckets share the link (expert copies), the better of that fill and one fitted to "
                               "their queue, a heuristic. Choices: "
                               + ", ".join(f"{c.name} {c.bwd_choice}" for c in out)
                               + f"; {gain:.4g} ms of iteration gained over every layer's fastest backward"
                               + "; objective = the configurations' iterations summed, bound = theirs where the "
                                 "backward choice is proved (single, nothing-exposed, exhaustive), else the "
                                 "iteration's lower bound over every choice of candidates (every layer's fastest "
                                 "backward, the all-reduce that no idle link time can hide)")
    predicted = sum(c.fwd_bwd_ms for c in out)
    baselines = {name: sum(c.baselines_fwd_bwd_ms[name] for c in out) for name in BASELINES}
    return MoEPlan(
        inputs_digest=inputs_digest([c.model_dump(mode="json") for c in configs], gpus, stages, profile,
                                    *([ep_size] if ep_size is not None else []),
                                    *([("two-step", gpus_per_node)] if two_step else [])),
        profile=profile_ref(profile), solver=record, predicted_ms=predicted, baselines_ms=baselines,
        gpus=gpus, gpus_per_node=profile.gpus_per_node, ep_size_option=ep_size, configs=out,
    )
