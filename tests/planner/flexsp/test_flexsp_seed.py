"""plan_sp's ``seed`` seeds the batch draw and the solver and is the one the plan records, with or without a
PlannerConfig (a config used to keep its own seed, 0 by default, for the solver and the record)."""
from __future__ import annotations

import numpy as np

from adasched.planner.flexsp import PlannerConfig, plan_sp
from adasched.profiler.profile import load_profile


def test_seed_reaches_the_solver_and_the_record_with_a_config():
    prof = load_profile("a100-64-flexsp-paper")
    lens = np.random.default_rng(11).integers(200, 6000, 64)
    kw = dict(gpus=4, global_batch=8, steps=1)
    cfg = PlannerConfig(time_limit=0.2, use_milp=False, max_evals=2)
    with_cfg, res5 = plan_sp(prof, "gpt-7b", lens, seed=5, config=cfg, **kw)
    alone, _ = plan_sp(prof, "gpt-7b", lens, seed=5, **kw)
    assert with_cfg.solver.seed == alone.solver.seed == 5
    assert cfg.seed == 0  # the caller's config is not changed
    only_cfg, _ = plan_sp(prof, "gpt-7b", lens, config=PlannerConfig(time_limit=0.2, use_milp=False, seed=7), **kw)
    assert only_cfg.solver.seed == 7
    default, res0 = plan_sp(prof, "gpt-7b", lens, config=cfg, **kw)
    assert default.solver.seed == 0
    # the seed also draws the batches: another seed, another batch (64 lengths, 8 drawn)
    assert sorted(res5[0].lens.tolist()) != sorted(res0[0].lens.tolist())
