"""The expert-gradient all-reduce overlaps the backward, as the runtime runs it: ExpertGradReducer launches a
bucket (>= 2**22 ready elements) from the gradient hooks when a layer's MoE backward ends, and the rest of the
backward (its dense block, the later layers) goes on. Before, the planner charged the whole all-reduce after the
backward. Expected values are worked out by hand in the comments."""
from __future__ import annotations

import inspect

import pytest

from adasched.planner.fsmoe.costmodel import (EXPERT_GRAD_BUCKET_ELEMENTS, expert_grad_allreduce_ms,
                                              expert_grad_buckets, topology)
from adasched.planner.fsmoe.model import evaluate_pipeline, exposed_comm_ms
from adasched.planner.fsmoe.planning import dense_block_ms, plan_config
from adasched.planner.fsmoe.presets import load_configs
from adasched.planner.solver import SolveParams
from adasched.profiler.profile import load_profile


def test_exposed_comm_hand_computed():
    # backlog: 0 -> max(0, 0+5-1) = 4 -> max(0, 4+1-3) = 2 -> max(0, 2+4-2) = 4; + 0.5 launched at the end
    assert exposed_comm_ms([(0, 2), (5, 1), (1, 3), (4, 2)], at_end_ms=0.5) == pytest.approx(4.5)
    # idle time before work arrives is lost: 3 ms of idle link then 2 ms of work in 1 ms of idle -> 1 exposed
    assert exposed_comm_ms([(0, 3), (2, 1)]) == pytest.approx(1.0)
    assert exposed_comm_ms([(2, 3), (1, 1)]) == 0.0
    with pytest.raises(ValueError, match="periods"):
        exposed_comm_ms([(-1, 1)])


def test_buckets_follow_the_runtime_rule():
    # waiting 3 (< 5) -> 6 launched -> 3 waits -> 4 waits: 4 left for finish()
    assert expert_grad_buckets([3, 3, 3, 1], 5) == ([0, 6, 0, 0], 4)
    assert expert_grad_buckets([5, 7], 5) == ([5, 7], 0)
    from adasched.runtime.moe.ep import ExpertGradReducer

    # the planner's bucket is the runtime's default (train_moe builds ExpertGradReducer with it)
    assert inspect.signature(ExpertGradReducer).parameters["bucket_elements"].default == EXPERT_GRAD_BUCKET_ELEMENTS


def test_mixtral_ep8_expert_allreduce_overlaps_the_backward():
    """Mixtral-8x7b L1024 on 64 GPUs in EP groups of 8 (profile stages). 32 identical layers; in backward order
    position j has m = idle link time of its MoE backward, d = its dense block's backward (links idle). Periods:
    (slice_j, m), (E, d) with E = one layer's bucket (0.341 + 1.75e-6 * 8 shards * 2 B * 176,160,768 = 4932.6 ms),
    far above any gap, so from position 0's dense block on the link never idles: the backlog at the end is
    32 E + (the dense slices launched at positions >= 1) - (32 d + 31 m); the dense remainder launched after the
    backward (grad_exposed_ms) comes on top, so the expert part exposed is that backlog."""
    prof = load_profile("h100-sxm")
    cfg = load_configs("mixtral-8x7b", 64)[0]
    pc = plan_config(cfg, 64, prof, stages="profile", params=SolveParams(time_limit=1.0), ep_size=8)
    topo = topology(cfg, 64, 8, ep_size=8)
    E = 0.341 + 1.75e-6 * 8 * 2 * 176_160_768
    assert expert_grad_allreduce_ms(cfg, topo, source="profile", profile=prof, elements=176_160_768)[0] == \
        pytest.approx(E, rel=1e-12)
    _, d = dense_block_ms(cfg, prof)
    from adasched.planner.fsmoe.costmodel import stage_costs

    l0 = pc.layers[0]
    m = evaluate_pipeline(stage_costs(cfg, topo, source="profile", profile=prof).backward(), l0.r_bwd, l0.order_bwd,
                          l0.wgrad_bwd).inter_idle_ms
    a4, b4 = 0.341, 1.75e-6 * 2               # the dense all-reduce on 64 ranks, per element
    slices_ms = sum(a4 + b4 * x for x in pc.grad_slices[1:] if x > 0)
    assert pc.grad_slices[0] == 0             # nothing exists before the first layer's backward
    # everything launched from position 0's dense block on, minus the idle time from then on; the dense remainder
    # launched at the end adds grad_exposed_ms to both sides
    want = 32 * E + slices_ms - (32 * d + 31 * m)
    assert pc.expert_grad_exposed_ms == pytest.approx(want, rel=1e-9)
    assert pc.expert_grad_allreduce_ms - pc.expert_grad_exposed_ms == pytest.approx(32 * d + 31 * m - slices_ms,
                                                                                    rel=1e-9)
    assert 0 < pc.expert_grad_exposed_ms < pc.expert_grad_allreduce_ms      # before: all of it was exposed
