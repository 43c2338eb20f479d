"""Numeric extremes of the 35th session's hunt: UBA at the smallest positive phi (0 / 0 at the end: a
ZeroDivisionError traceback from `schedules plot`), and a refinement whose norms span more than ~1e154 (every
product underflowed and the schedule was refused as degenerate)."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from adasched.planner.cli import main
from adasched.schedules.lr import refined_multipliers, uba_multiplier


def test_uba_at_the_smallest_phi_ends_at_zero(tmp_path, capsys):
    for phi in (5e-324, 1e-320, 2.2e-308):
        assert uba_multiplier(1.0, phi) == 0.0
        assert uba_multiplier(0.0, phi) == 1.0
        # phi -> 0: the multiplier stays at 1 until the very end (c^2 + (phi/2) s^2 rounds to c^2 here)
        assert uba_multiplier(random.uniform(0.05, 0.95), phi) == 1.0
    assert main(["schedules", "plot", "uba:5e-324", "--steps", "10", "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize("norm, span", [("l2", 155), ("l2", 200), ("l1", 300)])
def test_a_refinement_over_a_huge_norm_span_is_defined(norm, span):
    g = np.array([1.0, 10.0 ** span])
    got = refined_multipliers(g, norm=norm, smoothing=0.0)
    # exact: w = g**-p; m_0 = w_0 (w_1 + w_1), m_1 = w_1 w_1, m_2 = 0 -> [1, w_1 / (2 w_0), 0] in logs
    p = 2.0 if norm == "l2" else 1.0
    log_m1 = -p * span * math.log(10.0) - math.log(2.0)
    want1 = math.exp(log_m1) if log_m1 > -745 else 0.0
    assert got[0] == 1.0 and got[2] == 0.0
    assert got[1] == pytest.approx(want1, rel=1e-9, abs=1e-320)


def test_ordinary_norms_keep_the_exact_path():
    """Constant norms still give exactly the linear decay (the log-domain path is only the fallback)."""
    K = random.randint(3, 40)
    got = refined_multipliers(np.full(K, random.uniform(0.1, 10.0)), smoothing=0.0)
    assert np.array_equal(got, np.array([(K - k) / K for k in range(K + 1)]))
