"""End-to-end planning on the packaged Wikipedia sample: never worse than the baselines, every sequence in
exactly one group, buddy placement, memory, plan file round trip, simulation."""
import math
from importlib import resources

import numpy as np
import pytest

from adasched.planner.flexsp import PlannerConfig, SPPlan, load_lengths, plan_sp, sp_cost_model
from adasched.planner.flexsp.assign import buddy_ranks
from adasched.planner.plan import load_plan, save_plan
from adasched.profiler.profile import load_profile

SAMPLE = resources.files("adasched.planner.flexsp").joinpath("data/wikipedia-sample.txt")


@pytest.fixture(scope="module")
def planned():
    prof = load_profile("a100-64-flexsp-paper")
    lens = load_lengths(SAMPLE, max_context=32768)
    out = {}
    for form in ("auto", "groups"):
        cfg = PlannerConfig(time_limit=0.3, seed=1, formulation=form)
        out[form] = plan_sp(prof, "gpt-7b", lens, gpus=8, global_batch=48, steps=3, seed=3, config=cfg,
                            max_context=32768)
    return prof, out


def test_sample_fixture():
    lens = load_lengths(SAMPLE)
    assert lens.size == 20000 and lens.min() >= 1
    assert 300 < np.median(lens) < 400  # Wikipedia: p50 ~ 347 tokens


@pytest.mark.parametrize("form", ["auto", "groups"])
def test_plan_is_never_worse_and_complete(planned, form):
    prof, out = planned
    plan, results = out[form]
    cm = sp_cost_model(prof, "gpt-7b", 8)
    for st, r in zip(plan.steps, results):
        assert st.predicted_ms <= st.baselines_ms["best_homogeneous"] * (1 + 1e-9)
        assert st.predicted_ms <= st.baselines_ms["static"] * (1 + 1e-9)
        assert st.predicted_ms >= r.lower_bound_ms * (1 - 1e-9)
        seen = [i for mb in st.micro_batches for g in mb.groups for i in g.seq_ids]
        assert sorted(seen) == list(range(len(st.seqlens)))  # every sequence in exactly one group
        total = 0.0
        for mb in st.micro_batches:
            assert sum(g.degree for g in mb.groups) <= 8
            for g in mb.groups:
                assert g.seqlens == [st.seqlens[i] for i in g.seq_ids]
                assert cm.fits(g.degree, g.seqlens)  # memory on the real lengths
                assert g.predicted_ms == pytest.approx(cm.group_time(g.degree, g.seqlens), rel=1e-6)
            assert mb.predicted_ms == pytest.approx(max(g.predicted_ms for g in mb.groups), rel=1e-6)
            total += mb.predicted_ms
        assert st.predicted_ms == pytest.approx(total, rel=1e-6)
        assert st.solver_status in ("optimal", "feasible", "timeout", "infeasible", "heuristic")


def test_buddy_placement(planned):
    prof, out = planned
    plan, _ = out["auto"]
    distinct: dict[int, set] = {r: set() for r in range(plan.world_size)}
    for st in plan.steps:
        for mb in st.micro_batches:
            for g in mb.groups:
                r0 = g.ranks[0]
                assert g.ranks == list(range(r0, r0 + g.degree))  # contiguous
                assert r0 % g.degree == 0  # aligned to the degree
                if g.degree <= prof.gpus_per_node:
                    assert r0 // prof.gpus_per_node == g.ranks[-1] // prof.gpus_per_node  # inside one node
                for r in g.ranks:
                    distinct[r].add(tuple(g.ranks))
    assert max(len(v) for v in distinct.values()) <= int(math.log2(plan.world_size)) + 1


def test_buddy_ranks_properties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        degs, left = [], 16
        while left:
            d = int(2 ** rng.integers(0, int(math.log2(left)) + 1))
            degs.append(d)
            left -= d
        rng.shuffle(degs)
        ranks = buddy_ranks(degs, 16)
        flat = sorted(r for rs in ranks for r in rs)
        assert flat == list(range(16))
        for d, rs in zip(degs, ranks):
            assert len(rs) == d and rs[0] % d == 0 and rs == list(range(rs[0], rs[0] + d))
    with pytest.raises(ValueError):
        buddy_ranks([8, 8, 1], 16)


def test_plan_round_trip_and_simulation(planned, tmp_path):
    _, out = planned
    plan, _ = out["auto"]
    p = tmp_path / "plan.json"
    save_plan(plan, p)
    back = load_plan(p, expect=SPPlan)
    assert back.model_dump() == plan.model_dump()
    for st in back.steps:
        sim = back.simulate(st.step)
        assert sim.makespan_ms == pytest.approx(st.predicted_ms, rel=1e-9)
    rows = dict(back.summary_rows())
    assert "step 0" in rows and "model / GPUs" in rows
    back.plot(tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_plan_rejects_a_sequence_that_cannot_fit():
    from adasched.profiler.io import InputError

    prof = load_profile("a100-64-flexsp-paper")
    lens = np.array([100, 200, 10_000_000])
    with pytest.raises(InputError, match=r"the longest sequence drawn \(length number 3 of 3 listed\) has 10000000 tokens and needs .* GiB"):
        plan_sp(prof, "gpt-7b", lens, gpus=64, global_batch=3, steps=1)


def test_plan_status_never_claims_a_solver_result_it_did_not_get(planned):
    """Plan status: all MILPs timed out (no solution) -> heuristic; bucketed MILPs proved optimal -> still only
    feasible (the real-length plan is not proven optimal) unless every step meets its lower bound."""
    import dataclasses

    from adasched.planner.flexsp.api import to_plan
    from adasched.planner.flexsp.planner import MilpStat

    prof, out = planned
    _, results = out["auto"]
    cm = sp_cost_model(prof, "gpt-7b", 8)
    cfg = PlannerConfig(time_limit=0.3, seed=1)

    def with_milp(*statuses, at_bound=False):
        rs = [dataclasses.replace(r, milp=[MilpStat(s, None, None, None, 0.1, False)],
                                  lower_bound_ms=r.time_ms if at_bound else r.lower_bound_ms)
              for r, s in zip(results, statuses)]
        return to_plan(rs, cm, prof, cfg, "d", 32768).solver.status

    assert any(r.time_ms > r.lower_bound_ms * (1 + 1e-9) for r in results)  # the real plans are above the bound
    assert with_milp("timeout", "timeout", "timeout") == "heuristic"
    assert with_milp("optimal", "optimal", "optimal") == "feasible"
    assert with_milp("optimal", "timeout", "optimal") == "feasible"
    assert with_milp("feasible", "optimal", "optimal") == "feasible"
    assert with_milp("timeout", "timeout", "timeout", at_bound=True) == "optimal"  # proved by the bound
    assert with_milp("infeasible", "infeasible", "timeout") == "heuristic"


def test_step_milp_status_names_an_infeasible_bucketed_model():
    """Every MILP of a step infeasible (the bucketed model's memory rows use each bucket's longest length) was
    reported as a time-out; a mix of infeasible and timed-out MILPs is still a time-out."""
    from adasched.planner.flexsp.planner import MilpStat, StepResult

    def status(*ss):
        r = StepResult(step=0, lens=np.array([1]), micro_batches=[], time_ms=1.0, baselines_ms={}, chosen_m=1,
                       split="x", solve_seconds=0.0, milp=[MilpStat(s, None, None, None, 0.0, False) for s in ss],
                       static=[], lower_bound_ms=0.0)
        return r.milp_status

    assert status("infeasible", "infeasible") == "infeasible"
    assert status("infeasible", "timeout") == "timeout"
    assert status("infeasible", "feasible") == "feasible"
    assert status("optimal", "optimal") == "optimal"
    assert status() == "heuristic"


def test_a_step_whose_clock_stopped_the_milps_is_not_called_optimal():
    """StepResult.milp_status summarised the MILPs that ran: the clock stopping the loop after one fast optimal
    MILP of a 23-micro-batch step called the whole step optimal. Optimal now needs every planned MILP."""
    import numpy as np

    from adasched.planner.flexsp.planner import MilpStat, PlannerConfig, StepResult, plan_step

    one = [MilpStat("optimal", 0.0, 1.0, 1.0, 0.01, False)]
    mk = lambda planned: StepResult(step=0, lens=np.ones(3), micro_batches=[], time_ms=1.0,  # noqa: E731
                                    baselines_ms={}, chosen_m=1, solve_seconds=0.0, milp=one, milp_planned=planned)
    assert mk(1).milp_status == "optimal" and mk(23).milp_status == "feasible"
    # the planner records how many it meant to run
    from adasched.planner.flexsp.costmodel import sp_cost_model
    from adasched.profiler.profile import load_profile

    cm = sp_cost_model(load_profile("a100-64-flexsp-paper"), "gpt-7b", 16)
    lens = np.random.default_rng().integers(1000, 30000, 24)
    r = plan_step(lens, cm, PlannerConfig(time_limit=2.0, max_evals=50), step=0)  # deterministic: every MILP runs
    assert r.milp_planned >= r.chosen_m and len(r.milp) == r.milp_planned
