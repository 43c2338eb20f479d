"""`adasched bench twill`: its rows are the plans' own figures, its targets read the plans, and bad options are one
line with exit 2 before any solve."""
from __future__ import annotations

import json
import random

import pytest

from adasched.planner.cli import main
from adasched.planner.solver import SolveParams
from adasched.planner.twill.bench import fa3_structure_problems
from adasched.planner.twill.graph import make_problem
from adasched.planner.twill.plan import plan_twill, serial_cycles

#: each built-in graph's serial cycles per iteration (one iteration after the other, one instruction stream): by hand
#: from the graph files for toy-attention (S 0, P 1, O 2, done at 3) and hopper-gemm (L 0, M0 3, M1 4 on the one
#: tensor core, done at 5); fa3-hopper's is the list schedule's figure as of the 35th session
_SERIAL = {"toy-attention": 3, "fa3-hopper": 14, "hopper-gemm": 5}


def test_bench_rows_and_targets_are_the_plans_figures(capsys):
    repeats = random.randint(1, 2)
    rc = main(["bench", "twill", "--graph", "toy-attention,fa3-hopper,hopper-gemm", "--repeats", str(repeats),
               "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["repeats"] == repeats and [r["graph"] for r in res["rows"]] == ["toy-attention", "fa3-hopper",
                                                                                 "hopper-gemm"]
    for row in res["rows"]:
        plan = plan_twill(row["graph"], None, SolveParams(time_limit=10.0, seed=0, threads=1))
        assert (row["ii"], row["mii"], row["res_mii"], row["rec_mii"], row["status"], row["stages"]) == (
            plan.ii, plan.mii, plan.res_mii, plan.rec_mii, plan.solver.status, plan.stages)
        assert row["machine"] == plan.machine_name == "h100" and row["same_ii_every_run"]
        assert row["status"] in row["statuses_of_runs"] and set(row["statuses_of_runs"]) <= {"optimal", "feasible"}
        assert row["knobs"] == plan.knobs.model_dump(exclude={"note"})
        assert row["sim_cycles_per_iteration"] == plan.sim_cycles_per_iteration
        assert row["speedup_vs_no_pipelining"] == pytest.approx(plan.baselines_ms["no-pipelining"] / plan.predicted_ms,
                                                               rel=1e-12)
        assert row["speedup_vs_no_pipelining"] > 1.0
        # the baseline is in the row (32nd session: the speedup could not be recomputed from the output)
        assert row["speedup_vs_no_pipelining"] == pytest.approx(row["no_pipelining_cycles"] / row["ii"], rel=1e-9)
        # the serial baseline is the graph's, whatever the plan (hunt, 35th session: a worse warp grouping, with more
        # handoffs in its own no-pipelining baseline, read a larger speedup than the optimal plan of the same I)
        prob = make_problem(row["graph"])
        assert row["serial_cycles"] == serial_cycles(prob.graph, prob.units) == _SERIAL[row["graph"]]
        assert row["speedup_vs_serial"] == pytest.approx(row["serial_cycles"] / row["ii"], rel=1e-12)
        assert 0 < row["solve_seconds_min"] <= row["solve_seconds_median"] <= row["solve_seconds_max"]
    fa3 = res["rows"][1]
    assert fa3["warp_groups"] == "producer: LK LV; consumer: S0 P0 R0 O0; consumer: S1 P1 R1 O1"
    assert [t["met"] for t in res["targets"]] == [True, True, True], res["targets"]
    assert res["targets"][1]["value"].startswith(f"slowest of {repeats}: ")


def test_the_fa3_structure_check_catches_each_missing_part():
    plan = plan_twill("fa3-hopper", "h100", SolveParams(time_limit=10.0, seed=random.randint(0, 2), threads=1))
    assert fa3_structure_problems(plan) == []

    def broken(edit):
        p = plan.model_copy(deep=True)
        edit(p)
        return fa3_structure_problems(p)

    def no_producer(p):
        for g in p.warp_groups:
            if g.role == "producer":
                g.role = "consumer"

    def one_consumer_group(p):
        for o in p.ops:
            if o.name.endswith("1"):
                o.warp_group = next(x.warp_group for x in p.ops if x.name == "S0")

    def not_peeled(p):
        p.peeled = [n for n in p.peeled if n != "S1"]

    def no_ping_pong(p):  # P0 moved onto the cycles of nothing of consumer 1 (its GEMMs' residues taken away)
        for o in p.ops:
            if o.name in ("S1", "O1"):
                o.length = 1
                o.issue_cycle = next(x.issue_cycle for x in p.ops if x.name == "P0") + p.ii // 2 + 2

    assert any("producer" in m for m in broken(no_producer))
    assert any("consumer" in m for m in broken(one_consumer_group))
    assert broken(not_peeled) == ["S1 not peeled a stage ahead of O1"]
    got = broken(no_ping_pong)
    assert any("P0 never overlaps consumer 1" in m for m in got), got


@pytest.mark.parametrize("argv, needle", [
    (["--repeats", "0"], "--repeats: 0: must be 1..100"),
    (["--graph", "toy-attention,,fa3-hopper"], "--graph"),
    (["--graph", "toy-attention,toy-attention"], "names a graph twice"),
    (["--graph", "no-such-graph"], "no-such-graph"),
    (["--threads", "0"], "--threads"),
])
def test_bad_options_are_one_line(argv, needle, capsys):
    assert main(["bench", "twill", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], captured.err
    assert captured.out == ""


def test_bench_rows_carry_the_exclusive_cells_bound(tmp_path, capsys):
    """Found by the 31st session's hunt: a row gave mii, res_mii and rec_mii but not excl_mii, so a graph whose MII
    is the exclusive-cells bound showed "4 (3, 1)" with nothing explaining the 4 (README: all four in --json)."""
    units = random.randint(2, 3)  # 1 ALU, then all of them: the full cells exclude each other above ResMII
    ops = [{"name": f"o{i}", "reserve": {"ALU": [1, units]}} for i in range(2)]
    g = tmp_path / "excl.json"
    g.write_text(json.dumps({"units": {"ALU": units}, "ops": ops, "edges": []}))
    assert main(["bench", "twill", "--graph", str(g), "--repeats", "1", "--time-limit", "5", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    plan = plan_twill(str(g), None, SolveParams(time_limit=5.0, seed=0, threads=1))
    assert (row["mii"], row["res_mii"], row["rec_mii"], row["excl_mii"]) == (
        plan.mii, plan.res_mii, plan.rec_mii, plan.excl_mii)
    assert row["excl_mii"] == row["mii"] > max(row["res_mii"], row["rec_mii"]), row
    assert main(["bench", "twill", "--graph", str(g), "--repeats", "1", "--time-limit", "5"]) == 0
    assert f"{row['mii']} ({row['res_mii']}, {row['rec_mii']}, {row['excl_mii']})" in capsys.readouterr().out
