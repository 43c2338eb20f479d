"""FSMoE scheduling: choose the pipeline degree r per direction by exact evaluation, and the gradient
all-reduce slices by a greedy fill proved optimal by a matching upper bound (the slice MILP is the fallback).

Sections follow the OR-Tools sample order (data, model, variables, constraints, objective, solve, extract).

Pipeline of one MoE layer, split into r chunks (one rank's view; three resources run concurrently:
the inter-node link, the intra-node link and the compute stream, each in issue order like a CUDA stream):
    chunk j:  A2A-dispatch(j) -> AllGather(j) -> ExpertGEMM(j) -> ReduceScatter(j) -> A2A-combine(j)
Two issue orders are evaluated for the links ("dispatch-first": all dispatches, then all combines, as in the
paper's T_A; "interleaved": dispatch(j+1) is issued before combine(j)) and the better is kept; the EP runtime
issues its collectives in the same two orders (``runtime.moe.ep``; interleaved on flat exchanges only, so the
planner offers it only there).
r is chosen over powers of two by evaluating the discrete-event simulation exactly (no continuous
relaxation + rounding), separately for forward and backward (backward doubles the expert GEMM).

Backward weight gradients (``wgrad``): the backward expert compute is two GEMMs of the forward's size, the data
gradient (dX, which the combine all-to-all sends back) and the weight gradient (dW, which nothing in the layer
waits for). ``"fused"`` runs them as one task per chunk, as autograd does (the combine waits for dW too: what
DeepSpeed-MoE and Tutel do); ``"per-chunk"`` issues chunk j's dW right after its dX, off the combine's path;
``"deferred"`` issues every dW after the last dX (Megatron-core's delayed wgrad), so the combines never queue
behind a dW. The backward is evaluated in all three and the best is kept; a layer's backward ends when both the
last combine and the last dW have finished.

Two-step exchange (``StageCosts.two_step``, the runtime's hierarchical all-to-all of whole experts): stages 1 and 3
are the intra-node all-to-all steps; chunk j runs dispatch-intra(j) -> dispatch(j) (inter-node) -> ExpertGEMM(j) ->
combine(j) (inter-node) -> combine-intra(j), dispatch-first only (as the runtime).

Shared experts (a dense MLP every token passes through, fine-grained MoE): one compute task, not chunked,
issued first - it needs no exchange, so it runs while the first dispatches are in flight (the EP runtime does
the same, ``runtime.moe.ep``); the baselines compute it before the dispatch (autograd's sequential order).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

from ..simulator import Simulation, Task, simulate
from ..solver import SolveOutcome, SolveParams, heuristic_outcome, solve_pulp
from .costmodel import StageCosts

__all__ = [
    "PipelineEval",
    "evaluate_pipeline",
    "choose_r",
    "best_per_r",
    "paper_cases",
    "GradSliceResult",
    "greedy_slices",
    "slice_upper_bound",
    "solve_slices",
    "R_CANDIDATES",
    "R_MAX",
    "WGRAD_MODES",
    "orders",
    "exposed_comm_ms",
]

R_CANDIDATES = (1, 2, 4, 8, 16)
#: past the candidates :func:`choose_r` doubles r while the time improves, up to this many chunks (the Mixtral preset
#: at 4,096 tokens on 64 GPUs chose 16, the largest candidate; 32 is 1 % faster in the model, 64 slower again); a
#: bound on the planning time too: with alpha near 0 every doubling is faster (0.3 s per layer up to 256)
R_MAX = 64
Order = Literal["dispatch-first", "interleaved"]
Wgrad = Literal["fused", "per-chunk", "deferred"]
WGRAD_MODES: tuple[Wgrad, ...] = ("fused", "per-chunk", "deferred")


@dataclass(frozen=True)
class PipelineEval:
    r: int
    order: Order
    wgrad: Wgrad
    time_ms: float
    inter_busy_ms: float
    compute_busy_ms: float
    sim: Simulation

    @property
    def inter_idle_ms(self) -> float:
        return max(0.0, self.time_ms - self.inter_busy_ms)


def _tasks(c: StageCosts, r: int, order: Order, prefix: str = "", wgrad: Wgrad = "fused",
           shared_overlap: bool = True) -> list[Task]:
    """Tasks of one direction. With ``wgrad`` other than "fused", ``c`` must be backward costs: each chunk's
    expert task becomes dX (what the combine waits for) plus a dW task that nothing in the layer depends on;
    dW = ``c.dw_chunk_ms(r)`` (half of the chunk's GEMM unless measured separately), dX = the rest.
    Shared experts (``c.shared``) are one compute task issued first; with ``shared_overlap`` it runs while the
    first dispatches are in flight (as the EP runtime does), without it every dispatch waits for it (autograd's
    sequential order: what the baselines do)."""
    d = [c.chunk_ms(0, r) if c.work[0] > 0 else 0.0, c.chunk_ms(1, r), c.chunk_ms(2, r), c.chunk_ms(3, r),
         c.chunk_ms(0, r) if c.work[0] > 0 else 0.0]
    d_w = c.dw_chunk_ms(r) if wgrad != "fused" else 0.0
    d[2] -= d_w
    names = [[f"{prefix}{s}{j}" for s in ("dispatch", "allgather", "gemm", "reducescatter", "combine")] for j in range(r)]
    shared_ms = c.shared_ms
    shared = [Task(f"{prefix}shared", 0, "compute", shared_ms, (), category="shared")] if shared_ms > 0 else []
    first_deps = () if shared_overlap or not shared else (shared[0].name,)
    per_chunk = []
    for j in range(r):
        nd, na, ng, nr, nc = names[j]
        if c.two_step:
            # the runtime's two-step exchange (whole experts): dispatch intra- then inter-node, combine inter- then
            # intra-node; the tuple keeps the stage positions (issue order below works per position)
            di, ci = f"{prefix}dispatch_intra{j}", f"{prefix}combine_intra{j}"
            per_chunk.append((
                Task(di, 0, "intra", d[1], first_deps, category="a2a-intra"),
                Task(nd, 0, "inter", d[0], (di,), category="a2a"),
                Task(ng, 0, "compute", d[2], (nd,), category="gemm"),
                Task(nc, 0, "inter", d[4], (ng,), category="a2a"),
                Task(ci, 0, "intra", d[3], (nc,), category="a2a-intra"),
            ))
            continue
        per_chunk.append((
            Task(nd, 0, "inter", d[0], first_deps, category="a2a"),
            Task(na, 0, "intra", d[1], (nd,), category="allgather"),
            Task(ng, 0, "compute", d[2], (na,), category="gemm"),
            Task(nr, 0, "intra", d[3], (ng,), category="reducescatter"),
            Task(nc, 0, "inter", d[4], (nr,), category="a2a"),
        ))
    # Issue order per stream (tasks are queued in list order for each (rank, stream)).
    if order == "dispatch-first":
        seq = [t[0] for t in per_chunk] + [t[1] for t in per_chunk] + [t[2] for t in per_chunk] + \
              [t[3] for t in per_chunk] + [t[4] for t in per_chunk]
    else:
        seq = []
        for j in range(r):
            seq += [per_chunk[j][0], per_chunk[j][1]]
            if j >= 1:
                seq += [per_chunk[j - 1][3], per_chunk[j - 1][4]]
            seq.append(per_chunk[j][2])
        seq += [per_chunk[r - 1][3], per_chunk[r - 1][4]]
    seq = shared + seq
    if wgrad == "fused":
        return seq
    dw = {t.name: Task(f"{prefix}wgrad{t.name[len(prefix) + 4:]}", 0, "compute", d_w, (t.name,), category="wgrad")
          for t in seq if t.category == "gemm"}
    if wgrad == "deferred":
        return seq + list(dw.values())
    out = []
    for t in seq:
        out.append(t)
        if t.name in dw:
            out.append(dw[t.name])
    return out


def evaluate_pipeline(c: StageCosts, r: int, order: Order = "dispatch-first", wgrad: Wgrad = "fused",
                      shared_overlap: bool = True) -> PipelineEval:
    """Exact (simulated) time of one MoE layer direction with r chunks (``wgrad``: backward only, see module;
    ``shared_overlap``: see ``_tasks``)."""
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    if c.two_step and order != "dispatch-first":  # the runtime issues two-step exchanges dispatch-first only
        raise ValueError(f"order {order!r}: a two-step exchange is costed dispatch-first only "
                         "(as the runtime issues it)")
    if wgrad not in WGRAD_MODES:
        raise ValueError(f"wgrad must be one of {WGRAD_MODES}, got {wgrad!r}")
    sim = simulate(_tasks(c, r, order, wgrad=wgrad, shared_overlap=shared_overlap))
    return PipelineEval(r, order, wgrad, sim.makespan_ms, sim.busy_ms(stream="inter"), sim.busy_ms(stream="compute"), sim)


def orders(r: int, two_step: bool = False) -> tuple[Order, ...]:
    """Issue orders worth trying for r chunks (one chunk, or a two-step exchange: dispatch-first only)."""
    return ("dispatch-first",) if r == 1 or two_step else ("dispatch-first", "interleaved")


def choose_r(c: StageCosts, candidates=R_CANDIDATES, wgrad_modes: tuple[Wgrad, ...] = ("fused",),
             issue_orders: tuple[Order, ...] = ("dispatch-first", "interleaved"), extend: bool = True,
             evaluated: list[PipelineEval] | None = None) -> tuple[PipelineEval, dict[int, float]]:
    """Best (r, order, wgrad) over the candidates by exact evaluation; also returns the best time of every r
    timed. Pass ``wgrad_modes=WGRAD_MODES`` for a backward pass (``c`` = backward costs); ``issue_orders`` limits
    the link orders (the runtime issues "interleaved" on flat exchanges only; two-step costs get "dispatch-first"
    whatever is passed). Ties keep the earlier candidate
    (smaller r, "fused" before the split modes, "dispatch-first" before "interleaved"). ``extend``: when the
    largest candidate is the best, r doubles while that is strictly faster (up to :data:`R_MAX`), so the
    candidates' range does not cut the optimum off; the first doubling that is not faster is timed too.
    ``evaluated``: a list that receives every schedule timed, in evaluation order (the planner's joint choice of
    the backward degrees with the gradient slices picks among them, :func:`best_per_r`)."""
    best: PipelineEval | None = None
    per_r: dict[int, float] = {}
    for r in candidates:
        best = _best_at_r(c, r, wgrad_modes, issue_orders, best, per_r, evaluated)
    assert best is not None
    r = max(candidates)
    while extend and best.r == r and 2 * r <= R_MAX:
        r *= 2
        best = _best_at_r(c, r, wgrad_modes, issue_orders, best, per_r, evaluated)
    return best, per_r


def best_per_r(evaluated: list[PipelineEval]) -> dict[int, PipelineEval]:
    """The fastest schedule of each r among ``evaluated`` (as :func:`choose_r` timed them; ties keep the earlier,
    as choose_r does): the schedule whose time ``per_r`` records for that r."""
    out: dict[int, PipelineEval] = {}
    for ev in evaluated:
        if ev.r not in out or ev.time_ms < out[ev.r].time_ms - 1e-12:
            out[ev.r] = ev
    return out


def _best_at_r(c: StageCosts, r: int, wgrad_modes, issue_orders, best: PipelineEval | None,
               per_r: dict[int, float], evaluated: list[PipelineEval] | None = None) -> PipelineEval | None:
    """Evaluate every (wgrad, order) at r; record r's best time in ``per_r`` (and every schedule in
    ``evaluated``); return the better of it and ``best`` (ties keep ``best``)."""
    for wgrad in wgrad_modes:
        # r = 1 has one chunk: "per-chunk" and "deferred" issue the same stream order
        if r == 1 and wgrad == "per-chunk" and "deferred" in wgrad_modes:
            continue
        for order in (o for o in orders(r, c.two_step) if o in issue_orders):
            ev = evaluate_pipeline(c, r, order, wgrad)
            if evaluated is not None:
                evaluated.append(ev)
            per_r[r] = min(per_r.get(r, float("inf")), ev.time_ms)
            if best is None or ev.time_ms < best.time_ms - 1e-12:
                best = ev
    return best


def paper_cases(c: StageCosts, r: int, allreduce_ms: float = 0.0) -> dict[str, float | bool]:
    """The paper's closed forms for reference (fsmoe.md): T_A (all-to-all bound, with its validity condition),
    T_B (compute bound), T_C (all-reduce bound). Not used by the planner, which evaluates every (r, order,
    weight-gradient placement) exactly (``best_schedule``); the tests check the exact evaluation against these
    where the paper's cases hold."""
    a0, a1, a2, a3 = c.alpha[0], c.alpha[1], c.alpha[2], c.alpha[3]
    w0, w1, w2, w3 = c.work[0], c.work[1], c.work[2], c.work[3]
    t_ag = (a1 + w1 / r) if w1 else 0.0
    t_rs = (a3 + w3 / r) if w3 else 0.0
    t_a = 2 * (r * a0 + w0) + t_ag + t_rs
    valid_a = 2 * (r - 1) * (a0 + w0 / r) >= r * a2 + w2
    t_b = 2 * (a0 + w0 / r) + t_ag + t_rs + r * a2 + w2
    t_c = 2 * (r * a0 + w0) + allreduce_ms
    return {"T_A": t_a, "T_A_valid": valid_a, "T_B": t_b, "T_C": t_c}


# ---- gradient all-reduces during the backward ----------------------------------------------------
def exposed_comm_ms(periods: list[tuple[float, float]], at_end_ms: float = 0.0) -> float:
    """All-reduce time left after the backward when the gradient all-reduces share the link with the MoE
    exchanges and only fill its idle time (the dense-slice MILP's assumption, extended to every all-reduce).

    ``periods``: in time order, (ms of all-reduce work launched at the period's start, ms of idle link time in the
    period). The link is a work-conserving queue over the idle time: ``backlog = max(0, backlog + launched - idle)``
    per period; the backlog at the end plus ``at_end_ms`` (what is launched only after the backward) is exposed.
    Independent of the order among queued all-reduces. Not the Task simulator: its streams are FIFO and
    non-preemptive, so a queued all-reduce would hold back the next layer's all-to-all, while the runtime issues
    the gradient all-reduces on their own process groups (streams) next to the exchanges."""
    backlog = 0.0
    for launched, idle in periods:
        if launched < 0 or idle < 0:
            raise ValueError(f"periods: launched and idle ms must be >= 0, got ({launched}, {idle})")
        backlog = max(0.0, backlog + launched - idle)
    return backlog + at_end_ms


# ---- gradient all-reduce slices ------------------------------------------------------------------
@dataclass
class GradSliceResult:
    slices: list[float]
    """Bytes (as element counts) of dense gradients reduced in each layer's gap, backward order."""
    exposed_ms: float
    """All-reduce time left after the backward pass (not hidden)."""
    outcome: SolveOutcome


def _exposed(slices, produced, alpha, beta) -> float:
    left = sum(produced) - sum(slices)
    return alpha + beta * left if left > 1e-9 else 0.0


def _slice_cap(gap: float, alpha: float, beta: float) -> float:
    """Elements one slice can all-reduce in a gap of ``gap`` ms (alpha + beta x <= gap); a free link (beta 0)
    takes any amount."""
    if gap <= alpha:
        return 0.0
    return (gap - alpha) / beta if beta > 0 else math.inf


def _clip_slices(xs, gaps_ms, produced, alpha, beta) -> list[float]:
    """``xs`` made feasible: each slice within its gap (alpha + beta x <= G, else 0) and the prefix rule."""
    out, taken = [], 0.0
    for i, (x, g) in enumerate(zip(xs, gaps_ms)):
        cap = _slice_cap(g, alpha, beta)
        x = max(0.0, min(x, cap, sum(produced[:i]) - taken))
        out.append(x)
        taken += x
    return out


def greedy_slices(gaps_ms: list[float], produced: list[float], alpha: float, beta: float) -> list[float]:
    """Fill each gap (backward order) with as much already-produced gradient as fits.

    Gradients of the layer at backward position i exist only after it finished, so the gap of position i can
    reduce at most sum(produced[:i]) minus what earlier gaps took (prefix rule)."""
    out = []
    taken = 0.0
    prefix = 0.0  # sum(produced[:i]), summed in the same order (the same floats), O(n) in all
    for i, g in enumerate(gaps_ms):
        avail = prefix - taken
        cap = _slice_cap(g, alpha, beta)
        x = max(0.0, min(avail, cap))
        out.append(x)
        taken += x
        prefix += produced[i]
    return out


def slice_upper_bound(gaps_ms: list[float], produced: list[float], alpha: float, beta: float) -> float:
    """An upper bound on the elements any feasible set of slices hides: min(sum_j c_j, min_k P_k + sum_{j>k} c_j),
    with c_j the gap capacity and P_k = sum(produced[:k]) the prefix rule's right-hand side at position k (what
    positions <= k take is at most P_k, what positions > k take at most their capacities).

    The greedy fill attains it: let k be the last position whose prefix row the fill makes tight (every later
    position is then filled to capacity, else its row would be tight too), so the fill hides P_k + sum_{j>k} c_j;
    with no tight row every position is at capacity and the fill hides sum_j c_j. The bound is therefore the
    optimum, and :func:`solve_slices` uses it as the certificate."""
    caps = [_slice_cap(g, alpha, beta) for g in gaps_ms]
    best = sum(caps)
    prefixes, p = [], 0.0  # sum(produced[:k]) for every k, summed in the same order (O(n))
    for d in produced:
        prefixes.append(p)
        p += d
    tail = 0.0  # sum of caps after position k
    for k in range(len(caps) - 1, -1, -1):
        best = min(best, prefixes[k] + tail)
        tail += caps[k]
    return best


def solve_slices(gaps_ms: list[float], produced: list[float], alpha: float, beta: float,
                 params: SolveParams, *, method: Literal["auto", "milp"] = "auto") -> GradSliceResult:
    """Maximise the gradient volume hidden in the gaps.

    ``method="auto"`` (the planner's): the greedy fill, returned as optimal when it reaches
    :func:`slice_upper_bound` within 1e-9 of the total (it always does - see there; O(n) instead of a MILP with
    O(n^2) prefix terms, slow at 1,024 layers); otherwise, and with ``method="milp"`` (the tests' cross-check),
    the MILP below, the greedy fill as its warm start.

    data:        gaps G_i (ms idle inter-node link during backward position i), produced D_i (elements, available
                 after position i), all-reduce cost alpha + beta * x per slice.
    variables:   x_i >= 0 (elements reduced in gap i), y_i in {0,1} (a slice is launched in gap i).
    constraints: alpha y_i + beta x_i <= G_i;  x_i <= D_total y_i;  sum_{j<=i} x_j <= sum_{j<i} D_j (prefix rule).
    objective:   maximise sum x_i (= minimise the exposed remainder alpha + beta (D_total - sum x))."""
    import pulp

    n = len(gaps_ms)
    if len(produced) != n:
        raise ValueError("gaps_ms and produced must have one entry per layer")
    t0 = time.perf_counter()
    total = float(sum(produced))
    if n == 0 or total <= 0:  # nothing to all-reduce (no replicated parameters, or one GPU): nothing exposed
        return GradSliceResult([0.0] * n, 0.0, SolveOutcome("exact", "optimal", 0.0, 0.0, time.perf_counter() - t0,
                                                            params, note="no gradients to all-reduce"))
    if method not in ("auto", "milp"):
        raise ValueError(f"method must be 'auto' or 'milp', not {method!r}")
    greedy = greedy_slices(gaps_ms, produced, alpha, beta)
    if method == "auto":
        bound = slice_upper_bound(gaps_ms, produced, alpha, beta)
        if sum(greedy) >= bound - 1e-9 * total:
            return GradSliceResult(
                greedy, _exposed(greedy, produced, alpha, beta),
                SolveOutcome("exact", "optimal", sum(greedy), bound, time.perf_counter() - t0, params,
                             {f"x_{i}": v for i, v in enumerate(greedy)},
                             note="greedy fill, equal to the prefix-rule upper bound"))
    heur = heuristic_outcome(sum(greedy), time.perf_counter() - t0, params, note="greedy fill")
    heur.values = {f"x_{i}": v for i, v in enumerate(greedy)}
    scale = 1.0 / total  # solve in units of the total (x_i <= 1) to keep CBC well conditioned
    prob = pulp.LpProblem("grad_slices", pulp.LpMaximize)
    x = [pulp.LpVariable(f"x_{i}", lowBound=0, upBound=1.0) for i in range(n)]
    y = [pulp.LpVariable(f"y_{i}", cat="Binary") for i in range(n)]
    prob += pulp.lpSum(x)
    for i in range(n):
        prob += alpha * y[i] + beta * total * x[i] <= gaps_ms[i], f"gap_{i}"
        prob += x[i] <= y[i], f"launch_{i}"
        # no slack on the right-hand side: CBC 2.10 mishandled a 1e-12 there (returned x_i > 0 with y_i = 0)
        prob += pulp.lpSum(x[: i + 1]) <= sum(produced[:i]) * scale, f"prefix_{i}"
    warm = {f"x_{i}": v * scale for i, v in enumerate(greedy)}
    warm.update({f"y_{i}": 1.0 if v > 0 else 0.0 for i, v in enumerate(greedy)})
    try:
        solved = solve_pulp(prob, params, warm_start=warm)
    except pulp.PulpSolverError as err:  # CBC killed by a very short limit before writing a solution file
        solved = SolveOutcome("pulp-cbc", "timeout", None, None, params.time_limit, params, note=str(err)[:200])
    best = heur
    slices = list(greedy)
    if solved.has_solution:
        # CBC's answer is checked, not trusted: its values are clipped to every gap's capacity and to the prefix
        # rule (a presolve slip once returned a slice in a gap whose launch flag was 0, against the prefix rule)
        raw = [solved.values.get(f"x_{i}", 0.0) * total for i in range(n)]
        mine = _clip_slices(raw, gaps_ms, produced, alpha, beta)
        # CBC's feasibility tolerance (~1e-7 of the scaled problem) can leave its clipped answer a few elements
        # below the greedy fill's (2 of 6e8 once, which read "heuristic" for a proved optimum): within 1e-6 of the
        # total the solve's status stands, with the larger of the two fills
        tol = 1e-6 * max(total, 1.0)
        if sum(mine) >= sum(greedy) - tol:
            slices = mine if sum(mine) >= sum(greedy) else list(greedy)
            best = SolveOutcome(solved.backend, solved.status, sum(slices),
                                None if solved.bound is None else solved.bound * total,
                                solved.solve_seconds + heur.solve_seconds, params,
                                {f"x_{i}": v for i, v in enumerate(slices)}, solved.note)
        else:
            best = SolveOutcome(f"heuristic+{solved.backend}", "heuristic", sum(greedy), None,
                                solved.solve_seconds + heur.solve_seconds, params, heur.values,
                                note=f"CBC's {solved.status} solution hid {sum(mine):.6g} of the gradients once "
                                     f"checked against its constraints, the greedy fill {sum(greedy):.6g}")
    return GradSliceResult(slices, _exposed(slices, produced, alpha, beta), best)
