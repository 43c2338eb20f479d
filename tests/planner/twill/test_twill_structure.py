"""Built-in graphs: the toy loop, the FA3-style Hopper forward (structure + speed), the Hopper GEMM, the
Blackwell FA4-style forward; the simulator; the validator catching broken schedules; honest status."""
from __future__ import annotations


import pytest

from adasched.planner.solver import SolveParams
from adasched.planner.twill import model as twill_model
from adasched.planner.twill.graph import builtin_graphs, load_machine, make_problem, normalise_costs
from adasched.planner.twill.knobs import buffer_depths, gemm_graph
from adasched.planner.twill.mii import compute_mii
from adasched.planner.twill.plan import plan_twill
from adasched.planner.twill.simsched import simulate_schedule
from adasched.planner.twill.validator import validate

P = SolveParams(time_limit=10.0, seed=0, threads=1)


@pytest.fixture(scope="module", params=[0, 1, 2], ids=lambda s: f"seed{s}")
def fa3(request):
    """The structure must hold for any optimal schedule, so several seeds. The limit is generous (a loaded CI
    machine must not turn 'optimal' into 'feasible'): the issue's 10 s target is `adasched bench twill`'s row."""
    return plan_twill("fa3-hopper", "h100", SolveParams(time_limit=60.0, seed=request.param, threads=1))


def test_builtins_present():
    assert {"toy-attention", "fa3-hopper", "hopper-gemm", "fa4-blackwell"} <= set(builtin_graphs())


def test_toy_loop_ii_2_with_one_tensor_core():
    plan = plan_twill("toy-attention", "h100", P)
    assert plan.ii == 2 and plan.mii == 2 and plan.solver.status == "optimal" and plan.ii_proven_minimal
    assert plan.graph["units"]["TC"] == 1
    assert not plan.warp_specialised  # no warp fields: plain modulo scheduling
    assert validate(plan.graph, plan.machine, plan.model_dump(mode="json")) == []
    # with two tensor cores the bound and the result drop to 1 (graph units override the machine)
    g = dict(plan.graph, units={"TC": 2, "SFU": 1})
    from adasched.planner.twill.graph import Graph

    plan2 = plan_twill(Graph.model_validate(g), "h100", P)
    assert plan2.ii == 1


def test_fa3_structure(fa3):
    plan = fa3
    assert plan.solver.status == "optimal" and plan.ii_proven_minimal and plan.ii == plan.mii
    assert validate(plan.graph, plan.machine, plan.model_dump(mode="json")) == []
    groups = {g.index: g for g in plan.warp_groups}
    producers = [g for g in groups.values() if g.role == "producer"]
    consumers = [g for g in groups.values() if g.role == "consumer"]
    assert len(producers) == 1 and set(producers[0].ops) == {"LK", "LV"}  # a TMA producer group
    assert len(consumers) == 2
    wg = {o.name: o.warp_group for o in plan.ops}
    assert wg["S0"] == wg["P0"] == wg["O0"] != wg["S1"] == wg["P1"] == wg["O1"]
    # ping-pong: while one consumer runs its (blocking) softmax, the tensor core runs the other's GEMMs
    slot = {o.name: o for o in plan.ops}
    ii = plan.ii

    def cycles(name):
        return {(slot[name].issue_cycle + c) % ii for c in range(slot[name].length)}

    for i, j in ((0, 1), (1, 0)):
        other_mma = cycles(f"S{j}") | cycles(f"O{j}")
        assert cycles(f"P{i}") & other_mma, f"softmax P{i} never overlaps consumer {j}'s GEMMs"
    # the first QK^T is peeled into the prologue: S_i runs a stage ahead of its PV
    for i in (0, 1):
        assert slot[f"S{i}"].stage < slot[f"O{i}"].stage
        assert f"S{i}" in plan.peeled
    assert plan.sim_replay_exact and plan.sim_deadlock is False
    # ASAP in-order issue with the scheduled unit order (ping-pong barriers) sustains I cycles per iteration
    assert plan.sim_cycles_per_iteration == pytest.approx(plan.ii, rel=0.02)
    assert plan.knobs.num_warps == 8 and plan.knobs.warp_specialize is False  # Hopper: no warp_specialize


def test_hopper_gemm_knobs_and_fa4_blackwell():
    gemm = plan_twill("hopper-gemm", "h100", P)
    assert gemm.solver.status == "optimal"
    assert validate(gemm.graph, gemm.machine, gemm.model_dump(mode="json")) == []
    # loads live TMA latency + MMA cycles -> buffer depth ceil(life / I); num_stages = that depth plus one slack
    # buffer for the variable-latency load, within one CTA's shared memory (32 KiB stages: 3 + 1 <= 227 // 32)
    times = {o.name: o.issue_cycle for o in gemm.ops}
    depth = buffer_depths(make_problem("hopper-gemm", "h100").graph, gemm.ii, times)["L"]
    assert depth == 3 and gemm.knobs.num_stages == min(depth + 1, 227 // 32) == 4
    # no warp specialization: one warpgroup per register-holding 64-row MMA slice (two here)
    assert gemm.knobs.num_warps == 8
    assert gemm.knobs.maxnreg is None  # no warp specialization on Hopper: the compiler keeps its registers
    fa4 = plan_twill("fa4-blackwell", "b200", P)
    assert validate(fa4.graph, fa4.machine, fa4.model_dump(mode="json")) == []
    assert fa4.knobs.warp_specialize is True  # supported on Blackwell, with a producer group
    assert fa4.ii == compute_mii(make_problem("fa4-blackwell", "b200")).mii
    # FA4-like roles: TMA producer, an MMA-issue group (QK^T of both tiles), two softmax groups
    roles = sorted(sorted(g.ops) for g in fa4.warp_groups)
    assert roles == [["C0", "O0", "P0"], ["C1", "O1", "P1"], ["LK", "LV"], ["S0", "S1"]]
    # 4 default warps per register-holding group (the MMA-issue group is a worker partition); one CTA's registers
    # (8 + 4 worker warps at maxnreg) fit the file: 168 = 65,536 / (12 x 32), down to a multiple of 8
    assert fa4.knobs.maxnreg == 168 and fa4.knobs.num_warps == 8 and fa4.knobs.note is None


def test_gemm_graph_tiles():
    h100 = load_machine("h100")
    g = gemm_graph(h100, 128, 256, 64)
    assert [o.name for o in g.ops] == ["L", "M0", "M1"] and g.op("M0").regs == 128
    assert all(min(max(r) for r in o.reserve.values()) >= 1 for o in g.ops)
    with pytest.raises(ValueError, match="multiple of 64"):
        gemm_graph(h100, 96, 128, 64)


def test_normalise_costs_keeps_ratios_and_never_zero():
    costs, unit = normalise_costs({"mma": 1024, "softmax": 1536, "issue": 3, "lat": 1536})
    assert costs == {"mma": 2, "softmax": 3, "issue": 1, "lat": 3} and unit == 512
    costs, unit = normalise_costs({"a": 1000, "b": 333, "c": 1})
    assert min(costs.values()) >= 1 and max(costs.values()) <= 16
    assert abs(costs["a"] * unit - 1000) / 1000 <= 0.15 and abs(costs["b"] * unit - 333) / 333 <= 0.15
    for m in ("h100", "b200"):
        raw = load_machine(m).raw_cycles
        c, u = normalise_costs(raw)
        assert min(c.values()) >= 1 and u == pytest.approx(load_machine(m).cycle_ns * load_machine(m).clock_ghz, rel=1e-3)


def test_status_is_honest_when_mii_times_out(monkeypatch):
    real = twill_model.solve_at

    def fake(problem, ii, params, **kw):
        att = real(problem, ii, params, **kw)
        if ii == 2:  # pretend the MII attempt ran out of time
            return twill_model.Attempt(ii=ii, warp=kw["warp"], status="timeout", seconds=params.time_limit)
        return att

    monkeypatch.setattr(twill_model, "solve_at", fake)
    prob = make_problem("toy-attention", "h100")
    s = twill_model.solve(prob, P, heuristic=False)  # the CP-SAT search alone (the heuristic has I = 2)
    assert s.ii == 3 and not s.proven and s.status == "feasible" and "timed out" in s.note


def test_validator_and_simulator_catch_broken_schedules(fa3):
    plan = fa3
    base = plan.model_dump(mode="json")
    # move a GEMM one cycle earlier: breaks a dependence or the tensor-core row
    early = [{"name": o["name"], "warp_group": o["warp_group"],
              "issue_cycle": o["issue_cycle"] - (o["name"] == "O0")} for o in base["ops"]]
    errs = validate(plan.graph, plan.machine, {**base, "ops": early})
    assert any("O0" in e or "unit TC" in e for e in errs), errs
    # a stage that disagrees with the issue cycle
    wrong = [dict(o, stage=o["stage"] + 1) if o["name"] == "S0" else o for o in base["ops"]]
    assert any("stage" in e for e in validate(plan.graph, plan.machine, {**base, "ops": wrong}))
    # both consumers on one warp group: issue slots and registers overflow
    merged = {**base, "ops": [dict(o, warp_group=1) if o["warp_group"] == 2 else o for o in base["ops"]]}
    errs = validate(plan.graph, plan.machine, merged)
    assert any("registers" in e for e in errs)
    # too few buffers
    assert validate(plan.graph, plan.machine, {**base, "buffers": {k: 1 for k in base["buffers"]}})
    # deadlock: a consumer whose issue order puts an op before its own same-group producer (cycle via queue)
    times = {o.name: o.issue_cycle for o in plan.ops}
    groups = {o.name: o.warp_group for o in plan.ops}
    swapped = dict(times, S0=times["O0"] + 1)  # S0 queued after O0 in its group, but O0 needs S0's softmax
    sim = simulate_schedule(plan.graph, plan.machine, plan.ii, swapped, groups, mode="timed")
    assert sim.deadlock
    ok = simulate_schedule(plan.graph, plan.machine, plan.ii, times, groups, mode="asap", jitter=2, seed=3)
    assert not ok.deadlock and ok.cycles_per_iteration < 2 * plan.ii
