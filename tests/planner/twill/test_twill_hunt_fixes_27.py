"""27th session's Twill hunt (each failed before): the simulator's steady-state window cut recurrences of
distance d > 1 mid-burst (a self-loop of delay 22 at distance 11 read 2.03 cycles/iteration, "slower than I = 2";
delay 71 at distance 9 read 6.81, below its bound 7.89); a machine file's negative unit count was blamed on the
graph, or planned; edited baseline and simulation figures verified."""
from __future__ import annotations

import json
import random

import pytest

from adasched.planner.cli import main
from adasched.planner.solver import SolveParams
from adasched.planner.twill.graph import Graph, MACHINES_DIR
from adasched.planner.twill.plan import TwillPlan, plan_twill

P = SolveParams(time_limit=5.0)


def _loop(delay: int, distance: int) -> Graph:
    return Graph.model_validate({"ops": [{"name": "A", "reserve": {"TC": [1]}}],
                                 "edges": [{"from": "A", "to": "A", "delay": delay, "distance": distance}]})


@pytest.mark.parametrize("delay, distance", [(22, 11), (71, 9), (16, 5), (22, 7)])
def test_a_recurrence_of_long_distance_runs_at_its_own_rate(delay, distance):
    plan = plan_twill(_loop(delay, distance), "h100", P)
    assert plan.sim_cycles_per_iteration == pytest.approx(max(delay / distance, 1.0), abs=5.1e-5)
    text = dict(plan.summary_rows())
    assert not any("slower than I" in v for v in text.values()), text


def test_random_self_loops_run_at_their_rate():
    rng = random.Random()
    for _ in range(6):
        d = rng.randint(2, 11)
        delay = rng.randint(1, 8 * d)
        plan = plan_twill(_loop(delay, d), "h100", P)
        assert plan.sim_cycles_per_iteration == pytest.approx(max(delay / d, 1.0), abs=5.1e-5), (delay, d)


@pytest.mark.parametrize("loops", [[(22, 11), (20, 7)], [(22, 11), (13, 5)], [(40, 13), (33, 11)],
                                   [(50, 17), (40, 13)]])
@pytest.mark.parametrize("held", [None, (14, 5), (19, 7)])
def test_independent_recurrences_and_a_unit_of_several_copies_run_at_their_rates(loops, held):
    """Each loop on its own unit, and an op holding one of k copies for L cycles (k in flight, then a wait: L / k
    cycles per iteration): the slowest op's exact rate. A window of whole periods of one of them misread the others
    (2.7727 for 2.8571; a plan failed its own check, 'below the units' bound of 2.8'), and the lcm of several
    periods is longer than the run."""
    ops = [{"name": f"A{i}", "reserve": {f"U{i}": [1]}} for i in range(len(loops))]
    edges = [{"from": f"A{i}", "to": f"A{i}", "delay": d, "distance": k} for i, (d, k) in enumerate(loops)]
    units = {f"U{i}": 1 for i in range(len(loops))}
    want = max(d / k for d, k in loops)
    if held:
        ops.append({"name": "C", "reserve": {"Y": [1] * held[0]}})
        units["Y"] = held[1]
        want = max(want, held[0] / held[1])
    plan = plan_twill(Graph.model_validate({"units": units, "ops": ops, "edges": edges}), "h100", P)
    assert plan.sim_cycles_per_iteration == pytest.approx(max(want, 1.0), abs=5.1e-5)


def test_steady_rate_reads_a_cycle_not_a_burst():
    from adasched.planner.twill.simsched import steady_rate

    rng = random.Random()
    d, delay = rng.randint(2, 13), rng.randint(20, 60)
    start = rng.randint(0, d - 1)
    times = [(i // d) * delay + i % d for i in range(start, start + rng.randint(4 * d, 8 * d))]  # bursts of d
    assert steady_rate(times) == pytest.approx(delay / d, rel=1e-12)
    assert steady_rate(list(range(0, 3 * 40, 3))) == 3.0
    short = [0, 5, 6, 11]  # no cycle in a window this short: its mean
    assert steady_rate(short) == pytest.approx(11 / 3)


@pytest.mark.parametrize("graph", ["toy-attention", "fa3-hopper"])
def test_a_negative_unit_count_in_a_machine_file_names_the_file(graph, tmp_path, capsys):
    m = json.loads((MACHINES_DIR / "h100.json").read_text())
    m["units"]["TC"] = -random.randint(1, 4)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(m))
    out = tmp_path / "p.json"
    assert main(["plan", "twill", "--graph", graph, "--machine", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}") and f"units['TC'] = {m['units']['TC']}" in err[0]
    assert not out.exists()


@pytest.fixture(scope="module")
def fa3():
    return plan_twill("fa3-hopper", "h100", P)


def _verify(plan, **edit):
    return TwillPlan.model_validate({**plan.model_dump(mode="json"), **edit}).verify()


def test_edited_baseline_and_simulation_figures_are_refused(fa3):
    assert fa3.verify() == []
    assert any("baselines_ms.no-pipelining" in e for e in _verify(fa3, baselines_ms={"no-pipelining": 1e-9}))
    assert any("sim_deadlock" in e for e in _verify(fa3, sim_deadlock=True))
    assert any("sim_deadlock" in e for e in _verify(fa3, sim_cycles_per_iteration=None))
    skipped = _verify(fa3, sim_cycles_per_iteration=None, sim_deadlock=None, sim_replay_exact=None)
    assert not any("sim_" in e for e in skipped), skipped  # a skipped simulation (too many instances) is no error
