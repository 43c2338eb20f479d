"""Least-squares fits of the cost models, with their relative fit error.

All fits minimise *relative* error (rows weighted by 1/measured), because the models are used over ranges
spanning several orders of magnitude (a 1 KB and a 1 GB message; a 1K and a 64K sequence).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Fit", "fit_alpha_beta", "fit_quadratic", "fit_affine"]


@dataclass(frozen=True)
class Fit:
    coef: tuple[float, ...]  # highest power last is NOT assumed: see each function's docstring
    rel_error: float  # mean |pred - y| / y over the points
    note: str = ""  # set when a fallback was needed (the data did not resolve a term)


def _nonneg_lstsq(X: np.ndarray, y: np.ndarray, relative: bool = True) -> np.ndarray:
    """Least squares with non-negative coefficients (scipy's NNLS), on relative error unless told otherwise."""
    from scipy.optimize import nnls

    w = 1.0 / np.maximum(np.abs(y), 1e-30) if relative else np.full_like(y, 1.0 / max(float(np.max(np.abs(y))), 1e-30))
    coef, _ = nnls(X * w[:, None], y * w)
    return coef


def _check(x, y):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"fit: x and y must be equal-length 1-D, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))) or np.any(y <= 0):
        raise ValueError("fit: measurements must be finite and positive")
    return x, y


def _rel_err(pred, y) -> float:
    return float(np.mean(np.abs(pred - y) / y))


#: a size term under this share of the time at the largest message is not resolved by the data: below it,
#: timing noise alone could hide the bandwidth term (e.g. latency-bound times, flat within a few percent)
SIZE_TERM_FLOOR = 0.05


def _distinct(x: np.ndarray, k: int, what: str, of: str) -> None:
    """A fit with k coefficients needs k distinct x (fewer: one point of 256 tokens fitted a pure s^2 model, so 4x
    the length was priced 16x, with no note)."""
    u = np.unique(x)
    if u.size < k:
        raise ValueError(f"fit: {what} needs at least {k} distinct {of}, got {u.tolist()}")


def fit_alpha_beta(nbytes, ms, *, min_size_term: float | None = None) -> Fit:
    """time_ms = alpha + beta * nbytes; returns Fit(coef=(alpha_ms, beta_ms_per_byte)), beta > 0.

    Noisy small-message times can leave the relative-error fit with no size term (beta = 0, i.e. infinite
    bandwidth; a slope under 1e-9 of the largest time is the solver's round-off and counts as none). Then the
    absolute-error fit (dominated by the large messages) is used; if that finds no slope either, alpha = the
    fastest point and beta spans the fastest to the slowest point at the largest size (conservative), and
    ``note`` says so. With ``min_size_term`` (collective fits: SIZE_TERM_FLOOR, 5 %), a size term that stays
    under that share of the time at the largest message is raised to it (flat, latency-bound times bound the
    bandwidth only from below; a fit of their noise gave 1e4-1e15 GB/s) and ``note`` says so: measure larger
    messages to resolve it."""
    x, y = _check(nbytes, ms)
    _distinct(x, 2, "an alpha-beta fit", "message sizes")  # (one size: it all went into beta, alpha 0, silently)
    X = np.stack([np.ones_like(x), x], axis=1)
    xmax, ymax = float(np.max(x)), float(np.max(y))
    a, b = _nonneg_lstsq(X, y)
    b = 0.0 if b * xmax < 1e-9 * ymax else b
    note = ""
    if b <= 0:
        a, b = _nonneg_lstsq(X, y, relative=False)
        b = 0.0 if b * xmax < 1e-9 * ymax else b
        note = "size term from the absolute-error fit (the relative fit found none)"
    if b <= 0:
        a = float(np.min(y))
        b = (ymax - a) / max(xmax, 1.0)
        note = "bandwidth not resolved by the data: beta bounds it from the slowest point - measure larger messages"
        if b <= 0:  # all points equal time: keep a tiny positive slope so bandwidth stays finite
            b = a / max(xmax, 1.0) * 1e-6
    t_top = float(np.mean(y[x == xmax]))  # the time at the largest message
    if min_size_term is not None and b * xmax < min_size_term * t_top:
        share = b * xmax / t_top
        b = min_size_term * t_top / max(xmax, 1.0)
        note = (f"bandwidth not resolved by the data (the size term was {100 * share:.2g} % of the time at the "
                f"largest message, {xmax:.4g} bytes): beta raised to {100 * min_size_term:g} % of that time - "
                f"measure larger messages")
    return Fit((float(a), float(b)), _rel_err(a + b * x, y), note)


def fit_quadratic(s, ms) -> Fit:
    """time_ms = a1 s^2 + a2 s + b; returns Fit(coef=(a1, a2, b)), all >= 0."""
    x, y = _check(s, ms)
    _distinct(x, 3, "a quadratic fit", "lengths")
    X = np.stack([x * x, x, np.ones_like(x)], axis=1)
    a1, a2, b = _nonneg_lstsq(X, y)
    xmax, ymax = float(np.max(x)), float(np.max(y))
    # a term that adds less than 1e-9 of the largest time at the longest length is the solver's round-off (1e-21
    # came back for exactly linear data): zero, so the checks below see it
    a1 = 0.0 if a1 * xmax * xmax < 1e-9 * ymax else a1
    a2 = 0.0 if a2 * xmax < 1e-9 * ymax else a2
    note = ""
    if a1 == 0 and a2 == 0:  # flat or falling times (a loaded machine): a constant would say length is free
        b = float(np.min(y))
        a2 = (float(np.max(y)) - b) / max(float(np.max(x)), 1.0)
        if a2 <= 0:
            a2 = b / max(float(np.max(x)), 1.0) * 1e-6
        note = "no growth with length resolved by the data: linear from the slowest point"
    elif a1 == 0:
        note = "no s^2 term resolved by the data: long sequences extrapolate linearly"
    return Fit((float(a1), float(a2), float(b)), _rel_err(a1 * x * x + a2 * x + b, y), note)


def fit_affine(t, ms) -> Fit:
    """time_ms = c * t + b; returns Fit(coef=(c, b)), both >= 0."""
    x, y = _check(t, ms)
    _distinct(x, 2, "an affine fit", "sizes")
    X = np.stack([x, np.ones_like(x)], axis=1)
    c, b = _nonneg_lstsq(X, y)
    # a slope adding under 1e-9 of the largest time at the largest size is the solver's round-off, as in
    # fit_quadratic and fit_alpha_beta (1.3e-14 ms/token came back for flat data and passed a `> 0` check)
    c = 0.0 if c * float(np.max(x)) < 1e-9 * float(np.max(y)) else c
    return Fit((float(c), float(b)), _rel_err(c * x + b, y))
