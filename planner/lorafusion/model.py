"""LoRAFusion multi-job scheduling: adapter grouping, per-(global batch, group) bin packing (first-fit-decreasing
warm start, MILP 1 = fewest bins, MILP 2 = same bins with the smallest last bin), a merge pass, the pipeline
dependency rule with no-op microbatches, a verifier and a 1F1B pipeline simulation.

Vocabulary: a *sample* has a length in tokens and belongs to one job (adapter) and one of its global batches;
a *microbatch* (bin) holds segments, one per adapter, each padded to a multiple of 128 tokens; its padded
size must not exceed the capacity. The MILPs follow the OR-Tools section order: data, model, variables,
constraints, objective, solve, extract, statistics.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from adasched.planner.solver import SolveOutcome, SolveParams, solve_pulp

from .costmodel import FWD_FRACTION, StageCost, padded
from .jobs import SEGMENT_ALIGN

__all__ = [
    "Bin",
    "Microbatch",
    "PackResult",
    "AdapterStats",
    "group_adapters",
    "bubble_check",
    "padded_size",
    "ffd_pack",
    "bin_lower_bound",
    "pack_problem",
    "DEFAULT_TIME_LIMIT_S",
    "merge_pass",
    "apply_dependency_rule",
    "check_noops",
    "MAX_NOOP_STAGE_SLOTS",
    "dependency_violations",
    "verify_schedule",
    "simulate_1f1b",
    "makespan_1f1b",
]


# ---- data types -----------------------------------------------------------------------------------
Bin = dict  # adapter index -> list of sample ids (one global batch per adapter within a bin)


@dataclass
class Microbatch:
    """One slot of the pipeline schedule: segments (adapter, global batch, sample ids); empty = no-op."""

    segments: list[tuple[int, int, list[int]]] = field(default_factory=list)

    @property
    def noop(self) -> bool:
        return not self.segments

    def adapters(self) -> set[int]:
        return {a for a, _, _ in self.segments}

    def padded_tokens(self, lengths: Sequence[int]) -> int:
        return sum(padded(sum(lengths[s] for s in ids)) for _, _, ids in self.segments)

    def tokens(self, lengths: Sequence[int]) -> int:
        return sum(lengths[s] for _, _, ids in self.segments for s in ids)


@dataclass
class PackResult:
    """Packing of one (global batch, group) problem."""

    bins: list[Bin]
    lower_bound: int
    ffd_bins: int
    status: str
    """'optimal' (bin count proved minimal: FFD met the lower bound or MILP 1 proved it), 'feasible' (MILP 1
    stopped by its time limit with a solution), 'heuristic' (FFD kept, optimality not proved)."""
    solve_seconds: float
    milp1: str | None = None
    milp2: str | None = None
    smallest_before: int = 0
    smallest_after: int = 0


@dataclass(frozen=True)
class AdapterStats:
    mu: float
    """mean sample length (tokens)"""
    sigma: float
    """standard deviation of sample length (tokens)"""
    global_batch_size: int

    def microbatches(self, capacity: int) -> int:
        """Expected microbatches per global batch: ceil(gbs * mu / capacity)."""
        return max(1, math.ceil(self.global_batch_size * self.mu / capacity))

    def microbatches_low(self, capacity: int) -> int:
        """Lower estimate: one standard deviation of the batch's token total below its mean, at least 1."""
        total = self.global_batch_size * self.mu - self.sigma * math.sqrt(self.global_batch_size)
        return max(1, math.floor(total / capacity))


# ---- grouping -------------------------------------------------------------------------------------
def bubble_check(groups: Sequence[Sequence[int]], stats: Sequence[AdapterStats], capacity: int, stages: int) -> bool:
    """For every group, the other groups' lower microbatch estimates must cover the S - 1 slots that separate
    the group's consecutive global batches under 1F1B (else no-op microbatches, i.e. bubbles, are needed)."""
    if len(groups) <= 1:
        return stages <= 1
    low = [sum(stats[a].microbatches_low(capacity) for a in g) for g in groups]
    total = sum(low)
    return all(total - lo >= stages - 1 for lo in low)


def group_adapters(stats: Sequence[AdapterStats], capacity: int, stages: int) -> list[list[int]]:
    """Sort adapters by mean length; pair the longest remaining with the shortest remaining while the bubble
    check still holds for the resulting grouping; the rest stay alone. Groups have 1 or 2 adapters."""
    order = sorted(range(len(stats)), key=lambda a: (stats[a].mu, a))
    pairs: list[list[int]] = []
    lo, hi = 0, len(order) - 1
    while lo < hi:
        cand = pairs + [[order[hi], order[lo]]] + [[a] for a in order[lo + 1: hi]]
        if not bubble_check(cand, stats, capacity, stages):
            break
        pairs.append([order[hi], order[lo]])
        lo, hi = lo + 1, hi - 1
    return pairs + [[a] for a in order[lo: hi + 1]]


# ---- packing --------------------------------------------------------------------------------------
def padded_size(b: Bin, lengths: Sequence[int]) -> int:
    return sum(padded(sum(lengths[s] for s in ids)) for ids in b.values())


def bin_lower_bound(samples: Sequence[int], adapter_of: Sequence[int], lengths: Sequence[int], capacity: int) -> int:
    """ceil(sum over adapters of ceil128(adapter tokens) / capacity): every adapter's tokens need at least that
    many 128-token blocks however they are split."""
    per: dict[int, int] = {}
    for s in samples:
        per[adapter_of[s]] = per.get(adapter_of[s], 0) + lengths[s]
    return max(1, math.ceil(sum(padded(t) for t in per.values()) / capacity)) if samples else 0


def ffd_pack(samples: Sequence[int], adapter_of: Sequence[int], lengths: Sequence[int], capacity: int) -> list[Bin]:
    """First-fit decreasing under the padded capacity (each adapter's segment rounded up to 128): every sample,
    longest first, into the first bin whose padded size stays within ``capacity``. The bins are tested all at once
    (numpy; the loop over the open bins per sample, their sizes re-summed, grew quadratically)."""
    import numpy as np

    order = sorted(samples, key=lambda s: (-lengths[s], s))
    col = {a: i for i, a in enumerate(sorted({adapter_of[s] for s in order}))}
    n = max(1, len(order))
    tok = np.zeros((len(col), n), dtype=np.int64)   # tok[adapter, bin]: the adapter's tokens in the bin
    free = np.zeros(n, dtype=np.int64)               # capacity - padded size, of the open bins
    bins: list[Bin] = []
    A = SEGMENT_ALIGN
    for s in order:
        a, ln = adapter_of[s], lengths[s]
        nb = len(bins)
        t = tok[col[a], :nb]
        grow = -((-(t + ln)) // A) * A - (-((-t) // A) * A)   # padded(old + ln) - padded(old), per bin
        fits = grow <= free[:nb]
        if nb and fits.any():
            b = int(fits.argmax())
            bins[b].setdefault(a, []).append(s)
            free[b] -= grow[b]
        else:
            if padded(ln) > capacity:
                raise ValueError(f"sample {s} ({ln} tokens) does not fit the capacity {capacity}")
            b = nb
            bins.append({a: [s]})
            free[b] = capacity - padded(ln)
        tok[col[a], b] += ln
    return bins


def _milp(samples: Sequence[int], adapter_of: Sequence[int], lengths: Sequence[int], capacity: int,
          nbins: int, *, fix_bins: bool, lower_bound: int, warm: list[Bin], params: SolveParams) -> tuple[SolveOutcome, list[Bin] | None]:
    """MILP 1 (fix_bins=False): fewest bins out of ``nbins``. MILP 2 (fix_bins=True): exactly ``nbins`` bins,
    minimise the padded size of the last bin (the merge pass folds it into a neighbour)."""
    import pulp

    # data
    adapters = sorted({adapter_of[s] for s in samples})
    blocks_per_bin = capacity // SEGMENT_ALIGN
    B = range(nbins)
    # model
    prob = pulp.LpProblem("lora_pack_min_smallest" if fix_bins else "lora_pack_min_bins", pulp.LpMinimize)
    # variables
    x = {(s, b): pulp.LpVariable(f"x_{s}_{b}", cat="Binary") for s in samples for b in B}
    k = {(a, b): pulp.LpVariable(f"k_{a}_{b}", lowBound=0, upBound=blocks_per_bin, cat="Integer")
         for a in adapters for b in B}
    u = {b: pulp.LpVariable(f"u_{b}", cat="Binary") for b in B} if not fix_bins else None
    # constraints
    for s in samples:
        prob += pulp.lpSum(x[s, b] for b in B) == 1, f"assign_{s}"
    for a in adapters:
        mine = [s for s in samples if adapter_of[s] == a]
        for b in B:
            prob += pulp.lpSum(lengths[s] * x[s, b] for s in mine) <= SEGMENT_ALIGN * k[a, b], f"segment_{a}_{b}"
    for b in B:
        cap = capacity * u[b] if u is not None else capacity
        prob += pulp.lpSum(SEGMENT_ALIGN * k[a, b] for a in adapters) <= cap, f"capacity_{b}"
        if u is not None:
            for s in samples:
                prob += x[s, b] <= u[b], f"open_{s}_{b}"
            if b + 1 < nbins:
                prob += u[b + 1] <= u[b], f"order_{b}"
        else:
            prob += pulp.lpSum(x[s, b] for s in samples) >= 1, f"nonempty_{b}"
    # objective
    if u is not None:
        prob += pulp.lpSum(u.values()) >= lower_bound, "lower_bound"
        prob += pulp.lpSum(u.values())
    else:
        # valid bound: the other bins hold at most (nbins - 1) * capacity of the padded total
        least = sum(padded(sum(lengths[s] for s in samples if adapter_of[s] == a)) for a in adapters)
        floor_blocks = max(1, -(-(least - (nbins - 1) * capacity) // SEGMENT_ALIGN))
        prob += pulp.lpSum(k[a, nbins - 1] for a in adapters) >= floor_blocks, "last_bin_floor"
        prob += pulp.lpSum(k[a, nbins - 1] for a in adapters)
    # solve (warm start: the given bins, in order)
    hint: dict[str, float] = {}
    for b, bn in enumerate(warm):
        for a, ids in bn.items():
            for s in ids:
                hint[f"x_{s}_{b}"] = 1.0
            hint[f"k_{a}_{b}"] = float(padded(sum(lengths[s] for s in ids)) // SEGMENT_ALIGN)
        if u is not None:
            hint[f"u_{b}"] = 1.0
    for s in samples:
        for b in B:
            hint.setdefault(f"x_{s}_{b}", 0.0)
    for a in adapters:
        for b in B:
            hint.setdefault(f"k_{a}_{b}", 0.0)
    if u is not None:
        for b in B:
            hint.setdefault(f"u_{b}", 0.0)
    try:
        out = solve_pulp(prob, params, warm_start=hint)
    except pulp.PulpSolverError as err:  # CBC killed by a very short limit before writing a solution file
        return SolveOutcome("pulp-cbc", "timeout", None, None, params.time_limit, params, note=str(err)[:200]), None
    # extract
    if not out.has_solution:
        return out, None
    bins: list[Bin] = [dict() for _ in B]
    for s in samples:
        b = max(B, key=lambda b: out.values.get(f"x_{s}_{b}", 0.0))
        bins[b].setdefault(adapter_of[s], []).append(s)
    bins = [b for b in bins if b]
    return out, bins


DEFAULT_TIME_LIMIT_S = 0.4
"""Solver budget of one (global batch, group) packing problem when none is given (seconds; `plan lora`'s
--time-limit)."""

#: the shortest time limit (s) a MILP is started with (CBC's start-up alone takes about that)
MIN_MILP_LIMIT_S = 0.05
MILP_BINARIES_PER_SECOND = 8_000
"""Largest MILP (samples x bins binaries) started per second of its budget. Measured with CBC 2.10 on this 2-core
CPU: 3840 binaries took 0.14 s, 6080 took 1.2 s and 17408 took 1.75 s whatever the limit, 65k took 16-24 s."""


def pack_problem(samples: Sequence[int], adapter_of: Sequence[int], lengths: Sequence[int], capacity: int,
                 *, time_limit: float = DEFAULT_TIME_LIMIT_S, seed: int = 0,
                 use_milp: bool = True) -> PackResult:
    """Pack one (global batch, group): FFD warm start; MILP 1 unless FFD already meets the lower bound;
    MILP 2 to shrink the last bin. ``time_limit`` (s) is the budget of the whole problem: MILP 1 may use half
    of it, MILP 2 what is left after ~0.1 s is set aside for CBC's start-up. A MILP whose binaries (samples x
    bins) exceed ``MILP_BINARIES_PER_SECOND`` x its budget is not started (status ``"skipped"``): CBC 2.10 does
    not keep short time limits on such models (measured: 6080 binaries ran 1.2 s at a 0.05 s limit, a
    512-sample problem 16-24 s at any limit <= 1 s, and CBC segfaults when its limit ends while it reads the
    warm start). The result keeps the best feasible bins found and an honest status.
    Bins are returned largest first, the smallest last."""
    t0 = time.perf_counter()
    lb = bin_lower_bound(samples, adapter_of, lengths, capacity)
    bins = ffd_pack(samples, adapter_of, lengths, capacity)
    ffd_n = len(bins)
    status = "optimal" if ffd_n == lb else "heuristic"
    m1 = m2 = None

    def params(limit: float) -> SolveParams:
        return SolveParams(time_limit=max(MIN_MILP_LIMIT_S, limit), seed=seed, threads=1)

    def ordered(bs: list[Bin]) -> list[Bin]:
        return sorted(bs, key=lambda b: (-padded_size(b, lengths), min(min(v) for v in b.values())))

    def fits(nbins: int, limit: float) -> bool:     # CBC can keep its time limit at this model size
        return len(samples) * nbins <= MILP_BINARIES_PER_SECOND * limit

    bins = ordered(bins)
    smallest_before = padded_size(bins[-1], lengths) if bins else 0
    solve1 = use_milp and ffd_n > lb
    # a half budget under CBC's shortest limit is not started: raised to that limit, MILP 1 took the whole budget
    # and more (0.075 s at --time-limit 0.05)
    if solve1 and (time_limit / 2 < MIN_MILP_LIMIT_S or not fits(ffd_n, time_limit / 2)):
        m1 = "skipped"
    elif solve1:
        out, sol = _milp(samples, adapter_of, lengths, capacity, ffd_n, fix_bins=False, lower_bound=lb,
                         warm=bins, params=params(time_limit / 2))
        m1 = out.status
        if sol is not None and _valid(sol, samples, lengths, capacity) and len(sol) <= len(bins):
            if len(sol) < len(bins) or out.status == "optimal":
                bins = ordered(sol)
            status = "optimal" if (out.status == "optimal" or len(sol) == lb) else "feasible"
    left = time_limit - (time.perf_counter() - t0) - 0.1  # ~0.1 s of CBC start-up and file I/O per run
    shrink = use_milp and len(bins) >= 2 and padded_size(bins[-1], lengths) > SEGMENT_ALIGN and left >= MIN_MILP_LIMIT_S
    if shrink and not fits(len(bins), left):
        m2 = "skipped"
    elif shrink:
        out, sol = _milp(samples, adapter_of, lengths, capacity, len(bins), fix_bins=True, lower_bound=lb,
                         warm=bins, params=params(left))
        m2 = out.status
        if sol is not None and len(sol) == len(bins) and _valid(sol, samples, lengths, capacity):
            sol = ordered(sol)
            if padded_size(sol[-1], lengths) < padded_size(bins[-1], lengths):
                bins = sol
    return PackResult(bins=bins, lower_bound=lb, ffd_bins=ffd_n, status=status,
                      solve_seconds=time.perf_counter() - t0, milp1=m1, milp2=m2,
                      smallest_before=smallest_before,
                      smallest_after=padded_size(bins[-1], lengths) if bins else 0)


def _valid(bins: list[Bin], samples: Sequence[int], lengths: Sequence[int], capacity: int) -> bool:
    seen = [s for b in bins for ids in b.values() for s in ids]
    return sorted(seen) == sorted(samples) and all(padded_size(b, lengths) <= capacity for b in bins)


# ---- sequence: merge pass and dependency rule -----------------------------------------------------
def merge_pass(problems: list[list[Microbatch]], lengths: Sequence[int], capacity: int) -> tuple[list[list[Microbatch]], int]:
    """Fold the last (smallest) microbatch of problem k+1 into the last microbatch of problem k when their
    adapters are disjoint and the padded sizes fit together. Returns the new problems and the merge count."""
    out = [list(p) for p in problems]
    merges = 0
    for k in range(len(out) - 1):
        if not out[k] or not out[k + 1]:  # (a problem packed into one microbatch folds like any last bin)
            continue
        tail, cand = out[k][-1], out[k + 1][-1]
        if tail.adapters() & cand.adapters():
            continue
        if tail.padded_tokens(lengths) + cand.padded_tokens(lengths) > capacity:
            continue
        out[k][-1] = Microbatch(tail.segments + cand.segments)
        out[k + 1].pop()
        merges += 1
    return out, merges


def _first_last(seq: Sequence[Microbatch]) -> tuple[dict[tuple[int, int], int], dict[tuple[int, int], int]]:
    first: dict[tuple[int, int], int] = {}
    last: dict[tuple[int, int], int] = {}
    for i, mb in enumerate(seq):
        for a, g, _ in mb.segments:
            first.setdefault((a, g), i)
            last[(a, g)] = i
    return first, last


def dependency_violations(seq: Sequence[Microbatch], stages: int) -> list[tuple[int, int, int, int]]:
    """(adapter, global batch g+1, first position of g+1, last position of g) wherever the first microbatch of
    an adapter's global batch g+1 is fewer than S positions after the last microbatch of g (under 1F1B the
    optimizer step of g would not have happened), or where g and g+1 interleave."""
    first, last = _first_last(seq)
    bad = []
    for (a, g), f in first.items():
        if g > 0 and (a, g - 1) in last and f - last[(a, g - 1)] < stages:
            bad.append((a, g, f, last[(a, g - 1)]))
    return sorted(bad, key=lambda t: t[2])


MAX_NOOP_STAGE_SLOTS = 2 ** 21
"""Most idle stage slots (no-op microbatches x stages) one simulated sequence may hold: S = 64 with one-sample global
batches needed 63 no-ops per global batch, and 1,000 of them (4.0M slots) took 76 s and 1.3 GB to simulate - linear in
the global batches, so the 10**6 samples MAX_SAMPLES allows would have run for a day."""


def check_noops(noops: int, stages: int, where: str) -> None:
    """InputError (naming ``where``, the jobs file) when a sequence's no-ops pass :data:`MAX_NOOP_STAGE_SLOTS`."""
    if noops * stages > MAX_NOOP_STAGE_SLOTS:
        from adasched.profiler.io import InputError

        raise InputError(where, f"stages {stages}: the dependency rule needs {noops:,} no-op microbatches "
                                f"({noops * stages:,} idle stage slots, more than the {MAX_NOOP_STAGE_SLOTS:,} the "
                                f"pipeline simulation takes); use fewer pipeline stages, fewer global batches or "
                                f"larger ones (global_batch_size), so that a job's global batch spans its stages")


def apply_dependency_rule(seq: Sequence[Microbatch], stages: int) -> tuple[list[Microbatch], int]:
    """Insert no-op microbatches before every microbatch that starts an adapter's next global batch too early.
    Returns the new sequence and the number of no-ops inserted."""
    out: list[Microbatch] = []
    last: dict[tuple[int, int], int] = {}
    noops = 0
    for mb in seq:
        need = 0
        for a, g, _ in mb.segments:
            if g > 0 and (a, g - 1) in last:
                need = max(need, last[(a, g - 1)] + stages - len(out))
        for _ in range(need):
            out.append(Microbatch())
            noops += 1
        for a, g, _ in mb.segments:
            last[(a, g)] = len(out)
        out.append(mb)
    return out, noops


@dataclass
class Verification:
    missing: list[int]
    duplicated: list[int]
    errors: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.errors)


def verify_schedule(seq: Sequence[Microbatch], batches: dict[tuple[int, int], Sequence[int]], lengths: Sequence[int],
                    capacity: int, stages: int, *, capacity_text: str | None = None) -> Verification:
    """Every sample of every (adapter, global batch) appears exactly once, in a segment of its adapter and
    global batch; every microbatch fits the capacity; one segment per adapter per microbatch; the dependency
    rule holds."""
    where: dict[int, tuple[int, int]] = {}
    for key, ids in batches.items():
        for s in ids:
            where[s] = key
    count: dict[int, int] = {}
    errors: list[str] = []
    for i, mb in enumerate(seq):
        seen_a: set[int] = set()
        for a, g, ids in mb.segments:
            if a in seen_a:
                errors.append(f"microbatch {i}: adapter {a} has two segments")
            seen_a.add(a)
            for s in ids:
                count[s] = count.get(s, 0) + 1
                if s not in where:
                    errors.append(f"microbatch {i}: sample {s} belongs to no global batch")
                elif where[s] != (a, g):
                    errors.append(f"microbatch {i}: sample {s} of {where[s]} placed in segment {(a, g)}")
        if mb.padded_tokens(lengths) > capacity:
            errors.append(f"microbatch {i}: {mb.padded_tokens(lengths)} padded tokens > "
                          f"{capacity_text or f'capacity {capacity}'}")
    for a, g, f, l in dependency_violations(seq, stages):
        errors.append(f"adapter {a} global batch {g} starts at microbatch {f}, fewer than {stages} after {l}")
    missing = sorted(s for s in where if count.get(s, 0) == 0)
    duplicated = sorted(s for s, c in count.items() if c > 1)
    return Verification(missing, duplicated, errors)


# ---- 1F1B pipeline simulation ---------------------------------------------------------------------
def simulate_1f1b(stage_ms: Sequence[float], stages: int, update_deps: Iterable[tuple[int, int]] = (),
                  stage_scale: Sequence[float] | None = None):
    """Simulate a 1F1B pipeline over ``stages`` ranks (adasched.planner.simulator).

    ``stage_ms[i]`` is microbatch i's fwd+bwd time on one stage (0 for a no-op); forward takes FWD_FRACTION
    of it; ``stage_scale[s]`` (default 1) multiplies every time on stage s (StageCost.stage_scales: layers that
    do not divide evenly over the stages). ``update_deps`` holds (i, j): microbatch i's forward on every stage waits for microbatch j's
    backward on that stage (the adapter's optimizer step). Raises ValueError (deadlock) when the order of
    1F1B makes that impossible, which the dependency rule prevents."""
    from adasched.planner.simulator import Task, simulate

    M = len(stage_ms)
    waits: dict[int, list[int]] = {}
    for i, j in update_deps:
        waits.setdefault(i, []).append(j)
    tasks = []
    for s, order in enumerate(_orders_1f1b(M, stages)):
        k = 1.0 if stage_scale is None else float(stage_scale[s])
        for fwd, i in order:
            if fwd:
                deps = [f"F{i}s{s - 1}"] if s > 0 else []
                deps += [f"B{j}s{s}" for j in waits.get(i, ())]
                tasks.append(Task(f"F{i}s{s}", s, "compute", k * stage_ms[i] * FWD_FRACTION, tuple(deps),
                                  category="fwd"))
            else:
                deps = [f"B{i}s{s + 1}"] if s + 1 < stages else [f"F{i}s{s}"]
                tasks.append(Task(f"B{i}s{s}", s, "compute", k * stage_ms[i] * (1 - FWD_FRACTION), tuple(deps),
                                  category="bwd"))
    return simulate(tasks)


def _orders_1f1b(M: int, stages: int) -> list[list[tuple[bool, int]]]:
    """Per stage its 1F1B order: (is forward, microbatch), warm-up forwards first."""
    out = []
    for s in range(stages):
        warm = min(stages - s - 1, M)
        order = [(True, i) for i in range(warm)]
        for i in range(M - warm):
            order += [(True, warm + i), (False, i)]
        order += [(False, i) for i in range(M - warm, M)]
        out.append(order)
    return out


def makespan_1f1b(stage_ms: Sequence[float], stages: int, update_deps: Iterable[tuple[int, int]] = (),
                  stage_scale: Sequence[float] | None = None) -> float:
    """The makespan of :func:`simulate_1f1b`'s pipeline (the same float arithmetic: the same value to the bit),
    without building the tasks: per stage its 1F1B order, each operation starting at the latest of its stage's
    previous end and its dependencies' ends, a stage looked at again when a neighbour finishes what it waits on.
    The planner simulates every candidate sequence and baseline this way (S = 64 with 40,960 samples: five
    generic simulations of 1.7M tasks each took 150 of the plan's 200 s). ValueError on deadlock, as there."""
    from collections import deque

    M = len(stage_ms)
    scale = [1.0 if stage_scale is None else float(stage_scale[s]) for s in range(stages)]
    for what, values in (("stage_ms", stage_ms), ("stage_scale", scale)):  # (what simulate_1f1b's tasks refuse:
        bad = next((x for x in values if not 0 <= x < float("inf")), None)  # a NaN scale vanished in max())
        if bad is not None:
            raise ValueError(f"{what}: {bad} is not a finite time factor >= 0 (durations must be finite and >= 0)")
    waits: dict[int, list[int]] = {}
    for i, j in update_deps:
        waits.setdefault(i, []).append(j)
    orders = _orders_1f1b(M, stages)
    end_f = [[None] * M for _ in range(stages)]
    end_b = [[None] * M for _ in range(stages)]
    head, free = [0] * stages, [0.0] * stages
    todo, queued = deque(range(stages)), [True] * stages
    while todo:
        s = todo.popleft()
        queued[s] = False
        order, h, t, k = orders[s], head[s], free[s], scale[s]
        ef, eb = end_f[s], end_b[s]
        prev_f = end_f[s - 1] if s > 0 else None
        next_b = end_b[s + 1] if s + 1 < stages else None
        while h < len(order):
            fwd, i = order[h]
            if fwd:
                r = t
                if prev_f is not None:
                    e = prev_f[i]
                    if e is None:
                        break
                    r = max(r, e)
                blocked = False
                for j in waits.get(i, ()):
                    e = eb[j]
                    if e is None:
                        blocked = True
                        break
                    r = max(r, e)
                if blocked:
                    break
                t = r + k * stage_ms[i] * FWD_FRACTION
                ef[i] = t
                if s + 1 < stages and not queued[s + 1]:
                    queued[s + 1] = True
                    todo.append(s + 1)
            else:
                e = next_b[i] if next_b is not None else ef[i]
                if e is None:
                    break
                t = max(t, e) + k * stage_ms[i] * (1 - FWD_FRACTION)
                eb[i] = t
                if s > 0 and not queued[s - 1]:
                    queued[s - 1] = True
                    todo.append(s - 1)
            h += 1
        head[s], free[s] = h, t
    stuck = [f"{'F' if orders[s][head[s]][0] else 'B'}{orders[s][head[s]][1]}s{s}" for s in range(stages)
             if head[s] < len(orders[s])]
    if stuck:
        raise ValueError(f"simulation deadlocked: waiting tasks {stuck[:5]}")
    ms = max(free, default=0.0) if M else 0.0
    if not ms < float("inf"):
        raise ValueError("simulation: the task durations add up past the float range (makespan inf)")
    return ms


def update_dependencies(seq: Sequence[Microbatch]) -> list[tuple[int, int]]:
    """(i, j) pairs for simulate_1f1b: the first microbatch i of (adapter, g+1) waits for the last j of g."""
    first, last = _first_last(seq)
    return sorted({(f, last[(a, g - 1)]) for (a, g), f in first.items() if g > 0 and (a, g - 1) in last})


def sequence_stage_ms(seq: Sequence[Microbatch], lengths: Sequence[int], cost: StageCost) -> list[float]:
    """Each packed microbatch's fwd+bwd time on one stage (0 for a no-op)."""
    return [cost.packed_ms(mb.padded_tokens(lengths), [lengths[s] for _, _, ids in mb.segments for s in ids])
            for mb in seq]


def sequence_ms(seq: Sequence[Microbatch], lengths: Sequence[int], cost: StageCost, stages: int, *,
                uniform: bool = False):
    """Simulated 1F1B makespan (ms) of a microbatch sequence and the simulation itself; ``uniform``: every stage
    at ``cost.layers_per_stage`` (how plans before 2026-11-29 were simulated), else the trainer's split."""
    sim = simulate_1f1b(sequence_stage_ms(seq, lengths, cost), stages, update_dependencies(seq),
                        None if uniform else cost.stage_scales(stages))
    return sim.makespan_ms, sim


def sequence_makespan_ms(seq: Sequence[Microbatch], lengths: Sequence[int], cost: StageCost, stages: int, *,
                         uniform: bool = False) -> float:
    """:func:`sequence_ms`'s makespan alone (:func:`makespan_1f1b`: no tasks built)."""
    return makespan_1f1b(sequence_stage_ms(seq, lengths, cost), stages, update_dependencies(seq),
                         None if uniform else cost.stage_scales(stages))
