"""Cost-model fits recover known coefficients from synthetic data (exact and noisy)."""
import numpy as np
import pytest

from adasched.profiler.fit import fit_affine, fit_alpha_beta, fit_quadratic


def test_alpha_beta_exact():
    rng = np.random.default_rng(1)
    alpha, beta = rng.uniform(0.01, 0.5), rng.uniform(1e-9, 1e-6)
    x = np.geomspace(1e3, 1e9, 9)
    f = fit_alpha_beta(x, alpha + beta * x)
    assert f.coef[0] == pytest.approx(alpha, rel=1e-6)
    assert f.coef[1] == pytest.approx(beta, rel=1e-6)
    assert f.rel_error < 1e-8


def test_alpha_beta_noisy_error_reported():
    rng = np.random.default_rng(2)
    alpha, beta = 0.2, 5e-7
    x = np.geomspace(1e3, 1e8, 30)
    y = (alpha + beta * x) * rng.uniform(0.95, 1.05, x.size)
    f = fit_alpha_beta(x, y)
    assert f.coef[0] == pytest.approx(alpha, rel=0.1)
    assert f.coef[1] == pytest.approx(beta, rel=0.1)
    pred = f.coef[0] + f.coef[1] * x
    assert f.rel_error == pytest.approx(np.mean(np.abs(pred - y) / y), rel=1e-9)
    assert 0.005 < f.rel_error < 0.05


def test_alpha_beta_flat_data_keeps_positive_beta():
    f = fit_alpha_beta([1e3, 1e4, 1e5], [2.0, 2.0, 2.0])
    assert f.coef[1] > 0 and f.coef[0] == pytest.approx(2.0, rel=1e-6)
    assert "not resolved" in f.note


def test_alpha_beta_noisy_small_messages_fall_back_to_absolute_fit():
    # the 64 KiB point is a noise spike: the relative fit finds no size term; the fallback keeps one
    x = [4096, 65536, 1048576, 4194304]
    y = [0.647, 4.97, 0.43, 7.57]
    f = fit_alpha_beta(x, y)
    assert "absolute-error fit" in f.note
    a, b = f.coef
    assert a >= 0 and b > 1e-7  # a finite bandwidth (< 10 GB/s), not the 1e6 GB/s of a floored slope
    assert f.rel_error == pytest.approx(sum(abs(a + b * xi - yi) / yi for xi, yi in zip(x, y)) / 4)
    assert fit_alpha_beta([1e3, 1e6], [1.0, 2.0]).note == ""


def test_quadratic_exact():
    rng = np.random.default_rng(3)
    a1, a2, b = rng.uniform(1e-8, 1e-6), rng.uniform(1e-5, 1e-3), rng.uniform(0.01, 0.1)
    s = np.array([512, 1024, 2048, 4096, 8192, 16384, 32768], dtype=float)
    f = fit_quadratic(s, a1 * s * s + a2 * s + b)
    np.testing.assert_allclose(f.coef, (a1, a2, b), rtol=1e-5)
    assert f.rel_error < 1e-7


def test_affine_exact_and_nonnegative():
    rng = np.random.default_rng(4)
    c, b = rng.uniform(1e-4, 1e-2), rng.uniform(0.1, 1.0)
    t = np.array([64, 256, 1024, 4096, 16384], dtype=float)
    f = fit_affine(t, c * t + b)
    np.testing.assert_allclose(f.coef, (c, b), rtol=1e-6)
    # data that would want a negative intercept: the fit clamps it at 0 and reports its error honestly
    g = fit_affine([1.0, 2.0, 3.0], [1.0, 3.0, 5.0])
    assert g.coef[1] == 0.0 and g.coef[0] > 0 and g.rel_error > 0


@pytest.mark.parametrize("x,y", [([], []), ([1, 2], [1]), ([1, 2], [1, -1]), ([1, float("nan")], [1, 2])])
def test_bad_inputs(x, y):
    with pytest.raises(ValueError):
        fit_alpha_beta(x, y)
