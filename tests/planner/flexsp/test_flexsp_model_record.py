"""plan_sp refuses, before any planning, a ModelShape the SP plan could not record (its name or its sizes):
one InputError naming 'model', and on_checked (the CLI's notes) never runs; a recordable custom shape plans and
round-trips its sizes through the plan's model_shape."""
import dataclasses

import numpy as np
import pytest

from adasched.planner.flexsp import PlannerConfig, plan_sp
from adasched.planner.flexsp.costmodel import ModelShape
from adasched.profiler.io import InputError
from adasched.profiler.profile import load_profile


def _plan(shape, called):
    lens = np.random.default_rng().integers(1, 2000, 64)
    return plan_sp(load_profile("h100-sxm"), shape, lens, gpus=8, global_batch=8, steps=1,
                   config=PlannerConfig(use_milp=False, max_evals=2), on_checked=lambda: called.append(1))


@pytest.mark.parametrize("change, where", [
    (dict(name="my model"), "name 'my model'"),
    (dict(name="-x"), "name '-x'"),
    (dict(vocab=0), "vocab"),
    (dict(state_bytes_per_param=18.5), "state_bytes_per_param"),
    (dict(zero_stage=4), "zero_stage"),
])
def test_unrecordable_model_is_refused_before_planning(change, where):
    shape = dataclasses.replace(ModelShape(name="mini", hidden=64, layers=2, heads=4, act_bytes_per_token=1000.0),
                                **change)
    called = []
    with pytest.raises(InputError) as e:
        _plan(shape, called)
    assert str(e.value).startswith("model: ") and where in str(e.value) and "\n" not in str(e.value)
    assert called == []


def test_recordable_custom_model_plans_and_records_its_sizes():
    shape = ModelShape(name="mini-2", hidden=64, layers=2, heads=4, vocab=500, act_bytes_per_token=1000.0)
    called = []
    plan, _ = _plan(shape, called)
    assert called == [1] and plan.model == "mini-2"
    assert plan.model_shape.model_dump() == dataclasses.asdict(shape)
