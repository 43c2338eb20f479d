"""28th session: a plan's layers of a mean_k other than layer 0's are re-simulated by verify. Before, only layer 0
(from its stored stage costs) was, so with router statistics a layer's degree edited together with its timings -
r_fwd moved to another timed degree, that degree's time set to the layer's forward time, the old one made slower -
passed every check and the runtime would have run the edited degree."""
from __future__ import annotations

import json
import random

import pytest

from adasched.planner.fsmoe.costmodel import MoEConfig, stage_costs, topology
from adasched.planner.fsmoe.model import evaluate_pipeline
from adasched.planner.fsmoe.plan import MoEPlan
from adasched.planner.fsmoe.planning import plan_moe
from adasched.planner.solver import SolveParams
from adasched.profiler.profile import load_profile


@pytest.mark.parametrize("source", ["published", "profile"])
def test_an_edited_degree_of_a_layer_of_its_own_mean_k_is_refused(source):
    ks = [round(random.uniform(1.1, 2.0), 3) for _ in range(4)]
    cfg = MoEConfig(name="t", experts=8, hidden=256, ffn_hidden=512, top_k=2, batch=2, seq_len=256, num_layers=4,
                    mean_k_per_layer=ks)
    prof = load_profile("h100-sxm")
    plan = plan_moe([cfg], 16, prof, stages=source, params=SolveParams(time_limit=5.0))
    assert plan.verify() == []
    layer = random.randint(1, 3)
    d = json.loads(plan.model_dump_json())
    lp = d["configs"][0]["layers"][layer]
    topo = topology(cfg, 16, prof.gpus_per_node)
    fwd = stage_costs(cfg, topo, source=source, profile=prof, layer=layer)
    # another timed degree whose simulated forward differs from the layer's
    other = next(r for r in sorted(lp["time_by_r_fwd"], key=int) if int(r) != lp["r_fwd"] and abs(
        evaluate_pipeline(fwd, int(r), lp["order_fwd"]).time_ms - lp["fwd_ms"]) > 1e-6 * lp["fwd_ms"])
    lp["time_by_r_fwd"][str(lp["r_fwd"])] = lp["fwd_ms"] * 1.5
    lp["time_by_r_fwd"][other] = lp["fwd_ms"]
    lp["r_fwd"] = int(other)
    errors = MoEPlan.model_validate(d).verify()
    assert [e for e in errors if f"layer {layer}: forward" in e and "but its stage costs" in e], errors
