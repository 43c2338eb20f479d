"""The planner's fast paths give the same answers as the straightforward forms they replace, on random instances
with many ties and tight memory, and on a large global batch they do a fraction of the slow forms' work.

- lpt_assign (a heap per degree) vs a pass over all groups per sequence (the former implementation, below);
- local_search's pruned swap search vs the full swap matrix (``PRUNE_FROM``);
- evaluate's all-groups-at-once sums vs SPCostModel.group_time / fits per group;
- fill_across's skip of sequences longer than every group's room vs evaluating every sequence."""
import numpy as np
import pytest

import adasched.planner.flexsp.assign as asg
import adasched.planner.flexsp.search as srch
from adasched.planner.flexsp.assign import MBSolution, evaluate, local_search, lpt_assign

from adasched.planner.flexsp.oracle import tiny_cost_model


def lpt_reference(ids, lens, degrees, cm):
    """Longest first, each to the group (of any degree) that would finish earliest with memory room, first index on
    ties: a full pass over the groups per sequence."""
    order = np.asarray(ids)[np.argsort(-lens[np.asarray(ids)], kind="stable")]
    co = np.array([cm.coeffs(d) for d in degrees], dtype=np.float64)
    cap = np.array([cm.token_capacity(d) for d in degrees])
    load, tok, used = np.zeros(len(degrees)), np.zeros(len(degrees)), np.zeros(len(degrees), dtype=bool)
    members = [[] for _ in degrees]
    for i in order:
        asg.WORK["lpt_looks"] += len(degrees)  # every group looked at
        s = float(lens[i])
        t = load + co[:, 0] * (s * s) + co[:, 1] * s + np.where(used, 0.0, co[:, 2])
        t[tok + s > cap] = np.inf
        g = int(np.argmin(t))
        if not np.isfinite(t[g]):
            return None
        load[g], used[g] = t[g], True
        tok[g] += s
        members[g].append(int(i))
    return evaluate(MBSolution([(d, m) for d, m in zip(degrees, members)]), lens, cm)


def _instance(rng):
    world = int(rng.choice([4, 8, 16]))
    cm = tiny_cost_model(world=world, gpus_per_node=4, cap_tokens=float(rng.choice([300, 1500, 5000])))
    n = int(rng.integers(1, 160))
    lens = rng.integers(1, int(rng.choice([3, 40, 1200])), n + 5)  # 3: nearly all equal (ties everywhere)
    degs, free = [], world
    while free and rng.random() < 0.97:  # sometimes GPUs left idle
        degs.append(int(rng.choice([d for d in cm.degrees if d <= free])))
        free -= degs[-1]
    degs = degs or [1]
    rng.shuffle(degs)
    return cm, lens, degs, rng.permutation(n + 5)[:n]


def test_lpt_assign_equals_the_full_pass():
    rng = np.random.default_rng()
    none = 0
    for _ in range(500):
        cm, lens, degs, ids = _instance(rng)
        got, want = lpt_assign(ids, lens, list(degs), cm), lpt_reference(ids, lens, list(degs), cm)
        if want is None:
            none += 1
            assert got is None
            continue
        assert got.groups == want.groups and got.time_ms == want.time_ms and got.fits == want.fits
    assert 0 < none < 500  # both outcomes were exercised


def test_pruned_swaps_equal_the_full_swap_matrix(monkeypatch):
    rng = np.random.default_rng()
    for _ in range(250):
        cm, lens, degs, ids = _instance(rng)
        own = rng.integers(0, len(degs), ids.size)
        start = evaluate(MBSolution([(d, [int(i) for i in ids[own == g]]) for g, d in enumerate(degs)]), lens, cm)
        monkeypatch.setattr(asg, "PRUNE_FROM", 0)  # every swap search pruned
        pruned = local_search(start, lens, cm)
        monkeypatch.setattr(asg, "PRUNE_FROM", 10 ** 18)  # none
        full = local_search(start, lens, cm)
        assert pruned.groups == full.groups and pruned.time_ms == full.time_ms


@pytest.mark.parametrize("chunk", [1, 3, 17])
def test_swaps_in_blocks_equal_one_matrix(monkeypatch, chunk):
    """(33rd session) the full swap matrix is evaluated in blocks of rows of at most SWAP_CHUNK_PAIRS pairs: the
    same moves and tie-breaks as one matrix, the pruned search (which falls back to it above the bound) too."""
    rng = np.random.default_rng()
    for _ in range(120):
        cm, lens, degs, ids = _instance(rng)
        own = rng.integers(0, len(degs), ids.size)
        start = evaluate(MBSolution([(d, [int(i) for i in ids[own == g]]) for g, d in enumerate(degs)]), lens, cm)
        monkeypatch.setattr(asg, "PRUNE_FROM", 10 ** 18)
        monkeypatch.setattr(asg, "SWAP_CHUNK_PAIRS", 10 ** 12)
        one = local_search(start, lens, cm)
        monkeypatch.setattr(asg, "SWAP_CHUNK_PAIRS", chunk)
        blocks = local_search(start, lens, cm)
        monkeypatch.setattr(asg, "PRUNE_FROM", 0)
        pruned = local_search(start, lens, cm)
        assert blocks.groups == one.groups == pruned.groups and blocks.time_ms == one.time_ms == pruned.time_ms


def test_pruned_swaps_with_huge_lengths(monkeypatch):
    """Lengths near 2**60: the (group, length) keys would overflow int64, so the search stays the full matrix."""
    rng = np.random.default_rng()
    cm = tiny_cost_model(world=8, cap_tokens=1e20)
    for _ in range(20):
        lens = rng.integers(2 ** 59, 2 ** 60, 40)
        own = rng.integers(0, 4, 40)
        start = evaluate(MBSolution([(2, [int(i) for i in np.flatnonzero(own == g)]) for g in range(4)]), lens, cm)
        monkeypatch.setattr(asg, "PRUNE_FROM", 0)
        pruned = local_search(start, lens, cm)
        monkeypatch.setattr(asg, "PRUNE_FROM", 10 ** 18)
        full = local_search(start, lens, cm)
        assert pruned.groups == full.groups and pruned.time_ms == full.time_ms


def test_evaluate_equals_group_time_and_fits():
    rng = np.random.default_rng()
    for _ in range(300):
        cm, lens, degs, ids = _instance(rng)
        own = rng.integers(0, len(degs), ids.size)
        groups = [(d, [int(i) for i in ids[own == g]]) for g, d in enumerate(degs)]
        sol = evaluate(MBSolution(groups), lens, cm)
        kept = [(d, g) for d, g in groups if g]
        assert sol.groups == kept
        assert sol.time_ms == (max(cm.group_time(d, lens[g]) for d, g in kept) if kept else 0.0)
        assert sol.fits == (all(cm.fits(d, lens[g]) for d, g in kept) and sum(d for d, _ in kept) <= cm.world)


def test_fill_skips_only_sequences_that_fit_nowhere(monkeypatch):
    """fill_across with the room test equals fill_across evaluating every donor sequence."""
    from adasched.planner.flexsp.planner import PlannerConfig, plan_step

    rng = np.random.default_rng()
    checked = 0
    for _ in range(12):
        cm = tiny_cost_model(world=int(rng.choice([4, 8])), cap_tokens=float(rng.choice([800, 1500])))
        lens = np.minimum(rng.integers(1, 1400, int(rng.integers(10, 40))), int(cm.token_capacity(cm.world)))
        r = plan_step(lens, cm, PlannerConfig(use_milp=False, max_evals=5, local_search=True))
        mbs = [MBSolution([(d, list(ids)) for d, ids in mb.groups], time_ms=mb.time_ms) for mb in r.micro_batches]
        if len(mbs) < 2:
            continue
        checked += 1
        got = srch.fill_across(mbs, lens, cm, max_evals=5)
        with monkeypatch.context() as m:
            m.setattr(srch, "_room", lambda A, *a: np.full(A.shape, np.inf))  # nothing skipped
            want = srch.fill_across(mbs, lens, cm, max_evals=5)
        assert [(g.groups, g.time_ms) for g in got] == [(w.groups, w.time_ms) for w in want]
    assert checked >= 3


def test_room_bounds_the_longest_sequence_a_group_takes():
    """_room is at least the longest length that passes the fill's exact test (and not far above it)."""
    rng = np.random.default_rng()
    for _ in range(200):
        A, B, C = rng.uniform(0, 1e-4), rng.uniform(0, 0.05), rng.uniform(0, 5)
        if rng.random() < 0.2:
            A = 0.0
        sq, sm, cap = rng.uniform(0, 1e6), rng.uniform(0, 2e3), rng.uniform(1, 4e3)
        limit = rng.uniform(0, 200)
        room = srch._room(*(np.array([x]) for x in (A, B, C, sq, sm, cap)), limit)[0]
        s = np.arange(0, 5000, dtype=np.float64)
        ok = (A * (sq + s * s) + B * (sm + s) + C <= limit) & (sm + s <= cap)
        if not ok.any():  # not even an empty sequence: no room
            assert room < 1e-5
            continue
        longest = s[ok].max()
        assert room >= longest
        if longest < s[-1]:  # the next integer length fails: the room is below it (up to the margin)
            assert room < longest + 1 + 1e-6 * longest + 1e-5


def test_room_bounds_with_tiny_beta_and_a_limit_ulps_away():
    """The exact test rounds: with B tiny against the limit a length can pass although its true time is a few ulps
    above the limit; _room must still bound it (these four were missed: the room was ~0.2 token short)."""
    cases = [(0.0, 2.8607061722742376e-12, 8994.21318661195, 0.0, 0.0, 8994.213186625284),
             (0.0, 1.2200053295399e-12, 5906.251378053393, 29976948834.0, 415527.0, 5906.251378568389),
             (0.0, 2.07193892286092e-12, 8343.365997836143, 50682191.0, 9023.0, 8343.365999016412),
             (0.0, 1.1437127406869873e-12, 2592.297353232618, 257040.0, 918.0, 2592.2973532393294)]
    rng = np.random.default_rng()
    for _ in range(3000):
        A = 10 ** rng.uniform(-14, -4) if rng.random() < 0.8 else 0.0
        B, C = 10 ** rng.uniform(-12, -1), 10 ** rng.uniform(-1, 4)
        sm = float(rng.integers(0, 10 ** int(rng.integers(1, 7))))
        sq = sm * float(rng.integers(1, int(sm) + 2))
        s0 = float(rng.integers(1, 3000))  # the limit: the time with one more sequence of s0 tokens, as the fill's
        cases.append((A, B, C, sq, sm, (A * (sq + s0 * s0) + B * (sm + s0) + C) * (1 + 1e-12)))
    checked = 0
    for A, B, C, sq, sm, limit in cases:
        room = srch._room(*(np.array([x]) for x in (A, B, C, sq, sm, np.inf)), limit)[0]
        if not room < 1e7:
            continue
        s = np.arange(max(0, int(room) - 3), int(room) + 3000, dtype=np.float64)
        ok = A * (sq + s * s) + B * (sm + s) + C <= limit
        assert not ok.any() or s[ok].max() <= room, (A, B, C, sq, sm, limit, room, s[ok].max())
        checked += 1
    assert checked >= 1000
    # memory: the free tokens get slack too (a capacity beyond 2**53 rounds sm + s)
    cap, sm = 2.0 ** 60 + 2.0 ** 8, 2.0 ** 60 - 2.0 ** 8
    room = srch._room(*(np.array([x]) for x in (0.0, 0.0, 0.0, 0.0, sm, cap)), 1.0)[0]
    s = np.arange(0, 2 ** 12, dtype=np.float64)
    assert s[sm + s <= cap].max() <= room


def test_a_large_global_batch_keeps_its_fast_paths(monkeypatch):
    """3,000 sequences of the packaged Wikipedia sample on the 64-GPU A100 profile, heuristics in deterministic
    mode (bounded by work, not the clock; max_evals=0: no structure search, whose packings are the same LPT and
    local search again): the fast paths' units of work (asg.WORK) against the slow forms' on the same plan, a
    count that does not depend on the machine. On 2026-11-29: LPT group looks 224,510 vs 3,553,937 (16x; 112,977,
    31x, once lpt_assign replaced the chosen top entry in place instead of leaving it stale above the new one), swap
    search elements 16.8 M vs 155 M (9.3x), fill exact tests 1,236 vs 121,217 (98x); CPU 4.3 s vs 14.4 s on this
    2-core machine, loaded (how fast is BENCHMARKS' business, not a test's). The bounds (20x, 5x, 20x) fail with
    PRUNE_FROM = 10 ** 18, without the fill's skip, or with lpt_assign's heap walk not stopping at the first later
    finish, or with its top left stale (16x)."""
    from importlib import resources

    import adasched.planner.flexsp.baselines as bl
    from adasched.planner.flexsp.api import load_lengths
    from adasched.planner.flexsp.batching import draw_batches
    from adasched.planner.flexsp.costmodel import sp_cost_model
    from adasched.planner.flexsp.planner import PlannerConfig, plan_step
    from adasched.profiler.profile import load_profile

    lens = load_lengths(str(resources.files("adasched.planner.flexsp").joinpath("data/wikipedia-sample.txt")),
                        393216)
    cm = sp_cost_model(load_profile("a100-64-flexsp-paper"), "gpt-7b", 64)
    batch = draw_batches(lens, 3000, 1, 0)[0]
    cfg = PlannerConfig(use_milp=False, max_evals=0, seed=0)

    def run():
        asg.WORK.update(dict.fromkeys(asg.WORK, 0))
        r = plan_step(batch, cm, cfg)
        return r, dict(asg.WORK)

    def full_pass(ids, lens, degrees, cm, source="lpt"):
        sol = lpt_reference(ids, lens, degrees, cm)
        if sol is not None:
            sol.source = source
        return sol

    fast, n_fast = run()
    with monkeypatch.context() as m:  # every fast path off: the same answers, more work
        m.setattr(asg, "PRUNE_FROM", 10 ** 18)
        m.setattr(srch, "_room", lambda A, *a: np.full(A.shape, np.inf))
        for mod in (asg, srch, bl):
            m.setattr(mod, "lpt_assign", full_pass)
        slow, n_slow = run()
    assert fast.memory_violations == 0 and fast.time_ms <= fast.baselines_ms["best_homogeneous"]
    assert slow.time_ms == fast.time_ms and [mb.groups for mb in slow.micro_batches] == \
        [mb.groups for mb in fast.micro_batches]
    assert n_fast["lpt_looks"] * 20 < n_slow["lpt_looks"], (n_fast, n_slow)
    assert n_fast["swap_elems"] * 5 < n_slow["swap_elems"], (n_fast, n_slow)
    assert n_fast["fill_evals"] * 20 < n_slow["fill_evals"], (n_fast, n_slow)
    assert n_fast["fill_evals"] > 0  # the fill ran


def test_fill_restarts_only_small_donors(monkeypatch):
    """Deterministic mode: the fill's structure search restarts only on donors of <= FILL_RESTARTS_PER_GPU sequences
    per GPU (larger ones descend from their structure). Same plans as with restarts on every donor on a Wikipedia
    step whose donors are larger (512 sequences, 16 GPUs, 5 micro-batches), packing 129 structures instead of 349; the
    same on 36 Wikipedia steps of 128-5,000 sequences (8-64 GPUs, 3 models, 2 profiles) and 120 random tiny instances
    (checked on 2026-11-29)."""
    from importlib import resources

    from adasched.planner.flexsp.api import load_lengths
    from adasched.planner.flexsp.batching import draw_batches
    from adasched.planner.flexsp.costmodel import sp_cost_model
    from adasched.planner.flexsp.planner import PlannerConfig, plan_step
    from adasched.profiler.profile import load_profile

    lens = load_lengths(str(resources.files("adasched.planner.flexsp").joinpath("data/wikipedia-sample.txt")),
                        393216)
    cm = sp_cost_model(load_profile("a100-64-flexsp-paper"), "gpt-7b", 16)
    batch = draw_batches(lens, 512, 1, 1)[0]
    packed = [0]
    pack = srch.pack_fast

    def counted(*a, **k):
        packed[0] += 1
        return pack(*a, **k)

    monkeypatch.setattr(srch, "pack_fast", counted)
    # the fill's packings only: the exchange after it (exchange_across) packs candidates of its own
    import adasched.planner.flexsp.planner as planner_mod
    monkeypatch.setattr(planner_mod, "exchange_across", lambda mbs, *a, **k: mbs)

    def run(per_gpu):
        monkeypatch.setattr(srch, "FILL_RESTARTS_PER_GPU", per_gpu)
        packed[0] = 0
        r = plan_step(batch, cm, PlannerConfig(use_milp=False, max_evals=100))
        return r, packed[0]

    (fast, n_fast), (slow, n_slow) = run(srch.FILL_RESTARTS_PER_GPU), run(10 ** 9)
    assert fast.chosen_m > 1 and any("fill" in mb.source for mb in fast.micro_batches)
    assert fast.time_ms == slow.time_ms and [mb.groups for mb in fast.micro_batches] == \
        [mb.groups for mb in slow.micro_batches]
    assert n_fast * 2 < n_slow, (n_fast, n_slow)


def test_first_feasible_microbatch_count_by_bisection(monkeypatch):
    """Sequences of 2,700 and 3,300 tokens on 4 GPUs holding 6,000: sorted runs fit only when every 3,300 is alone,
    so the first feasible M is 3n/4 while M_min is n/2. The planner split the batch once per M up to it (101 splits,
    ~11 s on 400 such sequences); now it bisects, and the splits it plans are the same: the first feasible M, then
    up to M_min + extra_microbatches."""
    import adasched.planner.flexsp.planner as pl
    from adasched.planner.flexsp.batching import split_microbatches
    from adasched.planner.flexsp.planner import PlannerConfig, plan_step

    cm = tiny_cost_model(world=4, cap_tokens=1500.0)
    cap = cm.token_capacity(4)
    rng = np.random.default_rng()
    real = pl._heuristics
    for n in (8, 40, 120):
        lens = rng.permutation(np.array([2700, 3300] * (n // 2), dtype=np.int64))
        assert cap >= 6000 and 2 * 3300 > cap
        srt = np.sort(lens)
        m_min = int(np.ceil(lens.sum() / cap - 1e-12))
        first = next(m for m in range(m_min, n + 1)
                     if all(srt[a:b].sum() <= cap for a, b in split_microbatches(srt, m)))
        assert first == 3 * n // 4 and m_min == n // 2
        calls, planned = [], []
        monkeypatch.setattr(pl, "split_microbatches", lambda s, m: calls.append(m) or split_microbatches(s, m))
        monkeypatch.setattr(pl, "_heuristics", lambda per_m, split, *a: planned.append(split[0]) or real(per_m, split, *a))
        cfg = PlannerConfig(use_milp=False, max_evals=5, seed=0)
        r = plan_step(lens, cm, cfg)
        assert sorted(i for mb in r.micro_batches for i in mb.seq_ids()) == list(range(n))
        sorted_ms = [int(x.split("-")[1]) for x in planned if x.startswith("sorted-")]
        assert sorted_ms and sorted_ms[0] == first and sorted_ms == list(range(first, first + len(sorted_ms)))
        assert max(sorted_ms) <= max(first, m_min + cfg.extra_microbatches)
        assert len(calls) <= 2 * int(np.ceil(np.log2(n))) + 2 + len(sorted_ms), (n, calls)


def test_clock_mode_fill_moves_get_a_budget_of_their_own(monkeypatch):
    """The fill's moves were cut at the searches' deadline, which they have usually spent by then: the fill was
    skipped and steps came out 0.2-0.7 % slower. The moves now get --time-limit of their own, started when the fill
    starts (and still stop there: ~200 micro-batches spent 22 s in them at a 1 s limit)."""
    import time

    import adasched.planner.flexsp.planner as pl
    from adasched.planner.flexsp.planner import PlannerConfig, plan_step

    cm = tiny_cost_model(world=8, gpus_per_node=4, cap_tokens=1500.0)
    lens = np.random.default_rng(11).integers(20, 2500, 60)
    real, left = pl.fill_across, []

    def spy(mbs, lens_, cm_, **kw):
        left.append(kw["move_deadline"] - time.perf_counter())
        return real(mbs, lens_, cm_, **kw)

    monkeypatch.setattr(pl, "fill_across", spy)
    plan_step(lens, cm, PlannerConfig(time_limit=0.3, use_milp=False, seed=0))
    assert left and left[0] > 0.2, left        # the first fill starts with (nearly) its whole budget


def test_the_memory_check_counts_the_swap_blocks_not_the_whole_matrix(monkeypatch):
    """(33rd session's scale hunt) plan sp refused 65,536 Wikipedia sequences on 1,024 GPUs as needing 26.6 GiB - the
    (k/2)^2 swap matrix of a micro-batch of every sequence - where planning them peaked at 176 MB; the matrix is
    evaluated in blocks of SWAP_CHUNK_PAIRS pairs now, and the estimate counts those."""
    import adasched.profiler.inventory as inv
    from adasched.planner.flexsp.api import (PlannerConfig, check_planner_memory, draw_batches, load_lengths,
                                             model_preset, planner_memory_bytes, sp_cost_model)
    from adasched.profiler.profile import load_profile

    cm = sp_cost_model(load_profile("a100-64-flexsp-paper").with_nodes(128), model_preset("gpt-7b"), 1024)
    from importlib import resources

    sample = load_lengths(str(resources.files("adasched.planner.flexsp").joinpath("data/wikipedia-sample.txt")))
    batch = draw_batches(sample, 65_536, 1, int(np.random.default_rng().integers(1000)))[0]
    need = planner_memory_bytes(batch, cm, PlannerConfig())
    m_hi = int(np.ceil(batch.sum() / cm.token_capacity(1024))) + PlannerConfig().extra_microbatches + 1
    assert need == (4 * m_hi + 96) * (batch.size + 1) + 128 * asg.SWAP_CHUNK_PAIRS  # (k/2)^2 is far above the bound
    monkeypatch.setattr(inv, "host_memory_bytes", lambda: 16 * 2 ** 30)
    check_planner_memory([batch], cm, PlannerConfig())  # a 16 GiB host plans it
