"""Baselines FlexSP is compared with, all evaluated on real lengths with the same cost model:

- :func:`static_sp`: one SP group over all N GPUs (DeepSpeed-Ulysses-like); the global batch is packed into
  as few micro-batches as memory allows (:func:`pack_bins`: best-fit decreasing, then fewer bins where it can).
- :func:`homogeneous`: N/d groups of one degree d for a micro-batch, sequences packed by LPT with memory
  checks; :func:`best_homogeneous` keeps the best d per micro-batch ("BatchAda", per micro-batch).
- :func:`greedy`: a one-pass heuristic: every sequence's class is the smallest degree that holds it, GPUs
  are shared among classes in proportion to their work (GPU-ms), then one LPT pass over all groups.
"""
from __future__ import annotations

import math

import numpy as np

from .assign import MBSolution, evaluate, lpt_assign, pack_structure
from .costmodel import SPCostModel

__all__ = ["static_sp", "pack_bins", "bins_lower_bound", "homogeneous", "best_homogeneous", "greedy"]


def static_sp(lens: np.ndarray, cm: SPCostModel, fewer_bins: bool = True) -> list[MBSolution]:
    """Static SP = N: the global batch packed into as few micro-batches of at most the token capacity of one
    all-GPU group as :func:`pack_bins` finds (``fewer_bins=False``: best-fit decreasing alone, as plans before
    2026-12-03 priced it); each micro-batch is one group of degree N."""
    n = cm.world
    cap = cm.token_capacity(n)
    longest = int(np.max(lens)) if len(lens) else 0
    if longest > cap:
        raise ValueError(f"sequence of {longest} tokens exceeds the capacity of all {n} GPUs ({cap:.0f} tokens)")
    return [evaluate(MBSolution([(n, b)], source="static"), lens, cm) for b in pack_bins(lens, cap, fewer_bins)]


#: sequences up to which :func:`pack_bins` searches exhaustively (one node budget for all its bin counts)
EXACT_PACK_MAX = 24
_EXACT_PACK_NODES = 50_000  # (about 0.1 s of Python at worst, per step and again in verify)


def bins_lower_bound(vals: np.ndarray, cap: float) -> int:
    """A lower bound on the bins of at most ``cap`` that hold ``vals``: the largest of the tokens' (L1), Martello
    and Toth's L2 (the items above cap - a, those in (cap/2, cap - a] and the room they leave for those in
    [a, cap/2], over every a), and, for t = 1..64, the items above cap/(t+1) at most t per bin. O(n log n)."""
    v = np.sort(np.asarray(vals, dtype=np.float64))
    n = v.size
    if n == 0:
        return 0
    best = max(1, math.ceil(float(v.sum()) / cap - 1e-12))
    for t in range(1, min(n, 64) + 1):
        over = n - int(np.searchsorted(v, cap / (t + 1), side="right"))
        best = max(best, -(-over // t))
    prefix = np.concatenate(([0.0], np.cumsum(v)))
    half = cap / 2
    alphas = np.unique(np.concatenate(([0.0], v[v <= half])))
    i1 = np.searchsorted(v, cap - alphas, side="right")   # J1: v > cap - a
    ih = int(np.searchsorted(v, half, side="right"))         # J2: half < v <= cap - a
    i3 = np.searchsorted(v, alphas, side="left")             # J3: a <= v <= half
    n1 = n - i1
    n2 = np.maximum(i1 - ih, 0)
    s2 = prefix[np.maximum(i1, ih)] - prefix[ih]
    s3 = prefix[ih] - prefix[i3]
    l2 = n1 + n2 + np.maximum(0.0, np.ceil((s3 - (n2 * cap - s2)) / cap - 1e-12))
    return max(best, int(l2.max()))


def pack_bins(lens: np.ndarray, cap: float, fewer_bins: bool = True) -> list[list[int]]:
    """Indices of ``lens`` in as few bins of at most ``cap`` tokens as found: best-fit decreasing; where that
    leaves more bins than :func:`bins_lower_bound`, the fewest bins a longest-first spread fills (each sequence into
    the least-filled bin, bisected over the bin count), then - up to :data:`EXACT_PACK_MAX` sequences - an
    exhaustive search below that (one node budget). Best-fit decreasing alone took 3 micro-batches where 2 fit
    (2717, 3107, 6582 | 4743, 4472, 4055 in 13,734 tokens: 23 % slower plans). A function of the lengths'
    multiset (ties by position): the plan's verify re-derives it from the groups."""
    order = [int(i) for i in np.argsort(-np.asarray(lens), kind="stable")]
    vals = [float(lens[i]) for i in order]
    bins: list[list[int]] = []
    room: list[float] = []
    for i, v in zip(order, vals):
        best, best_room = -1, float("inf")
        for b, r in enumerate(room):
            if v <= r and r - v < best_room:
                best, best_room = b, r - v
        if best < 0:
            bins.append([i])
            room.append(cap - v)
        else:
            bins[best].append(i)
            room[best] -= v
    if not fewer_bins or not vals:
        return bins
    low = bins_lower_bound(np.array(vals), cap)
    if low >= len(bins):  # best-fit decreasing is optimal (the usual case: one check, no search)
        return bins
    found, hi = None, len(bins)
    lo_m = low
    while lo_m < hi:  # the fewest bins the spread fills (roughly monotone in the count: bisected)
        mid = (lo_m + hi) // 2
        got = _spread(order, vals, cap, mid)
        if got is not None:
            found, hi = got, mid
        else:
            lo_m = mid + 1
    if len(vals) <= EXACT_PACK_MAX:
        budget = [_EXACT_PACK_NODES]
        for m in range(low, len(found) if found is not None else len(bins)):
            got = _exact(order, vals, cap, m, budget)
            if got is not None:
                return got
            if budget[0] <= 0:
                break
    return found if found is not None else bins


def _spread(order: list[int], vals: list[float], cap: float, m: int) -> list[list[int]] | None:
    """Longest first, each into the least-filled of ``m`` bins (lowest index on ties); None if one overflows."""
    import heapq

    heap = [(0.0, k) for k in range(m)]
    out: list[list[int]] = [[] for _ in range(m)]
    for i, v in zip(order, vals):
        load, b = heapq.heappop(heap)
        if load + v > cap:
            return None
        out[b].append(i)
        heapq.heappush(heap, (load + v, b))
    return out


def _exact(order: list[int], vals: list[float], cap: float, m: int, budget: list[int]) -> list[list[int]] | None:
    """Depth-first over the sequences (longest first) into ``m`` bins, a bin of the same load as an earlier one
    tried once (an empty bin among them); None when none fits or the node budget (``budget[0]``, shared by the
    calls of one packing) runs out."""
    load = [0.0] * m
    where = [0] * len(vals)
    suffix = [0.0] * (len(vals) + 1)
    for k in range(len(vals) - 1, -1, -1):
        suffix[k] = suffix[k + 1] + vals[k]

    def place(k: int) -> bool:
        if k == len(vals):
            return True
        budget[0] -= 1
        if budget[0] <= 0 or suffix[k] > m * cap - sum(load) + 1e-9:
            return False
        tried: set[float] = set()
        for b in range(m):
            if load[b] in tried or load[b] + vals[k] > cap:
                continue
            tried.add(load[b])
            load[b] += vals[k]
            where[k] = b
            if place(k + 1):
                return True
            load[b] -= vals[k]
        return False

    if not place(0):
        return None
    out: list[list[int]] = [[] for _ in range(m)]
    for k, i in enumerate(order):
        out[where[k]].append(i)
    return out


def homogeneous(ids: np.ndarray, lens: np.ndarray, d: int, cm: SPCostModel) -> MBSolution | None:
    """N/d groups of degree d; None if the micro-batch does not fit."""
    if lens[ids].max() > cm.token_capacity(d):
        return None
    return lpt_assign(ids, lens, [d] * (cm.world // d), cm, source=f"homogeneous-{d}")


def best_homogeneous(ids: np.ndarray, lens: np.ndarray, cm: SPCostModel) -> tuple[MBSolution | None, dict[int, float]]:
    """The best single degree for this micro-batch and the time of every feasible degree (ms)."""
    best, per = None, {}
    s = lens[ids].astype(np.float64)
    for d in cm.degrees:
        a, b, c = cm.coeffs(d)
        if best is not None and c + float(np.sum(a * s * s + b * s)) * d / cm.world >= best.time_ms:
            continue  # even perfectly balanced, degree d cannot beat the best so far
        sol = homogeneous(ids, lens, d, cm)
        if sol is None or not sol.fits:
            continue
        per[d] = sol.time_ms
        if best is None or sol.time_ms < best.time_ms:
            best = sol
    return best, per


def greedy(ids: np.ndarray, lens: np.ndarray, cm: SPCostModel, target_ms: float | None = None,
           cache: dict | None = None) -> MBSolution | None:
    """Class = smallest degree that holds the sequence and, alone, runs it within ``target_ms`` (when
    given); GPUs per class in proportion to GPU-ms of work (at least what its tokens need in memory);
    leftover GPUs go to the busiest class; one LPT pass over all groups. ``cache`` (a dict per ``ids``): targets
    that give the same group degrees share one packing (it depends on the degrees only)."""
    n = cm.world
    s = lens[ids].astype(np.float64)
    dmin = np.zeros(s.size, dtype=np.int64)
    for d in reversed(cm.degrees):
        a, b, c = cm.coeffs(d)
        ok = s <= cm.token_capacity(d)
        if target_ms is not None:
            ok &= (a * s * s + b * s + c <= target_ms) | (d == cm.world)
        dmin = np.where(ok, d, dmin)
    if np.any(dmin == 0):
        return None
    classes = sorted(set(int(d) for d in dmin), reverse=True)
    work, need, groups = {}, {}, {}
    for d in classes:
        sel = s[dmin == d]
        a, b, c = cm.coeffs(d)
        work[d] = float(np.sum(a * sel * sel + b * sel)) * d  # GPU-ms
        need[d] = max(1, math.ceil(sel.sum() / cm.token_capacity(d) - 1e-9))
    total = sum(work.values())
    for d in classes:
        groups[d] = max(need[d], int(round(n * work[d] / total / d)))

    def per_group(d):
        return work[d] / d / groups[d]

    while sum(groups[d] * d for d in classes) > n:
        shrink = [d for d in classes if groups[d] > need[d]]
        if not shrink:
            return None
        d = min(shrink, key=lambda d: work[d] / d / (groups[d] - 1))
        groups[d] -= 1
    left = n - sum(groups[d] * d for d in classes)
    while True:
        fit = [d for d in classes if d <= left]
        if not fit:
            break
        d = max(fit, key=per_group)
        groups[d] += 1
        left -= d
    degrees = [d for d in classes for _ in range(groups[d])]
    if target_ms is None:  # the plain baseline: one LPT pass
        sol = lpt_assign(ids, lens, degrees, cm, source="greedy")
        return evaluate(sol, lens, cm) if sol is not None else None
    if cache is None:
        return pack_structure(ids, lens, degrees, cm, source="greedy-target")
    key = tuple(degrees)
    if key not in cache:
        cache[key] = pack_structure(ids, lens, degrees, cm, source="greedy-target")
    return cache[key]
