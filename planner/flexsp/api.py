"""The FlexSP planner as a library: lengths in, an :class:`SPPlan` (and per-step figures) out.

    from adasched.profiler.profile import load_profile
    from adasched.planner.flexsp import plan_sp, PlannerConfig, load_lengths
    lens = load_lengths("wikipedia.txt", max_context=384 * 1024)
    plan, results = plan_sp(load_profile("a100-64-flexsp-paper"), "gpt-7b", lens, gpus=64,
                            global_batch=512, steps=10, seed=0, config=PlannerConfig(time_limit=1.0))
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from adasched.planner.plan import SolverRecord, inputs_digest, profile_ref, relative_gap
from adasched.profiler.io import InputError
from adasched.profiler.profile import ClusterProfile

from .batching import check_max_context, draw_batches, draw_indices, read_seqlens
from .costmodel import MODEL_PRESETS, ModelShape, SPCostModel, check_model_states, model_preset, sp_cost_model
from .plan import SPGroup, SPMicroBatch, SPModelShape, SPPlan, SPStep
from .planner import PlannerConfig, StepResult, check_fits, placed_groups, plan_step

__all__ = ["load_lengths", "plan_sp", "summarize", "to_plan", "planner_memory_bytes", "check_planner_memory",
           "draw_batches"]


def load_lengths(path: str | os.PathLike, max_context: int | None = None) -> np.ndarray:
    """Read a length file; sequences longer than ``max_context`` are clipped to it (documents truncated to
    the training context, as pre-training pipelines do; the step's token count then matches what is trained)."""
    lens = read_seqlens(path)
    if max_context is not None:
        check_max_context(max_context)
        lens = np.minimum(lens, max_context)
    return lens


def planner_memory_bytes(batch: np.ndarray, cm: SPCostModel, config: PlannerConfig) -> int:
    """Bytes the planner's largest arrays take for one global batch (an estimate): the micro-batch split DP
    (:func:`~.batching.split_microbatches`) keeps one int32 choice per sequence per micro-batch count, for M up
    to M_min + ``extra_microbatches`` (M_min = batch tokens / what all GPUs hold), plus about 12 temporaries of
    one int64 per sequence; and the local search's swap matrices (:func:`~.assign.local_search`: about 16 float64
    arrays of the slowest group's sequences x the micro-batch's other sequences, at most (k/2)^2 each for a
    micro-batch of k sequences, k at most the shortest sequences that fit together on all GPUs - and at most
    :data:`~.assign.SWAP_CHUNK_PAIRS` pairs at a time, evaluated in blocks since 2026-12-03: 10**6 sequences of 1-16
    tokens on 64 GPUs asked numpy for 5.9 GiB in one swap matrix, and the (k/2)^2 worst case refused 65,536
    Wikipedia sequences on 1,024 GPUs as 26.6 GiB where planning them peaked at 176 MB). (The bucketing DP is
    smaller: a micro-batch of at most C tokens has at most sqrt(2 C) distinct lengths.)

    This is the largest arrays, not the peak. Not counted: the Python lists of sequence ids each candidate plan
    holds (about 36 bytes per id; every split tried keeps its heuristic, searched and filled plans, so a few
    dozen copies of the batch's ids), the plan model and its JSON (about 100 bytes per sequence), the local
    search's move matrix (critical group's sequences x groups, 5 float64 arrays) and the interpreter with its
    libraries (~100 MB). The pruned swap search keeps ~16 arrays of its candidate pairs, but falls back to the full
    matrix when they are more than half its pairs, so the swap term above still bounds it. Measured peak RSS of
    `plan sp --global-batch 20000` (Wikipedia, 64 GPUs, one step): 464 MiB before the 2026-11-28 speed-up, 181 MiB
    after, and 179-181 MiB for 64, 2,000 and 8,000 sequences as well (the interpreter, its libraries and reading the
    10**6-line length file set that peak, not the planning); this estimate: 498 MiB for the 20,000 (its worst-case
    swap matrix did not occur). A fair peak would need those terms measured per sequence; this check only guards
    against the batches that cannot be planned in memory at all."""
    n = int(batch.size)
    cap = cm.token_capacity(cm.world)
    if not (n and cap > 0):
        return 0
    m_min = max(1, int(np.ceil(float(batch.sum()) / cap)))
    m_hi = min(n, m_min + config.extra_microbatches + 1)
    k = int(np.searchsorted(np.cumsum(np.sort(batch).astype(np.float64)), cap, side="right"))
    from .assign import SWAP_CHUNK_PAIRS

    return (4 * m_hi + 12 * 8) * (n + 1) + 16 * 8 * min(k * k // 4, SWAP_CHUNK_PAIRS)


def check_planner_memory(batches: list[np.ndarray], cm: SPCostModel, config: PlannerConfig) -> None:
    """Refuse (InputError naming --global-batch) a global batch whose planning needs more than half this host's
    memory (the rest is for the planner's other data): --global-batch 10**9 was
    OOM-killed. One line, before any planning."""
    from adasched.profiler.inventory import host_memory_bytes

    if not batches:
        return
    worst = max(batches, key=lambda b: planner_memory_bytes(b, cm, config))
    need, have = planner_memory_bytes(worst, cm, config), host_memory_bytes()
    if need > have / 2:
        raise InputError("--global-batch", f"{worst.size:,} sequences ({int(worst.sum()):,} tokens) split into "
                                           f"micro-batches on {cm.world} GPUs need at least {need / 2**30:,.1f} GiB "
                                           f"to plan, more than half this host's {have / 2**30:,.1f} GiB; lower "
                                           f"--global-batch")


def _step_model(r: StepResult, cm: SPCostModel) -> SPStep:
    mbs = []
    for mb in r.micro_batches:
        groups = []
        for d, ranks, ids in sorted(placed_groups(mb, cm.world), key=lambda g: g[1][0]):
            groups.append(SPGroup(degree=d, ranks=ranks, seq_ids=[int(i) for i in ids],
                                  seqlens=[int(r.lens[i]) for i in ids],
                                  predicted_ms=round(cm.group_time(d, r.lens[ids]), 6)))
        mbs.append(SPMicroBatch(groups=groups, predicted_ms=round(mb.time_ms, 6), source=mb.source))
    return SPStep(step=r.step, seqlens=[int(x) for x in r.lens], micro_batches=mbs, predicted_ms=round(r.time_ms, 6),
                  baselines_ms={k: round(v, 6) for k, v in r.baselines_ms.items() if np.isfinite(v)},
                  solve_seconds=round(r.solve_seconds, 6), solver_status=r.milp_status, mip_gap=r.mip_gap)


def to_plan(results: list[StepResult], cm: SPCostModel, profile: ClusterProfile, config: PlannerConfig,
            digest: str, max_context: int | None) -> SPPlan:
    steps = [_step_model(r, cm) for r in results]
    gaps = [r.mip_gap for r in results if r.mip_gap is not None]
    statuses = {r.milp_status for r in results}
    # The MILPs solve a bucketed model over some micro-batch splits only, so their "optimal" does not prove the
    # real-length plan optimal. The plan is "optimal" only where every step meets its lower bound; otherwise
    # "feasible" when some MILP found a solution, else "heuristic" (no MILP found one - timed out, or infeasible in
    # the bucketed model - or none ran).
    at_bound = all(r.time_ms <= r.lower_bound_ms * (1 + 1e-9) for r in results)
    solved = statuses & {"optimal", "feasible"}
    status = "optimal" if at_bound else ("feasible" if solved else "heuristic")
    n_won = sum(1 for r in results for m in r.milp if m.won)
    n_milp = sum(len(r.milp) for r in results)
    n_cold = sum(1 for r in results for m in r.milp if m.cold)
    cut = [r.step for r in results if r.clock_bound]  # (--deterministic: the steps a MILP's time cap cut)
    cut_note = f"{len(cut)} steps cut by that cap" + (
        f": step {', '.join(map(str, cut[:20]))}{', ...' if len(cut) > 20 else ''}" if cut else "")
    solver = SolverRecord(
        backend=f"ortools-{config.backend.lower()}+heuristics" if config.use_milp else "heuristic",
        status=status, objective=round(sum(r.time_ms for r in results), 6),
        bound=round(sum(r.lower_bound_ms for r in results), 6),
        gap=0.0 if at_bound else relative_gap(sum(r.time_ms for r in results), sum(r.lower_bound_ms for r in results)),
        solve_seconds=round(sum(r.solve_seconds for r in results), 6),
        time_limit=None if config.deterministic else config.time_limit * len(results),
        seed=config.seed, threads=config.threads,
        note=((f"deterministic: at most {config.max_evals} group structures per micro-batch and "
               f"{config.milp_nodes} nodes per MILP, {config.time_limit:g} s a cap per MILP; "
               f"{cut_note} (those may differ between runs); "
               if config.use_milp else
               f"deterministic: at most {config.max_evals} group structures per micro-batch, no MILP; ")
              if config.deterministic else
              f"{'MILP' if config.use_milp else 'search'} budget {config.time_limit:g} s per step (the time limit "
              f"recorded: that budget x steps), plus up to as much again for the fill across micro-batches, and the "
              f"single-degree and greedy candidates unbounded - solve_seconds can exceed it; ")
             + (f"{len(results)} steps; {n_milp} MILPs (bucketed, Q={config.buckets}); MILP beat the heuristics on "
                f"{n_won} (their mean gap in the bucketed model: "
                + (f"{float(np.mean(gaps)):.4g}" if gaps else "none solved") + ")"
                + (f"; {n_cold} started cold (the warm start, the heuristics' best micro-batch, breaks the bucketed "
                   "memory rows, which charge every sequence at its bucket's longest length: such a MILP's gap is its "
                   "own solution's, not the plan's)" if n_cold else "") + "; every "
                "plan is evaluated on real lengths and is the best of MILP, single-degree and greedy candidates; "
                "status 'optimal' only when every step meets its lower bound (MILP statuses per step refer to the "
                "bucketed model)" if config.use_milp else
                f"{len(results)} steps; heuristics only (--no-milp: single-degree, greedy and local-search candidates, "
                f"each evaluated on real lengths)")
             + "; objective, bound and gap: the predicted time against the sum of the steps' lower bounds",
    )
    bnames = sorted({k for r in results for k in r.baselines_ms})
    baselines = {k: round(sum(r.baselines_ms.get(k, np.inf) for r in results), 6) for k in bnames}
    baselines = {k: v for k, v in baselines.items() if np.isfinite(v)}
    return SPPlan(inputs_digest=digest, profile=profile_ref(profile), solver=solver,
                  predicted_ms=round(sum(r.time_ms for r in results), 6), baselines_ms=baselines,
                  world_size=cm.world, model=cm.model.name, model_shape=_shape_record(cm.model),
                  max_context=max_context, steps=steps, cost_model_source=cm.source)


def _check_recordable(shape: ModelShape) -> None:
    """InputError ('model') before any planning when the plan could not record this model (a name the plan's
    ``model`` field refuses, or sizes ``model_shape`` refuses): else plan_sp planned every step and then failed in
    :func:`to_plan` with pydantic's multi-line error."""
    import re

    from pydantic import ValidationError

    from .plan import MODEL_NAME_PATTERN

    if not (isinstance(shape.name, str) and len(shape.name) <= 200 and re.fullmatch(MODEL_NAME_PATTERN, shape.name)):
        raise InputError("model", f"name {shape.name!r}: 1-200 characters, letters, digits and ._+/:@- "
                                  f"(not first), as an SP plan records it")
    try:
        _shape_record(shape)
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError("model", f"{shape.name!r}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def _shape_record(shape: ModelShape) -> SPModelShape | None:
    """None for an unchanged preset (its name says it all); else the sizes, so the plan's model name means
    something (an SPPlan refuses an unknown name without them)."""
    if MODEL_PRESETS.get(shape.name) == shape:
        return None
    return SPModelShape(**dataclasses.asdict(shape))


def plan_sp(profile: ClusterProfile, model: str | ModelShape, lengths: np.ndarray, *, gpus: int | None = None,
            global_batch: int, steps: int, seed: int | None = None, config: PlannerConfig | None = None,
            max_context: int | None = None, on_step: Callable[[StepResult], None] | None = None,
            on_checked: Callable[[], None] | None = None, where: str = "--seqlens") -> tuple[SPPlan, list[StepResult]]:
    """Plan ``steps`` global batches drawn (seeded) from ``lengths``. Raises InputError on bad input
    before any planning (GPU count, a sequence that does not fit even on all GPUs, a batch too large to plan in
    this host's memory); ``on_checked`` runs once those checks passed (the CLI's notes go there, so an error is
    the only line). ``seed`` seeds the batch draw and the solver, in place of ``config.seed`` (default: that, else
    0), so the plan's recorded seed is the one both used (a ``config`` used to keep its own for the solver).
    ``max_context``: lengths above it are clipped to it (documents truncated to the context), as the plan records.
    Only the drawn sequences must fit on all GPUs (a plan trains its batches only; the CLI notes longer ones left
    in the file); ``where`` names the lengths' source in that error."""
    seed = seed if seed is not None else config.seed if config is not None else 0
    config = dataclasses.replace(config, seed=seed) if config is not None else PlannerConfig(seed=seed)
    cm = sp_cost_model(profile, model_preset(model) if isinstance(model, str) else model, gpus)
    check_model_states(cm, profile)
    _check_recordable(cm.model)
    if max_context is not None:  # the plan records its lengths as clipped to it (verify holds it to that)
        check_max_context(max_context)
        lengths = np.minimum(np.asarray(lengths), max_context)
    lengths = np.asarray(lengths)
    if lengths.size == 0:  # (draw_indices would take a remainder by 0)
        raise InputError(where, "no sequence lengths")
    idx = draw_indices(len(lengths), global_batch, steps, seed)
    check_fits(lengths, cm, where=where, drawn=np.concatenate(idx))
    batches = [lengths[i].copy() for i in idx]
    check_planner_memory(batches, cm, config)
    if on_checked is not None:
        on_checked()
    results = []
    for k, b in enumerate(batches):
        r = plan_step(b, cm, config, step=k)
        results.append(r)
        if on_step is not None:
            on_step(r)
    digest = inputs_digest(profile, cm.model.name, cm.world, global_batch, steps, seed, max_context,
                           [b.tolist() for b in batches], config.__dict__)
    return to_plan(results, cm, profile, config, digest, max_context), results


def summarize(results: list[StepResult], cm: SPCostModel) -> dict:
    """Per-step rows and the summary figures `adasched bench sp` reports."""
    rows = []
    for r in results:
        b = r.baselines_ms
        rows.append(dict(
            step=r.step, sequences=int(r.lens.size), tokens=int(r.lens.sum()), max_len=int(r.lens.max()),
            micro_batches=r.chosen_m, split=r.split, flexsp_ms=r.time_ms, static_ms=b["static"],
            best_homogeneous_ms=b["best_homogeneous"], greedy_ms=b["greedy"] if np.isfinite(b["greedy"]) else None,
            speedup_vs_static=b["static"] / r.time_ms, speedup_vs_best_homogeneous=b["best_homogeneous"] / r.time_ms,
            speedup_vs_greedy=(b["greedy"] / r.time_ms) if np.isfinite(b["greedy"]) else None,
            lower_bound_ms=r.lower_bound_ms, solve_seconds=r.solve_seconds, milp_status=r.milp_status,
            mip_gap=r.mip_gap, milp_won=sum(1 for m in r.milp if m.won), milp_cold=sum(1 for m in r.milp if m.cold),
            memory_violations=r.memory_violations,
            sources=sorted({mb.source for mb in r.micro_batches}),
        ))
    sv = np.array([x["speedup_vs_static"] for x in rows])
    hv = np.array([x["speedup_vs_best_homogeneous"] for x in rows])
    gv = [x["speedup_vs_greedy"] for x in rows if x["speedup_vs_greedy"] is not None]
    gaps = [x["mip_gap"] for x in rows if x["mip_gap"] is not None]
    solve = np.array([x["solve_seconds"] for x in rows])
    bound = np.array([x["best_homogeneous_ms"] / x["lower_bound_ms"] for x in rows])
    summary = dict(
        steps=len(rows),
        speedup_vs_static_mean=float(sv.mean()), speedup_vs_static_min=float(sv.min()),
        speedup_vs_best_homogeneous_mean=float(hv.mean()), speedup_vs_best_homogeneous_min=float(hv.min()),
        speedup_vs_best_homogeneous_max=float(hv.max()),
        speedup_vs_greedy_mean=float(np.mean(gv)) if gv else None,
        best_homogeneous_over_lower_bound_mean=float(bound.mean()),
        solve_seconds_mean=float(solve.mean()), solve_seconds_p95=float(np.percentile(solve, 95)),
        solve_seconds_max=float(solve.max()),
        memory_violations=int(sum(x["memory_violations"] for x in rows)),
        mip_gap_mean=float(np.mean(gaps)) if gaps else None,
        milp_won_micro_batches=int(sum(x["milp_won"] for x in rows)),
        cost_model_source=cm.source,
    )
    return dict(rows=rows, summary=summary)
