"""Findings of the 25th session's Twill hunt, each a test that fails on the code before the fix."""
from __future__ import annotations

import json
import random

import pytest

import adasched.planner.twill.model as twill_model
from adasched.planner.solver import SolveParams
from adasched.planner.twill.graph import Graph, check_graph, load_machine
from adasched.planner.twill.plan import make_plan
from adasched.profiler.io import InputError

H100, B200 = load_machine("h100"), load_machine("b200")


def _plan_of(gd: dict, machine=H100, time_limit: float = 5.0):
    prob = check_graph(Graph.model_validate(gd), machine)
    return make_plan(prob, twill_model.solve(prob, SolveParams(time_limit=time_limit, seed=0, threads=1)))


def test_knobs_never_ask_for_more_than_a_ctas_1024_threads():
    """Five register-holding consumer groups under one TMA producer on b200: the knobs asked for num_warps 32 beside
    Triton's 4 worker warps (1,152 threads; Triton refuses the launch) and said nothing. Now at most 32 warps in
    all, with a note that the groups share warps."""
    n = 5  # b200: at most 6 warp groups, one of them the producer
    regs = random.Random().choice([8, 16, 24])
    names = "abcde"
    gd = {"name": "many-consumers", "units": {"ALU": n},
          "ops": [{"name": "L", "reserve": {"TMA": [1]}, "variable_latency": True, "smem": 16}]
          + [{"name": c, "reserve": {"ALU": [1]}, "regs": regs} for c in names],
          "edges": [{"from": "L", "to": c, "delay": 1} for c in names]}
    plan = _plan_of(gd, B200)
    consumers = [g for g in plan.warp_groups if g.role == "consumer"]
    assert plan.knobs.warp_specialize and len(consumers) == n, plan.warp_groups
    # one worker group (the producer): 4 worker warps beside the default ones
    assert plan.knobs.num_warps + 4 <= 32 and plan.knobs.num_warps == 16, plan.knobs
    assert plan.knobs.note and "1024 threads" in plan.knobs.note and "capped at 16" in plan.knobs.note


def test_knobs_say_when_shared_memory_holds_fewer_stages_than_the_schedule_needs():
    """Two loads of 100 + 20 KiB a stage on h100 (227 KiB): the schedule keeps 3 copies of one of them, the knobs
    gave num_stages 1 and no note. Now the note says I is not realised."""
    gd = {"name": "st", "ops": [{"name": "L1", "reserve": {"TMA": [1]}, "variable_latency": True, "smem": 100},
                                {"name": "L2", "reserve": {"TMA": [1]}, "variable_latency": True, "smem": 20},
                                {"name": "c1", "reserve": {"TC": [1]}, "regs": 32},
                                {"name": "c2", "reserve": {"ALU": [1]}, "regs": 32}],
          "edges": [{"from": "L1", "to": "c1", "delay": 1}, {"from": "L2", "to": "c2", "delay": 7}]}
    plan = _plan_of(gd)
    depth = max(plan.buffers[v] for v in ("L1", "L2"))
    assert plan.knobs.num_stages < depth, (plan.knobs, plan.buffers)
    assert plan.knobs.note and f"buffer depth {depth}" in plan.knobs.note and f"I = {plan.ii}" in plan.knobs.note


@pytest.mark.parametrize("regs", [120, 150])
def test_a_self_loop_value_needing_several_copies_at_any_I_is_refused_naming_the_op(regs):
    """A value self-loop of distance 2 keeps 2 copies live at every I: 2 x 120 registers never fit a group's 216
    above its base, but the check counted one copy; the search went up to I = 5 and said 'cannot be met up to I = 5'
    naming no op. Now refused before the search, naming the op and the copies."""
    gd = {"name": "sl", "ops": [{"name": "acc", "reserve": {"TC": [1]}, "regs": regs}],
          "edges": [{"from": "acc", "to": "acc", "delay": 1, "distance": 2}]}
    with pytest.raises(InputError) as err:
        check_graph(Graph.model_validate(gd), H100)
    assert err.value.what == (f"ops[0] 'acc': needs 2 copies x {regs} registers per thread but a warp group has at "
                              f"most 216 (machine 'h100') - a value self-loop of distance d keeps d copies live at "
                              f"every I")
    # one copy of the same op fits: distance 1 (an in-place accumulator) plans
    ok = json.loads(json.dumps(gd))
    ok["edges"][0]["distance"] = 1
    assert _plan_of(ok).ii >= 1


def test_registers_over_the_machine_with_self_loop_copies_are_refused_up_front():
    """Three values of 100 registers, one a distance-2 self-loop (2 copies): 448 registers need 3 groups and 520
    with their bases (h100: 512) at any I; the search ran to its time limit and said 'raise --time-limit'."""
    gd = {"name": "r", "ops": [{"name": "o0", "reserve": {"SFU": [1, 0, 1]}, "regs": 8},
                               {"name": "o1", "reserve": {"ALU": [1, 1]}, "regs": 32},
                               {"name": "o2", "reserve": {"TC": [1, 1]}, "regs": 8},
                               {"name": "o3", "reserve": {"TC": [1, 1, 0]}, "regs": 100},
                               {"name": "o4", "reserve": {"ALU": [1, 1]}, "regs": 100},
                               {"name": "o6", "reserve": {"TC": [1]}, "regs": 100}],
          "edges": [{"from": "o0", "to": "o1", "delay": 3}, {"from": "o1", "to": "o3", "delay": 1},
                    {"from": "o6", "to": "o4", "delay": 4, "distance": 1},
                    {"from": "o6", "to": "o6", "delay": 3, "distance": 2}]}
    with pytest.raises(InputError) as err:  # by check_graph: no search runs
        check_graph(Graph.model_validate(gd), H100)
    assert err.value.what.startswith("ops: 448 registers per thread with the buffers any I needs (one per value, d "
                                     "for a value self-loop of distance d) need at least 3 warp group(s) and 520 "
                                     "registers with their base"), err.value.what


@pytest.mark.parametrize("field", [{"variable_latency": False}, {"regs": 0}, {"blocking": False}, {"smem": 0}])
def test_a_field_stating_its_default_leaves_the_plain_minimum(field):
    """Five independent ALU ops on 5 ALUs: I = 1. One op saying "variable_latency": false (or regs 0, blocking
    false, smem 0 - the defaults) switched the warp-specialised model on and gave I = 2 on h100."""
    gd = {"name": "vf", "units": {"ALU": 5},
          "ops": [{"name": c, "reserve": {"ALU": [1]}} for c in "abcde"], "edges": []}
    gd["ops"][random.Random().randrange(5)].update(field)
    plan = _plan_of(gd)
    assert plan.ii == 1 and not plan.warp_specialised, (plan.ii, plan.warp_specialised)


def test_show_says_when_early_issue_simulates_slower_than_the_schedule():
    """Reservation tables with gaps ([1, 0, 1]): the ASAP simulation settles at 4 cycles per iteration against the
    proved-minimal I = 3 (the timed replay is exact), and the summary printed both without a word."""
    gd = {"name": "gaps", "ops": [{"name": "o0", "reserve": {"TMA": [1, 0, 0]}},
                                  {"name": "o1", "reserve": {"TMA": [1, 0, 1]}},
                                  {"name": "o2", "reserve": {"ALU": [1]}}],
          "edges": [{"from": "o0", "to": "o0", "delay": 3, "distance": 2},
                    {"from": "o0", "to": "o2", "delay": 2, "distance": 0},
                    {"from": "o2", "to": "o1", "delay": 4, "distance": 2}]}
    plan = _plan_of(gd)
    assert plan.ii == 3 and plan.sim_replay_exact and plan.sim_cycles_per_iteration > 3
    row = dict(plan.summary_rows())["simulated"]
    assert "slower than I = 3" in row and "schedule's times they keep I" in row, row


def test_an_old_plan_of_a_graph_stating_default_fields_is_told_to_re_plan():
    """A plan made before the fix from a graph whose only warp fields state their defaults was warp-specialised;
    `show` now refuses it (the graph selects the plain model) and says why: re-plan."""
    from adasched.planner.twill.plan import TwillPlan

    gd = {"name": "vf", "units": {"ALU": 5},
          "ops": [{"name": c, "reserve": {"ALU": [1]}} for c in "abcde"], "edges": []}
    gd["ops"][0]["variable_latency"] = False
    data = _plan_of(gd).model_dump(mode="json")
    data["warp_specialised"] = True  # what the old planner wrote for this graph
    errors = TwillPlan.model_validate(data).verify()
    assert any("state their defaults, which no longer select the warp model since 2026-11-30: re-plan it" in e
               for e in errors), errors
