"""The FlexSP MILP for one micro-batch, over integer counts per (length bucket, candidate group).

Candidate groups are ``(d, k)``: copy k of a group of degree d (powers of two; at most N/d copies and no
more than the sequences that fit in such a group). With buckets q (count c_q, mean length mu_q, mean squared
length nu_q, longest S_q) and the per-degree cost Time = alpha_d sum s^2 + beta_d sum s + gamma_d:

    minimise   C
    s.t.       sum_g x[q,g] = c_q                                                    every bucket q
               sum_q x[q,g] <= (sum_q c_q) m[g]                                      every g (used flag)
               sum_q x[q,g] S_q <= d (E - model_state) / act m[g]                    memory in tokens (longest: safe)
               alpha_d sum_q x[q,g] nu_q + beta_d sum_q x[q,g] mu_q + gamma_d m[g] <= C   makespan
               sum_g d m[g] <= N                                                     GPUs
               sum_g d Time_g <= N C                                                 work bound (valid, tightens LP)
               m[d,k] >= m[d,k+1],  tokens[d,k] >= tokens[d,k+1]                     symmetry breaking

Solved through adasched.planner.solver.solve_linear (OR-Tools SCIP by default: it reports the best bound, so
the gap is real), warm-started with a hint (the best homogeneous or greedy plan mapped to bucket counts).
The solution is turned into real groups by :func:`realise`, which hands each bucket's real sequences to the
groups the MILP gave them to, and is then evaluated on the real lengths.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adasched.planner.solver import SolveOutcome, SolveParams, solve_linear

from .assign import MBSolution, evaluate
from .batching import Bucket
from .costmodel import SPCostModel

__all__ = ["MilpResult", "solve_microbatch", "realise", "bucket_counts", "ClassResult", "solve_classes",
           "realise_classes"]


@dataclass
class MilpResult:
    outcome: SolveOutcome
    groups: list[tuple[int, list[int]]]
    """(degree, counts per bucket) of the used groups."""
    n_vars: int
    n_cons: int


def bucket_counts(sol: MBSolution, bucket_of: dict[int, int], nq: int) -> list[tuple[int, list[int]]]:
    """A real solution as (degree, counts per bucket) per group."""
    out = []
    for d, ids in sol.groups:
        c = [0] * nq
        for i in ids:
            c[bucket_of[i]] += 1
        out.append((d, c))
    return out


def solve_microbatch(buckets: list[Bucket], cm: SPCostModel, params: SolveParams,
                     hint: list[tuple[int, list[int]]] | None = None, backend: str = "SCIP",
                     max_copies: int | None = None) -> MilpResult | None:
    """Build and solve the MILP; None when the backend is unavailable."""
    from ortools.linear_solver import pywraplp

    # ---- data ---------------------------------------------------------------------------------
    nq = len(buckets)
    n = cm.world
    total = sum(b.count for b in buckets)
    cand: list[tuple[int, int]] = []
    fits: dict[int, list[int]] = {}
    for d in cm.degrees:
        cap = cm.token_capacity(d)
        qs = [q for q, b in enumerate(buckets) if b.max <= cap]
        if not qs:
            continue
        fits[d] = qs
        copies = min(n // d, sum(buckets[q].count for q in qs))
        if max_copies is not None:
            copies = min(copies, max_copies)
        cand += [(d, k) for k in range(copies)]

    # ---- model --------------------------------------------------------------------------------
    solver = pywraplp.Solver.CreateSolver(backend)
    if solver is None:
        return None

    # ---- variables ----------------------------------------------------------------------------
    x: dict[tuple[int, tuple[int, int]], object] = {}
    m: dict[tuple[int, int], object] = {}
    for g in cand:
        d, k = g
        m[g] = solver.BoolVar(f"m_{d}_{k}")
        for q in fits[d]:
            x[q, g] = solver.IntVar(0, buckets[q].count, f"x_{q}_{d}_{k}")
    C = solver.NumVar(0.0, solver.infinity(), "C")

    # ---- constraints --------------------------------------------------------------------------
    for q, b in enumerate(buckets):
        terms = [x[q, g] for g in cand if (q, g) in x]
        solver.Add(sum(terms) == b.count, f"assign_{q}")
    time_of = {}
    for g in cand:
        d, k = g
        qs = fits[d]
        a, be, ga = cm.coeffs(d)
        solver.Add(sum(x[q, g] for q in qs) <= total * m[g], f"used_{d}_{k}")
        # memory in tokens (well scaled): sum x S_q <= token capacity of degree d
        solver.Add(sum(x[q, g] * float(buckets[q].max) for q in qs) <= cm.token_capacity(d) * m[g], f"mem_{d}_{k}")
        time_of[g] = sum(x[q, g] * (a * buckets[q].mean_sq + be * buckets[q].mean) for q in qs) + ga * m[g]
        solver.Add(time_of[g] <= C, f"time_{d}_{k}")
        if k > 0:
            prev = (d, k - 1)
            solver.Add(m[prev] >= m[g], f"symm_{d}_{k}")
            solver.Add(sum(x[q, prev] * buckets[q].mean for q in qs) >= sum(x[q, g] * buckets[q].mean for q in qs),
                       f"order_{d}_{k}")
    solver.Add(sum(g[0] * m[g] for g in cand) <= n, "gpus")
    solver.Add(sum(g[0] * time_of[g] for g in cand) <= n * C, "work")

    # ---- objective ----------------------------------------------------------------------------
    solver.Minimize(C)

    # ---- solve --------------------------------------------------------------------------------
    hint_vals = None
    if hint is not None:
        hint_vals = _hint(hint, buckets, cm, cand, fits, x, m, C)
    out = solve_linear(solver, params, hint_vals, variables=list(x.values()) + list(m.values()) + [C], name=backend)

    # ---- extract ------------------------------------------------------------------------------
    groups: list[tuple[int, list[int]]] = []
    if out.status in ("optimal", "feasible"):
        for g in cand:
            d, k = g
            if out.values.get(f"m_{d}_{k}", 0.0) < 0.5:
                continue
            counts = [int(round(out.values.get(f"x_{q}_{d}_{k}", 0.0))) for q in range(nq)]
            if sum(counts):
                groups.append((d, counts))

    # ---- statistics -----------------------------------------------------------------------------
    return MilpResult(out, groups, solver.NumVariables(), solver.NumConstraints())


def _hint(hint, buckets, cm, cand, fits, x, m, C):
    """Map (degree, counts) groups onto candidate copies (per degree, larger token load first)."""
    by_d: dict[int, list[list[int]]] = {}
    for d, counts in hint:
        if sum(counts):
            by_d.setdefault(d, []).append(counts)
    copies = {}
    for d, k in cand:
        copies[d] = copies.get(d, 0) + 1
    vals = {}
    worst = 0.0
    for d, lst in by_d.items():
        if d not in copies or len(lst) > copies[d]:
            return None
        if any(c and q not in fits[d] for c_l in lst for q, c in enumerate(c_l)):
            return None
        lst = sorted(lst, key=lambda c: -sum(ci * buckets[q].mean for q, ci in enumerate(c)))
        a, be, ga = cm.coeffs(d)
        for k, counts in enumerate(lst):
            vals[m[d, k]] = 1.0
            t = ga
            for q in fits[d]:
                vals[x[q, (d, k)]] = float(counts[q])
                t += counts[q] * (a * buckets[q].mean_sq + be * buckets[q].mean)
            worst = max(worst, t)
    for g in cand:
        if g not in {(d, k) for d in by_d for k in range(len(by_d[d]))}:
            vals[m[g]] = 0.0
            for q in fits[g[0]]:
                vals[x[q, g]] = 0.0
    vals[C] = worst
    return vals


def realise(groups: list[tuple[int, list[int]]], buckets: list[Bucket], ids_sorted: np.ndarray,
            lens: np.ndarray, cm: SPCostModel) -> MBSolution:
    """Real sequences for the MILP's (degree, counts) groups: buckets longest first, each bucket's sequences
    longest first, each to the group with quota left for that bucket that currently finishes earliest."""
    k = len(groups)
    quota = [list(c) for _, c in groups]
    members: list[list[int]] = [[] for _ in range(k)]
    sq = [0.0] * k
    sm = [0.0] * k
    co = [cm.coeffs(d) for d, _ in groups]
    for q in range(len(buckets) - 1, -1, -1):
        b = buckets[q]
        seqs = ids_sorted[b.start:b.end][::-1]
        for i in seqs:
            s = float(lens[i])
            best, best_t = -1, float("inf")
            for g in range(k):
                if quota[g][q] <= 0:
                    continue
                a, be, ga = co[g]
                t = a * (sq[g] + s * s) + be * (sm[g] + s) + ga
                if t < best_t:
                    best, best_t = g, t
            quota[best][q] -= 1
            members[best].append(int(i))
            sq[best] += s * s
            sm[best] += s
    return evaluate(MBSolution([(groups[g][0], members[g]) for g in range(k)], source="milp"), lens, cm)


# ---- the aggregated form: counts per (bucket, degree) ------------------------------------------------
@dataclass
class ClassResult:
    outcome: SolveOutcome
    groups_per_degree: dict[int, int]
    counts: dict[int, list[int]]
    """degree -> sequences of each bucket sent to groups of that degree."""
    n_vars: int
    n_cons: int


def solve_classes(buckets: list[Bucket], cm: SPCostModel, params: SolveParams,
                  hint: list[tuple[int, list[int]]] | None = None, c_max: float | None = None,
                  backend: str = "SCIP") -> ClassResult | None:
    """FlexSP's MILP with identical groups merged: integer counts n[q,d] of bucket-q sequences on degree-d
    groups and g[d] groups of degree d, the g[d] groups sharing their load evenly (fluid within a degree):

        minimise   C
        s.t.       sum_d n[q,d] = c_q
                   sum_q n[q,d] (alpha_d nu_q + beta_d mu_q) + gamma_d g[d] <= g[d] C      (load of degree d)
                   sum_q n[q,d] mu_q <= cap_d g[d]                                          (memory, tokens)
                   n[q,d] <= c_q u[q,d];  (alpha_d S_q^2 + beta_d S_q + gamma_d) u[q,d] <= C (one sequence)
                   u[q,d] <= g[d];  sum_d d g[d] <= N

    g[d] C is linearised with the binary expansion g[d] = sum_j 2^j z[d,j] and w[d,j] = z[d,j] C
    (McCormick with C <= c_max, exact for binaries). The variables are per (bucket, degree), so the model
    stays small at any N; the real groups come from :func:`realise_classes`."""
    from ortools.linear_solver import pywraplp

    # ---- data ---------------------------------------------------------------------------------
    n = cm.world
    fits = {d: [q for q, b in enumerate(buckets) if b.max <= cm.token_capacity(d)] for d in cm.degrees}
    degs = [d for d in cm.degrees if fits[d]]
    if c_max is None:
        c_max = 1e9
    bits = {d: max(1, (n // d).bit_length()) for d in degs}

    # ---- model --------------------------------------------------------------------------------
    solver = pywraplp.Solver.CreateSolver(backend)
    if solver is None:
        return None

    # ---- variables ----------------------------------------------------------------------------
    C = solver.NumVar(0.0, c_max, "C")
    x, u, g, z, w = {}, {}, {}, {}, {}
    for d in degs:
        g[d] = solver.IntVar(0, n // d, f"g_{d}")
        for j in range(bits[d]):
            z[d, j] = solver.BoolVar(f"z_{d}_{j}")
            w[d, j] = solver.NumVar(0.0, c_max, f"w_{d}_{j}")
        for q in fits[d]:
            x[q, d] = solver.IntVar(0, buckets[q].count, f"n_{q}_{d}")
            u[q, d] = solver.BoolVar(f"u_{q}_{d}")

    # ---- constraints --------------------------------------------------------------------------
    for q, b in enumerate(buckets):
        solver.Add(sum(x[q, d] for d in degs if (q, d) in x) == b.count, f"assign_{q}")
    for d in degs:
        a, be, ga = cm.coeffs(d)
        solver.Add(g[d] == sum((1 << j) * z[d, j] for j in range(bits[d])), f"bits_{d}")
        for j in range(bits[d]):
            solver.Add(w[d, j] <= c_max * z[d, j], f"w_le_z_{d}_{j}")
            solver.Add(w[d, j] <= C, f"w_le_C_{d}_{j}")
            solver.Add(w[d, j] >= C - c_max * (1 - z[d, j]), f"w_ge_{d}_{j}")
        load = sum(x[q, d] * (a * buckets[q].mean_sq + be * buckets[q].mean) for q in fits[d])
        solver.Add(load + ga * g[d] <= sum((1 << j) * w[d, j] for j in range(bits[d])), f"load_{d}")
        # memory on the bucket's exact token total (mean): the real packing (LPT with memory checks) decides
        solver.Add(sum(x[q, d] * buckets[q].mean for q in fits[d]) <= cm.token_capacity(d) * g[d], f"mem_{d}")
        for q in fits[d]:
            b = buckets[q]
            solver.Add(x[q, d] <= b.count * u[q, d], f"use_{q}_{d}")
            solver.Add((a * b.max * b.max + be * b.max + ga) * u[q, d] <= C, f"single_{q}_{d}")
            solver.Add(u[q, d] <= g[d], f"open_{q}_{d}")
    solver.Add(sum(d * g[d] for d in degs) <= n, "gpus")

    # ---- objective ----------------------------------------------------------------------------
    solver.Minimize(C)

    # ---- solve --------------------------------------------------------------------------------
    hint_vals = _class_hint(hint, buckets, cm, degs, fits, bits, x, u, g, z, w, C, c_max) if hint else None
    out = solve_linear(solver, params, hint_vals, variables=[C] + list(x.values()) + list(g.values()), name=backend)

    # ---- extract ------------------------------------------------------------------------------
    gpd, counts = {}, {}
    if out.status in ("optimal", "feasible"):
        for d in degs:
            k = int(round(out.values[f"g_{d}"]))
            cnt = [int(round(out.values.get(f"n_{q}_{d}", 0.0))) for q in range(len(buckets))]
            if k and sum(cnt):
                gpd[d], counts[d] = k, cnt

    # ---- statistics -----------------------------------------------------------------------------
    return ClassResult(out, gpd, counts, solver.NumVariables(), solver.NumConstraints())


def _class_hint(hint, buckets, cm, degs, fits, bits, x, u, g, z, w, C, c_max):
    gpd: dict[int, int] = {}
    cnt: dict[int, list[int]] = {}
    for d, c in hint:
        if not sum(c):
            continue
        if d not in g or any(ci and q not in fits[d] for q, ci in enumerate(c)):
            return None
        gpd[d] = gpd.get(d, 0) + 1
        cnt.setdefault(d, [0] * len(buckets))
        cnt[d] = [p + r for p, r in zip(cnt[d], c)]
    cval = 0.0
    for d, k in gpd.items():
        a, be, ga = cm.coeffs(d)
        load = sum(cnt[d][q] * (a * buckets[q].mean_sq + be * buckets[q].mean) for q in range(len(buckets)))
        cval = max(cval, load / k + ga)
        for q in fits[d]:
            if cnt[d][q]:
                b = buckets[q]
                cval = max(cval, a * b.max * b.max + be * b.max + ga)
    if cval > c_max:
        return None
    vals = {C: cval}
    for d in degs:
        k = gpd.get(d, 0)
        vals[g[d]] = float(k)
        for j in range(bits[d]):
            bit = (k >> j) & 1
            vals[z[d, j]] = float(bit)
            vals[w[d, j]] = cval if bit else 0.0
        for q in fits[d]:
            c = cnt.get(d, [0] * len(buckets))[q]
            vals[x[q, d]] = float(c)
            vals[u[q, d]] = 1.0 if c else 0.0
    return vals


def realise_classes(res: ClassResult, buckets: list[Bucket], ids_sorted: np.ndarray, lens: np.ndarray,
                    cm: SPCostModel) -> MBSolution | None:
    """Real groups for a class solution: within each bucket the longer sequences go to the larger degrees
    (as many as the MILP sent there), then each degree's sequences are LPT-packed onto its g[d] groups."""
    from .assign import lpt_assign, pack_structure

    if not res.counts:
        return None
    per_d: dict[int, list[int]] = {d: [] for d in res.counts}
    for q, b in enumerate(buckets):
        seqs = list(ids_sorted[b.start:b.end][::-1])  # longest first
        for d in sorted(res.counts, reverse=True):
            k = res.counts[d][q]
            per_d[d] += [int(i) for i in seqs[:k]]
            seqs = seqs[k:]
    groups: list[tuple[int, list[int]]] = []
    for d, ids in per_d.items():
        sol = lpt_assign(np.array(ids, dtype=np.int64), lens, [d] * res.groups_per_degree[d], cm)
        if sol is None:
            groups = []
            break
        groups += sol.groups
    cands = []
    if groups:
        cands.append(evaluate(MBSolution(groups, source="milp"), lens, cm))
    # the MILP's group structure with every sequence free to go anywhere (helps when memory is tight)
    structure = [d for d, k in res.groups_per_degree.items() for _ in range(k)]
    alt = pack_structure(ids_sorted, lens, structure, cm, source="milp", improve=False)
    if alt is not None:
        cands.append(alt)
    cands = [c for c in cands if c.fits]
    return min(cands, key=lambda c: c.time_ms) if cands else None
