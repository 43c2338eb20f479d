"""A CPU profile whose collectives ran on N ranks of one host gives each rank 1/N of the host's RAM (each rank,
a "device" to the planners, reported all of it: plans fitted N copies of the model states into one host)."""
from __future__ import annotations

import random

from adasched.profiler.inventory import cpu_inventory
from adasched.profiler.local import _assemble, profile_local
from adasched.profiler.profile import DeviceInfo


def test_cpu_ranks_share_the_host_memory():
    p = profile_local(quick=True, nproc=2, microbench=False, show_progress=False, verbose=False)
    host = cpu_inventory().memory_bytes
    assert p.device.kind == "cpu" and p.gpus_per_node == 2
    assert p.device.memory_bytes == host // 2 and "RAM / 2 ranks" in p.device.name


def test_no_collectives_or_gpus_keep_their_memory():
    total = random.Random(5).randint(8 * 2**30, 64 * 2**30)
    cpu = DeviceInfo(kind="cpu", name="cpu", memory_bytes=total)
    p = _assemble(quick=True, device=cpu, host={}, micro=None, coll=None, ranks_per_node=4, num_nodes=1, name="t")
    assert p.device.memory_bytes == total and p.gpus_per_node == 1      # no collectives: the host is one device
    gpu = DeviceInfo(kind="gpu", name="g", memory_bytes=total, count_per_node=4)
    p = _assemble(quick=True, device=gpu, host={}, micro=None, coll=None, ranks_per_node=4, num_nodes=1, name="t")
    assert p.device.memory_bytes == total                                # a GPU's memory is its own


def test_cpu_ranks_share_the_host_cores(monkeypatch):
    """Memory was split per rank but the microbenchmarks ran on every core: a profile of N ranks per host described
    each computing at the whole host's speed (8 ranks on 2 cores: ~8x optimistic). They run on one rank's share
    now, recorded in the raw config, and torch's thread count is restored after."""
    import torch

    from adasched.profiler import inventory, local, microbench

    tiny = microbench.MicrobenchConfig(device="cpu", dtype="float32", gemm_n=32, copy_bytes=1 << 16,
                                       attn_seqlens=(16, 32, 64), attn_heads=1, attn_head_dim=8, linear_hidden=16,
                                       linear_ffn=32, linear_tokens=(8, 16, 32), warmup=0, repeats=1)
    monkeypatch.setattr(microbench, "microbench_config", lambda quick, device=None: tiny)
    # (timings of these sizes are launch noise - a busy host fitted attention 754x off, refused; the threads are
    # what this test checks: each measured step runs once, its time a fixed growth with the step's count)
    calls = []
    monkeypatch.setattr(microbench, "time_ms", lambda fn, device, warmup, repeats: (fn(), calls.append(1),
                                                                                    0.5 + 0.01 * len(calls))[2])
    cores = random.Random(3).choice([4, 6, 12])
    monkeypatch.setattr(inventory, "_cores", lambda: cores)
    seen = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real_set(n)))
    before = torch.get_num_threads()
    for nproc, collectives, want in ((2, True, cores // 2), (3, True, cores // 3), (2, False, None)):
        seen.clear()
        p = local.profile_local(quick=True, nproc=nproc, collectives=collectives, show_progress=False, verbose=False)
        got = p.raw["microbench_config"].get("threads")
        if want is None:  # one "device", the whole host: torch's own thread count, untouched
            assert seen == [before] and got == before, (seen, got)
        else:
            assert seen[0] == want and got == want and p.gpus_per_node == nproc, (nproc, seen, got)
        assert torch.get_num_threads() == before
    assert microbench.cpu_threads_per_rank(cores * 4) == 1
