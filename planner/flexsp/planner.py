"""Plan one global batch (a training step) and a sequence of them.

Per step (all times on the real lengths):

1. sort the lengths; M_min = ceil(batch tokens / token capacity of all N GPUs); for M in M_min..M_min+4 split
   into M consecutive runs by the min-max token DP (:func:`split_microbatches`);
2. per micro-batch: the baselines (every single degree, LPT-packed; the greedy heuristic), each also
   improved by local search as a candidate for the FlexSP plan;
3. group-structure search on the real lengths (:func:`structure_search`: split / merge groups, restarts) from
   the best candidate of every micro-batch of the most promising splits;
4. for the most promising M (best heuristic total, then the next ones while time is left): bucket each
   micro-batch (padding DP, Q buckets), solve the MILP warm-started with the best candidate so far, hand the
   real sequences to the MILP's groups, local search; keep the best candidate per micro-batch;
5. splits with several micro-batches: sequences move into the idle time beside another micro-batch's critical
   group (:func:`fill_across`; the split is then no longer consecutive runs of the sorted order);
6. the most promising splits: single moves, swaps and (small pairs) new splits of two micro-batches, each pair
   re-packed (:func:`exchange_across`, EXCHANGE_SHARE of ``time_limit`` of its own);
7. the step's plan is the M with the smallest total; baselines are reported at their own best M, so the
   plan is never worse than the best single degree per micro-batch.

``time_limit`` is a budget per step: the structure search gets ``1 - milp_share`` of it first, the MILPs
(shared by their micro-batches) what is left.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from adasched.planner.solver import SolveParams, relative_gap
from adasched.profiler.io import InputError

from .assign import MBSolution, buddy_ranks, local_search
from .baselines import best_homogeneous, greedy, static_sp
from .batching import make_buckets, split_microbatches
from .bounds import per_sequence_bounds
from .costmodel import GiB, SPCostModel
from .search import exchange_across, fill_across, structure_search
from .model import bucket_counts, realise, realise_classes, solve_classes, solve_microbatch

__all__ = ["PlannerConfig", "StepResult", "plan_step", "check_fits", "lower_bound_work"]


@dataclass(kw_only=True)
class PlannerConfig:
    buckets: int = 16
    """Q: length buckets per micro-batch for the MILP."""
    extra_microbatches: int = 4
    """Micro-batch counts tried: M_min .. M_min + this."""
    time_limit: float = 1.0
    """Search seconds per step: the structure search gets (1 - milp_share) of it first, then the MILPs (shared by
    the micro-batches of the M values solved) get what is left."""
    milp_candidates: int = 2
    """How many of the best M values (by heuristic total) get MILPs."""
    seed: int = 0
    threads: int = 1
    backend: str = "SCIP"
    use_milp: bool = True
    local_search: bool = True
    formulation: str = "auto"
    """'groups': the paper's per-group MILP; 'classes': counts per (bucket, degree), identical groups merged;
    'auto': groups while the candidate groups number at most ``max_group_vars``, else classes."""
    max_group_vars: int = 40
    structure_search: bool = True
    """Before the MILPs, improve each micro-batch's group structure by local search on the real lengths
    (:func:`adasched.planner.flexsp.search.structure_search`); its plans then warm-start the MILPs."""
    milp_share: float = 0.25
    """Fraction of ``time_limit`` left to the MILPs when the structure search runs (it gets the rest first;
    what it leaves unused goes to the MILPs)."""
    max_evals: int | None = None
    """Deterministic mode when set: the searches are bounded by work instead of the clock - the structure search
    tries at most this many group structures per micro-batch (and per donor of the fill across micro-batches, there
    with restarts only on a donor of <= ``search.FILL_RESTARTS_PER_GPU`` sequences per GPU),
    every selected MILP runs (bounded by ``milp_nodes``), the exchange between micro-batches re-packs at most this
    many candidates per split (:func:`~.search.exchange_across`), so the same inputs give the same plan on any machine
    load. ``time_limit`` then caps each MILP only (a cap that stops one makes that step clock-dependent again:
    ``StepResult.clock_bound`` says so)."""
    milp_nodes: int = 50
    """Branch-and-bound nodes per MILP in deterministic mode (SCIP ``limits/nodes``)."""
    exchange: bool = True
    """Run the exchange between micro-batches (:func:`~.search.exchange_across`); off only to measure what it buys
    (`adasched bench sp-oracle`)."""

    @property
    def deterministic(self) -> bool:
        return self.max_evals is not None


@dataclass
class MilpStat:
    status: str
    gap: float | None
    objective: float | None
    bound: float | None
    seconds: float
    won: bool
    #: the warm start (the incumbent) broke the bucketed model's memory rows, which charge every sequence at its
    #: bucket's longest length: the MILP started cold, and its gap is its own solution's, not the plan's
    cold: bool = False


@dataclass
class StepResult:
    step: int
    lens: np.ndarray
    micro_batches: list[MBSolution]
    time_ms: float
    baselines_ms: dict[str, float]
    chosen_m: int
    """Micro-batches of the chosen split."""
    solve_seconds: float
    split: str = ""
    """Which split won: 'sorted-M' (min-max token DP over the sorted batch) or 'packed-M' (static's bins,
    :func:`~.baselines.pack_bins`; 'bfd-M' in plans before 2026-12-03)."""
    milp: list[MilpStat] = field(default_factory=list)
    static: list[MBSolution] = field(default_factory=list)
    lower_bound_ms: float = 0.0
    """M_min * b1 + :func:`lower_bound_work`: no plan of this step can be faster (ms)."""
    milp_planned: int = 0
    """MILPs the step meant to run (one per micro-batch of its most promising splits); the clock may stop it
    before all of them ran."""
    clock_bound: bool = False
    """Deterministic mode only: a MILP of this step was stopped by its time cap rather than its node limit, so
    this step may differ between runs (raise ``time_limit`` or lower ``milp_nodes``)."""

    @property
    def memory_violations(self) -> int:
        return sum(0 if mb.fits else 1 for mb in self.micro_batches)

    @property
    def mip_gap(self) -> float | None:
        gaps = [m.gap for m in self.milp if m.gap is not None]
        return float(np.mean(gaps)) if gaps else None

    @property
    def milp_status(self) -> str:
        if not self.milp:
            return "heuristic"
        if all(m.status == "optimal" for m in self.milp):
            # (only when every micro-batch meant for the MILP got one: the clock stopping the loop after one fast
            # optimal MILP of 23 called the whole step optimal)
            return "optimal" if len(self.milp) >= self.milp_planned else "feasible"
        if any(m.status in ("optimal", "feasible") for m in self.milp):
            return "feasible"
        # "infeasible": the bucketed model has no solution (its memory rows use each bucket's longest length), which
        # was reported as a time-out
        return "infeasible" if all(m.status == "infeasible" for m in self.milp) else "timeout"


#: clock mode: the moves and swaps between micro-batches (:func:`exchange_across`) get this share of --time-limit
#: of their own, after the fill (deterministic mode: at most ``max_evals`` re-packed candidates per split)
EXCHANGE_SHARE = 0.25


def check_fits(lens: np.ndarray, cm: SPCostModel, where: str = "--seqlens", drawn: np.ndarray | None = None) -> None:
    """Every sequence (``drawn``: those at these positions of ``lens``, the ones a plan's batches hold) must fit
    on all N GPUs; else an InputError naming it (its position in ``lens``) and the memory it needs."""
    cap = cm.token_capacity(cm.world)
    if drawn is None:
        i = int(np.argmax(lens))
    else:
        drawn = np.unique(np.asarray(drawn, dtype=np.int64))
        i = int(drawn[np.argmax(lens[drawn])])
    if cap < 1:
        raise InputError("--gpus", f"the {cm.model.name} model states alone need {cm.model_state_bytes / GiB:.1f} "
                                   f"GiB per GPU on {cm.world} GPUs (ZeRO-{cm.model.zero_stage}), more than the "
                                   f"device's {cm.memory_bytes / GiB:.1f} GiB: no sequence fits; add GPUs")
    if lens[i] > cap:
        need = cm.memory_needed(float(lens[i]), cm.world)
        # (it said "sequence i (0-based)", read as a line number; comments and blank lines are not counted)
        raise InputError(where, f"the longest sequence{' drawn' if drawn is not None else ''} (length number "
                                f"{i + 1} of {len(lens)} listed) has "
                                f"{int(lens[i])} tokens and needs {need / GiB:.1f} GiB "
                                f"per GPU even on all {cm.world} GPUs (device memory {cm.memory_bytes / GiB:.1f} GiB, "
                                f"at most {int(cap)} tokens fit); lower --max-context or add GPUs")


def min_microbatches(lens: np.ndarray, cm: SPCostModel) -> int:
    """M_min: the fewest micro-batches whose tokens the N GPUs' memory can hold."""
    return max(1, math.ceil(float(lens.sum()) / cm.token_capacity(cm.world) - 1e-12))


def step_lower_bound(lens: np.ndarray, cm: SPCostModel) -> float:
    """M_min * b1 + :func:`lower_bound_work` (ms): no plan of this step can be faster (``StepResult.lower_bound_ms``;
    an SP plan's ``solver.bound`` is their sum over its steps)."""
    return min_microbatches(lens, cm) * cm.b1 + lower_bound_work(lens, cm)


def lower_bound_work(lens: np.ndarray, cm: SPCostModel) -> float:
    """Lower bound on the compute+communication part of a step (ms): every sequence on its cheapest degree
    that holds it, in GPU-ms, spread perfectly over the N GPUs. A step with M micro-batches takes at least
    M * b1 + this (b1 is paid by every micro-batch)."""
    return float(per_sequence_bounds(lens, cm)[0].sum()) / cm.world


def analytic_bound(buckets, cm: SPCostModel, *, single: str = "mean") -> float:
    """A valid lower bound of a bucketed MILP's objective: b1 plus every bucket's work on its cheapest degree in
    GPU-ms over N GPUs, and at least the slowest single sequence of a bucket on its best degree, priced as that MILP
    prices it: at the bucket's means (``single="mean"``: the per-group model, ``solve_microbatch``) or at its longest
    length (``"max"``: the class model, ``solve_classes``, has that constraint). Pricing the per-group model's
    single sequence at the bucket's longest put the bound above its proved optimum (a gap of 37 % reported on an
    optimal MILP with one bucket of [10, 10, 10, 700])."""
    if single not in ("mean", "max"):
        raise ValueError(f"single must be 'mean' or 'max', got {single!r}")
    work, slowest = 0.0, 0.0
    for b in buckets:
        best_w, best_s = math.inf, math.inf
        for d in cm.degrees:
            if b.max > cm.token_capacity(d):
                continue
            a, be, ga = cm.coeffs(d)
            best_w = min(best_w, b.count * (a * b.mean_sq + be * b.mean) * d)
            one = a * b.mean_sq + be * b.mean if single == "mean" else a * b.max * b.max + be * b.max
            best_s = min(best_s, one + ga)
        work += best_w
        slowest = max(slowest, best_s)
    return max(cm.b1 + work / cm.world, slowest)


def _improve(sol: MBSolution | None, lens, cm, cfg) -> MBSolution | None:
    if sol is None or not cfg.local_search:
        return sol
    return local_search(sol, lens, cm)


def _heuristics(per_m: dict, split, lens, cm: SPCostModel, cfg: PlannerConfig) -> None:
    """Baselines and heuristic candidates for every micro-batch of one split; records the split if feasible."""
    key, mbs = split
    best_h, homog_tot, greedy_tot = [], 0.0, 0.0
    for ids in mbs:
        h, _ = best_homogeneous(ids, lens, cm)
        g = greedy(ids, lens, cm)
        homog_tot += h.time_ms if h is not None else math.inf
        greedy_tot += g.time_ms if g is not None and g.fits else math.inf
        cands = [c for c in (h, g) if c is not None and c.fits]
        if h is not None:  # greedy aimed at beating the best single degree
            packed: dict = {}  # targets with the same group degrees: one packing
            for f in (0.92, 0.96, 1.0):
                gt = greedy(ids, lens, cm, target_ms=f * h.time_ms, cache=packed)
                if gt is not None and gt.fits:
                    cands.append(_improve(gt, lens, cm, cfg))
        best_h.append(_improve(min(cands, key=lambda c: c.time_ms), lens, cm, cfg) if cands else None)
    if any(c is None for c in best_h):
        return
    per_m[key] = dict(mbs=mbs, best=best_h, start=list(best_h), homog=homog_tot, greedy=greedy_tot,
                      heur=sum(c.time_ms for c in best_h))


def _promising(per_m: dict, n: int) -> list[str]:
    """The (at most ``n``) splits worth searching further, best heuristic total first (ties by name, so the order
    does not depend on dict order): only those within 5 % of the best, else the budget is wasted."""
    keys = sorted(per_m, key=lambda m: (per_m[m]["heur"], m))
    return [k for k in keys if per_m[k]["heur"] <= 1.05 * per_m[keys[0]]["heur"]][:n]


def plan_step(lens: np.ndarray, cm: SPCostModel, cfg: PlannerConfig, step: int = 0) -> StepResult:
    """Plan one global batch; see the module docstring."""
    t0 = time.perf_counter()
    lens = np.asarray(lens, dtype=np.int64)
    check_fits(lens, cm)
    n_seq = lens.size
    order = np.argsort(lens, kind="stable")
    srt = lens[order]
    cap_n = cm.token_capacity(cm.world)
    m_min = min_microbatches(lens, cm)

    # ---- heuristics per candidate split ---------------------------------------------------------
    # splits: M consecutive runs of the sorted batch (min-max token DP) for M = M_min.. (at least one
    # feasible M, then ``extra_microbatches`` more), plus the static baseline's bins (pack_bins: best-fit decreasing,
    # then fewer bins where they fit; they mix long and short sequences when the sorted runs cannot fit)
    static = static_sp(lens, cm)
    per_m: dict[str, dict] = {}
    lb_work = lower_bound_work(lens, cm)
    splits = []
    m, last = m_min, m_min + cfg.extra_microbatches
    fits = lambda k: all(srt[a:b].sum() <= cap_n for a, b in split_microbatches(srt, k))  # noqa: E731
    if not fits(m_min):
        # the first M whose sorted runs fit, by bisection (the min-max split only shrinks as M grows): one split
        # per M up to it took 101 splits on 400 sequences that pair up to fill the GPUs exactly
        lo, hi = m_min, n_seq                      # fits(n_seq): one sequence per micro-batch (check_fits)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        m, last = hi, max(last, hi)               # as the loop did: the first feasible M, then up to M_min + extra
    while m <= min(n_seq, last):
        if per_m and m * cm.b1 + lb_work >= min(v["heur"] for v in per_m.values()):
            break  # no plan with m micro-batches can beat the best found (the bound grows with m)
        runs = split_microbatches(srt, m)
        if any(srt[a:b].sum() > cap_n for a, b in runs):
            last = max(last, m + 1)  # not feasible yet: keep going
            m += 1
            continue
        splits.append((f"sorted-{m}", [order[a:b] for a, b in runs]))
        _heuristics(per_m, splits[-1], lens, cm, cfg)
        m += 1
    bins = [np.array(sorted(mb.seq_ids(), key=lambda i: (lens[i], i)), dtype=np.int64) for mb in static]
    seen = {frozenset(frozenset(x.tolist()) for x in mbs) for _, mbs in splits}
    if frozenset(frozenset(x.tolist()) for x in bins) not in seen:
        _heuristics(per_m, (f"packed-{len(bins)}", bins), lens, cm, cfg)
    if not per_m:
        raise InputError("--global-batch",
                         f"no feasible split of {n_seq} sequences into micro-batches on {cm.world} GPUs")

    # ---- structure search on the real lengths, best splits first, first (its plans warm-start the MILPs) ---
    t_step_search = time.perf_counter()
    clock_bound = False  # a clock limit, not the work limits, cut a search of this step
    if cfg.structure_search and cfg.deterministic:
        for key in _promising(per_m, max(1, cfg.milp_candidates)):
            info = per_m[key]
            for r in range(len(info["mbs"])):
                info["best"][r] = structure_search(info["mbs"][r], lens, cm, info["best"][r], max_evals=cfg.max_evals)
            info["heur"] = sum(c.time_ms for c in info["best"])
    elif cfg.structure_search:
        deadline = time.perf_counter() + cfg.time_limit * (1.0 - (cfg.milp_share if cfg.use_milp else 0.0))
        keys = _promising(per_m, max(1, cfg.milp_candidates))  # the best split gets 70 % of the time first
        for n_key, key in enumerate(keys):
            info = per_m[key]
            now = time.perf_counter()
            key_deadline = deadline if n_key == len(keys) - 1 else now + 0.7 * max(0.0, deadline - now)
            order_mb = sorted(range(len(info["mbs"])), key=lambda r: -info["best"][r].time_ms)
            for j, r in enumerate(order_mb):
                now = time.perf_counter()
                if now >= key_deadline:
                    break
                share = (key_deadline - now) / (len(order_mb) - j)
                info["best"][r] = structure_search(info["mbs"][r], lens, cm, info["best"][r], deadline=now + share)
            info["heur"] = sum(c.time_ms for c in info["best"])

    # ---- MILP on the most promising M ----------------------------------------------------------
    milp_stats: list[MilpStat] = []
    n_runs = 0
    if cfg.use_milp:
        ranked = _promising(per_m, cfg.milp_candidates)
        n_runs = sum(len(per_m[m]["mbs"]) for m in ranked)
        budget = cfg.time_limit - (time.perf_counter() - t_step_search)
        t_milp0 = time.perf_counter()
        done = 0
        for m in ranked:
            info = per_m[m]
            for r, ids_sorted in enumerate(info["mbs"]):
                if cfg.deterministic:
                    per = cfg.time_limit  # a cap only: the node limit decides where the search stops
                else:
                    left = budget - (time.perf_counter() - t_milp0)
                    if left <= 0.02:
                        break
                    per = max(0.02, left / max(1, n_runs - done))
                done += 1
                buckets = make_buckets(lens[ids_sorted], cfg.buckets)
                bucket_of = {int(ids_sorted[j]): q for q, bk in enumerate(buckets) for j in range(bk.start, bk.end)}
                inc = info["best"][r]
                hint = bucket_counts(inc, bucket_of, len(buckets))
                params = SolveParams(time_limit=per, seed=cfg.seed, threads=cfg.threads,
                                     node_limit=cfg.milp_nodes if cfg.deterministic else None)
                n_groups = sum(min(cm.world // d, ids_sorted.size) for d in cm.degrees)
                per_group = cfg.formulation == "groups" or (cfg.formulation == "auto" and n_groups <= cfg.max_group_vars)
                if per_group:
                    res = solve_microbatch(buckets, cm, params, hint=hint, backend=cfg.backend)
                    sol = realise(res.groups, buckets, ids_sorted, lens, cm) if res is not None and res.groups else None
                else:
                    res = solve_classes(buckets, cm, params, hint=hint, c_max=1.5 * inc.time_ms, backend=cfg.backend)
                    sol = realise_classes(res, buckets, ids_sorted, lens, cm) if res is not None else None
                if res is None:
                    raise InputError("PlannerConfig.backend", f"OR-Tools backend {cfg.backend!r} is not available")
                won = False
                if sol is not None:
                    sol = _improve(sol, lens, cm, cfg)
                    if sol.fits and sol.time_ms < inc.time_ms - 1e-9:
                        info["best"][r] = sol
                        won = True
                o = res.outcome
                bound = analytic_bound(buckets, cm, single="mean" if per_group else "max")
                if o.bound is not None and o.bound == o.bound and o.bound > bound:
                    bound = o.bound
                gap = relative_gap(o.objective, bound) if o.status in ("optimal", "feasible") else None
                cold = per_group and any(sum(c * buckets[q].max for q, c in enumerate(counts))
                                         > cm.token_capacity(d) for d, counts in hint)
                milp_stats.append(MilpStat(o.status, gap, o.objective, bound, o.solve_seconds, won, cold))
                if cfg.deterministic and o.status != "optimal" and o.solve_seconds >= 0.95 * per:
                    clock_bound = True  # stopped by the time cap, not by its nodes
            info["heur"] = sum(c.time_ms for c in info["best"])

    # ---- idle time beside a micro-batch's critical group takes sequences of the other micro-batches ------
    if cfg.structure_search:
        deadline = t_step_search + cfg.time_limit
        # the moves get --time-limit of their own: the searches above have usually spent `deadline` (a batch of ~200
        # micro-batches spent many times the limit in the moves; a bound at `deadline` skipped the fill)
        moves_until = time.perf_counter() + cfg.time_limit
        for key in sorted(per_m, key=lambda m: (per_m[m]["heur"], m)):
            info = per_m[key]
            if len(info["best"]) > 1:
                # from the searched micro-batches and from the heuristic ones the search started from: the fill
                # moves sequences between micro-batches, so the better start for it is not always the searched one
                # (24 sequences on 8 GPUs: 117.6 ms from the searched plan, 112.8 ms from the heuristic one)
                # (the heuristic start only where the search changed a micro-batch: else it is the same input again)
                searched = any(a is not b for a, b in zip(info["best"], info["start"]))
                for start in ((info["best"], info["start"]) if searched else (info["best"],)):
                    filled = (fill_across(start, lens, cm, max_evals=cfg.max_evals) if cfg.deterministic
                              else fill_across(start, lens, cm, deadline=deadline, move_deadline=moves_until))
                    if sum(c.time_ms for c in filled) < sum(c.time_ms for c in info["best"]) - 1e-9:
                        info["best"] = filled
                info["heur"] = sum(c.time_ms for c in info["best"])
        # ---- single moves and swaps between two micro-batches, each pair re-packed (exchange_across) -----------
        # the best splits (the MILPs' count) only; in clock mode EXCHANGE_SHARE of --time-limit of their own
        ex_until = time.perf_counter() + EXCHANGE_SHARE * cfg.time_limit
        for key in sorted(per_m, key=lambda m: (per_m[m]["heur"], m))[:max(1, cfg.milp_candidates)]:
            info = per_m[key]
            if cfg.exchange and len(info["best"]) > 1:
                info["best"] = (exchange_across(info["best"], lens, cm, max_evals=cfg.max_evals) if cfg.deterministic
                                else exchange_across(info["best"], lens, cm, deadline=ex_until))
                info["heur"] = sum(c.time_ms for c in info["best"])

    # ---- choose ----------------------------------------------------------------------------------
    best_m = min(per_m, key=lambda m: per_m[m]["heur"])
    mbs = list(per_m[best_m]["best"])
    # the best single degree of each chosen micro-batch too: the fill moves sequences between micro-batches, and
    # a split it made could run one degree per micro-batch (16 GPUs, 128 Wikipedia sequences: 1.088x "vs 1-degree"
    # measured against the sorted splits' single degrees, 1.0016x against the plan's own micro-batches' own); where
    # one degree runs a chosen micro-batch faster, it is the plan's
    own_homog = 0.0
    for k, mb in enumerate(mbs):
        h, _ = best_homogeneous(np.array(sorted(mb.seq_ids()), dtype=np.int64), lens, cm)
        if h is not None and h.fits and h.time_ms < mb.time_ms - 1e-9:
            mbs[k] = h
        own_homog += h.time_ms if h is not None and h.fits else math.inf
    baselines = {
        "static": sum(s.time_ms for s in static),
        "best_homogeneous": min(min(v["homog"] for v in per_m.values()), own_homog),
        "greedy": min(v["greedy"] for v in per_m.values()),
    }
    total = sum(mb.time_ms for mb in mbs)
    return StepResult(step=step, lens=lens, micro_batches=mbs, time_ms=total, baselines_ms=baselines,
                      chosen_m=len(mbs), split=best_m, solve_seconds=time.perf_counter() - t0, milp=milp_stats,
                      static=static,
                      lower_bound_ms=step_lower_bound(lens, cm), clock_bound=clock_bound, milp_planned=n_runs)


def placed_groups(mb: MBSolution, world: int) -> list[tuple[int, list[int], list[int]]]:
    """(degree, ranks, seq ids) per group, buddy-placed (larger first)."""
    ranks = buddy_ranks([d for d, _ in mb.groups], world)
    return [(d, r, ids) for (d, ids), r in zip(mb.groups, ranks)]
