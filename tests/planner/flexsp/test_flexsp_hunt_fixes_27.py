"""27th session's FlexSP hunt: "vs 1-degree" compared the plan with single degrees on the sorted splits only; the
fill across micro-batches can make a split on which one degree per micro-batch runs about as fast (16 GPUs, 128
Wikipedia sequences: 1.088x reported, 1.0016x against the plan's own micro-batches)."""
from __future__ import annotations

import numpy as np

from adasched.planner.cli import main
from adasched.planner.flexsp.baselines import best_homogeneous
from adasched.planner.plan import load_plan



def test_the_single_degree_baseline_covers_the_plans_own_micro_batches(tmp_path, capsys):
    src = "builtin"  # the packaged Wikipedia sample
    out = tmp_path / "p.json"
    assert main(["plan", "sp", "--seqlens", src, "--gpus", "16", "--global-batch", "128", "--max-context", "65536",
                 "--steps", "3", "--deterministic", "--out", str(out)]) == 0
    capsys.readouterr()
    plan = load_plan(out)
    cm = plan._builtin_cost_model()
    assert cm is not None
    several = 0
    for st in plan.steps:
        own = 0.0
        for mb in st.micro_batches:
            lens = np.array([s for g in mb.groups for s in g.seqlens], dtype=np.int64)
            h, _ = best_homogeneous(np.arange(lens.size), lens, cm)
            own += h.time_ms
            assert mb.predicted_ms <= h.time_ms + 1e-6  # never slower than one degree on its own sequences
        several += len(st.micro_batches) > 1
        assert st.baselines_ms["best_homogeneous"] <= own + 1e-5 * len(st.micro_batches), (st.step, own)
        assert st.predicted_ms <= st.baselines_ms["best_homogeneous"] + 1e-5
    assert several >= 1  # the case the fill changes: a step of several micro-batches


def test_a_milp_whose_warm_start_breaks_the_bucketed_memory_rows_is_marked_cold(monkeypatch, tmp_path, capsys):
    """16 GPUs, gpt-7b: the heuristics' micro-batch fits real memory but not the per-group model's rows (every
    sequence charged at its bucket's longest length), so SCIP starts cold: its 41.5 % gap was shown as the step's
    beside a plan 0.7 % from its bound. Each MILP's `cold` flag is checked against its hint here."""
    import adasched.planner.flexsp.planner as P
    from adasched.planner.flexsp import PlannerConfig, plan_step
    from adasched.planner.flexsp.costmodel import sp_cost_model
    from adasched.profiler.profile import load_profile

    seen = []
    real = P.solve_microbatch

    def spy(buckets, cm, params, hint=None, backend="SCIP"):
        seen.append(any(sum(c * buckets[q].max for q, c in enumerate(counts)) > cm.token_capacity(d)
                        for d, counts in hint))
        return real(buckets, cm, params, hint=hint, backend=backend)

    monkeypatch.setattr(P, "solve_microbatch", spy)
    cm = sp_cost_model(load_profile("a100-64-flexsp-paper"), "gpt-7b", 16)
    rng = np.random.default_rng(1)
    lens = np.minimum(rng.lognormal(7.0, 1.2, 128).astype(np.int64) + 1, int(cm.token_capacity(16)))
    r = plan_step(lens, cm, PlannerConfig(time_limit=30.0, seed=0, max_evals=40, milp_nodes=20, formulation="groups"))
    assert [m.cold for m in r.milp] == seen and any(seen) and not all(seen), seen
