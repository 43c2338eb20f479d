"""Layer-wise MoE capacity schedules (DynaMoE): integer per-layer expert counts or k_max over depth.

Every schedule maps ``(num_layers L, total budget B, bounds (lo, hi))`` to integers ``c_0..c_{L-1}`` with
``lo <= c_l <= hi`` and ``sum c_l == B`` exactly (the same parameter/compute budget as the uniform schedule).

Shape over depth ``u = l / (L - 1)`` (``u = 0`` for one layer):

    uniform            f(u) = 0
    descending         f(u) = 1 - u          (more capacity in early layers)
    ascending          f(u) = u
    pyramid            f(u) = 1 - |2u - 1|   (peak in the middle)
    inverted_pyramid   f(u) = |2u - 1|       (valley in the middle)
    wave               f(u) = sin(2 pi * waves * u)   (``waves`` periods over depth, default 1)

Real profile: ``k_l = B/L + s * (f_l - mean f)``, whose sum is B for any s; ``s`` is the widest spread that
keeps every ``k_l`` inside ``[lo, hi]``, times ``strength`` (in [0, 1], default 1). So with bounds (1, 4)
and B = 2.5 L a descending schedule runs linearly from 4 down to 1.

Integers by largest remainder under the bounds: floors first, then the ``B - sum(floor)`` units go to the
largest fractional parts (ties: the larger f, then the earlier layer). Monotone shapes stay monotone, the
pyramid stays unimodal. Bounds that cannot meet the budget (``B < L*lo`` or ``B > L*hi``) raise ValueError
naming the values.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import replace
from typing import Callable

__all__ = ["CAPACITY_SCHEDULES", "capacity_schedule", "schedule_shape", "moe_layer_configs"]

CAPACITY_SCHEDULES: tuple[str, ...] = ("uniform", "descending", "ascending", "pyramid", "inverted_pyramid", "wave")


def _shape_fn(name: str, waves: float, num_layers: int) -> Callable[[int], float]:
    """f(u_l) of layer l, u_l = l / (L - 1) (0 for one layer). The wave's phase waves * l / (L - 1) is reduced mod 1
    before the sine, exactly for a whole number of waves: a wave sampled at its zeros (L = 1024, waves = 2046;
    waves = 1e7) gave sin(2 pi k) ~ 1e-12..1e-9, which capacity_schedule then stretched over the whole [lo, hi]."""
    n = max(num_layers - 1, 1)
    return {
        "uniform": lambda l: 0.0,
        "descending": lambda l: 1.0 - l / n,
        "ascending": lambda l: l / n,
        "pyramid": lambda l: 1.0 - abs(2.0 * (l / n) - 1.0),
        "inverted_pyramid": lambda l: abs(2.0 * (l / n) - 1.0),
        "wave": lambda l: math.sin(2.0 * math.pi * (math.fmod(waves * l, n) / n)),
    }[name]


SHAPE_ZERO = 1e-12  # |shape value| below this is 0


def schedule_shape(name: str, num_layers: int, waves: float = 1.0) -> list[float]:
    """The unscaled shape f(u_l) of a schedule (see module docstring)."""
    if name not in CAPACITY_SCHEDULES:
        raise ValueError(f"schedule: {name!r} is not one of {', '.join(CAPACITY_SCHEDULES)}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) or num_layers < 1:
        raise ValueError(f"num_layers: {num_layers!r} must be an integer >= 1")
    num_layers = int(num_layers)
    # (checked here, not only in capacity_schedule: this is public too, and NaN gave NaN shapes, a negative
    # number flipped the wave, inf raised a math domain error)
    if isinstance(waves, bool) or not isinstance(waves, numbers.Real) or not (math.isfinite(waves) and waves > 0):
        raise ValueError(f"waves: {waves!r} must be a finite number > 0")
    fn = _shape_fn(name, waves, num_layers)
    vals = [fn(l) for l in range(num_layers)]
    # what is left of the sine's rounding at its zeros (sin(pi) = 1.2e-16) is 0 (shapes lie in [-1, 1])
    return [0.0 if abs(v) < SHAPE_ZERO else v for v in vals]


#: the largest budget or bound capacity_schedule takes: its spread is computed in floats, exact up to 2**53
MAX_EXACT = 2**53


def capacity_schedule(name: str, num_layers: int, budget: int, lo: int, hi: int, *, strength: float = 1.0,
                      waves: float = 1.0) -> list[int]:
    """Integer per-layer capacities (expert counts or k_max) of schedule ``name`` summing exactly to ``budget``.

    ``lo``/``hi``: inclusive per-layer bounds; ``strength``: fraction of the widest spread the bounds allow;
    ``waves``: periods of the ``wave`` schedule over depth.
    """
    # (NaN and inf passed the comparisons: a wrong 'budget could not be distributed', a math domain error; a
    # string strength raised a TypeError)
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength: {strength!r} must be a number in [0, 1]")
    f = schedule_shape(name, num_layers, waves)
    L = int(num_layers)
    for label, v in (("budget", budget), ("lo", lo), ("hi", hi)):
        if (isinstance(v, bool) or not isinstance(v, (numbers.Integral, numbers.Real))
                or (not isinstance(v, numbers.Integral) and not math.isfinite(v))  # (inf: OverflowError from int())
                or int(v) != v):
            raise ValueError(f"{label}: {v!r} must be an integer")
    budget, lo, hi = int(budget), int(lo), int(hi)
    for label, v in (("budget", budget), ("hi", hi)):
        if v > MAX_EXACT:  # (the spread is in floats: past 2**53 they round, and the sum missed the budget)
            raise ValueError(f"{label}: {v} is above 2**53, the largest count this schedule distributes exactly")
    if lo < 0 or hi < lo:
        raise ValueError(f"bounds: (lo={lo}, hi={hi}) need 0 <= lo <= hi")
    if not (L * lo <= budget <= L * hi):
        raise ValueError(f"budget: {budget} cannot be met by {L} layers within bounds (lo={lo}, hi={hi}): "
                         f"feasible totals are {L * lo}..{L * hi}")
    m = budget / L
    fbar = sum(f) / L
    d = [x - fbar for x in f]
    s = math.inf
    for dl in d:
        if dl > 1e-12:
            s = min(s, (hi - m) / dl)
        elif dl < -1e-12:
            s = min(s, (m - lo) / -dl)
    s = 0.0 if s == math.inf else s * strength
    k = [min(hi, max(lo, m + s * dl)) for dl in d]
    out = [int(math.floor(x + 1e-9)) for x in k]
    rest = budget - sum(out)
    frac = [x - o for x, o in zip(k, out)]
    order = sorted(range(L), key=lambda l: (-round(frac[l], 9), -round(f[l], 9), l))
    # near 2**53 a float k is a quarter-unit off (its ulp), so the floors can miss the budget by more than one per
    # layer, either way (5 layers of ~1.35e15: one pass left a unit over): passes of +-1, largest fractions first
    # for a shortfall, smallest first for an excess, until the budget is met (L*lo <= budget <= L*hi: it is)
    while rest != 0:
        moved = False
        for l in (order if rest > 0 else order[::-1]):
            if rest > 0 and out[l] < hi:
                out[l] += 1
                rest -= 1
                moved = True
            elif rest < 0 and out[l] > lo:
                out[l] -= 1
                rest += 1
                moved = True
            if rest == 0:
                break
        if not moved:
            break
    if rest != 0 or sum(out) != budget:  # pragma: no cover - defensive
        raise ValueError(f"budget: {budget} could not be distributed within (lo={lo}, hi={hi})")
    return out


def moe_layer_configs(schedule: str, num_layers: int, budget: int, lo: int, hi: int, base, *,
                      field: str | None = None, **kw) -> list:
    """Per-layer router configs from a schedule: ``base`` (a RouterConfig) copied with ``field`` set per layer
    (default: ``k_max`` for a top_p router, ``num_experts`` for a switch router - it always routes one expert -
    and ``top_k`` for the others).

    ``field="k_max"``: dynamic top-p routers get the layer's k_max (top-k routers: ``field="top_k"``);
    ``field="num_experts"``: the layer's expert count (top_k/k_max are clipped to it). A top_p controller's
    ``target_k`` above a layer's k_max is clipped to it (that layer cannot average more experts per token).
    A field the router ignores (``top_k`` of a switch router, or of a top_p router whose ``k_max`` caps it) is
    refused: the model would be uniform under a schedule that says otherwise. Every layer gets at least one
    expert (``lo >= 1``).
    """
    if field is None:
        field = {"top_p": "k_max", "switch": "num_experts"}.get(base.kind, "top_k")
    if field not in ("k_max", "top_k", "num_experts"):
        raise ValueError(f"field: {field!r} is not 'k_max', 'top_k' or 'num_experts'")
    if field == "k_max" and base.kind != "top_p":  # k_max is only top_p's cap: the schedule would do nothing
        raise ValueError(f"field: 'k_max' caps top_p routing; a {base.kind} router's capacity is field='top_k'")
    if field == "top_k" and base.kind == "switch":
        raise ValueError("field: 'top_k' does nothing for a switch router (one expert per token); schedule "
                         "field='num_experts'")
    if field == "top_k" and base.kind == "top_p" and base.k_max is not None:
        raise ValueError(f"field: 'top_k' does nothing for a top_p router whose k_max ({base.k_max}) caps it; "
                         "schedule field='k_max'")
    if field != "num_experts" and hi > base.num_experts:
        raise ValueError(f"hi: {hi} exceeds num_experts {base.num_experts} for {field}")
    caps = capacity_schedule(schedule, num_layers, budget, lo, hi, **kw)
    if min(caps) < 1:  # (a layer of 0 raised "top_k: 0 must be in [1, ...]", naming an argument never passed)
        raise ValueError(f"lo: {lo} must be >= 1 for field {field!r} (every layer routes to at least one expert)")
    out = []
    for c in caps:
        if field == "num_experts":
            k = min(base.top_k, c)
            km = None if base.k_max is None else min(base.k_max, c)
            cfg = replace(base, num_experts=c, top_k=k, k_max=km, target_k=None)
        else:
            cfg = replace(base, **{field: c}, target_k=None)
        if base.target_k is not None:
            cfg = replace(cfg, target_k=min(base.target_k, float(cfg.effective_k_max)))
        out.append(cfg)
    return out
