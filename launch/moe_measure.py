"""FSMoE cost model vs the real expert-parallel MoE layer, measured on this CPU over gloo.

    python -m adasched.launch.moe_measure [--json] [--quick] [--nproc 4]
    adasched bench moe --measure [--quick] [--json]        (runs this module in a subprocess)

For a few small configurations (GShard top-2, dropless or capacity mode, torch backend for the expert GEMMs, one
thread per rank) in two layouts - flat EP over ``--nproc`` gloo ranks (``layout="flat"``) and FSMoE's
expert-sharded layout (``layout="sharded"``: ``ExpertParallel.create_groups(E, nproc / 2, expert_shards=2)``, on 4
ranks 2 nodes x 2 shards, each rank holding half the FFN width of its node's E / 2 experts; the same layers as the
flat configurations of the same name) - every rank, all at once:

1. measures the primitives on this machine: the dispatch (rows + int64 tags, two asynchronous
   ``all_to_all_single``) and the combine (rows) over the EP group at four message sizes -> alpha-beta fits; the
   expert computation of one pipeline chunk (group by expert, expert MLP forward, or its backward from the saved
   activations; sharded: every row the node received, through the rank's half of the width) at three chunk sizes
   -> alpha + work per direction; for the sharded layout also the all-gather inside the node (rows + tags: the
   rank's block sent to each peer with ``all_to_all_single`` over ``ep.shard_group``) and the reduce-scatter (the
   peers' segments of the partial outputs, then their sum in peer order) at four block sizes -> alpha-beta fits;
   and the part of the layer that is not pipelined (router, permute/unpermute and their backward, the size
   exchange and the chunk bookkeeping of ``runtime.moe.ep``), per r;
2. builds :class:`~adasched.planner.fsmoe.costmodel.StageCosts` from the fits (stage 0 = the all-to-all over the
   EP group, stage 2 = the expert compute; flat: no intra-node stages; sharded: stage 1 = the all-gather and stage
   3 = the reduce-scatter of the busiest rank's block, FSMoE's layout, not ``two_step``; no all-reduce: one layer)
   and predicts the layer's forward and backward time for r in {1, 2, 4} with the planner's exact pipeline
   evaluation (in the issue order the layer runs here, dispatch-first) plus the measured non-pipelined part; the r
   with the shortest predicted pipeline is the pick (the planner also weighs the interleaved order, which the
   model has not yet found strictly faster, and which the sharded path does not run);
3. measures the real EP :class:`~adasched.runtime.moe.MoELayer` forward and backward separately for every r,
   the backward both with the expert weight gradients fused into each chunk (autograd's order) and deferred
   after the last combine (``wgrad="deferred"``; predicted with the weight-gradient part of one chunk's
   backward measured on its own). Before that, one forward at r = 2 records what the layer really runs (its
   groups, its expert weight shapes, the collective steps each chunk issues: ``configs[i]["layout"]``).
   Every timing of steps 1 and 3 is a probe; the probes run round-robin (each once per round, warm-up rounds
   first) so that load from other processes drifts over all of them alike; a barrier before each timed part;
   per round the max over ranks, then the median over rounds;
4. prints a table (unless ``--json``) and, last, ONE line of JSON ``{"rows": [...], "mean_abs_error": ...,
   "chosen_r_predicted": {...}, "best_r_measured": {...}, "by_layout": {"flat": {...}, "sharded": {...}},
   "note": ...}``; every row has ``layout``; ``error = (predicted - measured) / measured``. The top-level error
   statistics (``mean_abs_error``, ``mean_signed_error``, ``chosen_r_matches_best``, ...) are the flat rows' (as
   in runs before the sharded rows existed); ``by_layout`` has them per layout.

``--quick``: one flat configuration and one sharded (the same layer on half the tokens), fewer repeats. With a
``--nproc`` that does not give at least 2 nodes of 2 ranks dividing the experts, the sharded configurations are
skipped (the note says so).

All times are milliseconds. Sizes are per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

__all__ = ["MeasureConfig", "CONFIGS", "SHARDED_CONFIGS", "LAYOUTS", "R_VALUES", "main", "measure", "predict",
           "stage_costs_of", "summarize"]

R_VALUES = (1, 2, 4)


@dataclass(frozen=True, kw_only=True)
class MeasureConfig:
    """One small MoE layer measured on CPU (all sizes per rank)."""

    name: str
    hidden: int
    """M, model hidden size."""
    ffn: int
    """H, expert FFN hidden size."""
    experts: int
    """E, experts over all ranks (must divide by the EP size: --nproc, or --nproc / expert_shards)."""
    tokens: int
    """Tokens on each rank."""
    activation: str = "swiglu"
    capacity_factor: float | None = None
    """None = dropless."""
    top_k: int = 2
    expert_shards: int = 1
    """S: 1 = flat EP over all ranks (whole experts); S > 1 = FSMoE's expert-sharded layout
    (``ExpertParallel.create_groups(E, nproc / S, expert_shards=S)``: nodes of S ranks, each holding 1/S of the FFN
    width of the node's experts)."""


CONFIGS = (
    MeasureConfig(name="swiglu-dropless", hidden=64, ffn=128, experts=8, tokens=2048),
    MeasureConfig(name="gelu-capacity1.25", hidden=128, ffn=256, experts=8, tokens=1024, activation="gelu",
                  capacity_factor=1.25),
    MeasureConfig(name="swiglu-comm-heavy", hidden=256, ffn=32, experts=8, tokens=1024),
)
#: the same layers (router, experts, tokens) in the expert-sharded layout: on 4 ranks 2 nodes x 2 shards
SHARDED_CONFIGS = (
    MeasureConfig(name="swiglu-dropless-sharded", hidden=64, ffn=128, experts=8, tokens=2048, expert_shards=2),
    MeasureConfig(name="gelu-capacity1.25-sharded", hidden=128, ffn=256, experts=8, tokens=1024, activation="gelu",
                  capacity_factor=1.25, expert_shards=2),
)
#: --quick: the first sharded layer on half the tokens (keeps the quick run near its flat-only duration)
QUICK_SHARDED = replace(SHARDED_CONFIGS[0], name="swiglu-dropless-sharded-1k", tokens=1024)
LAYOUTS = ("flat", "sharded")


@dataclass(frozen=True)
class Repeats:
    warmup: int
    """Untimed rounds first."""
    rounds: int
    """Timed rounds: every probe once per round."""


NOTE = ("CPU measurement: {P} gloo ranks on a {C}-core machine, one compute thread per rank. Compute and gloo's "
        "communication threads compete for the same cores, so the overlap the pipeline model assumes (links and "
        "compute as independent resources) is only partly available, and chunking can gain little or lose. "
        "Prediction = FSMoE pipeline model on alpha-beta fits measured in the same run + the measured "
        "non-pipelined part of the layer (router, permute/unpermute, size exchange, bookkeeping). "
        "error = (predicted - measured) / measured; per-rank times, max over ranks, median over rounds.")
NOTE_SHARDED = (" Expert-sharded rows (layout \"sharded\"): the same layers on {N} nodes x 2 shards "
                "(ExpertParallel.create_groups(E, {N}, expert_shards=2)); stage 0 = the all-to-all over the EP group, "
                "stages 1/3 = the all-gather / reduce-scatter inside the node (all_to_all_single over the shard group, "
                "the reduce-scatter's sum included), stage 2 = every row of the node through 1/2 of the FFN width; "
                "the top-level error fields are the flat layout's, by_layout has both.")


# ---------------------------------------------------------------------------------------------------
# on every rank: probes, run round-robin
# ---------------------------------------------------------------------------------------------------
# A probe runs once and returns the local wall times (ms) of its timed parts; it places its own barriers.
# All probes of a configuration run in rounds (every probe once per round, the same order on every rank), so
# that load from other processes on the machine drifts over all of them alike. Per probe and timed part: the
# max over ranks of each sample, then the median over the rounds.
Probe = Callable[[], tuple]


def _simple(fn, setup=None) -> Probe:
    import torch.distributed as dist

    def probe():
        if setup:
            setup()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        return ((time.perf_counter() - t0) * 1e3,)
    return probe


def _run_probes(probes: dict[str, Probe], rep: Repeats) -> dict[str, list[float]]:
    import torch
    import torch.distributed as dist

    for _ in range(rep.warmup):
        for p in probes.values():
            p()
    samples: dict[str, list] = {k: [] for k in probes}
    for _ in range(rep.rounds):
        for k, p in probes.items():
            samples[k].append(p())
    out = {}
    for k, s in samples.items():
        t = torch.tensor(s, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out[k] = [statistics.median(col) for col in t.T.tolist()]
    return out


def _max_int(v: int) -> int:
    import torch
    import torch.distributed as dist

    t = torch.tensor([v], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _a2a_probes(rows_max: int, hidden: int, P: int, group=None) -> tuple[list[int], dict[str, Probe]]:
    """Dispatch (rows + int64 (src, expert, token) tags: two asynchronous all_to_all_single) and combine (rows)
    over the EP ``group`` (P ranks; None = the world) at four sizes up to the busiest rank's rows, split evenly
    over the P destinations."""
    import torch
    import torch.distributed as dist

    sizes = sorted({max(P, (rows_max // d) // P * P) for d in (8, 4, 2, 1)})
    probes = {}
    for n in sizes:
        x = torch.randn(n, hidden)
        tags = torch.randint(0, 1 << 20, (n, 3), dtype=torch.int64)
        ox, ot = torch.empty_like(x), torch.empty_like(tags)

        def dispatch(x=x, tags=tags, ox=ox, ot=ot):
            w1 = dist.all_to_all_single(ox, x, group=group, async_op=True)
            w2 = dist.all_to_all_single(ot, tags, group=group, async_op=True)
            w1.wait()
            w2.wait()

        def combine(x=x, ox=ox):
            dist.all_to_all_single(ox, x, group=group, async_op=True).wait()

        probes[f"dispatch/{n}"] = _simple(dispatch)
        probes[f"combine/{n}"] = _simple(combine)
    return sizes, probes


def _compute_probes(cfg: MeasureConfig, ep, rows_max: int) -> tuple[list[int], dict[str, Probe]]:
    """One pipeline chunk's work on the expert rank as ``runtime.moe.ep`` runs it (group the received rows by
    expert, expert MLP forward, restore the order; or the backward from the saved activations), at the chunk
    sizes of r = 4, 2, 1 of the busiest rank's received rows (expert-sharded: every row its node received, through
    this rank's 1/S of the FFN width)."""
    import torch

    from adasched.kernels.moe import (expert_mlp_backward, expert_mlp_backward_data, expert_mlp_backward_weight,
                                      expert_mlp_forward, make_index)
    from adasched.runtime.moe.ep import _group_by_expert, _unpermute_rows

    E_local, P = ep.experts_per_rank, ep.domain_size          # tags carry the source's index in the domain
    ffn = cfg.ffn // ep.shards
    cols = 2 * ffn if cfg.activation == "swiglu" else ffn
    w1 = torch.randn(E_local, cfg.hidden, cols) * cfg.hidden ** -0.5
    w2 = torch.randn(E_local, ffn, cfg.hidden) * cfg.ffn ** -0.5
    key_base = 1 << 40
    N = rows_max
    tags_all = torch.stack([torch.randint(0, P, (N,)), torch.randint(0, E_local, (N,)), torch.randperm(N)], 1)
    key_all = (tags_all[:, 1] * P + tags_all[:, 0]) * key_base + tags_all[:, 2]
    key_s, korder = torch.sort(key_all)
    x_all = torch.randn(N, cfg.hidden)
    x_s = x_all[korder]
    idx_all = make_index(torch.zeros(N, dtype=torch.int64), torch.bincount(tags_all[korder, 1], minlength=E_local), 1)
    _, a_s = expert_mlp_forward(x_s, w1, w2, idx_all, cfg.activation, "torch")
    dw1, dw2 = torch.zeros_like(w1), torch.zeros_like(w2)
    sizes = sorted({max(1, N // r) for r in (4, 2, 1)})
    probes = {}
    for n in sizes:
        sel = torch.randperm(N)[:n]
        xr, tags, g = x_all[sel].contiguous(), tags_all[sel].contiguous(), torch.randn(n, cfg.hidden)

        def forward(xr=xr, tags=tags):
            order, counts, _ = _group_by_expert(tags, E_local, P, key_base)
            xs = xr[order]
            idx = make_index(torch.zeros(xs.shape[0], dtype=torch.int64), counts, 1)
            ys, _ = expert_mlp_forward(xs, w1, w2, idx, cfg.activation, "torch")
            _unpermute_rows(ys, order)

        def backward(tags=tags, g=g):
            order, counts, keys = _group_by_expert(tags, E_local, P, key_base)
            pos = torch.searchsorted(key_s, keys)
            idx = make_index(torch.zeros(keys.shape[0], dtype=torch.int64), counts, 1)
            dx, d1, d2 = expert_mlp_backward(x_s[pos], a_s[pos], g[order], w1, w2, idx, cfg.activation, "torch")
            dw1.add_(d1)
            dw2.add_(d2)
            _unpermute_rows(dx, order)

        order, counts, keys = _group_by_expert(tags, E_local, P, key_base)
        pos = torch.searchsorted(key_s, keys)
        idx = make_index(torch.zeros(keys.shape[0], dtype=torch.int64), counts, 1)
        _, saved = expert_mlp_backward_data(x_s[pos], a_s[pos], g[order], w1, w2, idx, cfg.activation, "torch")

        def weight(saved=saved):
            d1, d2 = expert_mlp_backward_weight(saved, E_local)
            dw1.add_(d1)
            dw2.add_(d2)

        probes[f"expert_fwd/{n}"] = _simple(forward)
        probes[f"expert_bwd/{n}"] = _simple(backward)
        probes[f"expert_bwd_dw/{n}"] = _simple(weight)
    return sizes, probes


def _shard_probes(ep, block_max: int, hidden: int) -> tuple[list[int], dict[str, Probe]]:
    """Expert-sharded layout, inside the node (``ep.shard_group``, S ranks), as ``runtime.moe.ep`` runs them: the
    all-gather of what a rank received from the other nodes (rows + int64 tags: S copies of the block concatenated,
    two asynchronous all_to_all_single) and the reduce-scatter of the partial outputs (rows: one all_to_all_single
    of the peers' segments, then their sum in peer order), at four block sizes up to the busiest rank's block
    (equal blocks on every peer)."""
    import torch
    import torch.distributed as dist

    S, group = ep.shards, ep.shard_group
    sizes = sorted({max(1, block_max // d) for d in (8, 4, 2, 1)})
    probes = {}
    for n in sizes:
        x = torch.randn(n, hidden)
        tags = torch.randint(0, 1 << 20, (n, 3), dtype=torch.int64)
        part = torch.randn(n * S, hidden)

        def allgather(x=x, tags=tags, n=n):
            works = []
            for t in (x, tags):
                out = t.new_empty((n * S,) + tuple(t.shape[1:]))
                works.append(dist.all_to_all_single(out, torch.cat([t] * S), [n] * S, [n] * S, group=group,
                                                    async_op=True))
            for w in works:
                w.wait()

        def reducescatter(part=part, n=n):
            out = part.new_empty(n * S, hidden)
            dist.all_to_all_single(out, part, [n] * S, [n] * S, group=group, async_op=True).wait()
            out.reshape(S, n, hidden).sum(0)

        probes[f"allgather/{n}"] = _simple(allgather)
        probes[f"reducescatter/{n}"] = _simple(reducescatter)
    return sizes, probes


def _layout_of(layer, x, ep) -> dict:
    """What the measured layer really runs: its groups, its expert shapes, and the collective steps one forward
    (r = 2) issues per chunk (flat: the all-to-all, step 1; expert-sharded: step 1 across the nodes, step 2 inside
    the node)."""
    import torch
    import torch.distributed as dist

    ep.events = []
    layer.set_pipeline(2, 2)
    with torch.no_grad():
        layer(x)
    steps = {"dispatch": set(), "combine": set()}
    for _, what, _, detail in ep.events:
        if what == "issue":
            steps[detail[0]].add(detail[1])
    ep.events = None
    return {"layout": "sharded" if ep.shards > 1 else "flat", "ep_size": ep.size, "expert_shards": ep.shards,
            "ep_ranks": list(ep.ranks),
            "shard_ranks": dist.get_process_group_ranks(ep.shard_group) if ep.shard_group is not None else [],
            "w1_shape": list(layer.w1.shape), "w2_shape": list(layer.w2.shape),
            "issued_steps": {k: sorted(v) for k, v in steps.items()}}


def _fixed_probes(layer, x, gy, ep, recv_max: int) -> dict[str, Probe]:
    """The non-pipelined part of the EP layer: router + permute + unpermute (forward, then their backward), and
    per r ``runtime.moe.ep``'s size exchange (one all_gather) and chunk bookkeeping around the pipeline (row
    gathers and tags for the dispatch, output assembly, the saved activations re-sorted by key)."""
    import torch
    import torch.distributed as dist

    from adasched.kernels.moe import make_index, permute, unpermute
    from adasched.runtime.moe.ep import _chunks, _Exchange, _Meta, _tags

    T = x.shape[0]

    def local():
        xt = x.detach().requires_grad_(True)
        dist.barrier()
        t0 = time.perf_counter()
        routing = layer.router(xt)
        index = make_index(routing.token_idx, routing.counts, T)
        rows = permute(xt, index, layer.backend)
        out = unpermute(rows, routing.weight.to(rows.dtype), index, layer.backend)
        t1 = time.perf_counter()
        dist.barrier()
        t2 = time.perf_counter()
        out.backward(gy)
        return (t1 - t0) * 1e3, (time.perf_counter() - t2) * 1e3

    with torch.no_grad():
        routing = layer.router(x)
    index = make_index(routing.token_idx, routing.counts, T)
    x_rows = permute(x.detach(), index, layer.backend)
    w1, w2 = layer.w1.detach(), layer.w2.detach()
    recv_x = torch.randn(recv_max, w1.shape[1])
    recv_a = torch.randn(recv_max, w1.shape[2])
    probes: dict[str, Probe] = {"local": local}
    for r in R_VALUES:
        meta = _Meta(ep, routing.token_idx, routing.expert_idx, T, r, r, layer.activation, layer.backend)

        def book_forward(meta=meta, r=r):
            rows, mats = _chunks(meta, r)
            [_Exchange(ep, m) for m in mats]
            sent = [(x_rows[rw], _tags(meta, rw)) for rw in rows]
            y = x_rows.new_empty(x_rows.shape[0], w2.shape[2])
            for rw, (xr, _) in zip(rows, sent):
                y[rw] = xr
            korder = torch.argsort(torch.randperm(recv_max))
            recv_x[korder], recv_a[korder]

        def book_backward(meta=meta, r=r):
            rows, mats = _chunks(meta, r)
            [_Exchange(ep, m) for m in mats]
            sent = [(x_rows[rw], _tags(meta, rw)) for rw in rows]
            torch.zeros_like(w1), torch.zeros_like(w2)
            gx = x_rows.new_empty(x_rows.shape[0], w1.shape[1])
            for rw, (xr, _) in zip(rows, sent):
                gx[rw] = xr

        probes[f"book_fwd/{r}"] = _simple(book_forward)
        probes[f"book_bwd/{r}"] = _simple(book_backward)
    return probes


def _layer_probes(layer, x, gy) -> dict[str, Probe]:
    """The real EP layer: forward and backward timed separately (a barrier before each), per r."""
    import torch.distributed as dist

    def run(r, wgrad="fused"):
        layer.set_pipeline(r, r, wgrad)
        layer.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        dist.barrier()
        t0 = time.perf_counter()
        y = layer(xi)
        t1 = time.perf_counter()
        dist.barrier()
        t2 = time.perf_counter()
        y.backward(gy)
        return (t1 - t0) * 1e3, (time.perf_counter() - t2) * 1e3

    probes = {f"layer/{r}": (lambda r=r: run(r)) for r in R_VALUES}
    probes.update({f"layer_deferred/{r}": (lambda r=r: run(r, "deferred")) for r in R_VALUES})
    return probes


def _fit(xs, ms) -> dict:
    from adasched.profiler.fit import fit_alpha_beta

    f = fit_alpha_beta(xs, ms)
    return {"alpha_ms": f.coef[0], "ms_per_row": f.coef[1], "fit_rel_error": f.rel_error, "note": f.note}


def _measure_config(cfg: MeasureConfig, rank: int, world: int, rep: Repeats, seed: int) -> dict:
    import torch
    import torch.distributed as dist

    from adasched.runtime.moe import ExpertParallel, MoELayer, RouterConfig

    S = cfg.expert_shards
    ep = ExpertParallel.create_groups(cfg.experts, world // S, expert_shards=S) if S > 1 else \
        ExpertParallel.create(cfg.experts)
    torch.manual_seed(seed)                                   # same router and experts everywhere
    rc = RouterConfig(kind="gshard", num_experts=cfg.experts, top_k=cfg.top_k, capacity_factor=cfg.capacity_factor)
    full = MoELayer(cfg.hidden, cfg.ffn, rc, activation=cfg.activation, backend="torch")
    layer = MoELayer(cfg.hidden, cfg.ffn, rc, activation=cfg.activation, backend="torch", ep=ep)
    layer.router.load_state_dict(full.router.state_dict())
    layer.load_full_experts(full.w1.detach(), full.w2.detach())
    del full
    g = torch.Generator().manual_seed(seed * 1000 + rank + 1)
    x = torch.randn(cfg.tokens, cfg.hidden, generator=g)
    gy = torch.randn(cfg.tokens, cfg.hidden, generator=g)
    # the actual traffic of this routing: rows each rank sends and receives over its EP group (the busiest rank
    # sets the pace); expert-sharded: the rows a node's ranks received together are what each rank computes on
    with torch.no_grad():
        routing = layer.router(x)
    send = torch.bincount(routing.expert_idx // ep.experts_per_rank, minlength=ep.size)
    recv = send.clone()
    dist.all_reduce(recv, group=ep.group)
    node = recv[ep.rank:ep.rank + 1].clone()
    if ep.shard_group is not None:
        dist.all_reduce(node, group=ep.shard_group)
    sent_max, recv_max, node_max = _max_int(int(send.sum())), _max_int(int(recv[ep.rank])), _max_int(int(node))
    layout = _layout_of(layer, x, ep)
    a2a_sizes, probes = _a2a_probes(max(sent_max, recv_max), cfg.hidden, ep.size, ep.group)
    comp_sizes, comp = _compute_probes(cfg, ep, node_max)
    probes.update(comp)
    if S > 1:
        shard_sizes, sp = _shard_probes(ep, recv_max, cfg.hidden)
        probes.update(sp)
    probes.update(_fixed_probes(layer, x, gy, ep, node_max))
    probes.update(_layer_probes(layer, x, gy))
    t = _run_probes(probes, rep)
    one = {k: v[0] for k, v in t.items()}
    a2a = {"rows": a2a_sizes, "dispatch_ms": [one[f"dispatch/{n}"] for n in a2a_sizes],
           "combine_ms": [one[f"combine/{n}"] for n in a2a_sizes]}
    a2a.update(dispatch=_fit(a2a_sizes, a2a["dispatch_ms"]), combine=_fit(a2a_sizes, a2a["combine_ms"]))
    comp = {"rows": comp_sizes, "fwd_ms": [one[f"expert_fwd/{n}"] for n in comp_sizes],
            "bwd_ms": [one[f"expert_bwd/{n}"] for n in comp_sizes],
            "bwd_dw_ms": [one[f"expert_bwd_dw/{n}"] for n in comp_sizes]}
    comp.update(fwd=_fit(comp_sizes, comp["fwd_ms"]), bwd=_fit(comp_sizes, comp["bwd_ms"]),
                bwd_dw=_fit(comp_sizes, comp["bwd_dw_ms"]))
    fixed = {"local_fwd_ms": t["local"][0], "local_bwd_ms": t["local"][1]}
    for r in R_VALUES:
        fixed[f"book_fwd_ms_r{r}"] = one[f"book_fwd/{r}"]
        fixed[f"book_bwd_ms_r{r}"] = one[f"book_bwd/{r}"]
    layer_ms = {r: {"fwd_ms": t[f"layer/{r}"][0], "bwd_ms": t[f"layer/{r}"][1],
                    "bwd_deferred_ms": t[f"layer_deferred/{r}"][1]} for r in R_VALUES}
    out = {"config": asdict(cfg), "rows_sent_max": sent_max, "rows_received_max": recv_max,
           "a2a": a2a, "compute": comp, "fixed": fixed, "layer": layer_ms, "layout": layout}
    if S > 1:
        shard = {"rows": shard_sizes, "allgather_ms": [one[f"allgather/{n}"] for n in shard_sizes],
                 "reducescatter_ms": [one[f"reducescatter/{n}"] for n in shard_sizes]}
        shard.update(allgather=_fit(shard_sizes, shard["allgather_ms"]),
                     reducescatter=_fit(shard_sizes, shard["reducescatter_ms"]))
        out.update(rows_node_max=node_max, shard=shard)
    return out


def _rank_main(rank: int, world: int, configs: list[MeasureConfig], rep: Repeats, seed: int) -> list[dict]:
    import gc

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = [_measure_config(c, rank, world, rep, seed) for c in configs]
    # (after success only: a barrier in a `finally` held a failed rank's error back until the collective timeout,
    # its peers blocked in the collective it left)
    gc.collect()          # drop finished async-work handles before the group is torn down (see train_moe)
    dist.barrier()
    return out

# ---------------------------------------------------------------------------------------------------
# prediction (planner side: pure functions of the measured numbers)
# ---------------------------------------------------------------------------------------------------
def stage_costs_of(meas: dict, direction: str):
    """StageCosts of one direction from the fits: stage 0 = the mean of dispatch and combine over the EP group (the
    pipeline model uses one all-to-all cost for both; their sum is kept exact), stage 2 = the expert chunk work.
    Expert-sharded (``meas["shard"]``): stage 1 = the all-gather and stage 3 = the reduce-scatter inside the node
    (per chunk: the busiest rank's block of received rows), stage 2 on every row the node received, through the
    rank's shard; FSMoE's own layout (``two_step=False``), not the runtime's two-step all-to-all."""
    from adasched.planner.fsmoe.costmodel import StageCosts

    a2a, comp = meas["a2a"], meas["compute"]
    rows_a2a = max(meas["rows_sent_max"], meas["rows_received_max"])
    a0 = (a2a["dispatch"]["alpha_ms"] + a2a["combine"]["alpha_ms"]) / 2
    w0 = (a2a["dispatch"]["ms_per_row"] + a2a["combine"]["ms_per_row"]) / 2 * rows_a2a
    shard = meas.get("shard")
    c = comp[direction]
    rows = meas["rows_node_max"] if shard else meas["rows_received_max"]
    a2, w2 = c["alpha_ms"], c["ms_per_row"] * rows
    dw = None
    if direction == "bwd" and "bwd_dw" in comp:
        dw = (comp["bwd_dw"]["alpha_ms"], comp["bwd_dw"]["ms_per_row"] * rows)
    source = f"measured on this CPU over gloo ({direction})"
    if not shard:
        return StageCosts((a0, 0.0, a2, 0.0, 0.0), (w0, 0.0, w2, 0.0, 0.0), source,
                          ("stage 0: mean of dispatch (rows + tags) and combine fits",
                           "no intra-node stages (flat EP)"), dw=dw)
    block = meas["rows_received_max"]
    ag, rs = shard["allgather"], shard["reducescatter"]
    return StageCosts((a0, ag["alpha_ms"], a2, rs["alpha_ms"], 0.0),
                      (w0, ag["ms_per_row"] * block, w2, rs["ms_per_row"] * block, 0.0), source,
                      ("stage 0: mean of dispatch (rows + tags) and combine fits over the EP group (one rank per node)",
                       "stage 1: all-gather inside the node (rows + tags)",
                       "stage 2: all the node's rows, 1/S of the width",
                       "stage 3: reduce-scatter inside the node (rows, summed)"),
                      dw=dw, two_step=False)


def predict(meas: dict) -> dict:
    """Predicted fwd/bwd ms per r (pipeline model + measured non-pipelined part) and the r with the shortest
    predicted pipeline (dispatch-first, the order measured)."""
    from adasched.planner.fsmoe.model import evaluate_pipeline

    out = {"per_r": {r: {} for r in R_VALUES}, "chosen": {}}
    fx = meas["fixed"]
    for d in ("fwd", "bwd"):
        sc = stage_costs_of(meas, d)
        # the layer is measured with the runtime's default issue order (dispatch-first): predict that one, and
        # pick r among those predictions (for r <= 2 the two orders coincide)
        pipes = {r: evaluate_pipeline(sc, r, "dispatch-first").time_ms for r in R_VALUES}
        out["chosen"][d] = min(R_VALUES, key=lambda r: (pipes[r], r))
        for r in R_VALUES:
            pipe = pipes[r]
            out["per_r"][r][d] = {"pipeline_ms": pipe, "fixed_ms": fx[f"local_{d}_ms"] + fx[f"book_{d}_ms_r{r}"]}
            if d == "bwd":
                out["per_r"][r]["bwd_deferred"] = {
                    "pipeline_ms": evaluate_pipeline(sc, r, "dispatch-first", "deferred").time_ms,
                    "fixed_ms": out["per_r"][r]["bwd"]["fixed_ms"]}
    return out


def _errors(rows: list[dict], chosen: dict, best: dict) -> dict:
    """Error statistics of one layout's rows (fused backward and forward in the headline mean, as in earlier runs;
    the deferred rows have their own) and how often the predicted r was the fastest measured one."""
    signed = [r["error_fwd"] for r in rows] + [r["error_bwd"] for r in rows]
    mean = statistics.fmean
    return {
        "mean_abs_error": mean(abs(e) for e in signed) if signed else None,
        "mean_signed_error": mean(signed) if signed else None,
        "chosen_r_matches_best": sum(chosen[n][d] == best[n][d] for n in chosen for d in ("fwd", "bwd")),
        "chosen_r_decisions": 2 * len(chosen),
        "mean_abs_error_bwd_deferred": mean(abs(r["error_bwd_deferred"]) for r in rows) if rows else None,
        "measured_deferred_over_fused_mean": mean(r["measured_deferred_over_fused"] for r in rows) if rows else None,
        "predicted_deferred_over_fused_mean": mean(r["predicted_deferred_over_fused"] for r in rows) if rows else None,
    }


def summarize(results: list[dict], nproc: int) -> dict:
    """The rows of every configuration (``layout`` "flat" or "sharded"); the top-level error statistics are the flat
    layout's (comparable with runs before the sharded rows existed), ``by_layout`` has them per layout."""
    rows, chosen, best_meas, configs = [], {}, {}, []
    for meas in results:
        name = meas["config"]["name"]
        layout = meas["layout"]["layout"]
        pred = predict(meas)
        chosen[name] = pred["chosen"]
        lay = {int(k): v for k, v in meas["layer"].items()}
        best_meas[name] = {d: min(R_VALUES, key=lambda r: lay[r][f"{d}_ms"]) for d in ("fwd", "bwd")}
        for r in R_VALUES:
            p = pred["per_r"][r]
            pf = p["fwd"]["pipeline_ms"] + p["fwd"]["fixed_ms"]
            pb = p["bwd"]["pipeline_ms"] + p["bwd"]["fixed_ms"]
            pd = p["bwd_deferred"]["pipeline_ms"] + p["bwd_deferred"]["fixed_ms"]
            mf, mb, md = lay[r]["fwd_ms"], lay[r]["bwd_ms"], lay[r]["bwd_deferred_ms"]
            rows.append({"config": name, "r": r, "predicted_fwd_ms": pf, "measured_fwd_ms": mf,
                         "predicted_bwd_ms": pb, "measured_bwd_ms": mb,
                         "error_fwd": (pf - mf) / mf, "error_bwd": (pb - mb) / mb,
                         "predicted_bwd_deferred_ms": pd, "measured_bwd_deferred_ms": md,
                         "error_bwd_deferred": (pd - md) / md,
                         "predicted_deferred_over_fused": pd / pb, "measured_deferred_over_fused": md / mb,
                         "layout": layout})
        entry = {"name": name, "config": meas["config"], "rows_sent_max": meas["rows_sent_max"],
                 "rows_received_max": meas["rows_received_max"], "a2a": meas["a2a"],
                 "compute": meas["compute"], "fixed": meas["fixed"],
                 "prediction_parts": {str(r): pred["per_r"][r] for r in R_VALUES}, "layout": meas["layout"]}
        if "shard" in meas:
            entry.update(rows_node_max=meas["rows_node_max"], shard=meas["shard"])
        entry["stage_costs"] = {d: {"alpha_ms": list(sc.alpha), "work_ms": list(sc.work), "notes": list(sc.notes)}
                                for d in ("fwd", "bwd") for sc in [stage_costs_of(meas, d)]}
        configs.append(entry)
    by_layout = {}
    for lo in LAYOUTS:
        names = {c["name"] for c in configs if c["layout"]["layout"] == lo}
        if names:
            by_layout[lo] = _errors([r for r in rows if r["layout"] == lo], {n: chosen[n] for n in names},
                                    {n: best_meas[n] for n in names})
    flat = by_layout.get("flat") or _errors([], {}, {})
    signed = [e for r in rows if r["layout"] == "flat" for e in (r["error_fwd"], r["error_bwd"])]
    cores = os.cpu_count() or 1
    note = NOTE.format(P=nproc, C=cores)
    under = sum(e < 0 for e in signed)
    if signed and under >= 0.75 * len(signed):
        note += (f" In this run {under} of {len(signed)} predictions are below the measurement: inside the layer a "
                 "gloo transfer waits for cores held by other ranks' expert compute and the ranks drift apart between "
                 "synchronisations, while each primitive was timed on an otherwise idle group.")
    if "sharded" in by_layout:
        note += NOTE_SHARDED.format(P=nproc, N=nproc // 2)
    return {
        "rows": rows,
        **{k: flat[k] for k in ("mean_abs_error", "mean_signed_error")},
        "chosen_r_predicted": chosen,
        "best_r_measured": best_meas,
        **{k: v for k, v in flat.items() if k not in ("mean_abs_error", "mean_signed_error")},
        "by_layout": by_layout,
        "machine": f"{cores}-core CPU, gloo, {nproc} ranks",
        "note": note,
        "configs": configs,
    }


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------
def measure(quick: bool, nproc: int, seed: int = 0) -> dict:
    """Run the measurement on ``nproc`` fresh gloo ranks and summarize it."""
    from adasched.profiler.io import InputError

    if nproc < 2:
        raise InputError("--nproc", f"{nproc}: expert parallelism needs at least 2 ranks")
    configs = list(CONFIGS[:1] if quick else CONFIGS)
    for c in configs:
        if c.experts % nproc:
            raise InputError("--nproc", f"{nproc} does not divide the {c.experts} experts of config {c.name!r}")
    # the expert-sharded layout needs at least 2 nodes of S ranks (else there is no all-to-all across nodes)
    sharded = (QUICK_SHARDED,) if quick else SHARDED_CONFIGS
    skipped = [c.name for c in sharded
               if nproc % c.expert_shards or nproc // c.expert_shards < 2 or c.experts % (nproc // c.expert_shards)
               or c.ffn % c.expert_shards]
    configs += [c for c in sharded if c.name not in skipped]
    rep = Repeats(warmup=2, rounds=7) if quick else Repeats(warmup=3, rounds=25)
    from adasched.runtime.dist import spawn_gloo

    from adasched.launch import moe_measure as mod              # importable name for the spawned ranks
    t0 = time.perf_counter()
    omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"                        # inherited by the spawned ranks
    try:
        per_rank = spawn_gloo(mod._rank_main, nproc, configs, rep, seed, timeout_s=120 if quick else 600)
    finally:
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp
    out = summarize(per_rank[0], nproc)
    if skipped:
        out["note"] += (f" Not run with --nproc {nproc}: {', '.join(skipped)} (the expert-sharded layout needs "
                        "--nproc = S x nodes with at least 2 nodes, the nodes dividing the experts).")
    out.update(repeats={"warmup": rep.warmup, "rounds": rep.rounds}, wall_s=time.perf_counter() - t0,
               quick=quick, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    return out


def _print_table(res: dict) -> None:
    from adasched.planner.ui import print_table

    cols = ["config", "layout", "r", "pred fwd ms", "meas fwd ms", "err fwd", "pred bwd ms", "meas bwd ms", "err bwd",
            "pred bwd dW-deferred", "meas bwd dW-deferred", "err"]
    rows = [(r["config"], r["layout"], r["r"], r["predicted_fwd_ms"], r["measured_fwd_ms"], f"{r['error_fwd']:+.1%}",
             r["predicted_bwd_ms"], r["measured_bwd_ms"], f"{r['error_bwd']:+.1%}", r["predicted_bwd_deferred_ms"],
             r["measured_bwd_deferred_ms"], f"{r['error_bwd_deferred']:+.1%}") for r in res["rows"]]
    print_table(rows, cols, title=f"MoE layer: predicted vs measured ({res['machine']})")
    pick = [(n, res["chosen_r_predicted"][n]["fwd"], res["best_r_measured"][n]["fwd"],
             res["chosen_r_predicted"][n]["bwd"], res["best_r_measured"][n]["bwd"]) for n in res["chosen_r_predicted"]]
    print_table(pick, ["config", "r_fwd chosen", "r_fwd best measured", "r_bwd chosen", "r_bwd best measured"])
    for lo, b in res["by_layout"].items():
        print(f"{lo}: mean |error| {b['mean_abs_error']:.1%} (mean signed {b['mean_signed_error']:+.1%}; backward with "
              f"dW deferred {b['mean_abs_error_bwd_deferred']:.1%}); "
              f"chosen r = best measured r in {b['chosen_r_matches_best']} of {b['chosen_r_decisions']} decisions; "
              f"backward with dW deferred / fused: measured {b['measured_deferred_over_fused_mean']:.3f}, "
              f"predicted {b['predicted_deferred_over_fused_mean']:.3f} (mean over configs and r)")
    print(res["note"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m adasched.launch.moe_measure", allow_abbrev=False,
                                description="FSMoE predicted vs measured MoE layer time on this CPU (gloo).")
    p.add_argument("--json", action="store_true", help="print only the one-line JSON result")
    p.add_argument("--quick", action="store_true", help="one configuration, fewer repeats")
    p.add_argument("--nproc", type=int, default=4, help="gloo ranks = expert-parallel size (default 4)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        res = measure(args.quick, args.nproc, args.seed)
    except ValueError as err:                                   # InputError is a ValueError: one line, exit 2
        from adasched.profiler.io import error_line

        sys.stderr.write(error_line(err))
        return 2
    if not args.json:
        _print_table(res)
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
