"""`adasched plan moe --gpus D --ep-size K`: EP groups of K inside a data-parallel world of D GPUs.

Before: a plan for EP size K could only be made with --gpus K, so its dense all-reduce (the gradient slices) was
costed on K GPUs while train_moe --ep-size K on D ranks all-reduces the dense gradients over all D (and the expert
ones over their D/K copies, which no plan charged); the run accepted that plan. Also before: with all_reduce
fitted only below the world, the dense all-reduce took the largest fit (an 8-GPU intra-node figure for 64 GPUs).
Expected values are worked out by hand in the comments."""
from __future__ import annotations

import json

import pytest

from adasched.planner.cli import main
from adasched.planner.fsmoe.costmodel import (expert_grad_allreduce_ms, expert_params_per_gpu, stage_costs,
                                              topology)
from adasched.planner.fsmoe.plan import MoEPlan
from adasched.planner.fsmoe.planning import dense_block_ms, plan_config
from adasched.planner.fsmoe.presets import load_configs
from adasched.planner.plan import load_plan
from adasched.planner.solver import SolveParams
from adasched.profiler.io import InputError
from adasched.profiler.profile import CollectiveFit, load_profile


def _h100_with_ar8(keep_ar64: bool):
    """h100-sxm plus an intra-node all_reduce fit on 8 ranks (alpha 0.05 ms, beta 1e-7 ms/B) that a K=8 group
    would use; with keep_ar64 False the 64-rank all_reduce fit is dropped."""
    p = load_profile("h100-sxm")
    fits = [c for c in p.collectives if keep_ar64 or c.op != "all_reduce"]
    fits.append(CollectiveFit(op="all_reduce", group_size=8, scope="intra", alpha_ms=0.05, beta_ms_per_byte=1e-7,
                              source="test-ar8"))
    return p.model_copy(update={"collectives": fits})


def test_dense_allreduce_spans_the_world_not_the_ep_group():
    prof = _h100_with_ar8(keep_ar64=True)
    cfg = load_configs("mixtral-8x7b", 64)[0]
    topo = topology(cfg, 64, 8, ep_size=8)
    assert (topo.gpus, topo.ep_size, topo.hierarchical, topo.expert_copies) == (64, 8, False, 8)
    sc = stage_costs(cfg, topo, source="profile", profile=prof)
    # dense params 4 M^2 = 67,108,864 -> 134,217,728 bf16 bytes on the 64-rank fit: 0.341 + 1.75e-6 * B = 235.222
    # (the 8-rank fit would give 0.05 + 1e-7 * B = 13.47)
    assert sc.alpha[4] + sc.work[4] == pytest.approx(235.222024, rel=1e-9)
    pc = plan_config(cfg, 64, prof, stages="profile", params=SolveParams(time_limit=1.0), ep_size=8)
    # every one of the 32 layers' dense gradients after the backward: 0.341 + 32 * 234.881024 = 7516.533768
    assert pc.grad_exposed_at_end_ms == pytest.approx(7516.533768, rel=1e-9)
    assert pc.ep_size == 8 and not pc.hierarchical and pc.expert_copies == 8


def test_expert_gradient_allreduce_over_the_copies():
    prof = load_profile("h100-sxm")
    cfg = load_configs("mixtral-8x7b", 64)[0]
    topo = topology(cfg, 64, 8, ep_size=8)
    # one expert per GPU (8 experts / EP 8) of 3 * 4096 * 14336 = 176,160,768 params, 32 layers: 5,637,144,576
    assert expert_params_per_gpu(cfg, topo) == 5_637_144_576
    # over its 8 copies (ranks 8 apart, one per node), while the node's 7 other GPUs reduce theirs over the same
    # links: 8 shards leave each node, priced as one all-reduce of 8 shards over the 64 GPUs:
    # 0.341 + 1.75e-6 * 8 * 2 * 5,637,144,576 = 157840.389 ms
    ms, note = expert_grad_allreduce_ms(cfg, topo, source="profile", profile=prof)
    assert ms == pytest.approx(157840.389128, rel=1e-9) and "over 8 copies" in note
    pc = plan_config(cfg, 64, prof, stages="profile", params=SolveParams(time_limit=1.0), ep_size=8)
    # the runtime's buckets (ExpertGradReducer, >= 2**22 elements): each layer's 176,160,768 expert gradients are
    # launched when its MoE backward ends: 32 all-reduces, 31 more alphas: 157840.389128 + 31 * 0.341
    assert pc.expert_grad_allreduce_ms == pytest.approx(157850.960128, rel=1e-9)
    # the exposed part is in the plan's iteration; the baselines run the same buckets, overlapping only their dense
    # blocks' backward (the link as a queue: backlog + bucket - dense backward per layer)
    moe = sum(lp.fwd_ms + lp.bwd_ms for lp in pc.layers)
    f, b = dense_block_ms(cfg, prof)
    assert 0 < pc.expert_grad_exposed_ms < pc.expert_grad_allreduce_ms
    assert pc.iteration_ms == pytest.approx(moe + 32 * (f + b) + pc.grad_exposed_ms + pc.expert_grad_exposed_ms,
                                            rel=1e-12)
    bucket = pc.expert_grad_allreduce_ms / 32
    backlog = 0.0
    for _ in range(32):
        backlog = max(0.0, backlog + bucket - b)
    assert pc.iteration_baselines_ms["no-pipeline"] == pytest.approx(
        32 * pc.baselines_fwd_bwd_ms["no-pipeline"] + 32 * (f + b) + pc.grad_exposed_at_end_ms + backlog, rel=1e-12)
    # EP over every GPU (default layout on 64 GPUs with E = 64): one copy, nothing charged
    flat = load_configs("fine-grained", 64)[0]
    assert topology(flat, 64, 8).expert_copies == 1
    assert expert_grad_allreduce_ms(flat, topology(flat, 64, 8), source="profile", profile=prof) == (0.0, "")
    # the default Mixtral layout on 64 GPUs (EP over the 8 nodes, experts sharded in a node): one copy as well
    assert topology(cfg, 64, 8).expert_copies == 1


@pytest.mark.parametrize("source", ["profile", "published"])
def test_expert_gradient_allreduce_prices_a_nodes_inter_node_bytes(source):
    """Mixtral (8 experts) on 64 GPUs = 8 nodes x 8. EP 1: every GPU holds all 8 experts (8 X) and all-reduces them
    over 64 copies: 2 * 63/64 * 8 X leave each node. EP 8: every GPU holds one expert (X), 8 copies one per node,
    and the node's 8 GPUs reduce 8 different experts at once: 8 * 2 * 7/8 * X leave each node - about the same
    bytes through the same links, so the same time (both are one 64-rank all-reduce of 8 X).
    Before, EP 8 was charged the fit for X alone, 1/8 of EP 1 (19,730 vs 157,840 ms on the profile)."""
    prof = load_profile("h100-sxm")
    cfg = load_configs("mixtral-8x7b", 64)[0]
    t1, t8 = topology(cfg, 64, 8, ep_size=1), topology(cfg, 64, 8, ep_size=8)
    assert expert_params_per_gpu(cfg, t1) == 8 * expert_params_per_gpu(cfg, t8)
    ep1 = expert_grad_allreduce_ms(cfg, t1, source=source, profile=prof)[0]
    ep8 = expert_grad_allreduce_ms(cfg, t8, source=source, profile=prof)[0]
    assert ep8 == pytest.approx(ep1, rel=1e-12), (ep1, ep8)
    # one node (8 GPUs, EP 2: 4 experts a GPU, 4 copies on NVLink): the all_reduce of X alone on 4 ranks
    # (h100-sxm's only all_reduce fit, 64 ranks, is the next larger one): 0.341 + 1.75e-6 * 2 B * 4 * 176,160,768 * 32
    one = topology(cfg, 8, 8, ep_size=2)
    if source == "profile":
        assert expert_grad_allreduce_ms(cfg, one, source=source, profile=prof)[0] == pytest.approx(
            0.341 + 1.75e-6 * 2 * 4 * 176_160_768 * 32, rel=1e-12)


def test_dense_allreduce_beyond_every_fit_is_the_two_level_estimate():
    """all_reduce fitted only on 8 intra-node ranks, 64 GPUs (default layout). Two levels over B = 134,217,728 B:
    intra reduce_scatter 0.0688 + 4.1875e-8 B = 5.68917; inter all_reduce of B/8 over 8 nodes at the only
    64-rank inter fit (all_to_all, busbw 63/64 * 4.87 = 4.79391 GB/s, per GPU the 56/63 leaving the node:
    4.26125 GB/s): 2 * 7/8 * B/8 / 4.26125e6 = 6.89002; intra all_gather of the B/8 shard 0.0549 + 3.36e-7 * B/8
    = 5.69204; total 18.27124 ms (before: the 8-rank fit, 13.47 ms)."""
    prof = _h100_with_ar8(keep_ar64=False)
    cfg = load_configs("mixtral-8x7b", 64)[0]
    sc = stage_costs(cfg, topology(cfg, 64, 8), source="profile", profile=prof)
    assert sc.alpha[4] + sc.work[4] == pytest.approx(18.27123904, rel=1e-8)
    assert any(n.startswith("all_reduce: 64 ranks, two-level estimate") for n in sc.notes)
    intra_only = prof.model_copy(update={"collectives": [c for c in prof.collectives if c.scope == "intra"]})
    # EP size 1 (pure data parallelism: no all-to-all) on 64 GPUs of a profile with nothing inter-node
    with pytest.raises(InputError, match="all_reduce fitted up to group size 8 and no inter-node fit"):
        stage_costs(cfg, topology(cfg, 64, 8, ep_size=1), source="profile", profile=intra_only)


def test_plan_cli_ep_size_is_recorded_and_checked(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["plan", "moe", "--config", "mixtral-8x7b", "--gpus", "16", "--ep-size", "4", "--out", str(out),
                 "--stages", "published", "--time-limit", "0.5", "--json"]) == 0
    capsys.readouterr()
    plan = load_plan(out, expect=MoEPlan)
    assert plan.gpus == 16 and plan.ep_size_option == 4 and plan.verify() == []
    assert all(c.ep_size == 4 and c.expert_copies == 4 and not c.hierarchical for c in plan.configs)
    assert plan.check_ep_size(4, world=16).name == plan.configs[0].name
    with pytest.raises(InputError, match=r"planned for 16 GPUs with EP size 4, this run has 4 ranks with EP size 4"
                                         r".*plan moe --gpus 4 --ep-size 4"):
        plan.check_ep_size(4, world=4)
    with pytest.raises(InputError, match=r"configuration 'nope' not in the plan"):
        plan.check_ep_size(4, "nope")
    with pytest.raises(InputError, match=r"planned with whole experts per GPU \(EP size 4\), this run shards each "
                                         r"expert over 4 ranks"):
        plan.check_ep_size(4, world=16, expert_shards=4)
    assert plan.gantt_tasks()                                   # redraws with the planned layout
    for bad, needle in ((["--ep-size", "3"], "--ep-size: 3 does not divide --gpus 16"),
                        (["--ep-size", "16", "--config", "mixtral-8x7b"], "8 experts do not divide evenly over EP size 16")):
        argv = ["plan", "moe", "--config", "mixtral-8x7b", "--gpus", "16", "--out", str(tmp_path / "q.json")] + bad
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0]
        assert not (tmp_path / "q.json").exists()
    # default layout unchanged: no --ep-size recorded
    assert main(["plan", "moe", "--config", "mixtral-8x7b", "--gpus", "16", "--out", str(out), "--stages",
                 "published", "--time-limit", "0.5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    plan = load_plan(out, expect=MoEPlan)
    assert plan.ep_size_option is None and res["configs"][0]["EP"] == 2
    assert all(c.expert_copies == 1 and c.expert_grad_allreduce_ms == 0.0 for c in plan.configs)
