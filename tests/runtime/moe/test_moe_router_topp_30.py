"""30th session (schedules/DynaMoE hunt): top-p routing keeps the smallest prefix of the sorted probabilities whose
mass reaches p. The mass before each expert was cumsum - p in float32: for the second expert fl(p0 + p1) - p1 can
land one ulp below p0, and a token whose first probability alone reached p kept a second expert (666 of 12,863
crafted rows). Now an exclusive prefix sum: the mass before the second expert is p0 itself."""
from __future__ import annotations

import random

import numpy as np
import torch

from adasched.runtime.moe.router import Router, RouterConfig


def _router(E: int, p: float) -> Router:
    r = Router(8, RouterConfig(kind="top_p", num_experts=E, k_max=E, p=0.5))
    r.p = p
    return r


def test_the_reported_row_keeps_one_expert():
    r = _router(4, 0.49990623231888226)
    probs = torch.tensor([[0.4999062418937683, 0.24323853850364685, 0.15492568910121918, 0.10192952305078506]])
    si, sp, mask = r._top_p(probs)
    assert mask.tolist() == [[True, False, False, False]]
    assert si[0, 0].item() == 0


def test_a_first_probability_equal_to_p_keeps_one_expert():
    seed = random.SystemRandom().randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    for E in (4, 8, 16):
        probs = torch.softmax(torch.randn(2000, E, generator=g) * 1.5, dim=-1)
        top = probs.max(dim=-1).values
        for i in range(0, 2000, 97):  # p = each row's own first probability (float32, as float64)
            r = _router(E, float(top[i]))
            _, _, mask = r._top_p(probs[i:i + 1])
            assert mask.sum().item() == 1, (seed, E, i)


def test_kept_prefix_matches_a_float64_reference():
    """Every row: the smallest prefix whose mass (float64 over the float32 probabilities) reaches p, except rows
    where a prefix sum is within float32 rounding of p (either answer is a rounding of the same sum)."""
    seed = random.SystemRandom().randrange(2**31)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    checked = 0
    for E in (3, 6, 12, 32):
        probs = torch.softmax(torch.randn(3000, E, generator=g) * float(rng.uniform(0.5, 3.0)), dim=-1)
        p = float(rng.uniform(0.2, 0.95))
        si, sp, mask = _router(E, p)._top_p(probs)
        s64 = np.sort(probs.numpy().astype(np.float64), axis=-1)[:, ::-1]
        before = np.concatenate([np.zeros((s64.shape[0], 1)), np.cumsum(s64, -1)[:, :-1]], -1)
        want = before < np.float32(p)
        want[:, 0] = True
        clear = (np.abs(before - np.float32(p)) > 4e-7).all(-1)
        np.testing.assert_array_equal(mask.numpy()[clear], want[clear], err_msg=f"seed {seed}, E {E}")
        assert torch.equal(sp, torch.gather(probs, 1, si))
        checked += int(clear.sum())
    assert checked > 10_000
