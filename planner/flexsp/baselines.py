"""Baselines FlexSP is compared with, all evaluated on real lengths with the same cost model:

- :func:`static_sp`: one SP group over all N GPUs (DeepSpeed-Ulysses-like); the global batch is packed into
  as few micro-batches as memory allows by best-fit decreasing on tokens.
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

__all__ = ["static_sp", "homogeneous", "best_homogeneous", "greedy"]


def static_sp(lens: np.ndarray, cm: SPCostModel) -> list[MBSolution]:
    """Static SP = N: best-fit decreasing of the global batch into micro-batches of at most the token
    capacity of one all-GPU group; each micro-batch is one group of degree N."""
    n = cm.world
    cap = cm.token_capacity(n)
    order = np.argsort(-lens, kind="stable")
    bins: list[list[int]] = []
    room: list[float] = []
    for i in order:
        s = float(lens[i])
        if s > cap:
            raise ValueError(f"sequence of {int(s)} tokens exceeds the capacity of all {n} GPUs ({cap:.0f} tokens)")
        best, best_room = -1, float("inf")
        for b, r in enumerate(room):
            if s <= r and r - s < best_room:
                best, best_room = b, r - s
        if best < 0:
            bins.append([int(i)])
            room.append(cap - s)
        else:
            bins[best].append(int(i))
            room[best] -= s
    return [evaluate(MBSolution([(n, b)], source="static"), lens, cm) for b in bins]


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
