"""The plan's 1F1B makespan uses the layer split the trainer runs (hunt finding: it assumed layers / stages on
every stage, so 5 layers over 4 stages - [1, 1, 1, 2] in the trainer - were predicted 1.39x too fast)."""
from __future__ import annotations

import numpy as np
import pytest

from adasched.planner.lorafusion.costmodel import StageCost
from adasched.planner.lorafusion.jobs import build_workload, parse_jobs
from adasched.planner.lorafusion.model import FWD_FRACTION, update_dependencies
from adasched.planner.lorafusion.plan import build_plan
from adasched.planner.simulator import Task, simulate
from adasched.profiler.profile import load_profile
from adasched.runtime.lora_trainer import one_f_one_b_order, stage_layers


def _trainer_makespan(plan, layers: int, stages: int) -> float:
    """The plan's microbatches on the trainer's split and 1F1B order (its own functions), per-layer costs."""
    seq, L = plan.sequence(), plan.lengths
    cost = StageCost(**plan.stage_cost)
    per_layer = [cost.packed_ms(mb.padded_tokens(L), [L[s] for _, _, ids in mb.segments for s in ids])
                 / cost.layers_per_stage for mb in seq]
    waits: dict[int, list[int]] = {}
    for i, j in update_dependencies(seq):
        waits.setdefault(i, []).append(j)
    tasks = []
    for s in range(stages):
        a, b = stage_layers(layers, stages, s)
        for op, i in one_f_one_b_order(len(seq), stages, s):
            d = per_layer[i] * (b - a)
            if op == "F":
                deps = ([f"F{i}s{s - 1}"] if s else []) + [f"B{j}s{s}" for j in waits.get(i, ())]
                tasks.append(Task(f"F{i}s{s}", s, "compute", d * FWD_FRACTION, tuple(deps)))
            else:
                deps = [f"B{i}s{s + 1}"] if s + 1 < stages else [f"F{i}s{s}"]
                tasks.append(Task(f"B{i}s{s}", s, "compute", d * (1 - FWD_FRACTION), tuple(deps)))
    return simulate(tasks).makespan_ms


@pytest.mark.parametrize("layers, stages", [(4, 4), (5, 4), (7, 4), (9, 2), (6, 6), (33, 8)])
def test_predicted_makespan_is_the_trainers_split(layers, stages):
    seed = int(np.random.default_rng().integers(1000))
    # capacity 4096: xsum draws reach 4096 tokens (2048 refused some seeds: a flaky test)
    cfg = parse_jobs({"capacity": 4096, "stages": stages, "global_batches": 2, "layers": layers, "seed": seed,
                      "jobs": [{"name": f"j{i}", "adapter": {"r": 8 * (i + 1)}, "lengths": "xsum",
                                "global_batch_size": 8} for i in range(3)]})
    plan = build_plan(build_workload(cfg, label="t"), load_profile("h100-sxm"), use_milp=False)
    want = _trainer_makespan(plan, layers, stages)
    assert plan.predicted_ms == pytest.approx(want, rel=1e-9, abs=1e-3), (layers, stages, seed)
    assert not plan.verify()  # the stored makespan re-simulates to itself
    scales = StageCost(**plan.stage_cost).stage_scales(stages)
    assert (scales is None) == (layers % stages == 0)


def test_a_plan_written_before_the_split_rule_still_loads(tmp_path, monkeypatch):
    """Review finding: plans written before the trainer's split was simulated (uneven layers/stages) failed
    verification - show, simulate, train_lora --plan and the resume of a saved plan.json refused them. Their own
    (uniform) numbers are accepted; anything else is still refused."""
    import json

    from adasched.planner.plan import load_plan, save_plan
    from adasched.profiler.io import InputError

    cfg = parse_jobs({"capacity": 4096, "stages": 4, "global_batches": 2, "layers": 5,
                      "seed": int(np.random.default_rng().integers(1000)),
                      "jobs": [{"name": f"j{i}", "adapter": {"r": 8}, "lengths": "xsum", "global_batch_size": 8}
                               for i in range(2)]})
    new = build_plan(build_workload(cfg, label="t"), load_profile("h100-sxm"), use_milp=False)
    with monkeypatch.context() as m:  # the old simulation: every stage at layers / stages
        m.setattr(StageCost, "stage_scales", lambda self, stages: None)
        old = build_plan(build_workload(cfg, label="t"), load_profile("h100-sxm"), use_milp=False)
    assert old.predicted_ms < new.predicted_ms  # the last stage's 2 layers, not 1.25
    save_plan(old, tmp_path / "old.json")
    assert load_plan(tmp_path / "old.json").predicted_ms == old.predicted_ms
    data = json.loads((tmp_path / "old.json").read_text())
    data["predicted_ms"] = data["summary"]["makespan_ms"] = round((old.predicted_ms + new.predicted_ms) / 2, 4)
    (tmp_path / "edited.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="predicted_ms: .* the microbatches simulate to"):
        load_plan(tmp_path / "edited.json")
