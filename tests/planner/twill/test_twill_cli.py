"""`adasched plan twill` and `adasched show`: JSON fields, plan file, plot, and bad input -> one-line error, exit 2."""
from __future__ import annotations

import json

import pytest

from adasched.planner.cli import main
from adasched.planner.plan import load_plan
from adasched.planner.twill.plan import TwillPlan
from adasched.planner.twill.validator import validate


def _graph(tmp_path, ops, edges, units=None, name="g.json"):
    d = {"ops": ops, "edges": edges}
    if units is not None:
        d["units"] = units
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return p


def test_plan_twill_json_out_and_show_plot(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["plan", "twill", "--graph", "fa3-hopper", "--machine", "h100", "--json", "--out", str(out),
               "--time-limit", "10"])
    assert rc == 0
    js = json.loads(capsys.readouterr().out)
    for key in ("ii", "mii", "status", "solve_seconds", "warp_groups", "stages"):
        assert key in js
    assert js["ii"] == 8 and js["mii"] == 8 and js["status"] == "optimal"
    plan = load_plan(out, expect=TwillPlan)
    assert validate(plan.graph, plan.machine, plan.model_dump(mode="json")) == []
    png = tmp_path / "f.png"
    assert main(["show", str(out), "--plot", str(png)]) == 0
    assert png.stat().st_size > 5000
    text = capsys.readouterr().out
    assert "triton knobs" in text and "warp groups" in text
    # simulate: the loop schedule counts normalised cycles, and says so (it printed "makespan 44.000 ms")
    assert main(["simulate", str(out), "--json"]) == 0
    sim = json.loads(capsys.readouterr().out)
    assert sim["unit"] == "cycles" and "makespan_ms" not in sim
    bars = plan.gantt_tasks()
    assert sim["makespan_cycles"] == max(b.end_ms for b in bars) == (plan.stages + 1) * plan.ii - plan.ii + max(
        s.issue_cycle + s.length for s in plan.ops)
    assert {t["stream"] for t in sim["tasks"]} == {b.lane for b in bars}
    assert main(["simulate", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"makespan {sim['makespan_cycles']:.3f} cycles" in text and " ms" not in text


def test_plan_twill_user_graph_file(tmp_path, capsys):
    p = _graph(tmp_path, [{"name": "S", "reserve": {"TC": [1, 1]}, "regs": 64, "smem": 0, "variable_latency": False},
                          {"name": "P", "reserve": {"SFU": [1]}}],
               [{"from": "S", "to": "P", "delay": 2, "distance": 0},
                {"from": "P", "to": "S", "delay": 1, "distance": 1}], units={"TC": 1, "SFU": 1, "TMA": 1})
    assert main(["plan", "twill", "--graph", str(p), "--machine", "h100", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["ii"] == 3 and js["mii"] == 3  # recurrence S->P->S: (2 + 1) / 1


@pytest.mark.parametrize("ops,edges,needle", [
    ([{"name": "A", "reserve": {"TC": [1]}}, {"name": "B", "reserve": {"TC": [1]}}],
     [{"from": "A", "to": "B", "delay": 1}, {"from": "B", "to": "A", "delay": 0}],
     "zero total distance A -> B -> A (no legal schedule)"),
    ([{"name": "A", "reserve": {"TC": [1]}}, {"name": "B", "reserve": {"SFU": [1]}}],  # delays 0: "no legal" was false
     [{"from": "A", "to": "B", "delay": 0}, {"from": "B", "to": "A", "delay": 0}],
     "zero total distance A -> B -> A (a dependence cycle inside one iteration, here of total delay 0: not supported"),
    ([{"name": "A", "reserve": {"TC": [1]}}], [{"from": "A", "to": "X", "delay": 1}], "edges[0] A->X: unknown op 'X'"),
    ([{"name": "A", "reserve": {"FPGA": [1]}}], [], "'A': reserves unit 'FPGA'"),
    ([{"name": "A", "reserve": {"TC": [1]}, "regs": 400}], [], "'A': needs 400 registers"),
    ([{"name": "A", "reserve": {"TC": [2]}}], [], "'A': holds 2 'TC' in one cycle"),
    ([{"name": "A", "reserve": {"TC": [1]}}, {"name": "A", "reserve": {"TC": [1]}}], [], "duplicate op name 'A'"),
    ([{"name": "A", "reserve": {"TC": []}}], [], "reserve"),
    ([{"name": "A", "reserve": {"TC": [True]}}], [], "ops.0.reserve.TC.0: Input should be a valid integer"),
    ([{"name": "A", "reserve": {"TC": [1]}}, {"name": "B", "reserve": {"TC": [1]}}],
     [{"from": "A", "to": "B", "delay": True}], "edges.0.delay: Input should be a valid integer"),
])
def test_bad_graphs_exit_2_naming_the_op_or_edge(tmp_path, capsys, ops, edges, needle):
    p = _graph(tmp_path, ops, edges)
    out = tmp_path / "never.json"
    rc = main(["plan", "twill", "--graph", str(p), "--machine", "h100", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert not out.exists()


def test_bad_options_exit_2(tmp_path, capsys):
    assert main(["plan", "twill", "--graph", "no-such-graph", "--machine", "h100"]) == 2
    assert "error: --graph" in capsys.readouterr().err
    assert main(["plan", "twill", "--graph", "toy-attention", "--machine", "tpu"]) == 2
    assert "error: --machine" in capsys.readouterr().err
    assert main(["plan", "twill", "--graph", "toy-attention", "--time-limit", "0"]) == 2
    assert "time_limit" in capsys.readouterr().err
    assert main(["plan", "twill", "--graph", "toy-attention", "--out", str(tmp_path)]) == 2  # a directory
    assert "error: --out" in capsys.readouterr().err


def test_show_refuses_a_tampered_twill_plan(tmp_path, capsys, assert_show_refuses):
    out = tmp_path / "plan.json"
    assert main(["plan", "twill", "--graph", "fa3-hopper", "--machine", "h100", "--out", str(out)]) == 0
    capsys.readouterr()
    good = json.loads(out.read_text())
    assert TwillPlan.model_validate(good).verify() == []

    def below_mii(d):
        d["ii"] = 1

    def bad_group(d):
        d["ops"][0]["warp_group"] = 7

    def moved(d):  # the last op one stage later (stages kept consistent): its loop-carried edge breaks
        d["ops"][-1]["issue_cycle"] += d["ii"]
        d["ops"][-1]["stage"] += 1
        d["stages"] = max(o["stage"] for o in d["ops"]) + 1

    def wrong_stages(d):
        d["stages"] += 1

    def no_edges(d):  # a graph without its dependences would validate any schedule: the digest catches it
        d["graph"]["edges"] = []

    assert_show_refuses(good, [(below_mii, "ii 1 is below the plan's MII 8"),
                               (bad_group, "warp group 7 is not one of the plan's"), (moved, "issue distance"),
                               (wrong_stages, "stages"), (no_edges, "not the ones the plan was solved for")])


def test_bad_seed_threads_and_plan_fields_are_one_error_line(tmp_path, capsys):
    """Sweep findings: --seed 1e23 raised a TypeError traceback from OR-Tools, --threads 100000 printed 'CP-SAT model
    invalid:' naming no option; a plan whose cycle_ns is NaN, whose simulated cycles are inf or whose op draws on
    a unit its reservation table does not hold was read and drawn."""
    import json

    from adasched.planner.cli import main

    base = ["plan", "twill", "--graph", "toy-attention", "--machine", "h100", "--time-limit", "5"]
    for opts, needle in ((["--seed", "-3"], "error: --seed: seed must be an int >= 0"),
                         (["--threads", "100000"], "error: --threads: threads must be in 1..1024")):
        assert main(base + opts) == 2
        err = capsys.readouterr().err
        assert err.startswith(needle) and err.count("\n") == 1, err
    out = tmp_path / "p.json"
    assert main(base + ["--seed", str(10 ** 23), "--out", str(out)]) == 0
    capsys.readouterr()
    plan = json.loads(out.read_text())
    for change, needle in ((lambda d: d.update(cycle_ns=float("nan")), "cycle_ns"),
                           (lambda d: d.update(sim_cycles_per_iteration=float("inf")), "sim_cycles_per_iteration"),
                           (lambda d: d["ops"][0].update(units=["XYZ"]), "its reservation table holds")):
        bad = json.loads(json.dumps(plan))
        change(bad)
        f = tmp_path / "bad.json"
        f.write_text(json.dumps(bad))
        assert main(["show", str(f)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err


def test_solver_option_errors_name_the_option_whatever_the_message_says(monkeypatch, capsys):
    """The CLI named the bad option after the first word of SolveParams' message ('seed must be ...' -> --seed), so
    a reworded message ('invalid seed: ...') was blamed on --time-limit. Each option is now checked on its own:
    the error names the option, with SolveParams' message as it is; with several bad, the first in option order."""
    from dataclasses import dataclass

    import adasched.planner.solver as solver

    @dataclass(frozen=True)
    class Reworded(solver.SolveParams):
        def __post_init__(self):
            try:
                super().__post_init__()
            except ValueError as err:
                raise ValueError(f"invalid value: {err}") from None

    monkeypatch.setattr(solver, "SolveParams", Reworded)
    base = ["plan", "twill", "--graph", "toy-attention", "--machine", "h100"]
    for opts, option in ((["--seed", "-3"], "--seed"), (["--threads", "0"], "--threads"),
                         (["--time-limit", "-1"], "--time-limit"),
                         (["--threads", "0", "--seed", "-1", "--time-limit", "nan"], "--time-limit"),
                         (["--threads", "0", "--seed", "-1"], "--seed")):
        assert main(base + opts) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {option}: invalid value: ") and err.count("\n") == 1, (opts, err)
