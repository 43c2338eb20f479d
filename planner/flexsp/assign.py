"""Micro-batch solutions on real lengths: a set of concurrent SP groups, each with a degree and sequences.

Everything here evaluates on the real lengths (never bucket bounds): :func:`lpt_assign` packs sequences onto
a fixed multiset of group degrees (longest processing time first, memory-checked), :func:`local_search`
moves and swaps sequences off the critical group, :func:`buddy_ranks` places groups (larger first, aligned).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .costmodel import SPCostModel

__all__ = ["MBSolution", "evaluate", "lpt_assign", "worst_fit_assign", "pack_structure", "local_search", "buddy_ranks"]


@dataclass
class MBSolution:
    """One micro-batch: ``groups[i] = (degree, [sequence ids])``; ids index the step's length array."""

    groups: list[tuple[int, list[int]]]
    time_ms: float = float("nan")
    source: str = ""
    fits: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def gpus(self) -> int:
        return sum(d for d, _ in self.groups)

    def seq_ids(self) -> list[int]:
        return [i for _, ids in self.groups for i in ids]


def evaluate(sol: MBSolution, lens: np.ndarray, cm: SPCostModel) -> MBSolution:
    """Fill in time (makespan over groups, ms) and whether every group fits in memory; drops empty groups."""
    sol.groups = [(d, list(ids)) for d, ids in sol.groups if ids]
    times = [cm.group_time(d, lens[ids]) for d, ids in sol.groups]
    sol.time_ms = max(times) if times else 0.0
    sol.fits = all(cm.fits(d, lens[ids]) for d, ids in sol.groups) and sol.gpus <= cm.world
    return sol


def lpt_assign(ids: np.ndarray, lens: np.ndarray, degrees: list[int], cm: SPCostModel,
               source: str = "lpt") -> MBSolution | None:
    """Assign sequences ``ids`` onto groups of the given degrees: longest first, each to the group where it
    would finish earliest among those with memory room. None if some sequence fits nowhere."""
    order = np.asarray(ids)[np.argsort(-lens[np.asarray(ids)], kind="stable")]
    k = len(degrees)
    co = np.array([cm.coeffs(d) for d in degrees], dtype=np.float64)
    a, b, c = co[:, 0], co[:, 1], co[:, 2]
    cap = np.array([cm.token_capacity(d) for d in degrees], dtype=np.float64)
    load = np.zeros(k)
    tok = np.zeros(k)
    used = np.zeros(k, dtype=bool)
    owner = np.empty(len(order), dtype=np.int64)
    for j, i in enumerate(order):
        s = float(lens[i])
        t = load + a * (s * s) + b * s + np.where(used, 0.0, c)
        t[tok + s > cap] = np.inf
        g = int(np.argmin(t))
        if not np.isfinite(t[g]):
            return None
        load[g] = t[g]
        tok[g] += s
        used[g] = True
        owner[j] = g
    members: list[list[int]] = [[] for _ in range(k)]
    for j, i in enumerate(order):
        members[owner[j]].append(int(i))
    return evaluate(MBSolution([(degrees[g], members[g]) for g in range(k)], source=source), lens, cm)


def worst_fit_assign(ids: np.ndarray, lens: np.ndarray, degrees: list[int], cm: SPCostModel,
                     source: str = "worst-fit") -> MBSolution | None:
    """Memory first: longest sequence first, each to the group with the largest free memory fraction that
    holds it (spreads tokens evenly over memory; :func:`local_search` then balances time)."""
    order = np.asarray(ids)[np.argsort(-lens[np.asarray(ids)], kind="stable")]
    cap = np.array([cm.token_capacity(d) for d in degrees], dtype=np.float64)
    tok = np.zeros(len(degrees))
    members: list[list[int]] = [[] for _ in degrees]
    for i in order:
        s = float(lens[i])
        free = np.where(tok + s <= cap, (cap - tok - s) / cap, -np.inf)
        g = int(np.argmax(free))
        if not np.isfinite(free[g]):
            return None
        tok[g] += s
        members[g].append(int(i))
    return evaluate(MBSolution([(degrees[g], members[g]) for g in range(len(degrees))], source=source), lens, cm)


def pack_structure(ids: np.ndarray, lens: np.ndarray, degrees: list[int], cm: SPCostModel, source: str,
                   improve: bool = True) -> MBSolution | None:
    """The best real packing of ``ids`` onto groups of the given degrees: LPT (time first) and worst-fit
    (memory first), each improved by local search; None if neither fits."""
    best = None
    for fn in (lpt_assign, worst_fit_assign):
        sol = fn(ids, lens, degrees, cm, source=source)
        if sol is None or not sol.fits:
            continue
        if improve:
            sol = local_search(sol, lens, cm)
        if best is None or sol.time_ms < best.time_ms:
            best = sol
    return best


def local_search(sol: MBSolution, lens: np.ndarray, cm: SPCostModel, max_iter: int = 300) -> MBSolution:
    """Improve the makespan by moving one sequence off the critical group, or swapping it with a shorter one
    of another group, while every group stays within memory (best improving move first, vectorised).
    Degrees stay as they are."""
    if len(sol.groups) < 2:
        return sol
    deg = [d for d, _ in sol.groups]
    k = len(deg)
    co = np.array([cm.coeffs(d) for d in deg], dtype=np.float64)
    A, B, Cc = co[:, 0], co[:, 1], co[:, 2]
    cap = np.array([cm.token_capacity(d) for d in deg])
    seq = np.array([i for _, ids in sol.groups for i in ids], dtype=np.int64)
    own = np.array([g for g, (_, ids) in enumerate(sol.groups) for _ in ids], dtype=np.int64)
    s = lens[seq].astype(np.float64)
    sq = np.bincount(own, weights=s * s, minlength=k)
    sm = np.bincount(own, weights=s, minlength=k)
    cnt = np.bincount(own, minlength=k)

    def times():
        return np.where(cnt > 0, A * sq + B * sm + Cc, 0.0)

    t = times()
    for _ in range(max_iter):
        c = int(np.argmax(t))
        cur = t[c]
        mine = np.flatnonzero(own == c)
        si = s[mine]
        new_c = A[c] * (sq[c] - si * si) + B[c] * (sm[c] - si) + np.where(cnt[c] > 1, Cc[c], 0.0)
        # moves: |mine| x k
        new_g = A[None, :] * (sq[None, :] + (si * si)[:, None]) + B[None, :] * (sm[None, :] + si[:, None]) + Cc[None, :]
        ok = sm[None, :] + si[:, None] <= cap[None, :]
        ok[:, c] = False
        worst = np.where(ok, np.maximum(new_c[:, None], new_g), np.inf)
        mi = np.unravel_index(int(np.argmin(worst)), worst.shape)
        best_move = worst[mi]
        # swaps: i in c with a shorter j elsewhere
        other = np.flatnonzero(own != c)
        best_swap = np.inf
        if other.size:
            sj = s[other]
            gj = own[other]
            d = sj[None, :] - si[:, None]  # change of tokens in c
            d2 = (sj * sj)[None, :] - (si * si)[:, None]
            nc = A[c] * (sq[c] + d2) + B[c] * (sm[c] + d) + Cc[c]
            ng = A[gj][None, :] * (sq[gj][None, :] - d2) + B[gj][None, :] * (sm[gj][None, :] - d) + Cc[gj][None, :]
            okw = (d < 0) & (sm[c] + d <= cap[c]) & (sm[gj][None, :] - d <= cap[gj][None, :])
            w2 = np.where(okw, np.maximum(nc, ng), np.inf)
            si_idx = np.unravel_index(int(np.argmin(w2)), w2.shape)
            best_swap = w2[si_idx]
        if min(best_move, best_swap) >= cur - 1e-9:
            break
        if best_move <= best_swap:
            i, g = int(mine[mi[0]]), int(mi[1])
            x = s[i]
            own[i] = g
            sq[c] -= x * x; sm[c] -= x; cnt[c] -= 1
            sq[g] += x * x; sm[g] += x; cnt[g] += 1
        else:
            i, j = int(mine[si_idx[0]]), int(other[si_idx[1]])
            g = int(own[j])
            x, y = s[i], s[j]
            own[i], own[j] = g, c
            sq[c] += y * y - x * x; sm[c] += y - x
            sq[g] += x * x - y * y; sm[g] += x - y
        t = times()
    groups = [(deg[g], [int(seq[i]) for i in np.flatnonzero(own == g)]) for g in range(k)]
    out = evaluate(MBSolution(groups, source=sol.source if sol.source.endswith("+ls") else sol.source + "+ls",
                              extra=dict(sol.extra)), lens, cm)
    return out if (out.fits and out.time_ms <= sol.time_ms) or not sol.fits else sol


def buddy_ranks(degrees: list[int], world: int) -> list[list[int]]:
    """Ranks per group: groups sorted by degree (largest first) take consecutive blocks, so every block is
    aligned to its degree (a buddy allocation) and a group of degree <= gpus_per_node stays inside a node.
    Returns ranks in the input order of ``degrees``."""
    if sum(degrees) > world:
        raise ValueError(f"groups need {sum(degrees)} GPUs, world has {world}")
    order = sorted(range(len(degrees)), key=lambda g: -degrees[g])
    out: list[list[int]] = [[] for _ in degrees]
    off = 0
    for g in order:
        d = degrees[g]
        assert off % d == 0
        out[g] = list(range(off, off + d))
        off += d
    return out
