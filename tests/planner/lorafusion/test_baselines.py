"""mLoRA-style and sequential baselines against hand-computed costs (S = 1: the makespan is the sum of the
microbatches' stage costs, so every term is checked)."""
from __future__ import annotations

import dataclasses
import math

import pytest

from adasched.planner.lorafusion.baselines import mlora_baseline, sequential_baseline
from adasched.planner.lorafusion.costmodel import StageCost
from adasched.planner.lorafusion.jobs import JobSamples, JobsFile, Workload, build_workload, parse_jobs
from adasched.planner.lorafusion.model import ffd_pack, sequence_makespan_ms

COST = StageCost(layers_per_stage=2.0, linear_ms_per_token=0.002, linear_b_ms=0.3, attn_a1_ms_per_tok2=5e-8,
                 attn_a2_ms_per_tok=7e-5, attn_b_ms=0.05)


def _workload(stages: int, capacity: int = 2048) -> Workload:
    cfg: JobsFile = parse_jobs({
        "capacity": capacity, "stages": stages, "global_batches": 2,
        "jobs": [{"name": "x", "adapter": {"r": 4}, "lengths": "xsum", "global_batch_size": 3},
                 {"name": "y", "adapter": {"r": 8}, "lengths": "xsum", "global_batch_size": 2}]})
    lengths = (1000, 200, 700, 50, 1900, 600, 300, 1200, 128, 900)
    jobs = (JobSamples(0, cfg.jobs[0], ((0, 1, 2), (3, 4, 5))), JobSamples(1, cfg.jobs[1], ((6, 7), (8, 9))))
    return Workload(cfg, jobs, lengths, "test")


@pytest.mark.parametrize("capacity, counts", [(2048, [3, 3]), (4096, [2, 3]), (8192, [1, 2])])
def test_mlora_pads_to_longest_with_fixed_counts(capacity, counts):
    """m per global batch (hand-checked ``counts``): the smallest from the token budget whose padded batches fit
    the capacity, else one sample per job. Global batch 0 = x (1000, 200, 700) + y (300, 1200): at 4096, m = 1
    is one 5 x 1200 batch (6000 tokens), m = 2 cuts x 2 + 1 and y 1 + 1 rows: 3 x 1000 and 2 x 1200 fit. Before,
    m was the budget alone (2048: m = 2, batches of 3000 and 2400 tokens above the capacity)."""
    w = _workload(1, capacity)
    L = w.lengths
    res = mlora_baseline(w, COST)
    want_ms, computed, biggest = 0.0, 0, 0
    for (bx, by), m in zip((((0, 1, 2), (6, 7)), ((3, 4, 5), (8, 9))), counts):
        kx, ky = math.ceil(len(bx) / m), math.ceil(len(by) / m)
        for i in range(m):
            ids = list(bx[i * kx:(i + 1) * kx]) + list(by[i * ky:(i + 1) * ky])
            if ids:
                rows, width = len(ids), max(L[s] for s in ids)
                gemm_rows = -(-rows * width // 128) * 128        # the M tile rounding, once per batch
                assert gemm_rows <= capacity or kx == ky == 1
                att = rows * (COST.attn_a1_ms_per_tok2 * width ** 2 + COST.attn_a2_ms_per_tok * width)
                want_ms += COST.layers_per_stage * (COST.linear_ms_per_token * gemm_rows + COST.linear_b_ms
                                                    + att + COST.attn_b_ms)
                computed += gemm_rows
                biggest = max(biggest, gemm_rows)
    assert res.microbatches == sum(counts)
    assert res.makespan_ms == pytest.approx(want_ms, rel=1e-9)
    assert res.computed_tokens == computed and res.tokens == sum(L) and res.max_microbatch_tokens == biggest
    assert res.padding_waste == pytest.approx(1 - sum(L) / computed)


def test_sequential_packs_each_job_alone_with_ffd():
    w = _workload(1)
    L = w.lengths
    res = sequential_baseline(w, COST)
    want = 0.0
    for j in w.jobs:
        for b in j.batches:
            for bn in ffd_pack(b, w.adapter_of, L, 2048):
                ids = [s for v in bn.values() for s in v]
                want += COST.packed_ms(-(-sum(L[s] for s in ids) // 128) * 128, [L[s] for s in ids])
    assert res.makespan_ms == pytest.approx(want, rel=1e-9)
    assert res.noops == 0


def test_baselines_flush_between_global_batches_with_stages():
    res1 = sequential_baseline(_workload(1), COST)
    res4 = sequential_baseline(_workload(4), COST)
    # each job's global batch 0 -> 1 boundary needs S-1 = 3 no-op slots (job x -> job y needs none)
    assert res4.noops == 2 * 3
    assert res4.makespan_ms > res1.makespan_ms / 4


def test_sorted_mlora_pads_less_on_the_same_samples():
    w = _workload(1)
    plain, srt = mlora_baseline(w, COST), mlora_baseline(w, COST, sort_by_length=True)
    assert srt.tokens == plain.tokens and srt.microbatches == plain.microbatches
    # global batch 0 of job x = (1000, 200, 700) in 2 microbatches of 2 + 1 rows: sorted puts 200 and 700 together
    assert srt.computed_tokens < plain.computed_tokens
    assert srt.makespan_ms < plain.makespan_ms


def test_one_tiny_sample_costs_the_same_packed_or_padded():
    """A job of one 39-token sample: the packed segment and the mLoRA batch both run one 128-row GEMM tile, so
    the plan equals the baseline (before, the baseline was charged 39 rows and the plan looked 0.74x mLoRA)."""
    from adasched.planner.lorafusion.plan import build_plan
    from adasched.profiler.profile import load_profile

    for n, lens in ((1, (39,)), (2, (5, 8)), (3, (30, 40, 12))):      # rows x width <= one tile
        cfg = parse_jobs({"capacity": 1024, "stages": 1, "global_batches": 1,
                          "jobs": [{"name": "a", "adapter": {"r": 8}, "lengths": "xsum", "global_batch_size": n}]})
        w = Workload(cfg, (JobSamples(0, cfg.jobs[0], (tuple(range(n)),)),), lens, "test")
        plan = build_plan(w, load_profile("h100-sxm"), time_limit=0.2)
        # same GEMM rows; the padded batch's attention also runs its padding rows (a hair slower)
        assert 1.0 <= plan.summary.speedup_vs_mlora <= 1.01, lens
        assert plan.summary.mlora_padding_waste == pytest.approx(1 - sum(lens) / 128, abs=1e-5)


def test_tiny_random_workloads_never_lose_to_mlora_within_capacity():
    """60 random tiny workloads (1-4 jobs of 1-6 samples of 1-2048 tokens, S in {1, 2, 4}): the plan is never
    slower than the mLoRA-style baseline unless that baseline ran a batch above the capacity the plan keeps
    (before the baseline paid the M-tile rounding too, 6 of these 60 were 0.68-0.97x). This generator's claim
    only: with many short samples of equal length the per-segment tile rounding can lose (BENCHMARKS.md)."""
    import random

    from adasched.planner.lorafusion.costmodel import stage_cost_from_profile
    from adasched.planner.lorafusion.plan import build_plan
    from adasched.profiler.profile import load_profile

    prof = load_profile("h100-sxm")
    for seed in range(60):
        rng = random.Random(seed)
        nj, stages, gb = rng.randint(1, 4), rng.choice([1, 2, 4]), rng.randint(1, 3)
        cap = rng.choice([256, 512, 1024, 2048])
        cfg = parse_jobs({"capacity": cap, "stages": stages, "global_batches": gb, "jobs": [
            {"name": f"j{i}", "adapter": {"r": 8}, "lengths": "xsum", "global_batch_size": rng.randint(1, 6)}
            for i in range(nj)]})
        lengths, jobs = [], []
        for i, spec in enumerate(cfg.jobs):
            batches = []
            for _ in range(gb):
                ids = []
                for _ in range(spec.global_batch_size):
                    lengths.append(rng.randint(1, min(cap, rng.choice([16, 64, 200, cap]))))
                    ids.append(len(lengths) - 1)
                batches.append(tuple(ids))
            jobs.append(JobSamples(i, spec, tuple(batches)))
        w = Workload(cfg, tuple(jobs), tuple(lengths), "fuzz")
        plan = build_plan(w, prof, time_limit=0.2)
        if plan.summary.speedup_vs_mlora < 1.0:
            base = mlora_baseline(w, stage_cost_from_profile(prof, cfg.layers, stages))
            assert base.max_microbatch_tokens > cap, (seed, plan.summary.speedup_vs_mlora)
        assert plan.summary.samples_missing == plan.summary.samples_duplicated == 0


def _equal_length_workload(gbs, length, capacity, stages):
    cfg = parse_jobs({"capacity": capacity, "stages": stages, "global_batches": 2, "layers": 8, "jobs": [
        {"name": f"j{i}", "adapter": {"r": 8}, "lengths": "xsum", "global_batch_size": n} for i, n in enumerate(gbs)]})
    jobs, k = [], 0
    for i, n in enumerate(gbs):
        batches = []
        for _ in range(2):
            batches.append(tuple(range(k, k + n)))
            k += n
        jobs.append(JobSamples(i, cfg.jobs[i], tuple(batches)))
    return Workload(cfg, tuple(jobs), tuple([length] * k), "test")


def test_a_problem_packed_into_one_microbatch_is_merged():
    """The merge pass skipped every problem that packed into a single microbatch: four jobs of 5-11 31-token
    samples (one bin per (global batch, group)) kept 4 half-empty microbatches, 51.70 ms, where folding them gives 2
    (44.79 ms)."""
    from adasched.planner.lorafusion.model import Microbatch, merge_pass
    from adasched.planner.lorafusion.plan import build_plan
    from adasched.profiler.profile import load_profile

    lengths = [31] * 8
    problems = [[Microbatch([(0, 0, [0, 1])])], [Microbatch([(1, 0, [2, 3])])], [Microbatch([(2, 0, [4, 5])])]]
    merged, merges = merge_pass(problems, lengths, 4096)
    assert merges == 1 and [len(p) for p in merged] == [1, 0, 1], merged  # k+1 emptied: nothing to fold into it
    assert merged[0][0].segments == [(0, 0, [0, 1]), (1, 0, [2, 3])]
    w = _equal_length_workload([6, 5, 11, 7], 31, 4096, 1)
    plan = build_plan(w, load_profile("h100-sxm"), use_milp=False)
    assert plan.verify() == [] and plan.sequence_source == "packed"
    assert (plan.summary.microbatches, plan.summary.merges) == (2, 2), plan.summary
    assert all(p.bins == 1 for p in plan.problems) and len(plan.problems) == 4


def test_the_mlora_cut_is_the_plan_when_it_fits_and_simulates_faster():
    """Fewest-bins packing left S = 4's stages uneven: 7 + 2 samples of 597 tokens packed as 6 + 1 where the
    mLoRA-style cut runs 4 + 1 and 3 + 1 within the capacity (136.19 ms vs 124.74: 0.92x of the baseline). The cut,
    run as packed segments, is a candidate sequence like the sequential one; since 2026-12-02 so are the halvings
    of the capacity, and one sample per microbatch at 1,024 tokens beats both (77.94 ms)."""
    from adasched.planner.lorafusion.costmodel import stage_cost_from_profile
    from adasched.planner.lorafusion.plan import LoRAPlan, build_plan
    from adasched.profiler.profile import load_profile

    prof = load_profile("h100-sxm")
    w = _equal_length_workload([7, 2], 597, 4096, 4)
    plan = build_plan(w, prof, use_milp=False)
    cut = mlora_baseline(w, stage_cost_from_profile(prof, 8, 4))
    assert plan.verify() == [] and plan.sequence_source == "packed" and plan.packing_capacity == 1024
    assert plan.predicted_ms == pytest.approx(77.943469, rel=1e-6)
    assert plan.predicted_ms < sequence_makespan_ms(cut.sequence, w.lengths, stage_cost_from_profile(prof, 8, 4), 4)
    assert all(len(mb.segments) == 1 and len(mb.segments[0].samples) == 1 for mb in plan.microbatches if mb.segments)
    assert "4,096: 124.7 ms, 2,048: 96.06 ms, 1,024: 77.94 ms" in plan.solver.note

    # a workload whose fastest sequence is the cut, at a halved capacity (a 400-workload search: 3 such)
    cfg = parse_jobs({"capacity": 4096, "stages": 8, "global_batches": 1, "seed": 175457, "layers": 8, "jobs": [
        {"name": "j0", "adapter": {"r": 8, "alpha": 16}, "global_batch_size": 4, "lr": 1e-3,
         "lengths": {"dist": "lognormal", "median": 60, "sigma": 0.6708867302659983, "min": 8, "max": 1024}},
        {"name": "j1", "adapter": {"r": 8, "alpha": 16}, "global_batch_size": 2, "lr": 1e-3,
         "lengths": {"dist": "lognormal", "median": 600, "sigma": 0.7577369809057047, "min": 8, "max": 1024}}]})
    w = build_workload(cfg)
    plan = build_plan(w, prof, use_milp=False)
    assert plan.verify() == [] and plan.sequence_source == "mlora-cut" and plan.groups == [[0, 1]]
    assert plan.packing_capacity == 1024 and max(mb.padded_tokens for mb in plan.microbatches) <= 1024
    got = [[(s.job, s.global_batch, len(s.samples)) for s in mb.segments] for mb in plan.microbatches]
    assert got == [[(0, 0, 1), (1, 0, 1)], [(0, 0, 1), (1, 0, 1)], [(0, 0, 1)], [(0, 0, 1)]]
    half = dataclasses.replace(w, config=cfg.model_copy(update={"capacity": 1024}))
    cost = stage_cost_from_profile(prof, 8, 8)
    assert plan.predicted_ms == pytest.approx(sequence_makespan_ms(mlora_baseline(half, cost).sequence, w.lengths,
                                                                   cost, 8), rel=1e-6)
    assert plan.predicted_ms < mlora_baseline(w, cost).makespan_ms
    assert "mLoRA-style cut" in plan.solver.note and "mLoRA-style cut" in dict(plan.summary_rows())["microbatches"]
    bad = plan.model_dump(mode="json")
    bad["groups"] = [[0], [1]]
    assert any("mLoRA-style cut runs every job in one group" in e for e in LoRAPlan.model_validate(bad).verify())


def _equal_lengths_case(seed: int) -> Workload:
    """One workload of the review's generator (2026-11-30): 2-6 jobs of 1-12 samples per global batch, lengths
    equal everywhere, equal within a job, or within +-8 tokens of one length; S in {1, 2, 4}; capacity 512-8192."""
    import random

    rng = random.Random(1000 + seed)
    nj, stages, gb = rng.randint(2, 6), rng.choice([1, 2, 4]), rng.randint(1, 4)
    cap = rng.choice([512, 1024, 2048, 4096, 8192])
    mode = rng.choice(["equal", "equaljob", "narrow"])
    base_len = rng.randint(1, min(cap, 600))
    cfg = parse_jobs({"capacity": cap, "stages": stages, "global_batches": gb, "layers": 8, "jobs": [
        {"name": f"j{i}", "adapter": {"r": 8}, "lengths": "xsum", "global_batch_size": rng.randint(1, 12)}
        for i in range(nj)]})
    lengths, jobs = [], []
    for i, spec in enumerate(cfg.jobs):
        job_len = rng.randint(1, min(cap, 600))
        batches = []
        for _ in range(gb):
            ids = []
            for _ in range(spec.global_batch_size):
                lengths.append({"equal": base_len, "equaljob": job_len}.get(
                    mode, max(1, min(cap, base_len + rng.randint(-8, 8)))))
                ids.append(len(lengths) - 1)
            batches.append(tuple(ids))
        jobs.append(JobSamples(i, spec, tuple(batches)))
    return Workload(cfg, tuple(jobs), tuple(lengths), "review")


def test_equal_length_workloads_against_mlora_as_benchmarks_says():
    """BENCHMARKS.md `lora`'s count on the review's equal-length generator (150 workloads, first-fit decreasing):
    13 plans below an mLoRA-style baseline that kept the capacity (21 before the merge-pass fix and the mLoRA-cut
    candidate, 17 before the bubble check was skipped for one global batch per job, 16 before the all-adapter group
    candidate, 15 before the halved capacities; 58 plans take one), every one of them computing more padded tokens than it (every adapter's segment rounded up to the
    128-row tile, the padded batch once)."""
    from adasched.planner.lorafusion.costmodel import stage_cost_from_profile
    from adasched.planner.lorafusion.plan import build_plan
    from adasched.profiler.profile import load_profile

    prof = load_profile("h100-sxm")
    losing = []
    for seed in range(150):
        w = _equal_lengths_case(seed)
        plan = build_plan(w, prof, use_milp=False)
        assert plan.verify() == [], seed
        base = mlora_baseline(w, stage_cost_from_profile(prof, w.config.layers, w.config.stages))
        if plan.summary.speedup_vs_mlora < 1.0 and base.max_microbatch_tokens <= w.config.capacity:
            losing.append((plan.summary.speedup_vs_mlora,
                           sum(mb.padded_tokens for mb in plan.microbatches) > base.computed_tokens))
    assert len(losing) == 13 and all(more for _, more in losing), losing
    assert 0.73 <= min(s for s, _ in losing) and max(s for s, _ in losing) < 1.0



def test_one_stage_considers_one_group_of_every_adapter():
    """Seed 35 of the equal-length generator (S = 1, five jobs, three global batches): the paper's pairs packed
    each global batch into 3 microbatches (9 in all) where the mLoRA-style cut needs 2 of the same padded size, and
    the plan ran 0.918x it; with one stage the bubble check guards nothing, so one group of all five adapters is a
    candidate too: 6 microbatches, at least the baseline's speed."""
    from adasched.planner.lorafusion.plan import build_plan
    from adasched.profiler.profile import load_profile

    w = _equal_lengths_case(35)
    assert w.config.stages == 1 and len(w.jobs) == 5 and all(len(j.batches) == 3 for j in w.jobs)
    plan = build_plan(w, load_profile("h100-sxm"), use_milp=False)
    assert plan.verify() == [] and plan.sequence_source == "packed", plan.sequence_source
    assert plan.groups == [[0, 1, 2, 3, 4]] and len(plan.microbatches) == 6, (plan.groups, len(plan.microbatches))
    assert plan.summary.speedup_vs_mlora >= 1.0, plan.summary.speedup_vs_mlora
    assert len(plan.problems) == 3 and all(p.jobs == [0, 1, 2, 3, 4] for p in plan.problems)
    assert "one group of every adapter was packed too" in plan.solver.note and "the one group kept" in plan.solver.note


def test_one_global_batch_per_job_pairs_adapters_without_the_bubble_check():
    """Seed 118 of the equal-length generator (S = 4, one global batch per job): the bubble check refused every
    pair although no job has a next global batch for the dependency rule to guard, and the plan ran 0.913x the
    mLoRA-style baseline; paired, it beats it (1.02x)."""
    from adasched.planner.lorafusion.plan import build_plan
    from adasched.profiler.profile import load_profile

    w = _equal_lengths_case(118)
    assert w.config.stages == 4 and all(len(j.batches) == 1 for j in w.jobs)
    plan = build_plan(w, load_profile("h100-sxm"), use_milp=False)
    assert plan.verify() == [] and plan.summary.speedup_vs_mlora > 1.0, plan.summary.speedup_vs_mlora


def _random_jobs(rng, capacity: int, stages: int):
    n = rng.randint(2, 4)
    return parse_jobs({"capacity": capacity, "stages": stages, "global_batches": rng.randint(1, 3),
                       "seed": rng.randrange(10**6), "layers": 8, "jobs": [
                           {"name": f"j{i}", "adapter": {"r": 8, "alpha": 16}, "global_batch_size": rng.randint(2, 10),
                            "lr": 1e-3, "lengths": {"dist": "lognormal", "median": rng.choice([60, 200, 600]),
                                                    "sigma": rng.uniform(0.3, 1.0), "min": 8, "max": 1024}}
                           for i in range(n)]})


def test_a_doubled_capacity_never_plans_slower():
    """The capacity is a memory bound: 47 of 100 of these workloads planned slower with it doubled (fewer, larger
    microbatches leave a deep pipeline idle longer; up to 1.38x on Mix at S = 8). The candidates are taken at the
    capacity's halvings too now: the sequence at 2c is never slower than at c, and verifies."""
    import random

    from adasched.planner.lorafusion.plan import build_plan
    from adasched.profiler.profile import load_profile

    prof = load_profile("h100-sxm")
    base = random.SystemRandom().randrange(10**6)
    print(f"seeds {base}..{base + 24}")
    for t in range(base, base + 25):
        rng = random.Random(t)
        stages, c = rng.choice([1, 2, 4, 8]), rng.choice([1024, 2048])
        state = rng.getstate()
        a = build_plan(build_workload(_random_jobs(rng, c, stages)), prof, use_milp=False)
        rng.setstate(state)
        b = build_plan(build_workload(_random_jobs(rng, 2 * c, stages)), prof, use_milp=False)
        assert a.verify() == [] and b.verify() == [], t
        assert b.predicted_ms <= a.predicted_ms * (1 + 1e-9), (t, a.predicted_ms, b.predicted_ms)
        for p in (a, b):
            if p.packing_capacity is not None:
                assert p.packing_capacity in [p.capacity >> k for k in range(1, 20)]  # a halving of it
                assert max(mb.padded_tokens for mb in p.microbatches) <= p.packing_capacity
                assert f"taken at capacity {p.packing_capacity:,}" in p.solver.note


def test_packing_capacity_is_checked_by_verify():
    from adasched.planner.lorafusion.plan import LoRAPlan, build_plan
    from adasched.profiler.profile import load_profile

    w = _equal_length_workload([7, 2], 597, 4096, 4)
    plan = build_plan(w, load_profile("h100-sxm"), use_milp=False)
    assert plan.packing_capacity == 1024
    d = plan.model_dump(mode="json")
    for bad, what in ((4096, "packing_capacity: 4096, recorded only below the plan's capacity 4096"),
                      (512, "padded tokens > packing_capacity 512 (the capacity the sequence was taken at; the "
                            "plan's capacity is 4096)")):
        e = LoRAPlan.model_validate(dict(d, packing_capacity=bad)).verify()
        assert any(what in x for x in e), e


@pytest.mark.parametrize("time_limit", [0.05, 2.0])
def test_a_kept_first_fit_packing_is_said_in_the_note(time_limit):
    """A MILP plan whose kept problems are a halving's first-fit decreasing packing (its MILP packing simulated
    slower) recorded backend ffd+pulp-cbc, problems without a MILP and 'MILP 2 proved optimal in 0 of 0 runs'
    with nothing more; the MILP passes thrown away were in no time. (The review's seed-0 workload: S = 8,
    capacity 2048, two jobs of 9 and 6 samples.)"""
    from adasched.planner.lorafusion.plan import build_plan
    from adasched.profiler.profile import load_profile

    spec = {"capacity": 2048, "stages": 8, "global_batches": 2, "seed": 536110, "layers": 8, "jobs": [
        {"name": "j0", "adapter": {"r": 8, "alpha": 16}, "global_batch_size": 9, "lr": 1e-3,
         "lengths": {"dist": "lognormal", "median": 200.0, "sigma": 0.9427640322495923, "min": 8, "max": 1024}},
        {"name": "j1", "adapter": {"r": 8, "alpha": 16}, "global_batch_size": 6, "lr": 1e-3,
         "lengths": {"dist": "lognormal", "median": 200.0, "sigma": 0.5506345622864919, "min": 8, "max": 1024}}]}
    plan = build_plan(build_workload(parse_jobs(spec)), load_profile("h100-sxm"), time_limit=time_limit)
    assert plan.verify() == [] and plan.packing_capacity == 1024 and plan.solver.backend == "ffd+pulp-cbc"
    assert all(p.milp1 is None and p.milp2 is None for p in plan.problems)
    # (a review at time_limit 0.05: the MILP pass tied first-fit decreasing's and was kept, none of its problems
    # needing a MILP - the note said nothing; at 2.0 its packing simulated slower)
    why = ("its MILP packing simulated slower", "it met every problem's bound there, no MILP needed")
    assert any(f"the listed problems are first-fit decreasing's at 1,024 tokens: {w}" in plan.solver.note
               for w in why), plan.solver.note
    assert "packing passes not kept took " in plan.solver.note


def test_the_capacities_tried_are_summarised_past_six():
    """The largest capacity (2**25) with samples of at most 120 tokens tried 19 halvings (2**25 ... 128), not all
    listed in the note."""
    from adasched.planner.lorafusion.plan import build_plan
    from adasched.profiler.profile import load_profile

    spec = {"capacity": 2**25, "stages": 8, "global_batches": 1, "seed": 7, "layers": 8, "jobs": [
        {"name": f"j{i}", "adapter": {"r": 8, "alpha": 16}, "global_batch_size": 6, "lr": 1e-3,
         "lengths": {"dist": "lognormal", "median": 60, "sigma": 0.5, "min": 8, "max": 120}} for i in range(2)]}
    plan = build_plan(build_workload(parse_jobs(spec)), load_profile("h100-sxm"), use_milp=False)
    assert plan.verify() == [] and plan.packing_capacity is not None and plan.packing_capacity <= 1024
    note = plan.solver.note
    assert "; 19 capacities;" in note and f"..., {plan.packing_capacity:,}: " in note
    assert note.count(" ms, ") < 8
