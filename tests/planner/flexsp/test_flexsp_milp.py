"""The FlexSP MILPs against brute-force enumeration of group assignments on tiny instances."""

import numpy as np
import pytest

from adasched.planner.flexsp.assign import MBSolution, evaluate, local_search
from adasched.planner.flexsp.batching import make_buckets
from adasched.planner.flexsp.model import realise, realise_classes, solve_classes, solve_microbatch
from adasched.planner.flexsp.planner import analytic_bound
from adasched.planner.solver import SolveParams

from flexsp_oracle import brute_force


def _instance(seed, n):
    """n lengths, some longer than one GPU holds (1500 tokens), total within 85 % of the 4 GPUs."""
    rng = np.random.default_rng(seed)
    while True:
        lens = np.sort(rng.integers(100, 2600, n)).astype(np.int64)
        if lens.sum() <= 0.85 * 4 * 1500 and lens.max() > 1500:
            return lens


@pytest.mark.parametrize("seed,n", [(1, 4), (2, 5), (3, 5), (4, 6), (5, 6), (6, 4)])
def test_group_milp_equals_brute_force(seed, n, make_cm):
    cm = make_cm()
    lens = _instance(seed, n)
    opt = brute_force(lens, cm)
    assert np.isfinite(opt)
    ids = np.arange(n)
    buckets = make_buckets(lens, q=n)  # one bucket per distinct length: the bucketed model is exact
    res = solve_microbatch(buckets, cm, SolveParams(time_limit=20, mip_gap=1e-9))
    assert res.outcome.status == "optimal"
    assert res.outcome.objective == pytest.approx(opt, rel=1e-6)
    sol = realise(res.groups, buckets, ids, lens, cm)
    assert sol.fits and sol.time_ms == pytest.approx(opt, rel=1e-6)
    assert sorted(sol.seq_ids()) == list(range(n))
    assert analytic_bound(buckets, cm) <= opt + 1e-9


def test_bound_never_above_a_coarse_bucketed_milp(make_cm):
    """With fewer buckets than lengths the per-group MILP prices each sequence at its bucket's means; the bound
    priced its single longest sequence at the bucket's maximum and came out above the proved optimum ([10, 10, 10,
    700] in one bucket: 37 % gap on an optimal MILP). Random instances, one to three buckets; the class model keeps
    its max-priced single term (it has that constraint)."""
    cm = make_cm()
    rng = np.random.default_rng(20261129)  # seeded: the count of proved MILPs below depends on the draws
    checked = 0
    for _ in range(25):
        n = int(rng.integers(3, 7))
        lens = np.sort(np.concatenate([rng.integers(5, 60, n - 1), rng.integers(300, 1400, 1)])).astype(np.int64)
        for q in (1, 2, 3):
            buckets = make_buckets(lens, q=q)
            res = solve_microbatch(buckets, cm, SolveParams(time_limit=20, mip_gap=1e-9))
            if res.outcome.status == "optimal":
                assert analytic_bound(buckets, cm) <= res.outcome.objective * (1 + 1e-9), (lens, q)
                checked += 1
            res = solve_classes(buckets, cm, SolveParams(time_limit=20, mip_gap=1e-9), c_max=1e6)
            if res.outcome.status == "optimal":
                assert analytic_bound(buckets, cm, single="max") <= res.outcome.objective * (1 + 1e-9), (lens, q)
    assert checked >= 40
    one = make_buckets(np.array([10, 10, 10, 700]), q=1)
    assert analytic_bound(one, cm) < analytic_bound(one, cm, single="max")


@pytest.mark.parametrize("seed,n", [(11, 5), (12, 6), (13, 6)])
def test_class_milp_is_a_relaxation_and_realises_feasibly(seed, n, make_cm):
    cm = make_cm()
    lens = _instance(seed, n)
    opt = brute_force(lens, cm)
    ids = np.arange(n)
    buckets = make_buckets(lens, q=n)
    res = solve_classes(buckets, cm, SolveParams(time_limit=20, mip_gap=1e-9), c_max=10 * opt)
    assert res.outcome.status == "optimal"
    assert res.outcome.objective <= opt * (1 + 1e-6)  # identical groups share load evenly: never above the exact optimum
    sol = realise_classes(res, buckets, ids, lens, cm)
    if sol is not None:  # real packing of the fluid solution: feasible and never below the true optimum
        assert sol.fits and sol.time_ms >= opt * (1 - 1e-9)
        assert sorted(sol.seq_ids()) == list(range(n))


def test_local_search_improves_to_a_local_optimum(make_cm):
    cm = make_cm(world=8, gpus_per_node=4)
    rng = np.random.default_rng(3)
    lens = rng.integers(50, 700, 14).astype(np.int64)
    # a feasible but unbalanced start: the long half on one degree-4 group, the rest on four degree-1 groups
    order = list(np.argsort(-lens))
    start = evaluate(MBSolution([(4, order[:7]), (1, order[7:9]), (1, order[9:11]), (1, order[11:13]), (1, order[13:])]),
                     lens, cm)
    assert start.fits
    out = local_search(start, lens, cm)
    assert out.fits and out.time_ms < start.time_ms - 1e-6
    assert sorted(out.seq_ids()) == list(range(lens.size))
    assert sorted(d for d, _ in out.groups) == sorted(d for d, _ in start.groups if _)
    # no single move of a sequence off the critical group improves the makespan any more
    groups = [(d, list(g)) for d, g in out.groups]
    crit = max(range(len(groups)), key=lambda g: cm.group_time(groups[g][0], lens[groups[g][1]]))
    for i in groups[crit][1]:
        for g in range(len(groups)):
            if g == crit:
                continue
            moved = [(d, [j for j in ids_ if j != i] + ([i] if k == g else [])) for k, (d, ids_) in enumerate(groups)]
            cand = evaluate(MBSolution(moved), lens, cm)
            assert not (cand.fits and cand.time_ms < out.time_ms - 1e-6)
