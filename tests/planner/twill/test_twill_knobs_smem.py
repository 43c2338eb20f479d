"""num_stages leaves room for the shared memory of the ops that are not loads (review of the capacity cap)."""
from __future__ import annotations

from adasched.planner.solver import SolveParams
from adasched.planner.twill.graph import Graph, load_machine
from adasched.planner.twill.knobs import derive_knobs
from adasched.planner.twill.plan import plan_twill


def test_num_stages_leaves_room_for_other_ops_shared_memory():
    """A 40 KiB load beside an MMA holding 30 KiB on a 100 KiB machine: the cap was capacity // 40 = 2 stages,
    80 + 30 = 110 KiB, more than the machine has; the schedule itself fits (one L and one M buffer, 70 KiB)."""
    m = load_machine("h100").model_copy(update={"smem_capacity": 100})
    gd = {"ops": [{"name": "L", "reserve": {"TMA": [1]}, "variable_latency": True, "smem": 40},
                  {"name": "M", "reserve": {"TC": [1, 1]}, "regs": 32, "smem": 30}],
          "edges": [{"from": "L", "to": "M", "delay": 3}, {"from": "M", "to": "M", "delay": 2, "distance": 1}]}
    plan = plan_twill(Graph.model_validate(gd), m, SolveParams(time_limit=5.0, seed=0, threads=1))
    assert plan.verify() == []
    assert plan.knobs.num_stages * 40 + 30 * plan.buffers["M"] <= 100
    assert plan.knobs.num_stages == 1
    # with room for two stages beside M the load keeps its second one; with plenty, depth + slack as before
    g = Graph.model_validate(gd)
    times = {o.name: o.issue_cycle for o in plan.ops}
    groups = {o.name: o.warp_group for o in plan.ops}
    assert derive_knobs(g, m.model_copy(update={"smem_capacity": 110}), plan.ii, times, groups).num_stages == 2
    assert derive_knobs(g, m.model_copy(update={"smem_capacity": 109}), plan.ii, times, groups).num_stages == 1
    assert derive_knobs(g, m.model_copy(update={"smem_capacity": 1000}), plan.ii, times, groups).num_stages == 3
