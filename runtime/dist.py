"""World set-up for the runtime: one call to join the torchrun world, a free TCP port, a rendezvous store held
for local launches, and a helper that runs a function on N local gloo ranks (real process groups, for tests and
small CPU runs).

Every process group made here carries a timeout, so a rank that never arrives turns into an error instead of a
hang.
"""
from __future__ import annotations

import io
import math
import os
import queue as queue_mod
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

from adasched.profiler.collectives import free_port, held_store  # one copy of each (re-exported here)

__all__ = ["init_distributed", "free_port", "held_store", "spawn_gloo", "WorkerError", "env_world",
           "check_same_on_every_rank"]


class WorkerError(RuntimeError):
    """A rank started by :func:`spawn_gloo` raised; ``rank`` names it, the message holds its traceback."""

    def __init__(self, rank: int, tb: str):
        self.rank = rank
        super().__init__(f"rank {rank} failed:\n{tb}")


def env_int(name: str, default: int) -> int:
    """An integer torchrun variable, ``default`` when unset; a value that is not one is a ValueError naming the
    variable (LOCAL_WORLD_SIZE=abc said "invalid literal for int() with base 10: 'abc'")."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not an integer") from None


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) when it is not set."""
    rank = env_int("RANK", 0)
    world = env_int("WORLD_SIZE", 1)
    local = env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} WORLD_SIZE={world}: rank must lie in [0, world size)")
    return rank, world, local


def check_same_on_every_rank(mine: dict, where: str) -> None:
    """Each rank read its plan file and arguments itself (torchrun per node: on nodes without a shared file
    system, or with another command line, they can differ - and the run trained mismatched shards in silence or
    waited in a collective until its timeout). Every rank passes what decides its run (a flat dict of picklable
    values); any rank's differing from rank 0's raises the same InputError(``where``) on every rank, naming the
    ranks and the keys. A collective on the default group; nothing without an initialised world of > 1 ranks."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    odd = [r for r, other in enumerate(every) if other != every[0]]
    if odd:
        from adasched.profiler.io import InputError

        missing = object()  # (a key one rank lacks differs even from a None)
        keys = sorted({k for o in every[1:] for k in set(o) | set(every[0])
                       if o.get(k, missing) != every[0].get(k, missing)})
        raise InputError(where, f"rank(s) {odd[:8]} run another plan or options than rank 0 (different: "
                                f"{', '.join(keys)}): every rank must read the same plan file and arguments")


def init_distributed(backend: str | None = None, timeout_s: float = 60) -> tuple[int, int]:
    """Join the world described by the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    backend: "gloo", "nccl" or None (nccl when CUDA is available, else gloo). With nccl the rank binds to
    cuda:LOCAL_RANK. timeout_s bounds every collective on the default group (seconds). Without a torchrun
    environment a one-rank world on a free local port is created. Idempotent: an already initialised world
    is returned as is. Returns (rank, world_size).
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world, local = env_world()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: {backend!r} is not supported (gloo or nccl)")
    if backend == "nccl":
        torch.cuda.set_device(local)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world > 1:
            raise ValueError("MASTER_PORT: not set for a multi-rank world (start with torchrun)")
        os.environ["MASTER_PORT"] = str(free_port())
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", local)
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    return rank, world


def _worker(rank: int, world: int, port: int, timeout_s: float, fn: Callable, args: tuple, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    failed_at = None  # when the exception was caught: before the teardown below closes the connections, which
    try:               # makes the peers blocked in a collective with this rank fail too
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        try:
            result = fn(rank, world, *args)
        except BaseException:
            failed_at = time.time()
            raise
        finally:
            _reset_pool_cache()
            if dist.is_initialized():  # (fn may have torn it down itself: "Process group cannot be None" was the
                dist.destroy_process_group()  # report of a run that succeeded, or hid fn's own error)
        buf = io.BytesIO()
        torch.save(result, buf)  # plain bytes across the queue: no shared-memory tensors outliving the worker
        queue.put((rank, "ok", buf.getvalue()))
        code = 0
    except BaseException:  # noqa: BLE001 - reported to the parent with the rank and the time it failed
        queue.put((rank, "error", (failed_at or time.time(), traceback.format_exc())))
        code = 1
    # the report is flushed to the parent, then the process leaves without the interpreter's teardown: gloo's
    # threads have aborted a finished worker there ("terminate called without an active exception"), which the
    # parent could see before the report arrived
    queue.close()
    queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _reset_pool_cache() -> None:
    try:
        from .pg_pool import reset_pool
    except ImportError:  # pragma: no cover
        return
    reset_pool()


ERROR_GRACE_S = 3.0  # after a rank's error, how long the other ranks' reports are awaited


def spawn_gloo(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 60) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes joined in one gloo world.

    ``fn`` must be importable (module level). Returns the results indexed by rank (they must be
    ``torch.save``-able). A worker exception is raised here as :class:`WorkerError` naming the rank that failed
    first, with its traceback: a rank that died without reporting (a crash, ``os._exit``, a kill), else the
    earliest by the time each caught its exception (a peer blocked in a collective with the failed rank fails
    next, on the closed connection, and is not the cause). If the ranks are not all done after ``timeout_s``
    seconds (also the collective timeout inside the workers) the remaining workers are terminated and
    TimeoutError is raised.
    """
    import torch
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size: {world_size} must be >= 1")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = held_store(world_size, timeout_s)  # the ranks' rendezvous, on a port held for the whole run
    procs = [ctx.Process(target=_worker, args=(r, world_size, store.port, timeout_s, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, tuple[float, str]] = {}  # rank -> (when it failed, report); -inf: died without a report
    deadline = time.monotonic() + timeout_s + 30.0  # + start-up (imports) of the workers

    def record(rank: int, status: str, payload) -> None:
        nonlocal deadline
        if status == "ok":
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            return
        errors[rank] = payload
        # a failed rank usually leaves the others blocked in a collective until their timeout; the peers whose
        # collective fails with it report within moments - wait a little for those, so that the earliest failure
        # (the cause) is the one raised
        deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)

    try:
        while len(results) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                if errors:
                    break
                missing = sorted(set(range(world_size)) - set(results) - set(errors))
                raise TimeoutError(f"spawn_gloo: ranks {missing} did not finish within {timeout_s + 30:.0f} s")
            try:
                record(*queue.get(timeout=min(left, 1.0)))
                continue
            except queue_mod.Empty:
                pass
            # (exit code 0 without a report too: os._exit(0) waited out the whole timeout)
            silent = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in results
                      and r not in errors]
            if silent:
                # a worker flushes its report before it exits: one more look for a report that came meanwhile,
                # then whoever is still silent died without one (a crash, os._exit, a kill) - most likely the
                # cause, named before the peers that failed on its closed connection
                try:
                    while True:
                        record(*queue.get(timeout=0.2))
                except queue_mod.Empty:
                    pass
                for r in silent:
                    if r not in results and r not in errors:
                        errors[r] = (-math.inf, f"process exited with code {procs[r].exitcode} before reporting")
                        deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
    finally:
        for p in procs:
            p.join(timeout=0.5 if errors else 10.0)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
        del store
    if errors:
        rank = min(errors, key=lambda r: (errors[r][0], r))
        raise WorkerError(rank, errors[rank][1])
    return [results[r] for r in range(world_size)]
