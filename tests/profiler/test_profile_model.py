"""ClusterProfile: JSON round trip, queries, built-ins and their provenance, the report and plot."""
import json

import numpy as np
import pytest

from adasched.profiler.builtins import (BUILTIN_PROFILES, FLEXSP_A2A_GBPS, FLEXSP_MODEL_COSTS, FSMOE_ALPHA_MS,
                                        FSMOE_BETA_MS, builtin_profile)
from adasched.profiler.io import InputError
from adasched.profiler.profile import (AttentionFit, ClusterProfile, CollectiveFit, DeviceInfo, LinearFit,
                                       load_profile, save_profile)
from adasched.profiler.report import plot_profile, profile_rows


def _random_profile(rng) -> ClusterProfile:
    fits = [CollectiveFit(op=op, group_size=g, scope="intra" if g <= 4 else "inter",
                          alpha_ms=float(rng.uniform(0, 1)), beta_ms_per_byte=float(rng.uniform(1e-9, 1e-6)),
                          fit_rel_error=float(rng.uniform(0, 0.2)), source="synthetic")
            for op in ("all_to_all", "all_reduce") for g in (2, 4, 8)]
    return ClusterProfile(
        name="synthetic", source="test", num_nodes=2, gpus_per_node=4,
        device=DeviceInfo(kind="gpu", name="X", memory_bytes=int(rng.integers(1 << 30, 1 << 36)), count_per_node=4,
                          topology={"matrix": [["X", "NV4"], ["NV4", "X"]]}),
        gemm_tflops=float(rng.uniform(10, 900)), copy_GBps=float(rng.uniform(100, 3000)),
        attention=AttentionFit(a1_ms_per_tok2=float(rng.uniform(1e-9, 1e-7)), a2_ms_per_tok=float(rng.uniform(0, 1e-4)),
                               b_ms=float(rng.uniform(0, 0.1))),
        linear=LinearFit(ms_per_token=float(rng.uniform(1e-4, 1e-2)), b_ms=float(rng.uniform(0, 1))),
        collectives=fits, raw={"note": [1, 2.5, "x"]},
    )


def test_round_trip(tmp_path):
    p = _random_profile(np.random.default_rng(0))
    path = tmp_path / "p.json"
    save_profile(p, path)
    q = load_profile(path)
    assert q == p
    assert json.loads(path.read_text())["kind"] == "cluster_profile"


def test_queries():
    p = _random_profile(np.random.default_rng(1))
    assert p.world_size == 8 and p.group_sizes("all_to_all") == [2, 4, 8]
    c = p.collective("all_to_all", 3)  # between fitted sizes: next larger (conservative)
    assert c.group_size == 4
    assert p.collective_time_ms("all_reduce", 4, 1e6) == pytest.approx(c_ar := p.collective("all_reduce", 4).alpha_ms
                                                                       + p.collective("all_reduce", 4).beta_ms_per_byte * 1e6)
    assert c_ar > 0 and p.collective_time_ms("all_reduce", 1, 1e6) == 0.0
    with pytest.raises(InputError, match="has no all_gather fit"):
        p.collective("all_gather", 2)
    with pytest.raises(InputError, match="fitted up to group size 8"):
        p.collective("all_to_all", 16)
    with pytest.raises(InputError, match="lacks 'model_costs'"):
        p.require("model_costs", who="the SP planner")
    q = p.with_nodes(4)
    assert q.world_size == 16 and q.collective("all_to_all", 16).beta_ms_per_byte == p.collective("all_to_all", 8).beta_ms_per_byte
    assert "extrapolated" in q.collective("all_to_all", 16).source


def test_validation_rejects_bad_profiles():
    p = _random_profile(np.random.default_rng(2)).model_dump(mode="json")
    dup = json.loads(json.dumps(p))
    dup["collectives"].append(dict(dup["collectives"][0]))
    with pytest.raises(ValueError, match="duplicate"):
        ClusterProfile.model_validate(dup)
    big = json.loads(json.dumps(p))
    big["collectives"][0]["group_size"] = 64
    with pytest.raises(ValueError, match="> world size"):
        ClusterProfile.model_validate(big)
    neg = json.loads(json.dumps(p))
    neg["collectives"][0]["beta_ms_per_byte"] = -1.0
    with pytest.raises(ValueError):
        ClusterProfile.model_validate(neg)


def test_builtins_match_their_sources():
    assert set(BUILTIN_PROFILES) == {"h100-sxm", "a100-64-flexsp-paper"}
    a = load_profile("a100-64-flexsp-paper")
    assert a.world_size == 64 and a.device.memory_bytes == 40 * 2**30
    for d, v in FLEXSP_A2A_GBPS.items():  # v(d) in GB/s per rank, as published
        assert a.collective("all_to_all", d).bandwidth_GBps == pytest.approx(v, rel=1e-12)
        assert a.collective("all_to_all", d).scope == ("intra" if d <= 8 else "inter")
    assert a.model_costs["gpt-7b"].a1_ms_per_tok2 == 5.128e-6 and a.model_costs["gpt-30b"].b1_ms == 2789.3644
    assert a.model_costs["gpt-13b"].act_bytes_per_token == pytest.approx(4.2204 * 2**20)
    assert set(a.model_costs) == set(FLEXSP_MODEL_COSTS)

    h = load_profile("h100-sxm")
    assert h.device.name == "NVIDIA H100 80GB HBM3" and h.device.memory_bytes == 85520809984
    assert h.gemm_tflops == 789.6 and h.copy_GBps == pytest.approx(3001.0)
    raw = [r for r in h.raw["attention_causal_sdpa_bf16_headdim128_batch1"] if r["heads"] == 32]
    for r in raw:  # every measured point within 5 % of the fit
        assert h.attention.time_ms(r["seq"]) == pytest.approx(r["fwd_bwd_ms"], rel=0.05)
    for r in h.raw["dense_7b_layer_linear_fwd_bwd"]["rows"]:
        assert h.linear.time_ms(r["tokens"]) == pytest.approx(r["fwd_bwd_ms"], rel=0.05)
    assert h.attention.fit_rel_error < 0.03 and h.linear.fit_rel_error < 0.03
    ag = h.collective("all_gather", 8)
    assert ag.alpha_ms == FSMOE_ALPHA_MS[1] and ag.beta_ms_per_byte == pytest.approx(FSMOE_BETA_MS[1] / 2)
    assert h.collective("all_reduce", 64).alpha_ms == FSMOE_ALPHA_MS[4]
    assert all(c.source.startswith("published") for c in h.collectives)
    # built-ins are copies: mutating one does not change the next load
    h.gemm_tflops = 1.0
    assert load_profile("h100-sxm").gemm_tflops == 789.6


def test_unknown_name_is_one_line_error():
    with pytest.raises(InputError) as e:
        load_profile("h200-nope")
    assert "neither a built-in profile" in str(e.value) and "\n" not in str(e.value)


def test_report_and_plot(tmp_path):
    p = load_profile("h100-sxm")
    rows = dict(profile_rows(p))
    assert "789.6 TFLOP/s" in rows["GEMM"] and "all_to_all x64 (inter)" in rows
    out = tmp_path / "h.png"
    plot_profile(p, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in tmp_path.iterdir()] == ["h.png"]  # no temp file left behind
    plot_profile(_random_profile(np.random.default_rng(3)).model_copy(update={"attention": None}), tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000
