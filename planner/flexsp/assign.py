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


#: Units of work of the fast paths, for machine-independent guards (tests/planner/flexsp/test_flexsp_speed.py):
#: ``lpt_looks``: :func:`lpt_assign`'s looks at groups (one per degree class per sequence, plus every heap entry
#: popped; the full pass it replaced looks at every group per sequence); ``swap_elems``: elements of the swap
#: search of :func:`local_search` (the dense form: critical group's sequences x the others; pruned: a length range
#: per row and active group, plus the candidate pairs); ``fill_evals``: donor sequences :func:`.search.fill_across`
#: tests exactly (the rest are skipped by their room). Added once per call or batch operation, never per element.
WORK = {"lpt_looks": 0, "swap_elems": 0, "fill_evals": 0}


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
    if len(sol.groups) > 1 and lens.dtype.kind in "iu":
        # all groups at once: integral lengths sum exactly in float64 below 2**53 in any order, so these are
        # cm.group_time's and cm.fits' values bit for bit
        k = len(sol.groups)
        own = np.repeat(np.arange(k), [len(ids) for _, ids in sol.groups])
        s = lens[np.fromiter((i for _, ids in sol.groups for i in ids), dtype=np.int64, count=own.size)]
        s = s.astype(np.float64)
        sq = np.bincount(own, weights=s * s, minlength=k)
        if float(sq.sum()) < 2.0 ** 53:
            sm = np.bincount(own, weights=s, minlength=k)
            deg = np.array([d for d, _ in sol.groups], dtype=np.float64)
            co = np.array([cm.coeffs(d) for d, _ in sol.groups], dtype=np.float64)
            sol.time_ms = float(np.max(co[:, 0] * sq + co[:, 1] * sm + co[:, 2]))
            mem = sm * cm.act_bytes_per_token / deg + cm.model_state_bytes
            sol.fits = bool(np.all(mem <= cm.memory_bytes * (1 + 1e-12))) and sol.gpus <= cm.world
            return sol
    times = [cm.group_time(d, lens[ids]) for d, ids in sol.groups]
    sol.time_ms = max(times) if times else 0.0
    sol.fits = all(cm.fits(d, lens[ids]) for d, ids in sol.groups) and sol.gpus <= cm.world
    return sol


def lpt_assign(ids: np.ndarray, lens: np.ndarray, degrees: list[int], cm: SPCostModel,
               source: str = "lpt") -> MBSolution | None:
    """Assign sequences ``ids`` onto groups of the given degrees: longest first, each to the group where it
    would finish earliest among those with memory room (ties: the first such group). None if some sequence fits
    nowhere.

    Groups of one degree differ only in their load, so per degree only two kinds of group compete: the first
    unused one, and the used ones in a heap by (load, index), where the least-loaded with memory room finishes
    earliest (a group's finish is ``load + alpha s^2 + beta s``, non-decreasing in its load; groups whose finish
    rounds to the same value are all looked at, so the first index still wins a tie). O(log k) per sequence
    instead of a pass over all k groups while the least-loaded groups have memory room; groups without room for a
    sequence are popped and pushed back on the way to one with room (up to O(k log k) when memory is tight)."""
    import heapq

    order = np.asarray(ids)[np.argsort(-lens[np.asarray(ids)], kind="stable")]
    k = len(degrees)
    by_deg: dict[int, list[int]] = {}
    for g, d in enumerate(degrees):
        by_deg.setdefault(d, []).append(g)
    classes = [(cm.coeffs(d), cm.token_capacity(d), gs) for d, gs in by_deg.items()]
    nxt = [0] * len(classes)  # first unused group of each class (groups are used in index order)
    heaps: list[list[tuple[float, int]]] = [[] for _ in classes]
    tok = [0.0] * k
    cur = [np.nan] * k  # a used group's load (finish time so far)
    owner = np.empty(len(order), dtype=np.int64)
    n_popped = 0  # heap entries popped and pushed back (stale ones are counted at the end)
    n_replaced = 0  # tops replaced in place by their group's new load (a pop and a push, no look)
    for j, s in enumerate(lens[order].astype(np.float64).tolist()):
        best_t, best_g, best_c = np.inf, -1, -1
        for ci, ((a, b, c), cap, gs) in enumerate(classes):
            ss, bs = a * (s * s), b * s
            if nxt[ci] < len(gs) and 0.0 + s <= cap:
                g = gs[nxt[ci]]
                t = 0.0 + ss + bs + c
                if t < best_t or (t == best_t and g < best_g):
                    best_t, best_g, best_c = t, g, ci
            heap = heaps[ci]
            if heap:
                load, g = heap[0]
                if load == cur[g] and tok[g] + s <= cap:
                    # the least-loaded group is current and has room: unless a child in the heap finishes at the
                    # same time (a tie to look at), it is this class's candidate without touching the heap
                    # (the children tested inline: a generator here cost ~25 % of the function, 2026-11-29)
                    t = load + ss + bs + 0.0
                    n_h = len(heap)
                    if ((n_h < 2 or heap[1][0] + ss + bs + 0.0 > t)
                            and (n_h < 3 or heap[2][0] + ss + bs + 0.0 > t)):
                        if t < best_t or (t == best_t and g < best_g):
                            best_t, best_g, best_c = t, g, ci
                        continue
            popped = []
            first_t = None
            while heap:
                load, g = heap[0]
                if load != cur[g]:  # stale: the group has taken sequences since
                    heapq.heappop(heap)
                    continue
                t = load + ss + bs + 0.0
                if first_t is not None and t > first_t:
                    break  # every later group finishes later still
                popped.append(heapq.heappop(heap))
                if tok[g] + s > cap:
                    continue
                if first_t is None:
                    first_t = t
                if t < best_t or (t == best_t and g < best_g):
                    best_t, best_g, best_c = t, g, ci
            n_popped += len(popped)
            for item in popped:
                heapq.heappush(heap, item)
        if best_g < 0:
            WORK["lpt_looks"] += (j + 1) * len(classes) + j + n_popped - n_replaced - sum(len(h) for h in heaps)
            return None
        g, ci = best_g, best_c
        gs = classes[ci][2]
        if nxt[ci] < len(gs) and gs[nxt[ci]] == g:
            nxt[ci] += 1
        cur[g] = best_t
        heap = heaps[ci]
        if heap and heap[0][1] == g:
            # its entry is the top (the usual case: the least-loaded group took it): replaced in place, so the
            # next sequence's shortcut above sees a current top instead of this stale one (pushed beside it, the
            # stale entry stayed on top and the shortcut almost never fired: 224,510 -> 112,977 looks on the
            # 3,000-sequence Wikipedia batch of tests/planner/flexsp/test_flexsp_speed.py)
            heapq.heapreplace(heap, (best_t, g))
            n_replaced += 1
        else:
            heapq.heappush(heap, (best_t, g))  # its old entry (if any) is stale now, popped when it surfaces
        tok[g] += s
        owner[j] = g
    # heap pops = pushes (one per sequence placed, plus the popped ones pushed back) - entries left - replaced
    WORK["lpt_looks"] += (len(order) * len(classes) + len(order) + n_popped - n_replaced
                          - sum(len(h) for h in heaps))
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


#: swap matrices (critical group's sequences x the others) above this size are searched pruned (same answer)
PRUNE_FROM = 4096

#: the local search's matrices hold at most this many pairs at a time (rows of the critical group in blocks): the
#: moves (critical sequences x groups), the full swap matrix (x the other sequences: about 8 float64 arrays), the
#: pruned search's bounds (x groups) and candidates (16 arrays), so at most ~256 MiB whatever the batch (a
#: micro-batch of 60,000 sequences over 1,024 GPUs asked for a 7 GiB matrix, and plan sp refused such batches for
#: the memory they might need; api.planner_memory_bytes counts this bound)
SWAP_CHUNK_PAIRS = 2 ** 21


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

    # the pruned swap search needs time increasing in the tokens added and integral lengths
    # (and keys group * (longest + 2) + length within int64: lengths up to 2**40 on 2**16 groups)
    pruned = bool(np.all(A >= 0) and np.all(B >= 0) and np.all(s == np.rint(s)) and s.size
                  and (float(s.max()) + 2.0) * k < 2.0 ** 62)

    def times():
        return np.where(cnt > 0, A * sq + B * sm + Cc, 0.0)

    t = times()
    for _ in range(max_iter):
        c = int(np.argmax(t))
        cur = t[c]
        mine = np.flatnonzero(own == c)
        si = s[mine]
        new_c = A[c] * (sq[c] - si * si) + B[c] * (sm[c] - si) + np.where(cnt[c] > 1, Cc[c], 0.0)
        # moves: |mine| x k, in blocks of rows of at most SWAP_CHUNK_PAIRS pairs (40,000 sequences of the critical
        # group x 513 groups took 1.2 GiB at once); the first row, then the first column, on ties, as one matrix
        best_move, mi = np.inf, (0, 0)
        step = max(1, SWAP_CHUNK_PAIRS // k)
        for r0 in range(0, si.size, step):
            sr = si[r0:r0 + step]
            new_g = A[None, :] * (sq[None, :] + (sr * sr)[:, None]) + B[None, :] * (sm[None, :] + sr[:, None]) \
                + Cc[None, :]
            ok = sm[None, :] + sr[:, None] <= cap[None, :]
            ok[:, c] = False
            worst = np.where(ok, np.maximum(new_c[r0:r0 + step, None], new_g), np.inf)
            at = np.unravel_index(int(np.argmin(worst)), worst.shape)
            if worst[at] < best_move:
                best_move, mi = worst[at], (int(at[0]) + r0, int(at[1]))
        # swaps: i in c with a shorter j elsewhere
        other = np.flatnonzero(own != c)
        best_swap = np.inf
        if other.size:
            swap = (_swaps_pruned(c, si, other, s, own, A, B, Cc, sq, sm, cap, t, min(cur - 1e-9, best_move))
                    if pruned and si.size * other.size > PRUNE_FROM else
                    _swaps_dense(c, si, other, s, own, A, B, Cc, sq, sm, cap))
            best_swap, si_idx = swap
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




def _swaps_dense(c, si, other, s, own, A, B, Cc, sq, sm, cap):
    """Every swap of a sequence i of the critical group c (lengths ``si``) with a shorter one j of another group
    (``other``: indices into ``s``): (best resulting max(time of c, time of j's group), (row of i, column of j));
    inf when no swap fits in memory. Ties go to the first row, then the first column. Evaluated in blocks of rows
    of at most :data:`SWAP_CHUNK_PAIRS` pairs (the same values and tie-break as one matrix)."""
    sj = s[other]
    gj = own[other]
    Ag, Bg, Cg = A[gj][None, :], B[gj][None, :], Cc[gj][None, :]
    sqg, smg, capg = sq[gj][None, :], sm[gj][None, :], cap[gj][None, :]
    sj2 = (sj * sj)[None, :]
    step = max(1, SWAP_CHUNK_PAIRS // max(1, sj.size))
    best, best_idx = np.inf, (0, 0)
    for r0 in range(0, si.size, step):
        sr = si[r0:r0 + step]
        d = sj[None, :] - sr[:, None]  # change of tokens in c
        d2 = sj2 - (sr * sr)[:, None]
        nc = A[c] * (sq[c] + d2) + B[c] * (sm[c] + d) + Cc[c]
        ng = Ag * (sqg - d2) + Bg * (smg - d) + Cg
        okw = (d < 0) & (sm[c] + d <= cap[c]) & (smg - d <= capg)
        w2 = np.where(okw, np.maximum(nc, ng), np.inf)
        WORK["swap_elems"] += w2.size
        idx = np.unravel_index(int(np.argmin(w2)), w2.shape)
        if w2[idx] < best:  # (strictly: an earlier block's tie stands, as the first row in one matrix)
            best, best_idx = w2[idx], (int(idx[0]) + r0, int(idx[1]))
    return best, best_idx


def _inverse(A, B, y):
    """Largest x >= 0 with A x^2 + B x <= y (A, B >= 0, elementwise): 0 for y <= 0, inf when A = B = 0."""
    y = np.maximum(y, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.sqrt(B * B + 4.0 * A * y)
        x = np.where(B + root > 0, 2.0 * y / (B + root), np.inf)  # stable form of (-B + root) / (2 A)
    return np.where(y > 0, x, 0.0)


def _swaps_pruned(c, si, other, s, own, A, B, Cc, sq, sm, cap, t, thr):
    """:func:`_swaps_dense`'s answer whenever it is below ``thr`` (else some value >= ``thr``), without the full
    |critical group| x |other sequences| matrix: for a swap of i (length si) with j (length sj < si, group g) to
    end below ``thr``, group g's new time needs h_g(sj) > h_g(si) + t_g - thr and c's needs
    h_c(sj) < thr - t_c + h_c(si), with h(x) = A x^2 + B x increasing; per (i, g) that is a range of lengths,
    found by binary search in the other sequences sorted by (group, length), widened by a margin so rounding never
    drops a candidate. Only those pairs are evaluated, with the same arithmetic as the dense form (so the same
    values and the same tie-break: first row, then first column)."""
    # a group already at thr or later cannot take a longer sequence and finish before thr
    act = np.flatnonzero(t < thr)
    act = act[act != c]
    if act.size == 0:
        return np.inf, (0, 0)
    margin = 1e-7 * (abs(thr) + 1.0)
    hc = A[c] * si * si + B[c] * si
    up = np.minimum(np.ceil(_inverse(A[c], B[c], thr - t[c] + hc + margin)) + 1.0, si - 1.0)  # sj < si: integral
    rws = np.flatnonzero(up >= 1.0)
    if rws.size == 0:
        return np.inf, (0, 0)
    rank = np.full(A.size, -1, dtype=np.int64)
    rank[act] = np.arange(act.size)
    gj_all = own[other]
    rk = rank[gj_all]
    sel = np.flatnonzero(rk >= 0)  # positions in ``other`` of sequences in those groups
    if sel.size == 0:
        return np.inf, (0, 0)
    ka = act.size
    if rws.size * ka > SWAP_CHUNK_PAIRS:  # (the bounds below hold rows x groups at once: the blocked full matrix)
        return _swaps_dense(c, si, other, s, own, A, B, Cc, sq, sm, cap)
    sj_all = s[other]
    sh = int(s.max()) + 2  # key = group rank * sh + length: (group, length) order
    keys = rk[sel] * sh + sj_all[sel].astype(np.int64)
    by_key = np.argsort(keys, kind="stable")
    order = sel[by_key]  # ties: ascending position in ``other``
    keys = keys[by_key]
    sr_ = si[rws]
    Aa, Ba = A[act], B[act]
    hi_g = Aa[None, :] * (sr_ * sr_)[:, None] + Ba[None, :] * sr_[:, None]  # h_g(si): rows x active groups
    low = np.floor(_inverse(Aa[None, :], Ba[None, :], hi_g + t[act][None, :] - thr - margin)) - 1.0
    low = np.clip(low, 0.0, sh - 1.0).astype(np.int64)
    upr = np.clip(up[rws], -1.0, sh - 1.0).astype(np.int64)
    g_off = np.arange(ka, dtype=np.int64)[None, :] * sh
    a = np.searchsorted(keys, g_off + low, side="left")
    b = np.searchsorted(keys, g_off + upr[:, None], side="right")
    cnt = np.maximum(b - a, 0).ravel()
    total = int(cnt.sum())
    WORK["swap_elems"] += si.size + sel.size + cnt.size  # a bound per row, a key per sequence, a range per pair
    if total == 0:
        return np.inf, (0, 0)
    if 2 * total > si.size * other.size or total > SWAP_CHUNK_PAIRS:
        # pruning spared little: the full matrix (in blocks) is as fast; and the ~16 arrays of the candidates below
        # stay within SWAP_CHUNK_PAIRS pairs this way, as api.planner_memory_bytes counts
        return _swaps_dense(c, si, other, s, own, A, B, Cc, sq, sm, cap)
    WORK["swap_elems"] += total
    rows = rws[np.repeat(np.arange(rws.size * ka) // ka, cnt)]
    first = np.cumsum(cnt) - cnt
    col = order[np.repeat(a.ravel(), cnt) + np.arange(total) - np.repeat(first, cnt)]
    sj = sj_all[col]
    gj = gj_all[col]
    sr = si[rows]
    d = sj - sr
    d2 = sj * sj - sr * sr
    nc = A[c] * (sq[c] + d2) + B[c] * (sm[c] + d) + Cc[c]
    ng = A[gj] * (sq[gj] - d2) + B[gj] * (sm[gj] - d) + Cc[gj]
    okw = (d < 0) & (sm[c] + d <= cap[c]) & (sm[gj] - d <= cap[gj])
    w2 = np.where(okw, np.maximum(nc, ng), np.inf)
    best = w2.min()
    if not np.isfinite(best):
        return np.inf, (0, 0)
    at = np.flatnonzero(w2 == best)
    pick = at[np.lexsort((col[at], rows[at]))[0]]
    return best, (int(rows[pick]), int(col[pick]))


def buddy_ranks(degrees: list[int], world: int) -> list[list[int]]:
    """Ranks per group: groups sorted by degree (largest first) take consecutive blocks, so every block is
    aligned to its degree (a buddy allocation) and a group of degree <= gpus_per_node stays inside a node when
    the degree divides the node size (always, for a power-of-two node; on nodes of 6 a degree-4 block can straddle
    two, and the cost model prices that degree inter-node).
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
