"""Capacity schedules: exact budget, bounds, shapes (hypothesis properties), errors, per-layer configs."""
import pytest
from hypothesis import given, settings, strategies as st

from adasched.runtime.moe import RouterConfig
from adasched.schedules.capacity import CAPACITY_SCHEDULES, capacity_schedule, moe_layer_configs


@st.composite
def problems(draw):
    L = draw(st.integers(1, 24))
    lo = draw(st.integers(0, 6))
    hi = draw(st.integers(lo, lo + 10))
    B = draw(st.integers(L * lo, L * hi))
    return L, B, lo, hi


def _nonincreasing(xs):
    return all(a >= b for a, b in zip(xs, xs[1:]))


@settings(max_examples=150, deadline=None)
@given(problems(), st.sampled_from(CAPACITY_SCHEDULES), st.floats(0.0, 1.0))
def test_sum_exact_bounds_and_shape(prob, name, strength):
    L, B, lo, hi = prob
    c = capacity_schedule(name, L, B, lo, hi, strength=strength)
    assert len(c) == L and all(isinstance(x, int) for x in c)
    assert sum(c) == B
    assert all(lo <= x <= hi for x in c)
    assert max(c) - min(c) <= hi - lo
    if name == "uniform":
        assert max(c) - min(c) <= 1
    if name == "descending":
        assert _nonincreasing(c)
    if name == "ascending":
        assert _nonincreasing(c[::-1])
    mid = (L - 1) / 2
    left = [x for i, x in enumerate(c) if i <= mid]
    right = [x for i, x in enumerate(c) if i >= mid]
    if name == "pyramid":
        assert _nonincreasing(left[::-1]) and _nonincreasing(right)
    if name == "inverted_pyramid":
        assert _nonincreasing(left) and _nonincreasing(right[::-1])


def test_known_values():
    assert capacity_schedule("descending", 4, 10, 1, 4) == [4, 3, 2, 1]
    assert capacity_schedule("ascending", 4, 10, 1, 4) == [1, 2, 3, 4]
    assert capacity_schedule("uniform", 4, 10, 1, 4) == [3, 3, 2, 2]
    assert sum(capacity_schedule("pyramid", 5, 15, 1, 5)) == 15
    p = capacity_schedule("pyramid", 5, 15, 1, 5)
    assert p[2] == max(p) == 5 and p[0] == p[4] == min(p)
    v = capacity_schedule("inverted_pyramid", 5, 15, 1, 5)
    assert v[2] == min(v) and v[0] == v[4] == max(v)
    w = capacity_schedule("wave", 9, 27, 1, 5)
    assert w[2] == max(w) and w[6] == min(w) and sum(w) == 27
    assert capacity_schedule("descending", 1, 3, 1, 4) == [3]
    # half strength: half the spread around the mean
    assert capacity_schedule("descending", 3, 9, 1, 5, strength=0.5) == [4, 3, 2]


@pytest.mark.parametrize("args, match", [
    (("uniform", 4, 3, 1, 4), "budget: 3 cannot be met by 4 layers within bounds \\(lo=1, hi=4\\)"),
    (("pyramid", 4, 17, 1, 4), "budget: 17"),
    (("zigzag", 4, 8, 1, 4), "'zigzag'"),
    (("uniform", 0, 8, 1, 4), "num_layers: 0"),
    (("uniform", 4, 8, 3, 2), "lo=3, hi=2"),
])
def test_errors_name_values(args, match):
    with pytest.raises(ValueError, match=match):
        capacity_schedule(*args)


def test_layer_configs():
    base = RouterConfig(kind="top_p", num_experts=8, top_k=2, k_max=2)
    cfgs = moe_layer_configs("descending", 4, 10, 1, 4, base, field="k_max")
    assert [c.k_max for c in cfgs] == [4, 3, 2, 1]
    assert all(c.kind == "top_p" and c.num_experts == 8 for c in cfgs)
    cfgs = moe_layer_configs("ascending", 3, 12, 2, 6, RouterConfig(num_experts=8, top_k=2), field="num_experts")
    assert [c.num_experts for c in cfgs] == [2, 4, 6]
    with pytest.raises(ValueError, match="hi: 9 exceeds num_experts 8"):
        moe_layer_configs("uniform", 2, 10, 1, 9, base, field="k_max")


def test_layer_configs_clip_target_k_and_refuse_k_max_on_top_k_routers():
    """A top_p controller's target_k above a layer's scheduled k_max is clipped to it (it raised "target_k: 2.0
    must be in [1, k_max=1]" for the layer given k_max 1); field='k_max' on a gshard config would change nothing."""
    import numpy as np

    base = RouterConfig(kind="top_p", num_experts=8, k_max=4, target_k=2.0)
    cfgs = moe_layer_configs("descending", 4, 8, 1, 4, base, field="k_max")
    assert [c.k_max for c in cfgs] == [3, 2, 2, 1] and [c.target_k for c in cfgs] == [2.0, 2.0, 2.0, 1.0]
    cfgs = moe_layer_configs("descending", 4, 12, 1, 6, base, field="num_experts")
    assert [(c.num_experts, c.k_max, c.target_k) for c in cfgs] == [(5, 4, 2.0), (4, 4, 2.0), (2, 2, 2.0),
                                                                     (1, 1, 1.0)]
    with pytest.raises(ValueError, match="^field: 'k_max' caps top_p routing; a gshard router"):
        moe_layer_configs("descending", 4, 8, 1, 4, RouterConfig(kind="gshard"), field="k_max")
    # the default field follows the router: top_k for a top-k router, k_max for top_p
    assert [c.top_k for c in moe_layer_configs("descending", 4, 8, 1, 4, RouterConfig())] == [3, 2, 2, 1]
    assert [c.k_max for c in moe_layer_configs("descending", 4, 8, 1, 4, base)] == [3, 2, 2, 1]
    assert capacity_schedule("pyramid", np.int64(4), np.int64(10), np.int32(1), 4) == [1, 4, 4, 1]
    with pytest.raises(ValueError, match="^num_layers: 4.0 must be an integer >= 1"):
        capacity_schedule("pyramid", 4.0, 10, 1, 4)


def test_layer_configs_refuse_a_field_the_router_ignores_and_layers_without_experts():
    """Found by a hunt: a switch router scheduled on top_k (the default) and a top_p router with k_max scheduled on
    top_k built a uniform model (effective k_max 1 / k_max in every layer) under a layer-wise schedule; lo=0 gave a
    layer of capacity 0 and the error named top_k, which the caller never passed."""
    from adasched.runtime.moe.router import RouterConfig

    switch = RouterConfig(kind="switch", num_experts=8)
    cfgs = moe_layer_configs("descending", 4, 20, 2, 8, switch)  # default: the expert count
    assert [c.num_experts for c in cfgs] == [8, 6, 4, 2] and all(c.effective_k_max == 1 for c in cfgs)
    with pytest.raises(ValueError, match=r"^field: 'top_k' does nothing for a switch router"):
        moe_layer_configs("descending", 4, 10, 1, 4, switch, field="top_k")
    capped = RouterConfig(kind="top_p", num_experts=8, k_max=4)
    with pytest.raises(ValueError, match=r"^field: 'top_k' does nothing for a top_p router whose k_max \(4\)"):
        moe_layer_configs("descending", 4, 10, 1, 4, capped, field="top_k")
    uncapped = RouterConfig(kind="top_p", num_experts=8, top_k=4)  # no k_max: top_k is the cap, so it schedules
    assert [c.effective_k_max for c in moe_layer_configs("descending", 4, 10, 1, 4, uncapped, field="top_k")] \
        == [4, 3, 2, 1]
    for field in ("top_k", "num_experts"):
        with pytest.raises(ValueError, match=rf"^lo: 0 must be >= 1 for field '{field}'"):
            moe_layer_configs("descending", 4, 8, 0, 4, RouterConfig(num_experts=8), field=field)
    # lo=0 whose schedule never reaches 0 is fine
    assert [c.top_k for c in moe_layer_configs("uniform", 4, 8, 0, 4, RouterConfig(num_experts=8))] == [2] * 4


@pytest.mark.parametrize("waves", [float("nan"), -1.0, 0.0, float("inf"), "2", True])
def test_schedule_shape_checks_waves_itself(waves):
    """schedule_shape is public, but only capacity_schedule checked waves: NaN shapes, a flipped wave for -1,
    a math domain error for inf, a TypeError for a string."""
    from adasched.schedules.capacity import schedule_shape

    with pytest.raises(ValueError, match=r"^waves: .* must be a finite number > 0"):
        schedule_shape("wave", 5, waves)
    assert schedule_shape("wave", 5, 1.0) == pytest.approx([0.0, 1.0, 0.0, -1.0, 0.0], abs=1e-12)


def _exact_schedule(name: str, L: int, B: int, lo: int, hi: int) -> list[int]:
    """The module docstring's rule in exact rationals (the linear shapes): k_l = B/L + s (f_l - mean f), s the widest
    spread within [lo, hi]; floors, then the remaining units by largest fraction, ties the larger f, then the
    earlier layer."""
    from fractions import Fraction as Fr

    n = max(L - 1, 1)
    f = [{"uniform": Fr(0), "descending": 1 - Fr(l, n), "ascending": Fr(l, n),
          "pyramid": 1 - abs(2 * Fr(l, n) - 1), "inverted_pyramid": abs(2 * Fr(l, n) - 1)}[name] for l in range(L)]
    m, fbar = Fr(B, L), sum(f) / L
    d = [x - fbar for x in f]
    spans = [(hi - m) / x for x in d if x > 0] + [(m - lo) / -x for x in d if x < 0]
    s = min(spans) if spans else Fr(0)
    k = [min(hi, max(lo, m + s * x)) for x in d]
    out = [int(x) for x in k]  # k >= lo >= 0: floor
    order = sorted(range(L), key=lambda l: (-(k[l] - out[l]), -f[l], l))
    rest = B - sum(out)
    for l in order:
        if rest and out[l] < hi:
            out[l] += 1
            rest -= 1
    return out


def test_ties_go_to_the_larger_f_then_the_earlier_layer_exactly():
    """A symmetric shape's two equal values differed by 1e-16 in floating point (pyramid over 4 layers: 0.6666...6
    and 0.6666...7), so the spare unit went to the later layer: [1, 1, 2, 1] where the docstring's rule gives
    [1, 2, 1, 1] (26th session's MoE hunt: 1,095 of 31,800 pyramid / inverted-pyramid cases differed)."""
    import random

    assert capacity_schedule("pyramid", 4, 5, 1, 2) == [1, 2, 1, 1]
    assert capacity_schedule("pyramid", 7, 14, 1, 4) == [1, 2, 3, 3, 2, 2, 1]
    rng = random.Random()
    for _ in range(400):
        name = rng.choice(["uniform", "descending", "ascending", "pyramid", "inverted_pyramid"])
        L, lo = rng.randint(1, 16), rng.randint(0, 2)
        hi = lo + rng.randint(0, 5)
        B = rng.randint(L * lo, L * hi)
        assert capacity_schedule(name, L, B, lo, hi) == _exact_schedule(name, L, B, lo, hi), (name, L, B, lo, hi)
