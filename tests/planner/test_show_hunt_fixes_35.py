"""`show` (every plan's verify) refuses what a 35th-session hunt edited into genuine plans and it accepted or
crashed on: an SP sequence id past its step (an IndexError traceback from show and simulate), a Twill plan's
rec_mii / excl_mii, a MoE plan's configuration (its layer-0 stage costs kept), its fastest-backward iteration,
fused-wgrad backward and single-copy expert all-reduce, a LoRA plan's merge count and problem records."""
from __future__ import annotations

import json
import random

import pytest

from adasched.planner.cli import main


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    d = tmp_path_factory.mktemp("plans")
    cmds = {
        "sp": ["plan", "sp", "--seqlens", "builtin", "--gpus", "8", "--global-batch", "16", "--steps", "1",
               "--max-context", "32768", "--no-milp", "--deterministic"],
        "moe": ["plan", "moe", "--config", "mixtral-8x7b", "--gpus", "8"],
        "lora": ["plan", "lora", "--jobs", "tiny", "--no-milp"],
        "twill": ["plan", "twill", "--graph", "toy-attention", "--time-limit", "5"],
    }
    out = {}
    for kind, cmd in cmds.items():
        path = d / f"{kind}.json"
        assert main([*cmd, "--out", str(path)]) == 0, kind
        out[kind] = json.loads(path.read_text())
    return out


def test_the_genuine_plans_show(plans, tmp_path, capsys):
    for kind, plan in plans.items():
        p = tmp_path / f"{kind}.json"
        p.write_text(json.dumps(plan))
        assert main(["show", str(p)]) == 0, (kind, capsys.readouterr().err)


def test_an_sp_sequence_id_past_its_step_is_one_line(plans, tmp_path, capsys, assert_show_refuses):
    n = len(plans["sp"]["steps"][0]["seqlens"])
    bad = random.choice([n, n + 1, 10 ** 6])

    def edit(d):
        d["steps"][0]["micro_batches"][0]["groups"][0]["seq_ids"][0] = bad

    assert_show_refuses(plans["sp"], [(edit, f"seq_ids: {bad} outside the step's {n} sequences")])
    d = json.loads(json.dumps(plans["sp"]))
    edit(d)
    p = tmp_path / "sp_bad.json"
    p.write_text(json.dumps(d))
    capsys.readouterr()
    assert main(["simulate", str(p)]) == 2  # (an IndexError traceback, exit 1, before)
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p}: fails verification: ") and err.count("\n") == 1, err


def test_twill_rec_and_exclusive_bounds_are_the_graphs(plans, assert_show_refuses):
    plan = plans["twill"]
    assert (plan["rec_mii"], plan["excl_mii"]) == (1, 0)  # toy-attention: O's self-loop of 1 cycle, no exclusivity
    assert_show_refuses(plan, [
        (lambda d: d.update(rec_mii=2), "rec_mii 2: the graph gives 1"),
        (lambda d: d.update(rec_mii=0), "rec_mii 0: the graph gives 1"),
        (lambda d: d.update(excl_mii=2), "excl_mii 2: the graph gives 0"),
    ])


def test_moe_edits_that_kept_their_costs(plans, assert_show_refuses):
    plan = plans["moe"]
    c0 = plan["configs"][0]
    assert c0["expert_copies"] == 1 and c0["expert_grad_allreduce_ms"] == 0

    def cfg(**kw):
        return lambda d: d["configs"][0]["config"].update(**kw)

    def layer0(**kw):
        return lambda d: d["configs"][0]["layers"][0].update(**kw)

    assert_show_refuses(plan, [
        (cfg(ffn_hidden=2 * c0["config"]["ffn_hidden"]), "layer0_stage_costs.work ["),
        (cfg(capacity_factor=5.0), "layer0_stage_costs.work ["),
        (cfg(dropless=True), "layer0_stage_costs.work ["),
        (lambda d: d["configs"][0].update(iteration_fastest_bwd_ms=99999.0), "iteration_fastest_bwd_ms 99999.0 ms"),
        (layer0(bwd_fused_wgrad_ms=0.001), "bwd_fused_wgrad_ms 0.001 is below its fastest backward"),
        (lambda d: d["configs"][0].update(expert_grad_allreduce_ms=500.0), "expert_grad_allreduce_ms 500.0, but"),
    ])


def test_lora_merges_and_problem_records(plans, assert_show_refuses):
    plan = plans["lora"]
    assert plan["sequence_source"] == "packed" and len(plan["problems"]) >= 4
    merged = plan["summary"]["merges"]
    p0 = plan["problems"][0]
    other = next(j for j in range(len(plan["jobs"])) if j not in p0["jobs"])

    def prob(i, **kw):
        return lambda d: d["problems"][i].update(**kw)

    cap = plan.get("packing_capacity") or plan["capacity"]
    assert_show_refuses(plan, [
        (lambda d: d["summary"].update(merges=merged + 5), f"summary.merges: {merged + 5}, but {merged} microbatches"),
        (prob(0, jobs=[other]), "problems.0.samples: "),
        (prob(1, smallest_bin_tokens=cap + 1), f"a smallest bin of {cap + 1} tokens above the packing capacity"),
        (prob(3, ffd_bins=plan["problems"][3]["samples"] + 1), "problems.3: ffd_bins "),
    ])
    # a record moved onto another global batch of its group: that one twice, its own missing
    twin = next(i for i, p in enumerate(plan["problems"]) if i and p["jobs"] == p0["jobs"])
    assert_show_refuses(plan, [(prob(twin, global_batch=p0["global_batch"]),
                                f"problems.{twin}: global batch {p0['global_batch']} of group ")])



def test_an_sp_plan_for_a_model_that_cannot_fit_is_one_line(tmp_path, assert_show_refuses):
    """A 2-GPU gpt-7b plan edited to gpt-13b: the model states alone exceed the memory, the token capacity is 0 and
    the bounds divided by it (a ZeroDivisionError traceback from show, simulate and train_sp's pre-check)."""
    path = tmp_path / "sp2.json"
    assert main(["plan", "sp", "--profile", "h100-sxm", "--seqlens", "builtin", "--gpus", "2", "--global-batch", "8",
                 "--steps", "1", "--max-context", "12000", "--no-milp", "--deterministic", "--out", str(path)]) == 0
    plan = json.loads(path.read_text())
    assert plan["model"] == "gpt-7b"
    assert_show_refuses(plan, [(lambda d: d.update(model="gpt-13b"),
                                "model 'gpt-13b': its states alone need 96.19 GiB per GPU on all 2 GPUs, more than "
                                "profile 'h100-sxm''s 79.65 GiB: no sequence fits")])


def test_a_twill_plan_whose_mii_search_ran_out_of_time_writes_and_shows(tmp_path, capsys, monkeypatch):
    """(review) the rec_mii check above refused the planner's own plan when its RecMII bisection hit --time-limit:
    it records a lower bound (and says so in its note), verify computes the exact one. Such a plan writes and shows
    (its rec_mii may be below the graph's; above it, other checks refuse it first: I is at least the graph's). The
    planner's bisection is given a deadline already past (a 1 ms --time-limit was timing-dependent)."""
    import time

    import adasched.planner.twill.model as twill_model
    from adasched.planner.twill.graph import make_problem
    from adasched.planner.twill.mii import compute_mii

    n = 256
    ops = [{"name": f"v{i}", "reserve": {"ALU": [1]}} for i in range(n)]
    edges = [{"from": f"v{i}", "to": f"v{i + 1}", "delay": 97} for i in range(n - 1)]
    edges += [{"from": f"v{i}", "to": f"v{max(0, i - 50)}", "delay": 13, "distance": 1} for i in range(50, n, 7)]
    graph = tmp_path / "chain.json"
    graph.write_text(json.dumps({"name": "chain", "units": {"ALU": 2}, "ops": ops, "edges": edges}))
    real = compute_mii
    monkeypatch.setattr(twill_model, "compute_mii", lambda problem, deadline=None: real(problem,
                                                                                       deadline=time.perf_counter()))
    out = tmp_path / "plan.json"
    assert main(["plan", "twill", "--graph", str(graph), "--time-limit", "2", "--out", str(out), "--json"]) == 0, \
        capsys.readouterr().err
    plan = json.loads(out.read_text())
    assert "the RecMII search ran out of time" in plan["solver"]["note"]
    monkeypatch.undo()
    assert main(["show", str(out)]) == 0
    exact = real(make_problem(str(graph)))
    assert exact.exact and plan["rec_mii"] < exact.rec  # (the lower bound it recorded, below the graph's)
