"""27th session's SP runtime hunt (each failed before): --check-reference let a NaN gradient pass when it was not in
the first parameter (Python's max() over floats drops a NaN that is not first); an empty --plan was reported as
'.: is a directory' (train_sp and train_moe)."""
from __future__ import annotations

import math
import random

import pytest
import torch

from adasched.launch.train_sp import reference_diff


def test_reference_diff_is_the_largest_difference_over_every_parameter():
    shapes = [(random.randint(1, 5), random.randint(1, 5)) for _ in range(random.randint(3, 6))]
    ref = [torch.randn(s, dtype=torch.float64) for s in shapes]
    got = [r + 1e-9 * torch.randn_like(r) for r in ref]
    dl, dg = reference_diff(2.5, got, 2.0, ref)
    assert dl == pytest.approx(0.25, rel=1e-15)
    scale = max(float(r.abs().max()) for r in ref)
    assert dg == max(float((g - r).abs().max()) for g, r in zip(got, ref)) / scale


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_gradient_in_any_parameter_fails_the_check(bad):
    ref = [torch.randn(3, 4, dtype=torch.float64) for _ in range(4)]
    got = [r.clone() for r in ref]
    k = random.randint(1, 3)  # not the first parameter (a NaN there was already seen)
    got[k][random.randrange(3), random.randrange(4)] = bad
    _, dg = reference_diff(1.0, got, 1.0, ref)
    assert not dg <= 1e-6  # the trainer's test: `dl <= tol and dg <= tol`
    dl, _ = reference_diff(math.nan, ref, 1.0, ref)
    assert not dl <= 1e-6


@pytest.mark.parametrize("module, extra", [("train_sp", ["--check-plan-only", "--world", "4"]), ("train_moe", [])])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_plan_option_is_named(module, extra, value, capsys):
    import importlib

    main = importlib.import_module(f"adasched.launch.{module}").main
    assert main(["--plan", value, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --plan: is empty"], err
