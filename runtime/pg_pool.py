"""Process-group pool: every buddy-aligned power-of-two rank range, created once per process and cached.

FlexSP (and MoE expert parallelism) pick a different set of groups for every micro-batch. torch.distributed
requires every rank to take part in creating every group, in the same order, so groups cannot be made on
demand. The pool creates all aligned ranges at construction (2 * world - 1 of them for a power-of-two world;
each rank belongs to log2(world) + 1) and afterwards only looks them up.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Iterable

__all__ = ["buddy_groups", "is_buddy_range", "ProcessGroupPool", "get_pool", "reset_pool"]


def buddy_groups(world_size: int) -> list[list[int]]:
    """All aligned power-of-two rank ranges inside ``range(world_size)``: for every degree d = 1, 2, 4, ...
    <= world_size, the ranges [o, o + d) with o a multiple of d and o + d <= world_size. Ordered by degree,
    then offset (the creation order every rank follows)."""
    if world_size < 1:
        raise ValueError(f"world_size: {world_size} must be >= 1")
    out: list[list[int]] = []
    d = 1
    while d <= world_size:
        out.extend(list(range(o, o + d)) for o in range(0, world_size - d + 1, d))
        d *= 2
    return out


def is_buddy_range(ranks: Iterable[int], world_size: int) -> bool:
    """True when ``ranks`` (any order, no repeats) is one of :func:`buddy_groups` (world_size)."""
    rs = sorted(ranks)
    if not rs or len(set(rs)) != len(rs):
        return False
    d, o = len(rs), rs[0]
    return (d & (d - 1)) == 0 and o >= 0 and o % d == 0 and rs == list(range(o, o + d)) and o + d <= world_size


class ProcessGroupPool:
    """All buddy-aligned groups of the current world, created collectively at construction.

    Every rank must construct the pool at the same point (it issues ``new_group`` for every range of
    :func:`buddy_groups` in that order). Prefer :func:`get_pool`, which constructs it once per process.

    Attributes: ``world`` (int, world size), ``rank`` (this rank), ``timeout_s`` (collective timeout of every
    group, seconds), ``backend``.
    """

    def __init__(self, timeout_s: float = 60.0, backend: str | None = None):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("ProcessGroupPool: torch.distributed is not initialised (call init_distributed first)")
        self.world: int = dist.get_world_size()
        self.rank: int = dist.get_rank()
        self.timeout_s = float(timeout_s)
        self.backend = backend or dist.get_backend()
        self._world_pg = dist.group.WORLD  # tells get_pool when the world was torn down and rebuilt
        self._groups: dict[tuple[int, ...], object] = {}
        for ranks in buddy_groups(self.world):
            # new_group is collective over the whole world: every rank creates every group, same order
            pg = dist.new_group(ranks=ranks, timeout=timedelta(seconds=self.timeout_s), backend=self.backend)
            self._groups[tuple(ranks)] = pg

    def group(self, ranks: Iterable[int]):
        """The cached ProcessGroup for ``ranks`` (an aligned power-of-two range, any order).

        Raises ValueError naming the ranks when they are not such a range of this world. Group-local rank
        order is global rank order. Only members may use the group for collectives.
        """
        rs = sorted(int(r) for r in ranks)
        if not is_buddy_range(rs, self.world):
            raise ValueError(f"ranks {rs}: not an aligned power-of-two rank range of world size {self.world} "
                             f"(expected [o, o+d) with d a power of two and o a multiple of d)")
        return self._groups[tuple(rs)]

    def groups_of(self, rank: int | None = None) -> list[tuple[list[int], object]]:
        """(ranks, group) of every pooled group containing ``rank`` (default: this rank), smallest first."""
        r = self.rank if rank is None else rank
        return [(list(k), g) for k, g in self._groups.items() if k[0] <= r <= k[-1]]

    def __len__(self) -> int:
        return len(self._groups)


_POOL: ProcessGroupPool | None = None


def get_pool(timeout_s: float | None = None) -> ProcessGroupPool:
    """The process-wide pool, constructed on first call (collective: all ranks must call it at the same point) with
    ``timeout_s`` (default 60 s). A later call with the world torn down and re-initialised builds a new one; one
    asking for another timeout than the cached pool's groups have raises ValueError (the groups keep the timeout
    they were created with: :func:`reset_pool` on every rank, then ``get_pool``, builds new ones)."""
    global _POOL
    import torch.distributed as dist

    if _POOL is not None and dist.is_initialized() and _POOL.world == dist.get_world_size() \
            and _POOL._world_pg is dist.group.WORLD:
        if timeout_s is not None and float(timeout_s) != _POOL.timeout_s:
            raise ValueError(f"timeout_s: {timeout_s} s, but the process-wide pool's groups were created with "
                             f"{_POOL.timeout_s} s (reset_pool() on every rank first to rebuild them)")
        return _POOL
    _POOL = ProcessGroupPool(timeout_s=60.0 if timeout_s is None else timeout_s)
    return _POOL


def reset_pool() -> None:
    """Forget the cached pool (call before ``destroy_process_group``)."""
    global _POOL
    _POOL = None
