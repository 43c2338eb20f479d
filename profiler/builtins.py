"""Built-in ClusterProfiles, selectable by name wherever `--profile NAME|FILE` is accepted.

Where every number comes from (checked against ../shared/papers/flexsp.md, ../shared/papers/fsmoe.md and
../shared/data/profiles/h100-sxm-measured-2026-11-28.json, of which profiler/builtin/ holds a verbatim copy):

``a100-64-flexsp-paper`` - nothing here is measured by us.
  - cluster: 8 nodes x 8 A100-40GB (NVLink inside a node, 2x InfiniBand between nodes), as in FlexSP's setup;
  - all_to_all: FlexSP's measured bandwidth v(d) in GB/s for d = 2..64 = {2: 119.54, 4: 104.07, 8: 96.5,
    16: 10.33, 32: 5.94, 64: 4.87}, stored as alpha = 0, beta = 1/v(d) per byte *per rank* (FlexSP's
    T_comm = bytes / (d * v(d)) with bytes/d sent by each rank); d <= 8 is intra-node;
  - model_costs: FlexSP's published a1 (ms/token^2), a2 (ms/token), b1 (ms) and activation MB/token for
    GPT-7B/13B/30B (hidden 4096/5120/6656, layers 32/40/60), whole model, fwd+bwd; "MB" is read as MiB;
  - no GEMM/copy/attention/linear terms (FlexSP publishes the whole-model a1/a2 instead).

``h100-sxm`` - single-GPU terms measured by us on one H100, interconnect published:
  - device: name, memory (85,520,809,984 B = 79.6 GiB), max SM/memory clocks (1980/2619 MHz), PCIe gen 5,
    power limit 700 W: NVML fields of the measured file;
  - gemm_tflops 789.6 (bf16 8192^3) and copy_GBps 3001 (3.001 TB/s read+write): its "ceilings";
  - attention: a1 s^2 + a2 s + b fitted (relative least squares, profiler.fit.fit_quadratic) to causal SDPA
    fwd+bwd, bf16, 32 heads x 128, batch 1, s = 1K..64K (7 points; fit error ~1 %);
  - linear: ms/token + b fitted (fit_affine) to the 7B layer's QKV + O + SwiGLU MLP fwd+bwd, 1K..64K tokens
    (4 points; fit error ~1 %);
  - cluster shape 8 x 8 is an assumption (the measurement is one GPU; its NVLink count was 0);
  - all_to_all: FlexSP's A100 v(d) as above - a conservative stand-in, no H100 interconnect was measured;
  - all_gather (x8, intra), reduce_scatter (x8, intra), all_reduce (x64, inter): FSMoE's published fitted
    constants, alpha ms = 0.0549 / 0.0688 / 0.341 and beta = 6.72e-7 / 6.70e-7 / 3.50e-6 ms per element
    (stages 1, 3, 4), an element taken as 2 bytes (fp16/bf16) and the workload n read as the per-rank
    shard (all_gather's input, reduce_scatter's output: n1 = n3 = f*B*L*M), so the reduce_scatter beta is per
    byte of the whole unreduced input (beta / 8), as CollectiveFit's bytes are. Group sizes are our reading of the stages (intra-node AG/RS, cluster-wide gradient AR); a query
    for a smaller group uses the next larger fit (conservative).
Each fit's ``source`` field says which of these it is.
"""
from __future__ import annotations

import functools
import json
from importlib import resources

from .fit import fit_affine, fit_quadratic
from .io import InputError
from .profile import AttentionFit, ClusterProfile, CollectiveFit, DeviceInfo, LinearFit, ModelCost

__all__ = ["BUILTIN_PROFILES", "builtin_profile", "FLEXSP_A2A_GBPS", "FLEXSP_MODEL_COSTS", "FSMOE_ALPHA_MS", "FSMOE_BETA_MS"]

MB = 1024 * 1024
GB = 1e9

#: FlexSP, A100 cluster: measured all-to-all bandwidth v(d) in GB/s per group degree d (flexsp.md).
FLEXSP_A2A_GBPS: dict[int, float] = {2: 119.54, 4: 104.07, 8: 96.5, 16: 10.33, 32: 5.94, 64: 4.87}

#: FlexSP, A100 cluster: published per-model cost terms (ms, ms/token, ms/token^2, MB/token) (flexsp.md).
FLEXSP_MODEL_COSTS: dict[str, dict] = {
    "gpt-7b": dict(hidden=4096, layers=32, a1=5.128e-6, a2=0.1839576, b1=629.3563, act_mb=4.4804),
    "gpt-13b": dict(hidden=5120, layers=40, a1=9.2852e-6, a2=0.3060189, b1=1132.5632, act_mb=4.2204),
    "gpt-30b": dict(hidden=6656, layers=60, a1=15.4262e-6, a2=0.8035742, b1=2789.3644, act_mb=3.4174),
}

#: FSMoE published fitted constants (ms; beta per element), stages: 0 inter-node all-to-all,
#: 1 intra-node all-gather, 2 expert GEMM, 3 intra-node reduce-scatter, 4 gradient all-reduce (fsmoe.md).
FSMOE_ALPHA_MS = (0.235, 0.0549, 0.592, 0.0688, 0.341)
FSMOE_BETA_MS = (1.85e-6, 6.72e-7, 5.68e-11, 6.70e-7, 3.50e-6)
_FSMOE_ELEMENT_BYTES = 2  # assumption (fp16/bf16 elements), stated in the h100-sxm source line


def _a2a_fits(source: str) -> list[CollectiveFit]:
    return [
        CollectiveFit(
            op="all_to_all",
            group_size=d,
            scope="intra" if d <= 8 else "inter",
            alpha_ms=0.0,
            beta_ms_per_byte=1.0 / (v * GB) * 1e3,
            fit_rel_error=0.0,
            source=source,
        )
        for d, v in FLEXSP_A2A_GBPS.items()
    ]


def _model_costs() -> dict[str, ModelCost]:
    return {
        name: ModelCost(
            hidden=c["hidden"],
            layers=c["layers"],
            a1_ms_per_tok2=c["a1"],
            a2_ms_per_tok=c["a2"],
            b1_ms=c["b1"],
            act_bytes_per_token=c["act_mb"] * MB,
            source="FlexSP published A100 calibration (flexsp.md)",
        )
        for name, c in FLEXSP_MODEL_COSTS.items()
    }


def _a100_64_flexsp_paper() -> ClusterProfile:
    src = "published: FlexSP (arXiv 2412.01523) A100-40GB 8x8 calibration, ../shared/papers/flexsp.md"
    return ClusterProfile(
        name="a100-64-flexsp-paper",
        source=src,
        created="2025-01-01T00:00:00+00:00",
        num_nodes=8,
        gpus_per_node=8,
        device=DeviceInfo(kind="gpu", name="NVIDIA A100-SXM4-40GB", memory_bytes=40 * 1024**3, count_per_node=8),
        collectives=_a2a_fits("published: FlexSP v(d) all-to-all bandwidth, A100 NVLink + 2x IB"),
        model_costs=_model_costs(),
    )


def _h100_sxm() -> ClusterProfile:
    raw = json.loads(resources.files("adasched.profiler").joinpath("builtin/h100-sxm-measured-2026-11-28.json").read_text())
    dev = raw["device"]
    measured = "measured: one H100 80GB HBM3, torch 2.11, bf16 (profiler/builtin/h100-sxm-measured-2026-11-28.json)"
    att_rows = [r for r in raw["attention_causal_sdpa_bf16_headdim128_batch1"] if r["heads"] == 32]
    att = fit_quadratic([r["seq"] for r in att_rows], [r["fwd_bwd_ms"] for r in att_rows])
    lin_rows = raw["dense_7b_layer_linear_fwd_bwd"]["rows"]
    lin = fit_affine([r["tokens"] for r in lin_rows], [r["fwd_bwd_ms"] for r in lin_rows])
    a2a_src = "published: FlexSP A100 all-to-all v(d) (no H100 interconnect measurement available)"
    colls = _a2a_fits(a2a_src)
    fsmoe_src = "published: FSMoE fitted constants (fsmoe.md), per element taken as 2 bytes"
    for op, stage, g, scope in (("all_gather", 1, 8, "intra"), ("reduce_scatter", 3, 8, "intra"), ("all_reduce", 4, 64, "inter")):
        colls.append(
            CollectiveFit(
                op=op,
                group_size=g,
                scope=scope,
                alpha_ms=FSMOE_ALPHA_MS[stage],
                # FSMoE's n1 = n3 = f*B*L*M is the per-rank shard: all_gather's input, reduce_scatter's output.
                # Our reduce_scatter message is the whole unreduced input (g shards): per byte of it, beta / g
                beta_ms_per_byte=FSMOE_BETA_MS[stage] / _FSMOE_ELEMENT_BYTES / (g if op == "reduce_scatter" else 1),
                source=fsmoe_src,
            )
        )
    return ClusterProfile(
        name="h100-sxm",
        source=f"{measured}; collectives {a2a_src} and {fsmoe_src}; 8x8 topology assumed",
        created="2026-11-28T00:00:00+00:00",
        num_nodes=8,
        gpus_per_node=8,
        device=DeviceInfo(
            kind="gpu",
            name=dev["name"],
            memory_bytes=int(dev["mem_total"]),
            count_per_node=8,
            sm_clock_mhz=dev["sm_clock_max"],
            mem_clock_mhz=dev["mem_clock_max"],
            pcie_gen=dev["pcie_gen"],
            power_limit_w=dev["power_limit_mw"] / 1000.0,
        ),
        gemm_tflops=raw["ceilings"]["bf16_gemm_8192_tflops"],
        copy_GBps=raw["ceilings"]["d2d_copy_TBps_read_plus_write"] * 1000.0,
        attention=AttentionFit(
            a1_ms_per_tok2=att.coef[0], a2_ms_per_tok=att.coef[1], b_ms=att.coef[2], heads=32, head_dim=128,
            fit_rel_error=att.rel_error, source=measured,
        ),
        linear=LinearFit(
            ms_per_token=lin.coef[0], b_ms=lin.coef[1], hidden=4096, ffn_hidden=11008,
            fit_rel_error=lin.rel_error, source=measured,
        ),
        collectives=colls,
        model_costs={},
        raw=raw,
    )


BUILTIN_PROFILES = {
    "a100-64-flexsp-paper": _a100_64_flexsp_paper,
    "h100-sxm": _h100_sxm,
}


@functools.lru_cache(maxsize=None)
def _cached(name: str) -> ClusterProfile:
    return BUILTIN_PROFILES[name]()


def builtin_profile(name: str) -> ClusterProfile:
    if name not in BUILTIN_PROFILES:
        raise InputError("--profile", f"unknown built-in profile {name!r} (known: {', '.join(sorted(BUILTIN_PROFILES))})")
    return _cached(name).model_copy(deep=True)
