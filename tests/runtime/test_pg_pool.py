"""runtime.pg_pool: buddy ranges (pure) and the pool on 4 real gloo ranks."""
import math

import pytest

from adasched.runtime.dist import spawn_gloo
from adasched.runtime.pg_pool import buddy_groups, is_buddy_range


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16, 6])
def test_buddy_groups_properties(world):
    groups = buddy_groups(world)
    assert len({tuple(g) for g in groups}) == len(groups)
    for g in groups:
        d = len(g)
        assert d & (d - 1) == 0 and g[0] % d == 0 and g == list(range(g[0], g[0] + d)) and g[-1] < world
    # brute force: every contiguous aligned power-of-two range inside the world is listed
    expect = {tuple(range(o, o + d)) for d in range(1, world + 1) if d & (d - 1) == 0
              for o in range(0, world - d + 1) if o % d == 0}
    assert {tuple(g) for g in groups} == expect
    degrees = [len(g) for g in groups]
    assert degrees == sorted(degrees)
    if world & (world - 1) == 0:
        assert len(groups) == 2 * world - 1
        for r in range(world):  # every rank is in log2(world) + 1 groups, one per degree
            assert sum(r in g for g in groups) == int(math.log2(world)) + 1


def test_is_buddy_range():
    assert is_buddy_range([2, 3], 4) and is_buddy_range([3, 2], 4) and is_buddy_range([0, 1, 2, 3], 4)
    for bad in ([1, 2], [0, 1, 2], [], [4], [0, 0], [4, 5], [-2, -1], [-1]):  # (negatives passed: KeyError later)
        assert not is_buddy_range(bad, 4), bad
    for world in range(1, 17):  # exactly the members of buddy_groups
        members = {tuple(g) for g in buddy_groups(world)}
        for lo in range(-world, world):
            for d in (1, 2, 4, 8, 16):
                rs = list(range(lo, lo + d))
                assert is_buddy_range(rs, world) == (tuple(rs) in members), (rs, world)
    with pytest.raises(ValueError):
        buddy_groups(0)


def _pool_worker(rank, world):
    import torch
    import torch.distributed as dist

    from adasched.runtime.pg_pool import get_pool

    pool = get_pool(timeout_s=20)
    assert get_pool() is pool and get_pool(20) is pool  # cached
    try:                                               # its groups cannot take another timeout: said, not ignored
        get_pool(timeout_s=30)
        raise AssertionError("get_pool(30) returned the 20 s pool")
    except ValueError as err:
        assert "created with 20.0 s" in str(err), err
    sums = {}
    for ranks, g in pool.groups_of():
        assert dist.get_world_size(g) == len(ranks) and dist.get_rank(g) == ranks.index(rank)
        assert pool.group(list(reversed(ranks))) is g
        t = torch.tensor([float(10 ** rank)], dtype=torch.float64)
        dist.all_reduce(t, group=g)
        sums[tuple(ranks)] = float(t)
    errors = []
    for bad in ([1, 2], [0, 1, 2], [4], [3, 3]):
        try:
            pool.group(bad)
        except ValueError as err:
            errors.append(str(err))
    return {"n": len(pool), "world": pool.world, "sums": sums, "errors": errors}


def test_pool_on_four_ranks():
    out = spawn_gloo(_pool_worker, 4, timeout_s=40)
    for rank, res in enumerate(out):
        assert res["n"] == 7 and res["world"] == 4
        assert len(res["sums"]) == 3  # degrees 1, 2, 4
        for ranks, s in res["sums"].items():
            assert rank in ranks and s == sum(10 ** r for r in ranks)
        assert len(res["errors"]) == 4 and all("not an aligned power-of-two rank range" in e for e in res["errors"])
