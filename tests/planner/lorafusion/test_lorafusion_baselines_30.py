"""A LoRA plan's baseline figures (mLoRA-style, length-sorted mLoRA-style, per-job sequential) are re-derived by
``verify`` from the plan's jobs, lengths, capacity, stages and stage_cost, and ``resimulated`` recomputes them.

Before: verify only checked that the speedups were the stored baseline makespans over the plan's, so a plan whose
mLoRA-style makespan (and, consistently, its speedup) was edited by hand showed the edited speedup; and a plan whose
lengths were changed and resimulated kept the old workload's baselines."""
from __future__ import annotations

import dataclasses
import random

import pytest

from adasched.planner.lorafusion.baselines import mlora_baseline, sequential_baseline
from adasched.planner.lorafusion.costmodel import StageCost, padded
from adasched.planner.lorafusion.jobs import build_workload, parse_jobs
from adasched.planner.lorafusion.plan import build_plan, derived_ratios, round_ms
from adasched.profiler.profile import load_profile


def _workload(seed: int, stages: int):
    jobs = parse_jobs({
        "capacity": 512, "stages": stages, "global_batches": 2, "seed": seed, "layers": 4,
        "jobs": [
            {"name": "a", "adapter": {"r": 8, "alpha": 16}, "global_batch_size": 6, "lr": 1e-3,
             "lengths": {"dist": "lognormal", "median": 60, "sigma": 0.7, "min": 8, "max": 400}},
            {"name": "b", "adapter": {"r": 4, "alpha": 8}, "global_batch_size": 5, "lr": 1e-3,
             "lengths": {"dist": "lognormal", "median": 30, "sigma": 0.9, "min": 4, "max": 300}},
            {"name": "c", "adapter": {"r": 16, "alpha": 16}, "global_batch_size": 3, "lr": 1e-3,
             "lengths": {"dist": "lognormal", "median": 120, "sigma": 0.4, "min": 16, "max": 480}},
        ]})
    return build_workload(jobs, label="baselines")


def _expected(w, plan) -> dict:
    """The baseline figures computed straight from the workload the planner read."""
    cost = StageCost(**plan.stage_cost)
    m, ms, sq = mlora_baseline(w, cost), mlora_baseline(w, cost, sort_by_length=True), sequential_baseline(w, cost)
    return {"mlora_makespan_ms": round_ms(m.makespan_ms), "mlora_sorted_makespan_ms": round_ms(ms.makespan_ms),
            "sequential_makespan_ms": round_ms(sq.makespan_ms), "mlora_microbatches": m.microbatches,
            "mlora_sorted_microbatches": ms.microbatches, "sequential_microbatches": sq.microbatches,
            "mlora_max_microbatch_tokens": m.max_microbatch_tokens,
            "mlora_padding_waste": round(m.padding_waste, 5),
            "mlora_sorted_padding_waste": round(ms.padding_waste, 5),
            "sequential_padding_waste": round(sq.padding_waste, 5)}


@pytest.fixture(params=[(1, 1), (2, 2), (3, 3)], ids=["S1", "S2", "S3"])
def planned(request):
    seed, stages = request.param
    seed += random.SystemRandom().randrange(1000)
    print(f"workload seed {seed}, stages {stages}")  # (shown with a failure)
    w = _workload(seed, stages)
    return w, build_plan(w, load_profile("h100-sxm"), use_milp=False)


def _edited(plan, **fields):
    """The plan with summary fields replaced and everything the old verify checked kept consistent."""
    s = plan.summary.model_copy(update=fields)
    s = s.model_copy(update=derived_ratios(s.tokens, sum(mb.padded_tokens for mb in plan.microbatches),
                                           plan._makespan_ms(), s.mlora_makespan_ms, s.mlora_sorted_makespan_ms,
                                           s.sequential_makespan_ms))
    return plan.model_copy(update={"summary": s, "baselines_ms": {
        "mlora": s.mlora_makespan_ms, "mlora_sorted": s.mlora_sorted_makespan_ms, "sequential": s.sequential_makespan_ms}})


def test_planned_baselines_are_the_workloads(planned):
    w, plan = planned
    assert plan.verify() == []
    assert {k: getattr(plan.summary, k) for k in _expected(w, plan)} == _expected(w, plan)


@pytest.mark.parametrize("key,factor", [("mlora_makespan_ms", 1.37), ("sequential_makespan_ms", 0.81),
                                        ("mlora_sorted_makespan_ms", 1.6)])
def test_an_edited_baseline_makespan_is_refused(planned, key, factor):
    _, plan = planned
    bad = _edited(plan, **{key: round(getattr(plan.summary, key) * factor, 4)})
    errors = bad.verify()
    assert len(errors) == 1 and errors[0].startswith(f"summary.{key}: ") and "give" in errors[0], errors


@pytest.mark.parametrize("key,delta", [("mlora_microbatches", 1), ("sequential_microbatches", -1),
                                       ("mlora_max_microbatch_tokens", 128), ("mlora_padding_waste", 0.01)])
def test_an_edited_baseline_count_is_refused(planned, key, delta):
    _, plan = planned
    bad = _edited(plan, **{key: getattr(plan.summary, key) + delta})
    errors = bad.verify()
    assert len(errors) == 1 and errors[0].startswith(f"summary.{key}: "), errors


def test_a_plan_before_sorted_counts_keeps_its_baselines(planned):
    """Plans written before 2026-11-30 (no mlora_sorted_microbatches) cut the mLoRA-style batches by an older
    rule: their recorded figures are not re-derived."""
    _, plan = planned
    old = _edited(plan, mlora_sorted_microbatches=None, mlora_makespan_ms=round(plan.summary.mlora_makespan_ms * 1.2, 4))
    assert old.verify() == []


def test_resimulated_recomputes_the_baselines_of_new_lengths(planned):
    w, plan = planned
    rng = random.Random(plan.summary.tokens)
    shorter = [max(1, x - rng.randrange(0, x)) for x in plan.lengths]  # each microbatch still fits the capacity
    assert shorter != list(plan.lengths)
    edited = plan.model_copy(deep=True, update={"lengths": shorter})
    for mb in edited.microbatches:
        for seg in mb.segments:
            seg.tokens = sum(shorter[x] for x in seg.samples)
            seg.padded_tokens = padded(seg.tokens)
        mb.padded_tokens = sum(seg.padded_tokens for seg in mb.segments)
    new = edited.resimulated()
    assert new.verify() == []
    want = _expected(dataclasses.replace(w, lengths=tuple(shorter)), plan)
    assert {k: getattr(new.summary, k) for k in want} == want
    assert new.baselines_ms == {"mlora": want["mlora_makespan_ms"], "mlora_sorted": want["mlora_sorted_makespan_ms"],
                                "sequential": want["sequential_makespan_ms"]}
    assert new.summary.speedup_vs_mlora == round(want["mlora_makespan_ms"] / new._makespan_ms(), 4)


def test_the_solver_record_carries_its_gap(planned):
    """(README hunt) a LoRA plan recorded objective and bound but no gap: `show` said "feasible" without it."""
    from adasched.planner.plan import relative_gap

    _, plan = planned
    s = plan.solver
    assert s.gap is not None and s.gap == relative_gap(s.objective, s.bound)
    assert (s.gap == 0.0) == (s.objective == s.bound)
    gap = s.gap + random.uniform(0.01, 0.5)
    errors = plan.model_copy(update={"solver": s.model_copy(update={"gap": gap})}).verify()
    # (under status "optimal" the base check objects first: an open gap there)
    assert errors[-1] == (f"solver.gap: {gap}, the problems' bins {s.objective:g} and bounds {s.bound:g} give "
                          f"{s.gap:.6g}"), errors
    older = plan.model_copy(update={"solver": s.model_copy(update={"gap": None})})  # plans before 2026-12-02
    assert older.verify() == []
