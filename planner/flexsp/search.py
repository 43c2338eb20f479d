"""Group-structure search for one micro-batch, on the real lengths.

The MILP of ../shared/papers/flexsp.md chooses which groups exist (m_p) and which sequences each runs (A_kp)
at once; the bucketed MILP does so on bucket means and its plan must then be re-packed on the real lengths,
where it may not fit in memory. :func:`structure_search` works on the first half directly: the group
structure (a multiset of power-of-two degrees with sum <= N) is improved by a local search whose neighbours
split one group of degree d into two of degree d/2 (or into d groups of degree 1), merge two groups of degree d
into one of 2d (or d groups of degree 1 into one of degree d), or add a group on idle GPUs; every neighbour is
scored by packing the real sequences onto it (LPT, then worst-fit when LPT does not fit, each improved by
:func:`local_search`), so every plan it returns is evaluated on the real lengths with the memory check of the
formulation (Mem_p <= E for every group). First improvement, until no neighbour improves; then again from a few
restart structures (:func:`seed_structures`), until the time / evaluation budget runs out.
"""
from __future__ import annotations

import time
from collections import Counter

import numpy as np

from .assign import WORK, MBSolution, evaluate, local_search, lpt_assign, worst_fit_assign
from .bounds import per_sequence_bounds
from .costmodel import SPCostModel

__all__ = ["structure_neighbours", "pack_fast", "seed_structures", "structure_search", "fill_across",
           "exchange_across"]


def _key(degrees) -> tuple[int, ...]:
    return tuple(sorted((int(d) for d in degrees), reverse=True))


def structure_neighbours(degrees, world: int) -> list[tuple[int, ...]]:
    """Structures one move away: split a group d -> (d/2, d/2) or into d groups of degree 1 (largest d first),
    merge two groups of degree d -> 2d, merge d groups of degree 1 into one of degree d (d = 4, 8, 16), add the
    largest power-of-two group that fits on idle GPUs. Sorted descending, no duplicates."""
    st = list(_key(degrees))
    cnt = Counter(st)
    out: list[tuple[int, ...]] = []
    for d in sorted(cnt, reverse=True):
        if d >= 2:
            rest = list(st)
            rest.remove(d)
            out.append(_key(rest + [d // 2, d // 2]))
            if d >= 4:
                out.append(_key(rest + [1] * d))
    for d in sorted(cnt):
        if cnt[d] >= 2 and 2 * d <= world:
            rest = list(st)
            rest.remove(d)
            rest.remove(d)
            out.append(_key(rest + [2 * d]))
    for d in (4, 8, 16):
        if d <= world and cnt[1] >= d:
            rest = list(st)
            for _ in range(d):
                rest.remove(1)
            out.append(_key(rest + [d]))
    free = world - sum(st)
    if free >= 1:
        g = 1
        while 2 * g <= free:
            g *= 2
        out.append(_key(st + [g]))
    seen, uniq = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    return uniq


def pack_fast(ids: np.ndarray, lens: np.ndarray, degrees, cm: SPCostModel, source: str,
              incumbent_ms: float = float("inf"), slack: float = 0.03) -> MBSolution | None:
    """Real packing of ``ids`` onto groups of ``degrees``: LPT; when it fits and is within ``slack`` of the
    incumbent it is improved by local search; when LPT does not fit, worst-fit (memory first) + local search.
    None if nothing fits."""
    degrees = list(degrees)
    if max(lens[ids]) > cm.token_capacity(max(degrees)):
        return None
    sol = lpt_assign(ids, lens, degrees, cm, source=source)
    if sol is not None and sol.fits:
        if sol.time_ms <= incumbent_ms * (1 + slack):
            sol = local_search(sol, lens, cm)
        return sol
    sol = worst_fit_assign(ids, lens, degrees, cm, source=source)
    if sol is None or not sol.fits:
        return None
    return local_search(sol, lens, cm)


def seed_structures(ids: np.ndarray, lens: np.ndarray, cm: SPCostModel) -> list[tuple[int, ...]]:
    """Restart points: the longest sequence on a group of 2x / 4x its smallest feasible degree with every
    other GPU a degree-1 group, then every single degree (N/d groups)."""
    n = cm.world
    out = []
    dmin = cm.min_degree(float(np.max(lens[ids])))
    if dmin is not None:
        for f in (2, 4):
            d = min(n, dmin * f)
            out.append(_key([d] + [1] * (n - d)))
    out += [_key([d] * (n // d)) for d in cm.degrees]
    return out


def structure_search(ids: np.ndarray, lens: np.ndarray, cm: SPCostModel, start: MBSolution,
                     deadline: float | None = None, max_evals: int | None = None,
                     source: str = "structure", restarts: bool = True) -> MBSolution:
    """Local search over the group structure starting from ``start`` (a fitting real solution of ``ids``),
    then (``restarts``) from each of :func:`seed_structures` while the budget lasts.
    ``deadline`` is a time.perf_counter() value; ``max_evals`` bounds the packings tried (deterministic runs).
    Returns ``start`` unless a strictly faster fitting plan is found."""
    ids = np.asarray(ids, dtype=np.int64)
    best = start
    seen = {_key(d for d, _ in start.groups)}
    evals = looks = 0

    def out_of_budget() -> bool:
        # (looks: 800 single-sequence micro-batches of ~300k tokens, none of which two fit together, had no re-packed
        # candidate at all and spent 10 s on the 640,000 pairs)
        return ((deadline is not None and time.perf_counter() >= deadline)
                or (max_evals is not None and (evals >= max_evals or looks >= EXCHANGE_LOOKS_PER_EVAL * max_evals)))

    def descend(cur: MBSolution) -> MBSolution:
        nonlocal evals
        improved = True
        while improved:
            improved = False
            for nb in structure_neighbours([d for d, _ in cur.groups], cm.world):
                if nb in seen:
                    continue
                if out_of_budget():
                    return cur
                seen.add(nb)
                evals += 1
                sol = pack_fast(ids, lens, nb, cm, source, incumbent_ms=cur.time_ms)
                if sol is not None and sol.fits and sol.time_ms < cur.time_ms - 1e-9:
                    cur = sol
                    improved = True
                    break
        return cur

    best = descend(best)
    if restarts:
        for st in seed_structures(ids, lens, cm):
            if out_of_budget():
                break
            if st in seen:
                continue
            seen.add(st)
            evals += 1
            sol = pack_fast(ids, lens, st, cm, source, incumbent_ms=best.time_ms)
            if sol is None or not sol.fits:
                continue
            sol = descend(sol)
            if sol.time_ms < best.time_ms - 1e-9:
                best = sol
    return best


#: deterministic fill: a donor with at most this many sequences per GPU gets the structure search's restarts (see
#: :func:`fill_across`); larger donors a descent from their structure only
FILL_RESTARTS_PER_GPU = 4


def _room(A, B, C, sq, sm, cap, limit: float) -> np.ndarray:
    """Per group (arrays of its alpha, beta, gamma, sum s^2, sum s, token capacity): an upper bound on the
    longest sequence it can take with time ``A (sq + s^2) + B (sm + s) + C <= limit`` and ``sm + s <= cap``
    (A, B >= 0). The exact test rounds: it can pass a length whose true time is a few ulps of ``limit`` above it,
    which in tokens is ~1e-16 limit / B - more than any fixed token margin when B is tiny against limit
    (B = 1e-12 ms/token, limit = 9e3 ms: 4661 passes, the bound without slack was 4660.8). So the time budget and
    the free tokens get 1e-12 relative slack on the terms they are computed from (far above float64's rounding),
    and the result 1e-9 relative + 1e-6 tokens."""
    scale = np.abs(limit) + np.abs(C) + A * sq + B * np.abs(sm)
    r = limit - C - A * sq - B * sm + 1e-12 * scale  # A s^2 + B s <= r
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.sqrt(B * B + 4.0 * A * np.maximum(r, 0.0))
        # the stable form of (-B + root) / (2 A): 2 r / (B + root); B = A = 0: any length when r >= 0
        t = np.where(B + root > 0, 2.0 * np.maximum(r, 0.0) / (B + root), np.inf)
    t = np.where(r < 0, -np.inf, t)
    free = cap - sm + 1e-12 * (np.abs(cap) + np.abs(sm))
    return np.minimum(t, free) * (1 + 1e-9) + 1e-6


def fill_across(mbs: list[MBSolution], lens: np.ndarray, cm: SPCostModel, deadline: float | None = None,
                max_evals: int | None = None, move_deadline: float | None = None) -> list[MBSolution]:
    """Use the idle time beside a micro-batch's critical group for sequences of the other micro-batches.

    A step's time is the sum of its micro-batches' makespans, and a micro-batch whose makespan is set by one
    long sequence on a big group leaves its other groups idle for part of it. For each receiver (slowest
    first), sequences of every other micro-batch (longest first) move into the receiver's group that they
    fill best while that group stays within the receiver's makespan and within memory (Mem_p <= E); so the
    receiver's makespan is unchanged and every donor only loses work; the receiver's idle GPUs count as empty
    groups (largest power of two first), so a micro-batch that leaves GPUs idle can take whole sequences. Donors
    are then rebalanced by :func:`local_search` and :func:`structure_search` (a few structures always for a donor
    left with <= 8 sequences, more until ``deadline`` or, deterministic, up to ``max_evals``, with restarts only
    on a small donor); a donor left empty is dropped (one b1 less). The split is then no longer consecutive
    runs of the sorted order; every plan is still evaluated on the real lengths.
    ``move_deadline``: the moves themselves (receiver x donor pairs) stop there (None: all pairs); the planner gives
    them a budget of their own after the searches, whose ``deadline`` has usually passed by then.
    Returns the input unless the step's total time strictly drops."""
    if len(mbs) < 2:
        return mbs
    cur = [MBSolution([(d, list(ids)) for d, ids in mb.groups], time_ms=mb.time_ms, source=mb.source,
                      fits=mb.fits, extra=dict(mb.extra)) for mb in mbs]
    if not all(mb.fits for mb in cur):
        return mbs
    total0 = sum(mb.time_ms for mb in mbs)
    for a in sorted(range(len(cur)), key=lambda r: -cur[r].time_ms):
        if move_deadline is not None and time.perf_counter() >= move_deadline:
            break  # (its receiver x donor pairs, quadratic in the micro-batches, had no bound)
        rec = cur[a]
        if not rec.groups:
            continue
        # up to (not beyond) the receiver's makespan: a sequence that finishes with it still leaves its donor
        limit = rec.time_ms * (1 + 1e-12)
        deg = [d for d, _ in rec.groups]
        members = [list(ids) for _, ids in rec.groups]
        # the receiver's idle GPUs become empty groups (largest power of two first) that may take sequences too
        # (5 equal sequences on 4 GPUs: 3 + 2 by tokens -> 4 + 1, the 4th on the GPU the first left idle)
        free = cm.world - sum(deg)
        while free > 0:
            deg.append(1 << (free.bit_length() - 1))
            members.append([])
            free -= deg[-1]
        co = np.array([cm.coeffs(d) for d in deg], dtype=np.float64)
        A, Bc, Cc = co[:, 0], co[:, 1], co[:, 2]
        cap = np.array([cm.token_capacity(d) for d in deg])
        sq = np.array([float(np.dot(lens[ids], lens[ids].astype(np.float64))) for ids in members])
        sm = np.array([float(lens[ids].sum()) for ids in members])
        changed = False
        for b in range(len(cur)):
            if b == a or not cur[b].groups:
                continue
            if move_deadline is not None and time.perf_counter() >= move_deadline:
                break
            donor = cur[b]
            moved: set[int] = set()
            d_ids = np.asarray(donor.seq_ids(), dtype=np.int64)
            d_ids = d_ids[np.argsort(-lens[d_ids], kind="stable")]  # longest first (ties: donor order)
            neg_s = -lens[d_ids].astype(np.float64)  # ascending
            # a sequence longer than every group's room (time and memory, :func:`_room`) fits nowhere: skipped
            # without evaluating it (the rooms only shrink as sequences move in); the rest are checked exactly
            room = _room(A, Bc, Cc, sq, sm, cap, limit)
            pos = tried = 0
            while pos < d_ids.size:
                pos = max(pos, int(np.searchsorted(neg_s, -float(room.max()), side="left")))
                if pos >= d_ids.size:
                    break
                i = int(d_ids[pos])
                pos += 1
                tried += 1
                s = float(lens[i])
                new = A * (sq + s * s) + Bc * (sm + s) + Cc
                ok = (new <= limit) & (sm + s <= cap)
                if not ok.any():
                    continue
                g = int(np.argmax(np.where(ok, new, -np.inf)))  # best fit: the fullest group that still fits
                members[g].append(i)
                sq[g] += s * s
                sm[g] += s
                room[g] = _room(A[g:g + 1], Bc[g:g + 1], Cc[g:g + 1], sq[g:g + 1], sm[g:g + 1], cap[g:g + 1], limit)[0]
                moved.add(i)
            WORK["fill_evals"] += tried
            if not moved:
                continue
            changed = True
            left = [(d, [i for i in ids if i not in moved]) for d, ids in donor.groups]
            nd = evaluate(MBSolution(left, source=donor.source), lens, cm)
            if nd.groups:
                nd = local_search(nd, lens, cm)
                ids_b = np.array(sorted(nd.seq_ids(), key=lambda i: (int(lens[i]), i)), dtype=np.int64)
                # a donor left with a few sequences gets a few structures whatever the clock says (one sequence
                # left on a degree-2 group wants all GPUs; cheap at that size, and deterministic), then any donor
                # more while the deadline allows
                if ids_b.size <= 8:
                    nd = structure_search(ids_b, lens, cm, nd, max_evals=6, source=donor.source)
                if max_evals is not None:
                    # restarts only for a small donor (<= FILL_RESTARTS_PER_GPU sequences per GPU), else a descent
                    # from the donor's structure: on a large donor (about 1,000 Wikipedia sequences on 64 degree-1
                    # groups) the descent stops after a few structures and the restarts spent the rest of the budget
                    # walking back from a single-degree structure one group at a time, finding nothing better - most
                    # of --deterministic's time on large batches (5,000 sequences: 251 -> 41 s CPU, same plan; 36
                    # steps checked, test_flexsp_speed.py); on small donors (the tests' tiny cost model) a restart
                    # sometimes finds a better structure (steps up to 1.6 % slower with no restarts at all)
                    nd = structure_search(ids_b, lens, cm, nd, max_evals=max_evals, source=donor.source,
                                          restarts=ids_b.size <= FILL_RESTARTS_PER_GPU * cm.world)
                elif deadline is not None and time.perf_counter() < deadline:
                    nd = structure_search(ids_b, lens, cm, nd, deadline=deadline, source=donor.source)
            cur[b] = nd
        if changed:
            cur[a] = evaluate(MBSolution([(deg[g], members[g]) for g in range(len(deg))],
                                         source=rec.source if "fill" in rec.source else rec.source + "+fill",
                                         extra=dict(rec.extra)), lens, cm)
    cur = [mb for mb in cur if mb.groups]
    if not all(mb.fits for mb in cur) or sum(mb.time_ms for mb in cur) >= total0 - 1e-9:
        return mbs
    return cur


#: :func:`exchange_across` tries every split of two micro-batches that hold at most this many sequences together
#: (2^(n-1) splits, each length multiset once, most screened out by the lower bound)
EXCHANGE_RESPLIT = 12


#: deterministic :func:`exchange_across`: pairs and candidates looked at (screened or not) per re-packed candidate
#: of its budget
EXCHANGE_LOOKS_PER_EVAL = 200
#: micro-batches of at most this many sequences are packed exactly (:func:`exact_pack`) by :func:`exchange_across`
EXACT_PACK_MAX = 8
#: :func:`exact_pack`'s search nodes per call (an unproven search returns its best)
EXACT_PACK_NODES = 20_000


def exact_pack(ids: np.ndarray, lens: np.ndarray, degrees, cm: SPCostModel, source: str,
               below: float = float("inf")) -> MBSolution | None:
    """The fastest assignment of ``ids`` to groups of ``degrees`` within memory, by depth-first search (longest
    sequence first; a group's time only grows as sequences join it, so a branch stops at the incumbent; of the
    empty groups of one degree only the first is tried). Only plans faster than ``below`` are returned (None:
    none found within EXACT_PACK_NODES nodes). LPT and worst-fit miss tight memory packings: 6 sequences of
    330-1340 tokens on groups of 2, 1, 1 GPUs (3000, 1500, 1500 tokens) fit only one way, which neither finds."""
    degrees = list(degrees)
    order = sorted((int(i) for i in ids), key=lambda i: (-int(lens[i]), i))
    s = [float(lens[i]) for i in order]
    co = [cm.coeffs(d) for d in degrees]
    cap = [cm.token_capacity(d) for d in degrees]
    k = len(degrees)
    sq, sm = [0.0] * k, [0.0] * k
    cnt = [0] * k
    own = [0] * len(order)
    best = [below, None]
    nodes = [0]

    def t(g: int) -> float:
        a, b, c = co[g]
        return a * sq[g] + b * sm[g] + c

    def place(j: int, cur: float) -> None:
        if j == len(order):
            best[0], best[1] = cur, list(own)
            return
        x = s[j]
        empty_seen = set()
        for g in range(k):
            if nodes[0] >= EXACT_PACK_NODES:
                return
            if cnt[g] == 0:
                if degrees[g] in empty_seen:
                    continue
                empty_seen.add(degrees[g])
            if sm[g] + x > cap[g]:
                continue
            sq[g] += x * x
            sm[g] += x
            cnt[g] += 1
            tg = t(g)
            if max(cur, tg) < best[0] - 1e-12:
                nodes[0] += 1
                own[j] = g
                place(j + 1, max(cur, tg))
            sq[g] -= x * x
            sm[g] -= x
            cnt[g] -= 1

    place(0, 0.0)
    if best[1] is None:
        return None
    groups = [(degrees[g], [order[j] for j in range(len(order)) if best[1][j] == g]) for g in range(k)]
    sol = evaluate(MBSolution(groups, source=source), lens, cm)
    return sol if sol.fits and sol.time_ms < below else None


def exchange_across(mbs: list[MBSolution], lens: np.ndarray, cm: SPCostModel, deadline: float | None = None,
                    max_evals: int | None = None) -> list[MBSolution]:
    """Move one sequence to another micro-batch, or swap two sequences of two micro-batches, or (two holding at
    most EXCHANGE_RESPLIT sequences) split the two anew, where the two re-packed micro-batches take less time
    together; first improvement, slowest micro-batch first, until no candidate of any pair improves or the budget
    runs out: ``deadline`` (a time.perf_counter() value), or (deterministic) ``max_evals`` re-packed candidates and
    EXCHANGE_LOOKS_PER_EVAL times as many pairs and candidates looked at (screened out or not).

    :func:`fill_across` only moves sequences into a receiver's idle time, and the splits it starts from are sorted
    runs or packed bins, so a step whose best split is neither stayed above it: 7 sequences in 2 micro-batches
    5.7 % above the brute-force optimum, which here puts 6 of them on all GPUs at once and the 7th alone (moves),
    or exchanges the longest sequence of the slower micro-batch for a shorter one (a swap). A candidate is
    re-packed only when a lower bound (every sequence's cheapest work spread over the GPUs, and the slowest sequence
    alone) of the two micro-batches leaves room below their current time: by :func:`pack_fast` on its own structure,
    the other micro-batch's and (at most FILL_RESTARTS_PER_GPU sequences per GPU) :func:`seed_structures`, and for
    at most EXACT_PACK_MAX sequences by :func:`exact_pack` on the same structures; sequences of equal length are
    tried once, and two single-sequence micro-batches are not swapped (a relabelling). A micro-batch
    emptied by a move is dropped (one constant less). Returns the input unless the step's total time strictly
    drops; every returned micro-batch fits."""
    if len(mbs) < 2 or not all(mb.fits for mb in mbs):
        return mbs
    cur = [MBSolution([(d, list(ids)) for d, ids in mb.groups], time_ms=mb.time_ms, source=mb.source,
                      fits=mb.fits, extra=dict(mb.extra)) for mb in mbs]
    total0 = sum(mb.time_ms for mb in cur)
    work, alone = per_sequence_bounds(lens, cm)
    s_all = lens.astype(np.float64)
    cap_n = cm.token_capacity(cm.world)
    evals = looks = 0

    def out_of_budget() -> bool:
        # (looks: 800 single-sequence micro-batches of ~300k tokens, none of which two fit together, had no re-packed
        # candidate at all and spent 10 s on the 640,000 pairs)
        return ((deadline is not None and time.perf_counter() >= deadline)
                or (max_evals is not None and (evals >= max_evals or looks >= EXCHANGE_LOOKS_PER_EVAL * max_evals)))

    def bound(w_sum: float, slowest: float) -> float:
        return max(cm.b1 + w_sum / cm.world, slowest)

    def repack(ids: list[int], own: MBSolution, other: MBSolution, limit: float) -> MBSolution | None:
        """The fastest fitting packing of ``ids`` on ``own``'s structure, ``other``'s, or (at most
        FILL_RESTARTS_PER_GPU sequences per GPU) a seed structure; None: none fits."""
        if not ids:
            return MBSolution([], time_ms=0.0, source=own.source)
        arr = np.array(sorted(ids, key=lambda i: (int(lens[i]), i)), dtype=np.int64)
        best = None
        structures = [_key(d for d, _ in own.groups)]
        if other.groups and _key(d for d, _ in other.groups) not in structures:
            structures.append(_key(d for d, _ in other.groups))
        if arr.size <= FILL_RESTARTS_PER_GPU * cm.world:  # (larger ones: 11 ms a candidate on 64 GPUs, rarely won)
            structures += [st for st in seed_structures(arr, lens, cm) if st not in structures]
        for st in structures:
            sol = pack_fast(arr, lens, st, cm, own.source, incumbent_ms=min(limit, best.time_ms if best else limit))
            if sol is not None and sol.fits and (best is None or sol.time_ms < best.time_ms - 1e-12):
                best = sol
        if arr.size <= EXACT_PACK_MAX:  # a few sequences: the best assignment on each structure, not LPT's
            for st in structures:
                sol = exact_pack(arr, lens, st, cm, own.source, below=best.time_ms if best else limit)
                if sol is not None and (best is None or sol.time_ms < best.time_ms - 1e-12):
                    best = sol
        return best

    def candidates(a: int, b: int):
        """New (a, b) contents: single moves a -> b (longest first), swaps of a longer sequence of a for a shorter
        one of b (one sequence per distinct length), then, when the two hold at most EXCHANGE_RESPLIT sequences,
        every other split of them in two (each multiset of lengths once)."""
        ids_a, ids_b = cur[a].seq_ids(), cur[b].seq_ids()
        tok_a, tok_b = float(s_all[ids_a].sum()), float(s_all[ids_b].sum())
        rep_a = {int(lens[i]): i for i in sorted(ids_a, reverse=True)}
        rep_b = {int(lens[j]): j for j in sorted(ids_b, reverse=True)}
        la, lb = sorted(rep_a, reverse=True), sorted(rep_b)
        for x in la:
            if tok_b + x <= cap_n:
                i = rep_a[x]
                yield [k for k in ids_a if k != i], ids_b + [i]
        if len(ids_a) == 1 and len(ids_b) == 1:
            return  # (a swap would relabel the two; a re-split of two is the move above)
        for x in la:
            for y in lb:
                if y >= x:
                    break
                if tok_b + x - y <= cap_n and tok_a - x + y <= cap_n:
                    i, j = rep_a[x], rep_b[y]
                    yield [k for k in ids_a if k != i] + [j], [k for k in ids_b if k != j] + [i]
        both = sorted(ids_a + ids_b, key=lambda k: (-int(lens[k]), k))
        if a > b or len(both) > EXCHANGE_RESPLIT:  # (b, a) splits the same pair
            return
        seen = set()
        n = len(both)
        for mask in range(1 << (n - 1)):  # the longest sequence stays in b: each split once
            new_a = [both[k + 1] for k in range(n - 1) if mask >> k & 1]
            new_b = [both[0]] + [both[k + 1] for k in range(n - 1) if not mask >> k & 1]
            key = tuple(int(lens[k]) for k in new_a)
            if key in seen:
                continue
            seen.add(key)
            if float(s_all[new_a].sum()) <= cap_n and float(s_all[new_b].sum()) <= cap_n:
                yield new_a, new_b

    improved = True
    while improved and not out_of_budget():
        improved = False
        for a in sorted(range(len(cur)), key=lambda r: (-cur[r].time_ms, r)):
            for b in range(len(cur)):
                if b == a:
                    continue
                before = cur[a].time_ms + cur[b].time_ms
                looks += 1
                for new_a, new_b in candidates(a, b):
                    looks += 1
                    if out_of_budget():
                        break
                    lb_a = bound(float(work[new_a].sum()), float(alone[new_a].max())) if new_a else 0.0
                    lb_b = bound(float(work[new_b].sum()), float(alone[new_b].max())) if new_b else 0.0
                    if lb_a + lb_b >= before - 1e-9:
                        continue
                    evals += 1
                    pb = repack(new_b, cur[b], cur[a], before - lb_a)
                    if pb is None or pb.time_ms + lb_a >= before - 1e-9:
                        continue
                    pa = repack(new_a, cur[a], cur[b], before - pb.time_ms)
                    if pa is None or pa.time_ms + pb.time_ms >= before - 1e-9:
                        continue
                    cur[a], cur[b] = pa, pb
                    improved = True
                    break
                if improved or out_of_budget():
                    break
            if improved or out_of_budget():
                break
        cur = [mb for mb in cur if mb.groups]
        if len(cur) < 2:
            break
    if not all(mb.fits for mb in cur) or sum(mb.time_ms for mb in cur) >= total0 - 1e-9:
        return mbs
    return cur
