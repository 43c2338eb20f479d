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
    assert q.world_size == 16 and q.collective("all_to_all", 16).bus_bandwidth_GBps == pytest.approx(
        p.collective("all_to_all", 8).bus_bandwidth_GBps, rel=1e-12)
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
    # a group larger than a node marked on-node: the two-level and across-node queries would price it as NVLink
    h = builtin_profile("h100-sxm").model_dump(mode="json")
    wide = next(c for c in h["collectives"] if c["group_size"] > h["gpus_per_node"])
    assert wide["scope"] == "inter"
    wide["scope"] = "intra"
    with pytest.raises(ValueError, match="with scope 'intra', but a node holds 8 GPUs"):
        ClusterProfile.model_validate(h)


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
    # a CPU's rate keeps its digits (it printed "0.0 TFLOP/s")
    slow = float(np.random.default_rng(29).uniform(0.01, 0.05))
    assert dict(profile_rows(p.model_copy(update={"gemm_tflops": slow})))["GEMM"] == f"{slow:.4g} TFLOP/s"
    assert not dict(profile_rows(p.model_copy(update={"gemm_tflops": slow})))["GEMM"].startswith("0.0 ")
    out = tmp_path / "h.png"
    plot_profile(p, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in tmp_path.iterdir()] == ["h.png"]  # no temp file left behind
    plot_profile(_random_profile(np.random.default_rng(3)).model_copy(update={"attention": None}), tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


# ---- review findings (each test fails on the code before the fix) ------------------------------------------
def _one_node(rng, gpus: int, ops=("all_to_all", "all_reduce", "all_gather")) -> ClusterProfile:
    sizes = [g for g in (2, 4, 8) if g <= gpus]
    return ClusterProfile(
        name="node", source="test", num_nodes=1, gpus_per_node=gpus,
        device=DeviceInfo(kind="gpu", name="X", memory_bytes=1 << 34, count_per_node=gpus),
        collectives=[CollectiveFit(op=op, group_size=g, scope="intra", alpha_ms=float(rng.uniform(0.01, 0.1)),
                                   beta_ms_per_byte=float(rng.uniform(1e-9, 1e-8)), source="measured")
                     for op in ops for g in sizes])


def test_with_nodes_does_not_carry_intra_node_bandwidth_across_nodes():
    """A one-node profile (NVLink-only fits) on 2 nodes got 'intra' fits for 16-rank groups at NVLink speed:
    a planner then put sequence-parallel groups across nodes for free. Now no inter-node figure is invented."""
    rng = np.random.default_rng(21)
    p = _one_node(rng, 8)
    q = p.with_nodes(2)
    assert q.world_size == 16 and q.name == "node@2n"
    assert sorted((c.op, c.group_size, c.scope) for c in q.collectives) == sorted(
        (c.op, c.group_size, c.scope) for c in p.collectives)
    for c in p.collectives:  # kept unchanged
        assert q.collective(c.op, c.group_size) == c
    with pytest.raises(InputError, match="all_to_all fitted up to group size 8, asked for 16"):
        q.collective("all_to_all", 16)


def test_with_nodes_extends_inter_node_fits_to_every_power_of_two_and_the_world():
    rng = np.random.default_rng(22)
    p = _random_profile(rng)  # 2 nodes x 4, fits up to 8 ranks (inter)
    q = p.with_nodes(6)  # 24 ranks: 16 and the whole world (was: 16 only, a 24-rank query failed)
    for op in ("all_to_all", "all_reduce"):
        assert q.group_sizes(op) == [2, 4, 8, 16, 24]
        big = p.collective(op, 8)
        for g in (16, 24):
            c = q.collective(op, g)
            assert (c.group_size, c.scope, c.alpha_ms) == (g, "inter", big.alpha_ms)
            # the bus bandwidth is kept: per-rank beta x (g-1)/g / (7/8) (all_reduce: the same ratio)
            assert c.beta_ms_per_byte == pytest.approx(big.beta_ms_per_byte * (g - 1) / g * 8 / 7, rel=1e-12)
            assert "extrapolated from 8 ranks at the same bus bandwidth" in c.source and "optimistic" in c.source
    assert q.with_nodes(8).name == "synthetic@8n"  # not synthetic@6n@8n


def test_with_nodes_all_gather_keeps_its_bus_bandwidth():
    """Hunt finding: with_nodes copied the largest inter-node fit's per-rank beta to larger groups, but an
    all_gather's per-rank message is the shard (1/n of the data): gathering 7B bf16 parameters took 875 ms on 16
    ranks and 55 ms on 256 over the same links, so FlexSP's ZeRO-3 term fell 16x with --scaling. Now the time to
    gather the same total data stays the same (bus bandwidth kept)."""
    rng = np.random.default_rng(23)
    p = ClusterProfile(name="ag", source="test", num_nodes=2, gpus_per_node=8,
                       device=DeviceInfo(kind="gpu", name="X", memory_bytes=1 << 36, count_per_node=8), collectives=[
        CollectiveFit(op=op, group_size=16, scope="inter", alpha_ms=float(rng.uniform(0.01, 0.1)),
                      beta_ms_per_byte=float(rng.uniform(1e-8, 1e-7)), source="measured")
        for op in ("all_gather", "broadcast", "reduce_scatter")])
    q = p.with_nodes(32)  # 256 ranks
    total = 14e9  # bytes gathered (the whole parameter set); each rank passes its shard total / g
    ag16 = p.collective("all_gather", 16)
    for g in (32, 64, 128, 256):
        ag = q.collective("all_gather", g)
        assert (ag.alpha_ms, ag.scope) == (ag16.alpha_ms, "inter")
        assert ag.bus_bandwidth_GBps == pytest.approx(ag16.bus_bandwidth_GBps, rel=1e-12)
        # the same data over the same links: the bandwidth term grows by (g-1)/g / (15/16), not falls by g/16
        assert ag.beta_ms_per_byte * total / g == pytest.approx(ag16.beta_ms_per_byte * total / 16
                                                                * (g - 1) / g * 16 / 15, rel=1e-12)
        assert q.collective("broadcast", g).beta_ms_per_byte == p.collective("broadcast", 16).beta_ms_per_byte


def test_with_nodes_fewer_nodes_keeps_an_op_fitted_only_on_larger_groups():
    """h100-sxm has its all_reduce fitted on 64 ranks only: with_nodes(1) dropped it, and the MoE planner then
    failed on max() of an empty list. Now the next larger fit serves the smaller world (conservative)."""
    h = load_profile("h100-sxm")
    one = h.with_nodes(1)
    ar = one.collective("all_reduce", 8)
    big = h.collective("all_reduce", 64)
    assert (ar.group_size, ar.scope, ar.alpha_ms, ar.beta_ms_per_byte) == (8, "intra", big.alpha_ms,
                                                                           big.beta_ms_per_byte)
    assert "64-rank fit" in ar.source and "conservative" in ar.source
    assert one.collective("all_reduce", 2) == ar  # every smaller group: the same conservative fit
    for d in (2, 4, 8):
        assert one.collective("all_to_all", d) == h.collective("all_to_all", d)
    assert one.group_sizes("all_to_all") == [2, 4, 8]
    # 3 nodes of 8: the 24-rank world uses the 32-rank fit (next larger), not the 16-rank one
    three = h.with_nodes(3)
    c24 = three.collective("all_to_all", 24)
    assert c24.beta_ms_per_byte == h.collective("all_to_all", 32).beta_ms_per_byte and c24.group_size == 24
    # more nodes: the published all_gather/reduce_scatter are intra-node figures and are not extended
    sixteen = h.with_nodes(16)
    assert sixteen.group_sizes("all_gather") == [8] and sixteen.group_sizes("all_to_all")[-1] == 128
    assert sixteen.collective("all_reduce", 128).bus_bandwidth_GBps == pytest.approx(big.bus_bandwidth_GBps, rel=1e-12)
    ClusterProfile.model_validate(sixteen.model_dump())  # every derived profile passes validation


@pytest.mark.parametrize("field,where", [("b_ms", "attention"), ("b_ms", "linear"), ("sm_clock_mhz", "device"),
                                         ("power_limit_w", "device"), ("nvlink_links", "device")])
def test_negative_constants_are_refused(tmp_path, field, where):
    """A hand-written profile with attention b_ms = -5 predicted negative times for short sequences."""
    rng = np.random.default_rng(23)
    d = _random_profile(rng).model_dump(mode="json")
    d[where][field] = -float(rng.integers(1, 9))
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    with pytest.raises(InputError) as e:
        load_profile(path)
    assert str(e.value).startswith(f"{path}: {where}.{field}: Input should be greater than or equal to 0")


def test_require_rejects_a_name_that_is_not_a_field():
    p = _random_profile(np.random.default_rng(24))
    p.require("attention", "linear", "collectives", "world_size", who="x")
    with pytest.raises(ValueError, match="'attn' is not a ClusterProfile field") as e:
        p.require("attn", who="x")  # was: "profile 'synthetic' lacks 'attn'", blaming the profile
    assert not isinstance(e.value, InputError)


def test_bus_bandwidth_follows_nccl_tests():
    """busbw (nccl-tests, DeepSpeed comms logger) from bytes per rank B and time t, every op and group size."""
    rng = np.random.default_rng(25)
    for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"):
        for n in (2, 3, 4, 8, 64):
            beta = float(rng.uniform(1e-9, 1e-6))
            c = CollectiveFit(op=op, group_size=n, scope="intra", alpha_ms=0.0, beta_ms_per_byte=beta)
            B = float(rng.uniform(1e6, 1e9))
            t_s = c.time_ms(B) / 1e3
            algbw = {"all_gather": n * B}.get(op, B) / t_s / 1e9  # nccl-tests' size: all_gather's is the output
            factor = {"all_reduce": 2 * (n - 1) / n, "broadcast": 1.0}.get(op, (n - 1) / n)
            assert c.bandwidth_GBps == pytest.approx(B / t_s / 1e9, rel=1e-12)
            assert c.bus_bandwidth_GBps == pytest.approx(algbw * factor, rel=1e-12)
    rows = dict(profile_rows(load_profile("a100-64-flexsp-paper")))
    assert rows["all_to_all x64 (inter)"].startswith("alpha 0 ms, 4.87 GB/s of bytes per rank, busbw 4.79 GB/s")


def test_plot_skips_malformed_raw_rows(tmp_path, capsys):
    """`adasched show p.json --plot` died with a KeyError traceback on a raw row without fwd_bwd_ms."""
    from adasched.planner.cli import main

    rng = np.random.default_rng(26)
    p = _random_profile(rng)
    good = [{"seq": int(s), "fwd_bwd_ms": float(p.attention.time_ms(s))} for s in (64, 128, 256)]
    p.raw = {"attention": good + [{"seq": 512}, {"seq": "x", "fwd_bwd_ms": 1.0}, 3],
             "linear": {"rows": 1}, "dense_7b_layer_linear_fwd_bwd": [1, 2],
             "collectives": {"points": [{"op": "all_reduce"}, {"op": "all_reduce", "group_size": 2, "bytes": 4096,
                                                               "ms": float(rng.uniform(0.1, 1))}, None]}}
    path = tmp_path / "p.json"
    save_profile(p, path)
    assert main(["show", str(path), "--plot", str(tmp_path / "p.png")]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    p.raw = {"collectives": [1, 2], "attention": {"seq": 3}}
    plot_profile(p, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 1000


def test_memory_given_in_gib_or_mib_is_refused(tmp_path):
    """memory_bytes: 80 (meant as GiB) loaded fine and every planner then found that nothing fits."""
    rng = np.random.default_rng(27)
    d = _random_profile(rng).model_dump(mode="json")
    for v in (int(rng.integers(16, 200)), int(rng.integers(16, 200)) * 1024):
        d["device"]["memory_bytes"] = v
        path = tmp_path / "p.json"
        path.write_text(json.dumps(d))
        with pytest.raises(InputError) as e:
            load_profile(path)
        assert str(e.value) == (f"{path}: device.memory_bytes: {v} is under 1 MiB: the field is in "
                                f"bytes (80 GiB = 85899345920)")
    d["device"]["memory_bytes"] = 2**20
    path.write_text(json.dumps(d))
    assert load_profile(path).memory_bytes == 2**20


def test_collective_across_nodes_uses_inter_node_fits_only():
    """A Megatron data-parallel group of 4 ranks on 4 nodes (one rank a node) crosses nodes: the 4-rank fit
    measured on contiguous ranks is NVLink inside one node, so across_nodes picks the next inter-node fit."""
    rng = np.random.default_rng(28)
    p = _random_profile(rng)  # 2 nodes x 4: fits 2, 4 intra and 8 inter per op
    for op in ("all_to_all", "all_reduce"):
        inter = p.collective(op, 8)
        assert inter.scope == "inter"
        for g in (2, 3, 4, 8):
            assert p.collective(op, g, across_nodes=True) == inter
            B = float(rng.uniform(1e5, 1e8))
            assert p.collective_time_ms(op, g, B, across_nodes=True) == pytest.approx(
                inter.alpha_ms + inter.beta_ms_per_byte * B, rel=1e-12)
        assert p.collective(op, 4).scope == "intra"  # the default stays node-packed
        with pytest.raises(InputError, match="inter-node all_reduce fitted up to group size 8, asked for 16"):
            p.collective("all_reduce", 16, across_nodes=True)
    one = _one_node(rng, 8)
    assert one.collective("all_reduce", 4).group_size == 4
    with pytest.raises(InputError, match="has no inter-node all_reduce fit"):
        one.collective("all_reduce", 4, across_nodes=True)


def test_show_names_a_fit_the_data_did_not_resolve():
    """A collective fit whose bandwidth was floored (flat times) showed as 'fit error 1.9%' beside '41.7 GB/s', the
    floor's guess read as a measurement; its note lived only in the source, which show does not print for fits."""
    from adasched.profiler.fit import SIZE_TERM_FLOOR, fit_alpha_beta

    rng = np.random.default_rng(9)
    sizes = [4096 * 4**i for i in range(6)]
    flat = [2.0 + float(rng.uniform(-0.02, 0.02)) for _ in sizes]
    fit = fit_alpha_beta(sizes, flat, min_size_term=SIZE_TERM_FLOOR)
    assert "not resolved" in fit.note
    p = load_profile("h100-sxm")
    c = p.collectives[0].model_copy(update={"source": f"measured on box, gloo, 2 ranks; {fit.note}",
                                            "fit_rel_error": fit.rel_error})
    row = dict(profile_rows(p.model_copy(update={"collectives": [c]})))
    (text,) = [v for k, v in row.items() if k.startswith(c.op)]
    assert f"(fit error {fit.rel_error:.1%}; {fit.note})" in text, text
    plain = c.model_copy(update={"source": "measured on box, gloo, 2 ranks"})
    (text,) = [v for k, v in dict(profile_rows(p.model_copy(update={"collectives": [plain]}))).items()
               if k.startswith(c.op)]
    assert text.endswith(f"(fit error {c.fit_rel_error:.1%})"), text
