"""Profile the machine we run on: inventory + microbenchmarks + collectives -> one ClusterProfile.

Two ways to get the collectives:
- outside torchrun, :func:`profile_local` spawns ``nproc`` worker processes itself (gloo on the CPU; nccl,
  one GPU per rank, on a multi-GPU node);
- under torchrun (``RANK``/``WORLD_SIZE`` set), :func:`profile_in_world` measures in that world (gloo on
  CPU, nccl on GPU) and rank 0 adds its own inventory and microbenchmarks and writes the file.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path

from .profile import ClusterProfile, save_profile
from .io import InputError

__all__ = ["profile_local", "profile_in_world", "in_torchrun", "resolve_nproc", "max_cpu_nproc", "DEFAULT_NPROC"]

#: worker processes for the collectives when `adasched profile` spawns them (full, quick)
DEFAULT_NPROC = (4, 2)


def in_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _local_layout() -> tuple[int, int]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) as torchrun sets them. A launcher that sets RANK, WORLD_SIZE and MASTER_ADDR
    only (a Kubeflow PyTorchJob, a hand-written SLURM script) made a multi-node world one node of all its ranks:
    every fit 'intra', inter-node links recorded as on-node."""
    values = {}
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        text = os.environ.get(name)
        if text is None:
            raise InputError(name, "not set, while RANK, WORLD_SIZE and MASTER_ADDR are: launch with torchrun, or "
                                   "set LOCAL_RANK (this rank's index on its node) and LOCAL_WORLD_SIZE (ranks per "
                                   "node) too")
        if not (text.isascii() and text.isdigit()):
            raise InputError(name, f"{text!r} is not a whole number")
        values[name] = int(text)
    if values["LOCAL_WORLD_SIZE"] < 1 or values["LOCAL_RANK"] >= values["LOCAL_WORLD_SIZE"]:
        raise InputError("LOCAL_RANK", f"{values['LOCAL_RANK']} is not below LOCAL_WORLD_SIZE "
                                       f"{values['LOCAL_WORLD_SIZE']}")
    return values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"]


def _assemble(*, quick: bool, device, host, micro, coll, ranks_per_node: int, num_nodes: int,
              name: str | None) -> ClusterProfile:
    from .collectives import fit_collectives

    label = "quick " if quick else ""
    where = f"{host.get('hostname', 'this host')}, {device.name}"
    fits = []
    raw: dict = {}
    if micro is not None:
        raw.update(micro.raw)
    if coll is not None:
        fits = fit_collectives(coll, ranks_per_node, f"measured on {host.get('hostname', 'this host')}")
        raw["collectives"] = coll
    host = dict(host, ranks_per_node=ranks_per_node)
    gpus_per_node = max(ranks_per_node, 1) if coll is not None else device.count_per_node
    if device.kind == "cpu" and gpus_per_node > 1:
        # the host's RAM is shared by its ranks: a planner reads memory_bytes per rank (every rank reported all
        # of it, so plans fitted N copies of the model states into one host's memory)
        device = device.model_copy(update={"memory_bytes": max(2**20, device.memory_bytes // gpus_per_node),
                                           "name": f"{device.name}, RAM / {gpus_per_node} ranks"})
    return ClusterProfile(
        name=name or f"local-{host.get('hostname', 'host')}",
        source=f"measured: adasched profile {label.strip() or 'full'} run on {where}, "
               f"{datetime.date.today().isoformat()}",
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        device=device,
        host=host,
        gemm_tflops=micro.gemm_tflops if micro else None,
        copy_GBps=micro.copy_GBps if micro else None,
        attention=micro.attention if micro else None,
        linear=micro.linear if micro else None,
        collectives=fits,
        raw=raw,
    )


CPU_WORKER_BYTES = 300 * 2**20
"""Host memory of one gloo worker process (torch imported, nothing allocated), about."""


def max_cpu_nproc() -> int:
    """Most gloo worker processes `adasched profile` spawns on a host without GPUs: each is a torch process
    (~0.3 GB), so twice the usable cores, at least 8, at most 64 (a power of two)."""
    from .inventory import _cores

    cap = min(64, max(8, 2 * _cores()))
    return 1 << (cap.bit_length() - 1)


def resolve_nproc(nproc: int | None, *, quick: bool, collectives: bool, ngpu: int, option: str = "--nproc") -> int:
    """The worker count for the spawned collectives: ``nproc`` checked (>= 2, one GPU per nccl rank, a bounded
    number of CPU processes; any count, odd ones too) or the default (a power of two); a bad value raises
    ValueError('<option>: ...'). On a node with several GPUs the profile describes the ``nproc`` GPUs measured
    (its ``gpus_per_node``). ``option`` names where the count came from: ``--nproc`` of ``adasched profile``
    (which spawns its workers), or ``NPROC`` of ``profile_collectives.sh`` (ranks under torchrun)."""
    if nproc is None:
        return 1 << (min(ngpu, 8).bit_length() - 1) if ngpu >= 2 else DEFAULT_NPROC[1 if quick else 0]
    if not collectives:
        return nproc
    if ngpu == 1 and option == "--nproc":  # (the collectives are skipped on one GPU: the option was silently ignored)
        raise ValueError(f"--nproc: this node has one GPU, so there are no collectives to run with {nproc} workers "
                         "(omit --nproc, or profile the collectives under torchrun on a multi-GPU node)")
    if nproc < 2:
        raise ValueError(f"{option}: collectives need >= 2 processes, got {nproc} (or pass --no-collectives)")
    if ngpu >= 1 and nproc > ngpu:
        raise ValueError(f"{option}: {nproc} ranks but only {ngpu} GPU(s) (nccl needs one GPU per rank)")
    if ngpu == 0 and nproc > max_cpu_nproc():
        from .inventory import _cores

        raise ValueError(f"{option}: {nproc} worker processes is too many for this host ({_cores()} cores; at most "
                         f"{max_cpu_nproc()}: every rank is a torch process)")
    if ngpu == 0:  # the largest all_gather holds the shard and the gathered n x shard on every rank, in host memory
        # (64 ranks on a 32-core host: 65 GiB, an OOM kill after the whole run)
        from .collectives import collective_config
        from .io import check_host_memory

        big = max(collective_config(quick, gpu=False).sizes)
        need = nproc * (nproc + 1) * big + nproc * CPU_WORKER_BYTES
        check_host_memory(need, option, f"{nproc} worker processes need about {need / 2**30:,.1f} GiB (torch "
                                           f"processes and the largest all_gather's buffers)")
    return nproc


def profile_local(*, quick: bool, nproc: int | None = None, collectives: bool = True, microbench: bool = True,
                  show_progress: bool = True, name: str | None = None, verbose: bool = True) -> ClusterProfile:
    """Profile this machine in this process; the collectives in ``nproc`` spawned workers: nccl with one
    GPU per rank where there are >= 2 GPUs, gloo on the CPU where there is no GPU. A single GPU has no
    interconnect to measure: its collectives are skipped with a note on stderr."""
    import sys

    import torch

    from .collectives import collective_config, spawn_collectives
    from .inventory import inventory
    from .microbench import cpu_threads_per_rank, microbench_config, run_microbenchmarks

    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = "nccl" if ngpu >= 2 else "gloo"
    nproc = resolve_nproc(nproc, quick=quick, collectives=collectives, ngpu=ngpu)  # before any note on stderr
    device, host = inventory(verbose=verbose)
    if collectives and ngpu == 1:
        print("one GPU: no GPU interconnect to measure, skipping the collectives (run the collective profiling "
              "under torchrun on a multi-GPU node: launch/profile_collectives.sh)", file=sys.stderr)
        collectives = False
    micro = None
    if microbench:
        mcfg = microbench_config(quick)
        # a CPU profile of nproc ranks describes each rank with its share of the host (memory and cores)
        threads = cpu_threads_per_rank(nproc) if mcfg.device == "cpu" and collectives else None
        micro = run_microbenchmarks(mcfg, show_progress=show_progress, threads=threads)
    coll = None
    if collectives:
        if ngpu:
            torch.cuda.empty_cache()  # the workers share these GPUs: give back what the microbenchmarks cached
        coll = spawn_collectives(nproc, collective_config(quick, gpu=backend == "nccl"),
                                 show_progress=show_progress, backend=backend)
    # host.ranks_per_node: the workers that measured; without collectives none did (it recorded --nproc's default)
    return _assemble(quick=quick, device=device, host=host, micro=micro, coll=coll,
                     ranks_per_node=nproc if coll is not None else device.count_per_node, num_nodes=1, name=name)


def profile_in_world(*, quick: bool, out: str | os.PathLike | None, microbench: bool = True,
                     show_progress: bool = True, name: str | None = None) -> ClusterProfile | None:
    """Under torchrun: every rank measures the collectives; rank 0 returns (and writes ``out``) the profile.

    Initialises the default process group from the environment if needed (nccl with GPUs, else gloo),
    with a timeout on every collective, and destroys it before returning."""
    import torch
    import torch.distributed as dist

    from .collectives import collective_config, measure_collectives
    from .inventory import inventory
    from .microbench import cpu_threads_per_rank, microbench_config, run_microbenchmarks

    gpu = torch.cuda.is_available()
    cfg = collective_config(quick, gpu=gpu)
    local_rank, per_node = _local_layout()
    owns_pg = not dist.is_initialized()
    if owns_pg:
        if gpu:
            if local_rank >= torch.cuda.device_count():  # (set_device's "invalid device ordinal" traceback)
                raise InputError("--nproc_per_node", f"local rank {local_rank} but this node has "
                                                     f"{torch.cuda.device_count()} GPU(s): nccl needs one per rank")
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if gpu else "gloo", timeout=datetime.timedelta(seconds=cfg.timeout_s))
    try:
        rank = dist.get_rank()
        world = dist.get_world_size()
        if world < 2:  # nothing collective to time: an empty profile written as if measured
            raise InputError("--nproc_per_node", f"collectives need >= 2 processes, got {world} (or run "
                                                 f"`adasched profile --no-collectives`)")
        if world % per_node:
            raise InputError("LOCAL_WORLD_SIZE", f"{per_node} ranks per node do not divide the world of {world} "
                                                 "ranks (nodes with different rank counts)")
        coll = measure_collectives(cfg, device=f"cuda:{local_rank}" if gpu else "cpu",
                                   show_progress=show_progress)
        if rank != 0:
            return None
        device, host = inventory(verbose=True)
        micro = None
        if microbench:
            mcfg = microbench_config(quick)
            threads = cpu_threads_per_rank(per_node) if mcfg.device == "cpu" else None  # (one rank's cores)
            micro = run_microbenchmarks(mcfg, show_progress=show_progress, threads=threads)
        prof = _assemble(quick=quick, device=device, host=host, micro=micro, coll=coll, ranks_per_node=per_node,
                         num_nodes=max(1, world // per_node), name=name)
        if out is not None:
            save_profile(prof, Path(out))
        return prof
    finally:
        if owns_pg:
            dist.destroy_process_group()
