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
    f = fit_alpha_beta([1e3, 1e4, 1e5], [2.0, 2.0, 2.0], min_size_term=0.05)
    assert f.coef[0] == pytest.approx(2.0, rel=1e-6)
    assert f.coef[1] * 1e5 == pytest.approx(0.05 * 2.0, rel=1e-12)  # the size term: 5 % of the time at 1e5 bytes
    assert "not resolved" in f.note


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_alpha_beta_latency_bound_noise_does_not_give_unbounded_bandwidth(seed):
    """Hunt finding: flat, noisy (latency-bound) times left NNLS a round-off or noise slope that was still
    positive - 6.5e4 to 4.9e15 GB/s, no note, a small fit error, so no warning either. Now the size term is at
    least 5 % of the time at the largest message, and the note says the data did not resolve it."""
    rng = np.random.default_rng(seed)
    x = np.array([4096.0, 65536.0, 2.0**20, 2.0**22])
    for y in (2.0 * rng.uniform(0.95, 1.05, 4), np.full(4, 2.0) + rng.uniform(0, 1e-15, 4)):
        f = fit_alpha_beta(x, y, min_size_term=0.05)  # (what fit_collectives passes: SIZE_TERM_FLOOR)
        assert f.coef[1] * x[-1] >= 0.05 * y[-1] * (1 - 1e-12)
        assert 1e-6 / f.coef[1] < 200  # GB/s (1 / beta in ms per byte): bounded; the floor gives ~40 GB/s here
        assert "not resolved" in f.note and "measure larger messages" in f.note
    # a resolved size term keeps the fit as it is
    y = 0.05 + 1e-6 * x
    f = fit_alpha_beta(x, y, min_size_term=0.05)
    assert f.coef == pytest.approx((0.05, 1e-6), rel=1e-6) and f.note == ""
    # fit_collectives applies the floor to every collective fit
    from adasched.profiler.collectives import fit_collectives

    pts = [{"op": "all_reduce", "group_size": 2, "bytes": float(b), "ms": float(t)}
           for b, t in zip(x, 2.0 * rng.uniform(0.95, 1.05, 4))]
    (c,) = fit_collectives({"points": pts, "world": 2, "backend": "gloo"}, 2, "test")
    assert c.beta_ms_per_byte * x[-1] >= 0.05 * pts[-1]["ms"] * (1 - 1e-12) and "not resolved" in c.source


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


# ---- independent check: the fits are relative-error least squares, as the docstrings say ------------------
def _rel_lstsq(X, y):
    """min sum(((X c - y) / y)^2), written out with numpy's lstsq (no non-negativity; used where the optimum is
    positive anyway)."""
    w = 1.0 / y
    coef, *_ = np.linalg.lstsq(X * w[:, None], y * w, rcond=None)
    return coef


def test_builtin_h100_fits_are_the_relative_least_squares_of_the_measurements():
    """The h100-sxm attention and linear models against numpy's lstsq on the shipped measurements (ms, tokens)."""
    from adasched.profiler.builtins import builtin_profile

    h = builtin_profile("h100-sxm")
    rows = [r for r in h.raw["attention_causal_sdpa_bf16_headdim128_batch1"] if r["heads"] == 32]
    s = np.array([r["seq"] for r in rows], dtype=np.float64)
    y = np.array([r["fwd_bwd_ms"] for r in rows])
    ref = _rel_lstsq(np.stack([s * s, s, np.ones_like(s)], axis=1), y)
    assert np.all(ref > 0)
    np.testing.assert_allclose([h.attention.a1_ms_per_tok2, h.attention.a2_ms_per_tok, h.attention.b_ms], ref,
                               rtol=1e-6)
    # units: 65536 tokens, 32 heads x 128, causal fwd+bwd = 3.5 x 2 s^2 h d flops at ~532 TFLOP/s -> ~231 ms
    assert h.attention.time_ms(65536) == pytest.approx(3.5 * 2 * 65536**2 * 32 * 128 / 532e12 * 1e3, rel=0.03)
    lin = h.raw["dense_7b_layer_linear_fwd_bwd"]["rows"]
    t = np.array([r["tokens"] for r in lin], dtype=np.float64)
    yl = np.array([r["fwd_bwd_ms"] for r in lin])
    ref = _rel_lstsq(np.stack([t, np.ones_like(t)], axis=1), yl)
    np.testing.assert_allclose([h.linear.ms_per_token, h.linear.b_ms], ref, rtol=1e-6)
    # 6 flops per parameter per token, 4096 x (4 x 4096 + 3 x 11008) parameters, ~600 TFLOP/s -> ~2e-3 ms/token
    assert h.linear.ms_per_token == pytest.approx(6 * 4096 * (4 * 4096 + 3 * 11008) / 600e12 * 1e3, rel=0.05)
    pred = np.array([h.linear.time_ms(x) for x in t])
    assert h.linear.fit_rel_error == pytest.approx(np.mean(np.abs(pred - yl) / yl), rel=1e-9)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_noisy_synthetic_fits_match_numpy_and_recover_the_coefficients(seed):
    """Known coefficients over the GPU config's ranges (64 KiB..256 MiB per rank; 1K..64K tokens), 2 % noise."""
    rng = np.random.default_rng(seed)
    x = np.geomspace(2**16, 2**28, 13)
    alpha, beta = 10 ** rng.uniform(-2, 0), 10 ** rng.uniform(-8, -6)  # 0.01..1 ms; 1..100 GB/s per rank
    y = (alpha + beta * x) * rng.uniform(0.98, 1.02, x.size)
    f = fit_alpha_beta(x, y)
    ref = _rel_lstsq(np.stack([np.ones_like(x), x], axis=1), y)
    np.testing.assert_allclose(f.coef, ref, rtol=1e-6)
    np.testing.assert_allclose(f.coef, (alpha, beta), rtol=0.1)
    assert f.note == ""

    s = np.geomspace(1024, 65536, 7)
    a1, a2, b = 10 ** rng.uniform(-8, -7), 10 ** rng.uniform(-5, -4), 10 ** rng.uniform(-2, -1)
    y = (a1 * s * s + a2 * s + b) * rng.uniform(0.995, 1.005, s.size)
    q = fit_quadratic(s, y)
    ref = _rel_lstsq(np.stack([s * s, s, np.ones_like(s)], axis=1), y)
    assert np.all(ref > 0)
    np.testing.assert_allclose(q.coef, ref, rtol=1e-6)
    np.testing.assert_allclose(q.coef[0], a1, rtol=0.02)  # the s^2 term is what planners extrapolate with
    pred = q.coef[0] * s * s + q.coef[1] * s + q.coef[2]
    assert q.rel_error == pytest.approx(np.mean(np.abs(pred - y) / y), rel=1e-9)

    t = np.array([1024, 4096, 16384, 65536], dtype=np.float64)
    c, b0 = 10 ** rng.uniform(-4, -2), 10 ** rng.uniform(-1, 0)
    y = (c * t + b0) * rng.uniform(0.99, 1.01, t.size)
    a = fit_affine(t, y)
    ref = _rel_lstsq(np.stack([t, np.ones_like(t)], axis=1), y)
    np.testing.assert_allclose(a.coef, ref, rtol=1e-6)
    np.testing.assert_allclose(a.coef[0], c, rtol=0.03)
