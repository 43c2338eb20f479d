"""27th session's FSMoE hunt (each failed before): the expert-sharded layout's all-to-all priced with the
full-world fit whatever its EP size; `show` died on a KeyError for a baseline taken out by hand; plans verified
with hand edits the runtime would run (a layer's degree, gradient slices, mean_k, a heuristic called optimal, an
iteration shorter than its layers); the table left out the experts' all-reduce exposure; a two-step plan's forward
was "bound by all-gather / reduce-scatter" it does not run."""
from __future__ import annotations

import json
import random

import pytest

from adasched.planner.cli import main
from adasched.planner.fsmoe.costmodel import MoEConfig, stage_costs, topology
from adasched.planner.fsmoe.plan import MoEPlan
from adasched.planner.fsmoe.planning import plan_moe
from adasched.planner.solver import SolveParams
from adasched.profiler.profile import load_profile

PARAMS = SolveParams(time_limit=5.0)
BIG = dict(hidden=4096, ffn_hidden=14336, top_k=2, capacity_factor=1.2, batch=4, seq_len=1024,
           activation="swiglu")


@pytest.mark.parametrize("experts", [2, 4, 8])
def test_the_sharded_layouts_exchange_is_priced_over_the_ranks_it_spans(experts):
    """EP over P of 8 nodes: P nodes' GPUs exchange (the expert copies apart), as flat EP groups of P x 8 ranks
    do - the same bytes leave each node, the same fit prices them; before, every P took the 64-rank fit."""
    prof = load_profile("h100-sxm")
    cfg = MoEConfig(name="t", experts=experts, **BIG)
    topo = topology(cfg, 64, 8)
    assert topo.hierarchical and topo.ep_size == experts
    costs = stage_costs(cfg, topo, source="profile", profile=prof)
    fit = prof.collective("all_to_all", experts * 8)
    assert f"a2a: all_to_all fit on {fit.group_size} ranks" in costs.notes[0]
    assert costs.alpha[0] == fit.alpha_ms
    flat_cfg = MoEConfig(name="f", experts=experts * 8, **BIG)
    flat = stage_costs(flat_cfg, topology(flat_cfg, 64, 8, experts * 8), source="profile", profile=prof)
    assert flat.notes[0] == costs.notes[0] and flat.alpha[0] == costs.alpha[0]
    if experts < 8:  # fewer ranks than the world: a smaller fit than the 64-rank one it took
        assert fit.group_size < 64


@pytest.fixture(scope="module")
def plan16(tmp_path_factory):
    cfg = MoEConfig(name="t", experts=8, hidden=256, ffn_hidden=512, top_k=2, batch=2, seq_len=256, num_layers=4)
    return plan_moe([cfg], 16, load_profile("h100-sxm"), stages="published", params=PARAMS)


def _edited(plan, edit):
    d = plan.model_dump(mode="json")
    edit(d)
    return MoEPlan.model_validate(d).verify()


def test_genuine_plan_verifies(plan16):
    assert plan16.verify() == []


@pytest.mark.parametrize("name", ["no-pipeline", "fixed-r2"])
def test_a_baseline_taken_out_is_a_verify_error_and_one_line_in_show(plan16, name, tmp_path, capsys):
    def drop(d):
        d["baselines_ms"].pop(name)
        for c in d["configs"]:
            c["baselines_fwd_bwd_ms"].pop(name)
    errs = _edited(plan16, drop)
    assert any("not the baselines" in e for e in errs), errs
    d = plan16.model_dump(mode="json")
    drop(d)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "baselines" in err[0], err


def test_hand_edits_the_runtime_would_run_are_refused(plan16):
    layer = random.randint(1, 3)

    def one_degree(d):  # another degree with a one-entry "timing" that matches it
        lp = d["configs"][0]["layers"][layer]
        lp["r_fwd"] = 3
        lp["time_by_r_fwd"] = {"3": lp["fwd_ms"]}
    assert any(f"layer {layer}: timings differ from layer 0's" in e for e in _edited(plan16, one_degree))

    def faster_layer(d):
        lp = d["configs"][0]["layers"][layer]
        lp["time_by_r_fwd"] = {k: v * 0.5 for k, v in lp["time_by_r_fwd"].items()}
        lp["fwd_ms"] *= 0.5
    assert any(f"layer {layer}: timings differ" in e for e in _edited(plan16, faster_layer))

    def slices(d):
        d["configs"][0]["grad_slices"][0] = 1e30
    assert any("gradient slices sum" in e for e in _edited(plan16, slices))

    def mean_k(d):
        d["configs"][0]["layers"][layer]["mean_k"] = 7.5
    assert any(f"layer {layer}: mean_k 7.5" in e for e in _edited(plan16, mean_k))

    def short(d):
        d["configs"][0]["iteration_ms"] = 1e-3
    assert any("shorter than its MoE layers" in e for e in _edited(plan16, short))

    def optimal(d):
        d["solver"]["status"] = "optimal"
        d["configs"][0]["bwd_choice"] = "coordinate-descent (budget spent)"
    assert any("is a heuristic" in e for e in _edited(plan16, optimal))


def test_the_table_shows_the_expert_all_reduce_exposure(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"name": "e", "experts": 8, "hidden": 256, "ffn_hidden": 512, "top_k": 2, "batch": 2,
                               "seq_len": 256, "num_layers": 3}))
    out = tmp_path / "p.json"
    assert main(["plan", "moe", "--config", str(cfg), "--gpus", "16", "--ep-size", "8", "--out", str(out),
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["configs"][0]
    c = MoEPlan.model_validate_json(out.read_text()).configs[0]
    assert c.expert_copies == 2 and c.expert_grad_exposed_ms is not None
    assert row["expert AR exposed ms"] == c.expert_grad_exposed_ms and row["AR exposed ms"] == c.grad_exposed_ms


def test_a_two_step_forward_is_not_called_all_gather_bound():
    from adasched.planner.fsmoe.planning import forward_case

    prof = load_profile("h100-sxm")
    cfg = MoEConfig(name="g", experts=64, hidden=1024, ffn_hidden=256, top_k=1, batch=1, seq_len=512)
    topo = topology(cfg, 8, 8, 8, two_step=True, exchange_gpus_per_node=8)  # one node: no inter-node step
    fwd = stage_costs(cfg, topo, source="profile", profile=prof)
    busy = fwd.resource_busy_ms(1)
    assert busy["inter"] == 0 and max(busy, key=busy.get) == "intra", busy
    assert forward_case(fwd, 1) == "intra-node-bound (the two-step exchange's intra-node all-to-all)"


def test_a_layer_of_its_own_mean_k_with_an_edited_degree_is_refused(tmp_path):
    """With router statistics every layer has its own mean_k, so no other layer's timings compare with it: its
    degrees must still be the planner's (the candidates and powers of two up to R_MAX)."""
    cfg = MoEConfig(name="t", experts=8, hidden=256, ffn_hidden=512, top_k=2, batch=2, seq_len=256, num_layers=4,
                    mean_k_per_layer=[1.7, 2.0, 1.3, 1.9])
    plan = plan_moe([cfg], 16, load_profile("h100-sxm"), stages="published", params=PARAMS)
    assert plan.verify() == []
    layer = random.randint(1, 3)

    def one_degree(d):
        lp = d["configs"][0]["layers"][layer]
        lp["r_fwd"] = 3
        lp["time_by_r_fwd"] = {"3": lp["fwd_ms"]}
    errs = _edited(plan, one_degree)
    assert any(f"layer {layer}: time_by_r_fwd has degrees ['3']" in e for e in errs), errs

    def extra_degree(d):
        d["configs"][0]["layers"][layer]["time_by_r_bwd"]["128"] = 1.0
    assert any(f"layer {layer}: time_by_r_bwd has degrees" in e for e in _edited(plan, extra_degree))
