"""The planners pass collective messages as CollectiveFit counts bytes (the tensor each rank passes in:
all_gather its shard, reduce_scatter the whole unreduced buffer). Before: FlexSP's ZeRO-3 term charged the
gradient reduce-scatter for one shard (world x too little) and the FSMoE profile path charged its intra-node
reduce-scatter for one shard (G x too little with a measured profile); a profile without all_reduce crashed the
FSMoE planner on max() of an empty list."""
from __future__ import annotations

import random

import pytest

from adasched.planner.flexsp.costmodel import ModelShape, _zero3_ms
from adasched.planner.fsmoe.costmodel import ELEMENT_BYTES, _workloads, stage_costs, topology
from adasched.planner.fsmoe.presets import load_configs
from adasched.profiler.builtins import FSMOE_BETA_MS
from adasched.profiler.io import InputError
from adasched.profiler.profile import CollectiveFit, load_profile


def _fit(op, g, rng):
    return CollectiveFit(op=op, group_size=g, scope="intra" if g <= 8 else "inter",
                         alpha_ms=rng.uniform(0.01, 0.1), beta_ms_per_byte=rng.uniform(1e-8, 1e-6), source="test")


def test_fsmoe_profile_reduce_scatter_is_charged_its_whole_input():
    rng = random.Random(7)
    base = load_profile("h100-sxm")
    fits = {op: _fit(op, g, rng) for op, g in (("all_gather", 8), ("reduce_scatter", 8), ("all_reduce", 64))}
    prof = base.model_copy(update={"collectives": [c for c in base.collectives if c.op == "all_to_all"]
                                   + list(fits.values())})
    cfg = load_configs("mixtral-8x7b", 64)[0]
    topo = topology(cfg, 64, 8)
    assert topo.hierarchical and topo.gpus_per_node == 8
    n = _workloads(cfg, topo, 0)
    sc = stage_costs(cfg, topo, source="profile", profile=prof)
    assert sc.work[1] == pytest.approx(fits["all_gather"].beta_ms_per_byte * n[1] * ELEMENT_BYTES, rel=1e-12)
    assert sc.work[3] == pytest.approx(fits["reduce_scatter"].beta_ms_per_byte * 8 * n[3] * ELEMENT_BYTES, rel=1e-12)
    assert sc.alpha[1] == fits["all_gather"].alpha_ms and sc.alpha[3] == fits["reduce_scatter"].alpha_ms


def test_builtin_h100_reduce_scatter_reproduces_the_published_stage():
    """The built-in fit is FSMoE's stage-3 constant per byte of the whole input, so the profile path equals the
    published one for the 8-GPU node it was fitted on."""
    prof = load_profile("h100-sxm")
    rs = prof.collective("reduce_scatter", 8)
    assert rs.beta_ms_per_byte == pytest.approx(FSMOE_BETA_MS[3] / 2 / 8, rel=1e-12)
    cfg = load_configs("mixtral-8x7b", 64)[0]
    topo = topology(cfg, 64, 8)
    pub = stage_costs(cfg, topo, source="published")
    mine = stage_costs(cfg, topo, source="profile", profile=prof)
    for i in (1, 3):
        assert mine.work[i] == pytest.approx(pub.work[i], rel=1e-9)
        assert mine.alpha[i] == pytest.approx(pub.alpha[i], rel=1e-12)


def test_flexsp_zero3_messages():
    rng = random.Random(11)
    base = load_profile("h100-sxm")
    ag, rs = _fit("all_gather", 64, rng), _fit("reduce_scatter", 64, rng)
    prof = base.model_copy(update={"collectives": [c for c in base.collectives if c.op == "all_to_all"] + [ag, rs]})
    model = ModelShape(name="t", layers=rng.randint(2, 40), hidden=rng.choice([512, 1024, 4096]), heads=8,
                       act_bytes_per_token=1000.0)
    P = model.params
    want = 2 * (ag.alpha_ms + ag.beta_ms_per_byte * 2 * P / 64) + (rs.alpha_ms + rs.beta_ms_per_byte * 2 * P)
    assert _zero3_ms(prof, model, 64) == pytest.approx(want, rel=1e-12)
    assert _zero3_ms(prof, model, 1) == 0.0


def test_fsmoe_profile_without_all_reduce_is_a_clear_error():
    base = load_profile("h100-sxm")
    prof = base.model_copy(update={"collectives": [c for c in base.collectives if c.op != "all_reduce"]})
    cfg = load_configs("mixtral-8x7b", 64)[0]
    with pytest.raises(InputError, match="has no all_reduce fit"):
        stage_costs(cfg, topology(cfg, 64, 8), source="profile", profile=prof)
