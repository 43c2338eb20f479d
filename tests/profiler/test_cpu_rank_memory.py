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
