"""A memory-aware fluid lower bound on one micro-batch's makespan (analysis; the planner does not need it).

Relaxation of the formulation in ../shared/papers/flexsp.md for one micro-batch with makespan C: sequence k may
be split into fractions x[k,d] over degrees d (only degrees whose group holds it, Mem <= E, and runs it alone
within C), and n_d GPUs (a real number) work at degree d:

    sum_d x[k,d] = 1                                     every sequence
    sum_k x[k,d] s_k            <= n_d * E_tokens        memory: a degree-d group holds d * E_tokens tokens
    sum_k x[k,d] d Time1_d(s_k) <= n_d * (C - b1)        GPU-ms of degree d within C - b1 per GPU
    sum_d n_d <= N

with Time1_d(s) = alpha_d s^2 + beta_d s (the group time without b1). Every real plan with makespan C gives a
feasible point (n_d = d * groups of degree d), so the least feasible C (bisection on C; an LP per probe) is a
lower bound. Used in BENCHMARKS.md to show how far each step is from what any plan could reach.
Units: ms, tokens.
"""
from __future__ import annotations

import numpy as np

from .costmodel import SPCostModel

__all__ = ["fluid_feasible", "fluid_lower_bound", "per_sequence_bounds"]


def fluid_feasible(lens, cm: SPCostModel, c_ms: float) -> bool:
    """Whether the relaxation above admits makespan ``c_ms``."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    s = np.asarray(lens, dtype=np.float64)
    k_n = s.size
    degs = cm.degrees
    nd = len(degs)
    if c_ms <= cm.b1:
        return False
    rows_eq, cols_eq = [], []
    rows_ub, cols_ub, vals_ub = [], [], []
    col = 0
    covered = np.zeros(k_n, dtype=bool)
    for j, d in enumerate(degs):
        a, b, c = cm.coeffs(d)
        t1 = a * s * s + b * s
        ok = np.flatnonzero((s <= cm.token_capacity(d) * (1 + 1e-12)) & (t1 + c <= c_ms))
        covered[ok] = True
        idx = np.arange(col, col + ok.size)
        rows_eq += ok.tolist()
        cols_eq += idx.tolist()
        rows_ub += [j] * ok.size + [nd + j] * ok.size
        cols_ub += idx.tolist() * 2
        vals_ub += s[ok].tolist() + (d * t1[ok]).tolist()
        col += ok.size
    if not covered.all():
        return False
    nx = col
    cap1 = cm.token_capacity(1)
    for j in range(nd):
        rows_ub += [j, nd + j, 2 * nd]
        cols_ub += [nx + j] * 3
        vals_ub += [-cap1, -(c_ms - cm.b1), 1.0]
    nv = nx + nd
    a_eq = coo_matrix((np.ones(len(rows_eq)), (rows_eq, cols_eq)), shape=(k_n, nv)).tocsr()
    a_ub = coo_matrix((vals_ub, (rows_ub, cols_ub)), shape=(2 * nd + 1, nv)).tocsr()
    b_ub = np.zeros(2 * nd + 1)
    b_ub[2 * nd] = cm.world
    res = linprog(np.zeros(nv), A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=np.ones(k_n), bounds=(0, None), method="highs")
    return res.status == 0


def fluid_lower_bound(lens, cm: SPCostModel, rel_tol: float = 1e-4, hi_ms: float | None = None) -> float:
    """Largest probed infeasible C (ms): no plan of ``lens`` in one micro-batch is faster. inf if even
    ``hi_ms`` (default: every sequence alone on all N GPUs, one after another) is infeasible."""
    s = np.asarray(lens, dtype=np.float64)
    lo = cm.b1
    if hi_ms is None:
        a, b, c = cm.coeffs(cm.world)
        hi_ms = float(np.sum(a * s * s + b * s)) + c
    if not fluid_feasible(s, cm, hi_ms):
        return float("inf")
    while hi_ms - lo > rel_tol * hi_ms:
        mid = 0.5 * (lo + hi_ms)
        if fluid_feasible(s, cm, mid):
            hi_ms = mid
        else:
            lo = mid
    return lo


def per_sequence_bounds(lens: np.ndarray, cm: SPCostModel) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence of the step: its cheapest work in GPU-ms (a s^2 + b s, times d, on the degree that holds it
    best) and its fastest time alone on one group (with that group's constant); inf where no degree holds it."""
    s = lens.astype(np.float64)
    work = np.full(s.size, np.inf)
    alone = np.full(s.size, np.inf)
    for d in cm.degrees:
        a, b, g = cm.coeffs(d)
        ok = s <= cm.token_capacity(d)
        t = a * s * s + b * s
        work = np.where(ok, np.minimum(work, t * d), work)
        alone = np.where(ok, np.minimum(alone, t + g), alone)
    return work, alone
