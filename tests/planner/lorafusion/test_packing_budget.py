"""A MILP too large for its budget is not started: CBC 2.10 ignores short limits on big models (a 512-sample
problem ran 16-24 s at a 0.01-1 s limit before) and segfaults when the limit ends inside its warm start."""
from __future__ import annotations

import random

from adasched.planner.lorafusion.model import MILP_BINARIES_PER_SECOND, bin_lower_bound, ffd_pack, pack_problem
from adasched.planner.lorafusion.plan import build_plan
from adasched.planner.lorafusion.jobs import parse_jobs, build_workload
from adasched.profiler.profile import load_profile


def _check_bins(bins, samples, lengths, adapter_of, capacity):
    seen = sorted(s for b in bins for ids in b.values() for s in ids)
    assert seen == sorted(samples)
    for b in bins:
        assert sum(-(-sum(lengths[s] for s in ids) // 128) * 128 for ids in b.values()) <= capacity
        for a, ids in b.items():
            assert all(adapter_of[s] == a for s in ids)


def test_large_problem_skips_the_milps_and_keeps_ffd():
    rng = random.Random(3)
    n = 512
    lengths = [rng.randint(50, 4000) for _ in range(n)]
    adapter_of = [rng.randrange(4) for _ in range(n)]
    samples = list(range(n))
    ffd = ffd_pack(samples, adapter_of, lengths, 8192)
    lb = bin_lower_bound(samples, adapter_of, lengths, 8192)
    assert n * len(ffd) > MILP_BINARIES_PER_SECOND * 1.0 and len(ffd) > lb      # the case under test
    res = pack_problem(samples, adapter_of, lengths, 8192, time_limit=1.0)
    assert res.milp1 == "skipped" and res.status == "heuristic"
    assert len(res.bins) == len(ffd) == res.ffd_bins and res.lower_bound == lb
    _check_bins(res.bins, samples, lengths, adapter_of, 8192)


def _ffd_gap_case(rng, sizes, tries):
    """A small problem where FFD misses the bin lower bound (so MILP 1 would run): samples, lengths, adapters."""
    for _ in range(tries):
        n = rng.choice(sizes)
        lengths = [rng.randint(300, 3000) for _ in range(n)]
        adapter_of = [rng.randrange(2) for _ in range(n)]
        samples = list(range(n))
        if len(ffd_pack(samples, adapter_of, lengths, 4096)) > bin_lower_bound(samples, adapter_of, lengths, 4096):
            return samples, lengths, adapter_of
    raise AssertionError("no case with an FFD gap found")


def test_small_problem_still_solves_the_milp():
    samples, lengths, adapter_of = _ffd_gap_case(random.Random(5), [24], 20)
    res = pack_problem(samples, adapter_of, lengths, 4096, time_limit=2.0)
    assert res.milp1 not in (None, "skipped")
    _check_bins(res.bins, samples, lengths, adapter_of, 4096)


def test_plan_note_says_which_milps_were_not_started():
    cfg = parse_jobs({"capacity": 8192, "stages": 2, "global_batches": 1, "jobs": [
        {"name": f"j{i}", "adapter": {"r": 8}, "lengths": "wikipedia", "global_batch_size": 160} for i in range(2)]})
    plan = build_plan(build_workload(cfg), load_profile("h100-sxm"), time_limit=0.2)
    skipped = sum((p.milp1 == "skipped") + (p.milp2 == "skipped") for p in plan.problems)
    assert skipped >= 1
    assert f"{skipped} MILPs not started" in plan.solver.note
    assert plan.summary.samples_missing == plan.summary.samples_duplicated == 0


def test_a_budget_under_the_shortest_milp_limit_starts_no_milp_1():
    """31st session's hunt: MILP 1 gets half the budget, raised to CBC's shortest limit (0.05 s): at --time-limit
    0.05 it got the whole budget and problems ran 0.055-0.075 s. Under twice that limit it is not started."""
    from adasched.planner.lorafusion.model import MIN_MILP_LIMIT_S

    seed = random.randrange(10**6)
    print("seed", seed)
    rng = random.Random(seed)
    samples, lengths, adapter_of = _ffd_gap_case(rng, list(range(8, 25)), 200)
    limit = rng.uniform(0.01, 2 * MIN_MILP_LIMIT_S - 1e-3)
    res = pack_problem(samples, adapter_of, lengths, 4096, time_limit=limit)
    assert res.milp1 == "skipped" and res.milp2 is None and res.status == "heuristic", (seed, res)
    _check_bins(res.bins, samples, lengths, adapter_of, 4096)
    res = pack_problem(samples, adapter_of, lengths, 4096, time_limit=2 * MIN_MILP_LIMIT_S)
    assert res.milp1 not in (None, "skipped"), seed
