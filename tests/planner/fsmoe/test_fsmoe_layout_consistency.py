"""Review fixes of the two-step layout (`plan moe --two-step-a2a`) and of the plan's layout checks:

- ``--gpus-per-node`` G splits the EP group for the exchange only; the cluster's node size (the profile's) still
  prices the expert-gradient all-reduce. Before, G replaced it: on 16 GPUs of 8-GPU nodes in EP groups of 8, G = 2
  made each node's all-reduce carry 2 shards instead of 8 (39,471 ms instead of 157,851 ms for Mixtral).
- A two-step exchange inside one node (G = EP size: no inter-node step) is the flat layout's one all-to-all; the
  gradient all-reduces get the same idle link time. Before, its gaps were read off the empty inter-node stream, so
  more of the dense slices looked hidden (h100-sxm Mixtral L1024, 16 GPUs, EP 8: 7,173 ms of dense all-reduce
  exposed vs 7,225 ms for the flat layout; L4096: 6,093 vs 6,300).
- verify() refuses a plan whose expert copies do not follow from its layout, or with a two-step node size on a
  flat exchange (it loaded them)."""
from __future__ import annotations

import json

import pytest

from adasched.planner.fsmoe.planning import plan_config, plan_moe
from adasched.planner.fsmoe.plan import MoEPlan
from adasched.planner.fsmoe.presets import load_configs
from adasched.planner.plan import load_plan, save_plan
from adasched.planner.solver import SolveParams
from adasched.profiler.io import InputError
from adasched.profiler.profile import load_profile

PARAMS = SolveParams(time_limit=0.5)


def test_exchange_node_size_does_not_price_the_expert_allreduce():
    prof = load_profile("h100-sxm")                       # 8 GPUs per node
    cfg = load_configs("mixtral-8x7b", 16)[0]              # 32 layers, E = 8, M = 4096, H = 14336, SwiGLU
    ts = plan_config(cfg, 16, prof, stages="published", params=PARAMS, ep_size=8, two_step=True, gpus_per_node=2)
    # by hand: one expert (3 * 4096 * 14336 = 176,160,768 elements) per GPU per layer, one bucket per layer; the
    # copies sit 8 ranks apart, so a node's 8 GPUs reduce 8 different shards at once: stage-4 constants
    # 0.341 + 3.5e-6 * 8 * 176,160,768 per layer, 32 layers
    per_layer = 0.341 + 3.5e-6 * 8 * 176_160_768
    assert ts.expert_grad_allreduce_ms == pytest.approx(32 * per_layer, rel=1e-12)
    flat = plan_config(cfg, 16, prof, stages="published", params=PARAMS, ep_size=8)
    assert flat.expert_grad_allreduce_ms == pytest.approx(ts.expert_grad_allreduce_ms, rel=1e-12)
    # the plan records the exchange's split and the cluster's node size apart
    assert (ts.two_step_a2a, ts.exchange_gpus_per_node, ts.gpus_per_node, ts.expert_copies) == (True, 2, 8, 2)


def test_two_step_inside_one_node_prices_like_the_flat_exchange():
    prof = load_profile("h100-sxm")
    cfg = load_configs("mixtral-8x7b", 16)[0]
    flat = plan_config(cfg, 16, prof, stages="profile", params=PARAMS, ep_size=8)
    ts = plan_config(cfg, 16, prof, stages="profile", params=PARAMS, ep_size=8, two_step=True)   # G = 8 = EP size
    assert ts.exchange_gpus_per_node == 8
    # the same exchange (one 8-rank all-to-all fit for f*T*M bf16 rows per rank), the same pipelines chosen
    key = [(lp.r_fwd, lp.r_bwd, lp.order_fwd, lp.order_bwd, lp.wgrad_bwd) for lp in flat.layers]
    assert key == [(lp.r_fwd, lp.r_bwd, lp.order_fwd, lp.order_bwd, lp.wgrad_bwd) for lp in ts.layers]
    assert [lp.bwd_ms for lp in ts.layers] == pytest.approx([lp.bwd_ms for lp in flat.layers], rel=1e-12)
    # hence the same idle link time for the all-reduces: the same slices and the same iteration
    assert ts.grad_slices == pytest.approx(flat.grad_slices, rel=1e-9, abs=1.0)
    assert ts.grad_exposed_ms == pytest.approx(flat.grad_exposed_ms, rel=1e-9)
    assert ts.iteration_ms == pytest.approx(flat.iteration_ms, rel=1e-9)


@pytest.fixture(scope="module")
def flat_plan_json(tmp_path_factory):
    cfg = load_configs("mixtral-8x7b", 4)[:1]
    plan = plan_moe(cfg, 4, load_profile("h100-sxm"), stages="published", params=PARAMS, ep_size=2)
    path = tmp_path_factory.mktemp("moe_verify") / "flat.json"
    save_plan(plan, path)
    return json.loads(path.read_text())


@pytest.mark.parametrize("edit,needle", [
    ({"expert_copies": 1}, "expert_copies 1 is not the layout's 2"),
    ({"exchange_gpus_per_node": 2}, "exchange_gpus_per_node 2 given for a flat exchange"),
])
def test_verify_refuses_inconsistent_layouts(flat_plan_json, tmp_path, edit, needle):
    data = json.loads(json.dumps(flat_plan_json))
    assert data["configs"][0]["expert_copies"] == 2 and data["configs"][0]["exchange_gpus_per_node"] is None
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps(data))
    assert load_plan(ok, expect=MoEPlan).configs[0].expert_copies == 2          # the plan as written loads
    data["configs"][0].update(edit)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(InputError) as err:
        load_plan(bad, expect=MoEPlan)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_exchange_node_size_without_two_step_is_refused():
    # plan_config(..., gpus_per_node=G) without two_step used to re-cost the layout with nodes of G (the CLI refused
    # the combination, the Python API did not); now G only ever splits a two-step exchange
    cfg = load_configs("mixtral-8x7b", 16)[0]
    with pytest.raises(InputError, match="--gpus-per-node: only with --two-step-a2a"):
        plan_config(cfg, 16, load_profile("h100-sxm"), stages="published", params=PARAMS, ep_size=8, gpus_per_node=2)


@pytest.mark.parametrize("edit,config_edit,needle", [
    # another EP size with the copies to match: it kept EP 8's all-to-all and no expert all-reduce, and loaded for
    # an EP-4 run (33rd session's hunt)
    ({"ep_size": 4, "expert_copies": 2}, {}, "ep_size 4, hierarchical False, expert_copies 2, gpus_per_node 8 are "
                                             "not the layout the planner builds on 8 GPUs (ep_size 8, hierarchical "
                                             "False, expert_copies 1, gpus_per_node 8)"),
    ({"hierarchical": True}, {}, "experts sharded over nodes of 8 GPUs in EP groups of 8 do not cover 8 GPUs (and 2 "
                                 "more)"),
    # experts the recorded EP size cannot hold whole (3 experts over EP 8 verified)
    ({}, {"experts": 12}, "no layout of 8 GPUs holds this configuration (--gpus: mixtral-8x7b-L1024: 12 experts do "
                          "not divide evenly over 8 GPUs)"),
    ({}, {"experts": 3}, "are not the layout the planner builds on 8 GPUs (ep_size 1, hierarchical True"),
])
def test_verify_refuses_a_layout_the_planner_would_not_build(tmp_path, edit, config_edit, needle):
    cfg = load_configs("mixtral-8x7b", 4)[:1]
    plan = plan_moe(cfg, 8, load_profile("h100-sxm"), stages="published", params=PARAMS)  # flat EP 8, 1 copy
    path = tmp_path / "ok.json"
    save_plan(plan, path)
    assert load_plan(path, expect=MoEPlan).configs[0].ep_size == 8
    data = json.loads(path.read_text())
    data["configs"][0].update(edit)
    data["configs"][0]["config"].update(config_edit)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(InputError) as err:
        load_plan(bad, expect=MoEPlan)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_plan_moe_reports_progress_per_timed_layer():
    """(33rd session's scale hunt) plan moe of 1,024 layers with router statistics ran 40 s without a word: the CLI's
    progress bar now advances per layer timed (one for a configuration whose layers are alike)."""
    import random

    from adasched.planner.fsmoe.costmodel import MoEConfig

    L = random.randint(2, 5)
    alike = load_configs("mixtral-8x7b", 4)[0]
    stats = MoEConfig(name="s", experts=8, hidden=256, ffn_hidden=512, top_k=2, batch=2, seq_len=256, num_layers=L,
                      mean_k_per_layer=[round(random.uniform(1.1, 2.0), 3) for _ in range(L)])
    calls = []
    plan = plan_moe([alike, stats], 8, load_profile("h100-sxm"), stages="published", params=PARAMS,
                    progress=lambda n=1, total=None: calls.append((n, total)))
    assert calls == [(0, 1 + L)] + [(1, None)] * (1 + L)
    assert [len(c.layers) for c in plan.configs] == [alike.num_layers, L]
