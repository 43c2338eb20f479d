"""Collective microbenchmarks over torch.distributed and their alpha-beta fits.

:func:`measure_collectives` runs inside an initialised process group (every rank calls it): for each group
size g (powers of two up to the world size) the world is cut into world/g contiguous groups of g ranks
(created once with ``dist.new_group``; all groups run at the same time, as concurrent SP/EP groups do), and
each op runs over each message size: ``warmup`` untimed runs, then ``repeats`` timed runs, each after a
barrier of its group (a timed run of a message under 1 MiB is up to 8 back-to-back calls, averaged, so the
barrier's exit skew does not dominate). A run's time is the slowest rank's (max over ranks, reduced to rank 0); the point is
the median over repeats. Message size = bytes of the tensor each rank passes in (per rank).

Ops: all_to_all (all_to_all_single), all_reduce, all_gather (all_gather_single / all_gather_into_tensor),
reduce_scatter (reduce_scatter_single / reduce_scatter_tensor). Where the backend lacks reduce_scatter
(gloo in older torch) it is timed as all_reduce + taking the local shard, and the fit's ``source`` says so.

Every rank of a group runs the same collectives in the same order, and no rank touches a group it is not in.
A world that is not a power of two leaves ranks outside every group of some sizes (3 ranks: rank 2 for size
2); they skip those points and meet the others at a world barrier after each such point. Whether
reduce_scatter is emulated is decided once, before any timing, by a probe on all ranks and an all_reduce of
the outcome, so every rank takes the same branch.

Every process group gets ``timeout_s``; :func:`spawn_collectives` runs the measurement in fresh worker
processes (torch.multiprocessing, gloo on CPU or nccl with one GPU per rank, free port) and kills them if the
whole run exceeds its limit.
"""
from __future__ import annotations

import datetime
import json
import numbers
import os
import socket
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from .fit import SIZE_TERM_FLOOR, fit_alpha_beta
from .profile import MAX_FIT_REL_ERROR, CollectiveFit, group_scope

__all__ = ["OPS", "CollectiveConfig", "collective_config", "measure_collectives", "fit_collectives",
           "spawn_collectives", "free_port", "held_store", "group_sizes_for"]

OPS = ("all_to_all", "all_reduce", "all_gather", "reduce_scatter")


@dataclass(frozen=True, kw_only=True)
class CollectiveConfig:
    sizes: tuple[int, ...]
    """Message sizes in bytes per rank (each is rounded down to a multiple of 4 * group size bytes)."""
    ops: tuple[str, ...] = OPS
    warmup: int = 1
    repeats: int = 5
    timeout_s: float = 120.0
    """Timeout of every collective (process-group timeout), seconds."""
    emulate_reduce_scatter: bool = False
    """Time reduce_scatter as all_reduce + local shard even where the backend has it (tests that path)."""

    def __post_init__(self):
        bad = [o for o in self.ops if o not in OPS]
        if bad:
            raise ValueError(f"ops: unknown collective(s) {bad} (known: {', '.join(OPS)})")
        if not self.ops:  # (measured nothing: a profile claiming measured collectives held none)
            raise ValueError(f"ops: need at least one collective (known: {', '.join(OPS)})")
        # whole byte counts (a size of 4096.5 failed in the workers with a torch signature fragment)
        if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in self.sizes):
            raise ValueError(f"sizes: message sizes are whole numbers of bytes, got {self.sizes}")
        if len(set(self.sizes)) < 2 or any(s <= 0 for s in self.sizes):
            raise ValueError(f"sizes: need >= 2 distinct positive message sizes to fit alpha-beta, got {self.sizes}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats}, {self.warmup}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


def collective_config(quick: bool, gpu: bool = False) -> CollectiveConfig:
    if gpu:
        sizes = tuple(1 << k for k in range(16, 29, 2 if quick else 1))  # 64 KiB .. 256 MiB
        return CollectiveConfig(sizes=sizes, warmup=2 if quick else 5, repeats=5 if quick else 20, timeout_s=300)
    if quick:
        return CollectiveConfig(sizes=(1 << 12, 1 << 16, 1 << 20, 1 << 22), warmup=1, repeats=5, timeout_s=60)
    return CollectiveConfig(sizes=tuple(1 << k for k in range(12, 25, 2)), warmup=2, repeats=7, timeout_s=300)


def group_sizes_for(world: int) -> list[int]:
    """Powers of two from 2 up to the world size (a non-power-of-two world also gets its own size)."""
    out, g = [], 2
    while g <= world:
        out.append(g)
        g *= 2
    if world >= 2 and world not in out:
        out.append(world)
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it). The one copy: runtime.dist and
    the tests import it from here. To launch local ranks, :func:`held_store` instead."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def held_store(world_size: int, timeout_s: float = 60):
    """A rendezvous store this process hosts on a port the OS picks, held until it is dropped: start ranks with
    ``MASTER_ADDR=127.0.0.1 MASTER_PORT=<store.port> TORCHELASTIC_USE_AGENT_STORE=True`` and they join it as clients
    (as under torchrun, whose agent hosts the store). Unlike a :func:`free_port` port, free only when asked and bound
    by rank 0 seconds later, no launch running meanwhile can be handed the same port (one that was: a rank of the
    other launch joined this one's world and waited in ProcessGroupGloo's constructor past its timeout). The one
    copy: runtime.dist re-exports it."""
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                    timeout=datetime.timedelta(seconds=timeout_s))


def _op_fns(dist):
    """(all_gather, reduce_scatter) single-tensor functions of this torch (2.13 renamed them)."""
    ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return ag, rs


def _elements(size: int, g: int) -> int:
    """float32 elements of a ``size``-byte message, divisible by the group's size g (3 ranks: groups of 2 and 3)."""
    return max(g, (size // 4) // g * g)


def measure_collectives(cfg: CollectiveConfig, *, device: str = "cpu", show_progress: bool = False
                        ) -> dict[str, Any] | None:
    """Measure every (group size, op, size) in the current world. Collective over all ranks.

    Returns on rank 0 ``{'world', 'backend', 'points': [{op, group_size, bytes, ms}], 'emulated': {op: how}}``;
    None on the other ranks."""
    import torch
    import torch.distributed as dist

    from adasched.planner.ui import progress

    world, rank = dist.get_world_size(), dist.get_rank()
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    all_gather, reduce_scatter = _op_fns(dist)
    gsizes = group_sizes_for(world)
    for g in gsizes:  # (every rank refuses alike, before any collective: a config that measured everything, then
        # failed its fit with "give larger sizes" where the sizes were 1 MiB but 4 bytes apart)
        rounded = sorted({_elements(size, g) * 4 for size in cfg.sizes})
        if len(rounded) < 2:
            raise ValueError(f"sizes: {list(cfg.sizes)} all round to one message of {rounded[0]} bytes on groups of "
                             f"{g} ranks (each size is rounded down to a multiple of 4 x {g} bytes): give sizes at "
                             f"least {4 * g} bytes apart")
    groups = {}
    for g in gsizes:  # every rank creates every group, in the same order, once
        if g == world:
            groups[g] = None  # the default (world) group
            continue
        mine = None
        for start in range(0, world - g + 1, g):
            pg = dist.new_group(list(range(start, start + g)), timeout=timeout)
            if start <= rank < start + g:
                mine = pg
        groups[g] = mine
    emulated: dict[str, str] = {}
    if "reduce_scatter" in cfg.ops:  # decided once, by every rank together, before any timed collective
        how = _reduce_scatter_emulation(cfg, dist, torch, reduce_scatter, world, device, timeout)
        if how:
            emulated["reduce_scatter"] = how
    keys, times = [], []
    total = len(gsizes) * len(cfg.ops) * len(cfg.sizes)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with warnings.catch_warnings(), progress(f"collectives ({world} ranks, {dist.get_backend()})", total,
                                             enabled=show_progress and rank == 0) as advance:
        warnings.simplefilter("ignore", FutureWarning)
        for g in gsizes:
            pg = groups[g]
            in_group = pg is not None or g == world
            for op in cfg.ops:
                for size in cfg.sizes:
                    n = _elements(size, g)
                    x = torch.randn(n, device=device)
                    if op == "all_to_all":
                        out = torch.empty_like(x)
                        fn = lambda: dist.all_to_all_single(out, x, group=pg)  # noqa: E731
                    elif op == "all_reduce":
                        fn = lambda: dist.all_reduce(x, group=pg)  # noqa: E731
                    elif op == "all_gather":
                        out = torch.empty(n * g, device=device)
                        fn = lambda: all_gather(out, x, group=pg)  # noqa: E731
                    else:
                        out = torch.empty(n // g, device=device)
                        fn = lambda: reduce_scatter(out, x, group=pg)  # noqa: E731
                        if in_group and emulated.get(op):
                            fn = _emulated_reduce_scatter(dist, out, x, pg, g)
                    ts = [0.0] * cfg.repeats  # ranks outside every group of size g (world not a power of 2)
                    if in_group:
                        ts = []
                        for _ in range(cfg.warmup):
                            fn()
                        sync()
                        inner = max(1, min(8, (1 << 20) // max(size, 1)))  # amortise barrier skew on small messages
                        for _ in range(cfg.repeats):
                            dist.barrier(group=pg)
                            t0 = time.perf_counter()
                            for _ in range(inner):
                                fn()
                            sync()
                            ts.append((time.perf_counter() - t0) * 1e3 / inner)
                    keys.append((op, g, n * 4))
                    times.append(ts)
                    if world % g:  # some ranks sat this point out: they wait here, one point at most, instead
                        dist.barrier()  # of in the next world collective for the whole of this group size
                    advance()
    t = torch.tensor(times, dtype=torch.float64, device=device)  # nccl reduces device tensors only
    dist.reduce(t, dst=0, op=dist.ReduceOp.MAX)  # the slowest rank of each run
    t = t.cpu()
    if rank != 0:
        return None
    points = [{"op": op, "group_size": g, "bytes": nbytes, "ms": statistics.median(t[i].tolist())}
              for i, (op, g, nbytes) in enumerate(keys)]
    return {"world": world, "backend": dist.get_backend(), "points": points,
            "emulated": {k: v for k, v in emulated.items() if v}}


def _reduce_scatter_emulation(cfg: CollectiveConfig, dist, torch, reduce_scatter, world: int, device: str,
                              timeout: datetime.timedelta) -> str:
    """How reduce_scatter is timed: '' for the backend's own, else why it is timed as all_reduce + local shard.

    Collective over all ranks (world group), called once before any timing: every rank probes the backend's
    reduce_scatter on a fresh all-ranks group, then the ranks agree with an all_reduce (MIN) of their success
    flags on the world group, so one rank's failed probe makes every rank emulate, and every group of every size
    then runs the same sequence of collectives. The probe group has half the timeout: a rank whose probe is left
    waiting by a rank that failed before sending gives up in time to join the agreement."""
    if cfg.emulate_reduce_scatter:
        return "timed as all_reduce + local shard (emulate_reduce_scatter set)"
    probe_pg = dist.new_group(list(range(world)), timeout=timeout / 2)
    x = torch.randn(4 * world, device=device)
    out = torch.empty(4, device=device)
    ok = 1.0
    try:
        reduce_scatter(out, x, group=probe_pg)
    except (RuntimeError, NotImplementedError):
        ok = 0.0
    flag = torch.tensor([ok], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if flag.item() == 1.0:
        return ""
    return "timed as all_reduce + local shard (backend lacks reduce_scatter)"


def _emulated_reduce_scatter(dist, out, x, pg, g):
    """reduce_scatter as all_reduce + copying this rank's shard (for backends without reduce_scatter)."""
    r = dist.get_rank(pg) if pg is not None else dist.get_rank()
    k = x.numel() // g

    def fn():
        dist.all_reduce(x, group=pg)
        out.copy_(x[r * k:(r + 1) * k])

    return fn


def fit_collectives(result: dict[str, Any], ranks_per_node: int, source: str) -> list[CollectiveFit]:
    """alpha-beta fit per (op, group size) of :func:`measure_collectives`' points, with the fit error."""
    by_key: dict[tuple[str, int], list[dict]] = {}
    for p in result["points"]:
        by_key.setdefault((p["op"], p["group_size"]), []).append(p)
    fits = []
    for (op, g), pts in sorted(by_key.items()):
        try:
            f = fit_alpha_beta([p["bytes"] for p in pts], [max(p["ms"], 1e-6) for p in pts],
                               min_size_term=SIZE_TERM_FLOOR)
        except ValueError as err:  # (sizes of a few bytes round to one: elements divisible by the group size)
            raise ValueError(f"{op} on {g} ranks: {err} (each size is rounded down to a multiple of 4 x {g} "
                             f"bytes: give larger sizes)") from None
        src = f"{source}, {result['backend']}, {result['world']} ranks"
        if f.note:
            src += f"; {f.note}"
        if result.get("emulated", {}).get(op):
            src += f"; {op} {result['emulated'][op]}"
        if not f.rel_error <= MAX_FIT_REL_ERROR:  # (a traceback after the whole measurement run: timings near 0)
            raise ValueError(f"{op} on {g} ranks: the alpha-beta fit's mean relative error is {f.rel_error:.3g} (a "
                             f"fit within {MAX_FIT_REL_ERROR:g} is kept): timings this close to 0 do not fit - "
                             f"measure larger sizes or more repeats")
        fits.append(CollectiveFit(op=op, group_size=g, scope=group_scope(g, ranks_per_node, result["world"]),
                                  alpha_ms=f.coef[0], beta_ms_per_byte=f.coef[1], fit_rel_error=f.rel_error,
                                  source=src))
    return fits


# ---- spawning workers (used by `adasched profile` outside torchrun) -------------------------------
def _exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Watchdog thread of a worker: exit as soon as the launching process is gone (killed, or interrupted while
    it was still starting workers), instead of measuring on, or waiting out the process-group timeout, as an
    orphan."""
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker(rank: int, world: int, port: int, cfg_dict: dict, out_path: str, show_progress: bool,
            backend: str = "gloo", parent_pid: int | None = None) -> None:
    import threading

    if parent_pid is not None:
        threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"  # a client of the launcher's held_store, as under torchrun
    cfg = CollectiveConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict.items()})
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=cfg.timeout_s))
    try:
        res = measure_collectives(cfg, device=device, show_progress=show_progress)
        if rank == 0:
            with open(out_path, "w", encoding="utf-8") as fh:
                json.dump(res, fh)
    finally:
        dist.destroy_process_group()


def spawn_collectives(nproc: int, cfg: CollectiveConfig, *, show_progress: bool = True,
                      limit_s: float | None = None, backend: str = "gloo") -> dict[str, Any]:
    """Run :func:`measure_collectives` in ``nproc`` fresh worker processes; rank 0's result.

    ``backend`` 'gloo' measures on the CPU; 'nccl' puts rank i on GPU i (needs nproc GPUs).

    The workers are killed if the whole run takes longer than ``limit_s`` (default: 4 x cfg.timeout_s)."""
    import torch.multiprocessing as mp

    if nproc < 2:
        raise ValueError(f"--nproc: collectives need >= 2 processes, got {nproc}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
    limit_s = limit_s or 4 * cfg.timeout_s
    fd, out_path = tempfile.mkstemp(prefix="adasched-coll-", suffix=".json")
    os.close(fd)
    ctx = store = None
    try:
        store = held_store(nproc, cfg.timeout_s)  # the ranks' rendezvous, its port held for the whole run
        # daemon: an interrupt while later workers are still starting ends the started ones at exit (they
        # would otherwise be joined, i.e. waited for); the watchdog covers a killed launcher
        ctx = mp.start_processes(_worker, args=(nproc, store.port, asdict(cfg), out_path, show_progress, backend,
                                                os.getpid()),
                                 nprocs=nproc, join=False, daemon=True, start_method="spawn")
        deadline = time.monotonic() + limit_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"collective profiling did not finish within {limit_s:.0f} s")
        with open(out_path, encoding="utf-8") as fh:
            return json.load(fh)
    except mp.ProcessRaisedException as err:
        raise RuntimeError(f"collective profiling failed in a worker: {str(err).strip().splitlines()[-1]}") from None
    except mp.ProcessExitedException as err:  # a worker killed (the OOM killer, a segfault): ProcessExitedException
        raise RuntimeError(f"collective profiling failed: {' '.join(str(err).split())}") from None
    finally:
        if ctx is not None:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        del store
        os.unlink(out_path)
