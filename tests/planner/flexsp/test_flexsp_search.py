"""Group-structure local search (planner/flexsp/search.py) on tiny instances, against brute force."""
import numpy as np
import pytest

from adasched.planner.flexsp.assign import MBSolution, evaluate, lpt_assign
from adasched.planner.flexsp.costmodel import ModelShape, SPCostModel
from adasched.planner.flexsp.search import (fill_across, pack_fast, seed_structures, structure_neighbours,
                                            structure_search)
from flexsp_oracle import STRUCTURES, brute_force


def _instance(seed, n):
    rng = np.random.default_rng(seed)
    while True:
        lens = rng.integers(100, 2600, n).astype(np.int64)
        if lens.sum() <= 0.85 * 4 * 1500 and lens.max() > 1500:
            return lens


def test_neighbours_are_one_move_away():
    got = structure_neighbours([8, 4, 1, 1, 1, 1], 16)
    want = {
        (4, 4, 4, 1, 1, 1, 1), (8, 2, 2, 1, 1, 1, 1),  # split d -> d/2, d/2
        (4,) + (1,) * 12, (8,) + (1,) * 8,  # split d -> d ones
        (8, 4, 2, 1, 1), (8, 4, 4),  # merge 1+1 -> 2; merge four ones -> 4
    }
    assert set(got) == want
    assert len(got) == len(set(got))
    for s in got:
        assert sum(s) <= 16 and all(d & (d - 1) == 0 for d in s) and list(s) == sorted(s, reverse=True)
    # idle GPUs: the largest power-of-two group that fits is added
    assert (4, 2, 1) in structure_neighbours([4, 1], 8)
    assert (4, 2, 2) in structure_neighbours([2, 2], 8) and (2, 2, 2) in structure_neighbours([2, 2], 6)


def test_seed_structures(make_cm):
    cm = make_cm(world=8)
    lens = np.array([2000, 300, 400, 500], dtype=np.int64)  # 2000 tokens need degree 2 (1500 per GPU)
    seeds = seed_structures(np.arange(4), lens, cm)
    assert seeds[:2] == [(4, 1, 1, 1, 1), (8,)]
    assert set(seeds[2:]) == {(1,) * 8, (2,) * 4, (4, 4), (8,)}


@pytest.mark.parametrize("seed,n", [(11, 4), (12, 5), (13, 5), (14, 6), (15, 6)])
def test_search_visits_every_structure_and_is_sound(seed, n, make_cm):
    """On 4 GPUs the search (with restarts) reaches every maximal structure, so its result is the best real
    packing over all of them; it never beats brute force (it is a feasible plan) and stays close to it."""
    cm = make_cm()
    lens = _instance(seed, n)
    ids = np.arange(n)
    start = lpt_assign(ids, lens, [4], cm, source="start")
    assert start is not None and start.fits
    got = structure_search(ids, lens, cm, start, max_evals=100)
    # evaluated on the real lengths, every group within memory, every sequence exactly once
    assert got.fits and sorted(got.seq_ids()) == list(range(n)) and got.gpus <= 4
    assert got.time_ms == pytest.approx(max(cm.group_time(d, lens[g]) for d, g in got.groups), rel=1e-12)
    assert all(cm.group_memory(d, lens[g]) <= cm.memory_bytes for d, g in got.groups)
    packs = [pack_fast(ids, lens, s, cm, "x") for s in STRUCTURES]
    best_pack = min(p.time_ms for p in packs if p is not None and p.fits)
    assert got.time_ms <= min(start.time_ms, best_pack) + 1e-9
    opt = brute_force(lens, cm)
    assert opt - 1e-9 <= got.time_ms <= 1.10 * opt


def _mixing_cm():
    """4 GPUs, 2 per node: a cheap quadratic term and a costly inter-node all-to-all, so a degree-2 group for
    the long sequence beside degree-1 groups for the short ones beats every single degree."""
    shape = ModelShape(name="tiny-mix", hidden=64, layers=2, heads=4, act_bytes_per_token=1000.0)
    return SPCostModel(model=shape, world=4, gpus_per_node=2, memory_bytes=1500 * 1000.0 + 1e5, a1=1e-7, a2=0.01,
                       b1=1.0, act_bytes_per_token=1000.0, model_state_bytes=1e5, a2a_alpha_ms={2: 0.0, 4: 0.0},
                       a2a_beta_ms_per_byte={2: 2e-6, 4: 5e-5})


@pytest.mark.parametrize("seed", [0, 1, 5, 9])
def test_search_finds_the_mixed_structure(seed):
    """One long sequence (needs degree 2) and five shorter ones: the brute-force optimum uses [2, 1, 1], which
    no single degree reaches; the search starting from the best single degree finds that optimum."""
    cm = _mixing_cm()
    rng = np.random.default_rng(seed)
    lens = np.concatenate([[rng.integers(1550, 1900)], rng.integers(300, 900, 5)]).astype(np.int64)
    ids = np.arange(lens.size)
    homog = [s for s in (lpt_assign(ids, lens, [d] * (4 // d), cm) for d in (2, 4)) if s is not None and s.fits]
    start = min(homog, key=lambda s: s.time_ms)
    got = structure_search(ids, lens, cm, start, max_evals=100)
    opt = brute_force(lens, cm)
    single = brute_force(lens, cm, ([4], [2, 2], [1, 1, 1, 1]))
    assert opt < single - 1e-6  # the instance really needs a mixed structure
    assert got.time_ms < start.time_ms - 1e-6
    assert got.time_ms == pytest.approx(opt, rel=1e-9)
    assert sorted(d for d, _ in got.groups) == [1, 1, 2] and got.fits


def test_budget_is_respected(make_cm):
    cm = make_cm(world=8)
    rng = np.random.default_rng(3)
    lens = rng.integers(100, 1400, 12).astype(np.int64)
    ids = np.arange(lens.size)
    start = evaluate(MBSolution([(8, list(ids))], source="s"), lens, cm)
    assert structure_search(ids, lens, cm, start, max_evals=0) is start
    one = structure_search(ids, lens, cm, start, max_evals=1, restarts=False)
    assert one.time_ms <= start.time_ms and one.fits


def _check_step(mbs, lens, cm, n):
    ids = sorted(i for mb in mbs for i in mb.seq_ids())
    assert ids == list(range(n))  # every sequence exactly once over the micro-batches
    for mb in mbs:
        assert mb.fits and mb.gpus <= cm.world
        assert mb.time_ms == pytest.approx(max(cm.group_time(d, lens[g]) for d, g in mb.groups), rel=1e-12)
        assert all(cm.group_memory(d, lens[g]) <= cm.memory_bytes for d, g in mb.groups)


def test_fill_across_uses_idle_time_and_drops_an_emptied_micro_batch():
    """Micro-batch 0: one long sequence sets the makespan on a degree-2 group, a degree-1 group beside it is
    almost idle; micro-batch 1 holds two short sequences that fit in that idle time: they move, micro-batch 1
    disappears and the step saves its whole makespan."""
    cm = _mixing_cm()
    lens = np.array([2900, 200, 300, 250], dtype=np.int64)
    mb0 = evaluate(MBSolution([(2, [0]), (1, [1])], source="a"), lens, cm)
    mb1 = evaluate(MBSolution([(1, [2]), (1, [3])], source="b"), lens, cm)
    out = fill_across([mb0, mb1], lens, cm)
    _check_step(out, lens, cm, 4)
    assert len(out) == 1
    assert out[0].time_ms == pytest.approx(mb0.time_ms, rel=1e-12)  # the receiver's makespan is unchanged
    assert sorted(i for d, g in out[0].groups if d == 1 for i in g) == [1, 2, 3]


@pytest.mark.parametrize("seed", [21, 22, 23, 24, 25, 26])
def test_fill_across_never_worse_and_sound(seed):
    """Random two-micro-batch steps (one long sequence in the first): the result is a valid plan of the same
    sequences, never slower than the input, strictly faster whenever some sequence of the other micro-batch
    fits beside the critical group, and never faster than the brute-force optimum of its own micro-batches."""
    cm = _mixing_cm()
    rng = np.random.default_rng(seed)
    lens = np.concatenate([[rng.integers(2200, 2900)], rng.integers(100, 500, 5)]).astype(np.int64)
    b_ids = [2, 3, 4, 5]
    mb0 = evaluate(MBSolution([(2, [0]), (1, [1])], source="a"), lens, cm)
    mb1 = lpt_assign(np.array(b_ids), lens, [1, 1, 1, 1], cm, source="b")
    before = mb0.time_ms + mb1.time_ms
    out = fill_across([mb0, mb1], lens, cm)
    _check_step(out, lens, cm, lens.size)
    after = sum(mb.time_ms for mb in out)
    assert after <= before + 1e-9
    slack = mb0.time_ms - cm.group_time(1, lens[[1]])
    cheapest = min(cm.group_time(1, lens[[i]]) - cm.b1 for i in b_ids)  # adding it to the degree-1 group
    if cheapest < slack - 1e-9:
        assert after < before - 1e-9
    assert after >= sum(brute_force(lens[mb.seq_ids()], cm) for mb in out) - 1e-9


def test_fill_across_keeps_a_step_without_idle_time():
    cm = _mixing_cm()
    lens = np.array([700, 700, 700, 700, 650, 650, 650, 650], dtype=np.int64)
    mb0 = evaluate(MBSolution([(1, [0]), (1, [1]), (1, [2]), (1, [3])], source="a"), lens, cm)
    mb1 = evaluate(MBSolution([(1, [4]), (1, [5]), (1, [6]), (1, [7])], source="b"), lens, cm)
    out = fill_across([mb0, mb1], lens, cm)
    assert out[0] is mb0 and out[1] is mb1
    assert fill_across([mb0], lens, cm)[0] is mb0


def test_plan_step_with_search_is_valid_and_never_worse_than_without():
    """plan_step on a 64-GPU A100 batch that needs two micro-batches and has one very long sequence: with the
    structure search and cross-micro-batch fill (MILP off, so both runs are heuristic and comparable) the plan is
    complete, fits, is scored on the real lengths and is never slower than without them (both only improve)."""
    from adasched.planner.flexsp.costmodel import sp_cost_model
    from adasched.planner.flexsp.planner import PlannerConfig, plan_step
    from adasched.profiler.profile import load_profile

    cm = sp_cost_model(load_profile("a100-64-flexsp-paper"), "gpt-7b", 64)
    rng = np.random.default_rng(5)
    short = np.maximum(50, rng.lognormal(np.log(1500), 1.0, 300)).astype(np.int64)
    lens = np.concatenate([[70000], np.minimum(short, 20000)])
    lens = lens[rng.permutation(lens.size)]
    base = plan_step(lens, cm, PlannerConfig(time_limit=0.4, use_milp=False, structure_search=False))
    got = plan_step(lens, cm, PlannerConfig(time_limit=0.4, use_milp=False, structure_search=True))
    for r in (base, got):
        _check_step(r.micro_batches, lens, cm, lens.size)
        assert r.time_ms == pytest.approx(sum(mb.time_ms for mb in r.micro_batches), rel=1e-12)
        assert r.time_ms <= r.baselines_ms["best_homogeneous"] + 1e-6
    assert got.time_ms <= base.time_ms + 1e-6
    assert got.chosen_m >= 1 and base.chosen_m >= 2


@pytest.mark.parametrize("seed,n", [(31, 4), (32, 5), (33, 6)])
def test_fluid_lower_bound_is_a_valid_bound(seed, n, make_cm):
    """b1 + cheapest work / N <= fluid bound <= brute-force optimum of one micro-batch (4 GPUs)."""
    from adasched.planner.flexsp.bounds import fluid_lower_bound
    from adasched.planner.flexsp.planner import lower_bound_work

    for cm in (make_cm(), _mixing_cm()):
        lens = _instance(seed, n)
        lb = fluid_lower_bound(lens, cm, rel_tol=1e-6)
        opt = brute_force(lens, cm)
        assert cm.b1 + lower_bound_work(lens, cm) - 1e-6 <= lb <= opt + 1e-9


def test_fluid_lower_bound_reports_an_impossible_batch(make_cm):
    from adasched.planner.flexsp.bounds import fluid_feasible, fluid_lower_bound

    cm = make_cm()
    lens = np.array([1400, 1400, 1400, 1400, 1400], dtype=np.int64)  # 7000 tokens > 4 GPUs x 1500
    assert fluid_lower_bound(lens, cm) == float("inf")
    assert not fluid_feasible(lens, cm, cm.b1)
