"""Group-structure local search (planner/flexsp/search.py) on tiny instances, against brute force."""
import itertools
from collections import Counter

import numpy as np
import pytest

from adasched.planner.flexsp.assign import MBSolution, evaluate, lpt_assign
from adasched.planner.flexsp.costmodel import ModelShape, SPCostModel
from adasched.planner.flexsp.search import pack_fast, seed_structures, structure_neighbours, structure_search

STRUCTURES = ([4], [2, 2], [2, 1, 1], [1, 1, 1, 1])  # every maximal buddy structure of 4 GPUs


def brute_force(lens, cm, structures=STRUCTURES):
    """Best makespan over the structures and every assignment of sequences to their groups (memory-checked)."""
    best = np.inf
    n = len(lens)
    for degs in structures:
        for assign in itertools.product(range(len(degs)), repeat=n):
            groups = [[i for i in range(n) if assign[i] == g] for g in range(len(degs))]
            if not all(cm.fits(d, lens[ids]) for d, ids in zip(degs, groups)):
                continue
            best = min(best, max(cm.group_time(d, lens[ids]) for d, ids in zip(degs, groups) if ids))
    return best


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
