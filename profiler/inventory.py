"""Device inventory: what the node is. NVIDIA GPUs through NVML (nvidia-ml-py); the CPU host otherwise.

:func:`inventory` never raises for a missing driver: it prints one line on stderr saying so and describes
the CPU host (model, cores, memory) as ``DeviceInfo(kind="cpu")``.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Any

from .profile import DeviceInfo

__all__ = ["inventory", "gpu_inventory", "torch_gpu_inventory", "cpu_inventory", "host_info", "host_memory_bytes"]

#: NVML topology levels (nvmlDeviceGetTopologyCommonAncestor) -> the short names `nvidia-smi topo -m` uses.
_TOPO_NAMES = {0: "X", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _try(fn, *args, default=None):
    """Call an NVML query that a given GPU/driver may not support; None (default) instead of an error."""
    try:
        return fn(*args)
    except Exception:  # pynvml raises NVMLError_NotSupported & co. per field
        return default


def gpu_inventory(verbose: bool = True) -> tuple[DeviceInfo, dict[str, Any]] | None:
    """GPU 0's description through NVML (all GPUs of a node are assumed alike) and per-GPU extras, or None
    without NVML (why: one line on stderr with ``verbose``). NVML only: :func:`inventory` falls back to
    torch.cuda's view of the GPUs, then to the CPU host; this function describes neither, so its note says
    only what NVML found."""
    found, why = _nvml_inventory()
    if found is None and verbose:
        print(f"NVML describes no NVIDIA GPU ({why})", file=sys.stderr)
    return found


def _nvml_inventory() -> tuple[tuple[DeviceInfo, dict[str, Any]] | None, str]:
    """(what NVML describes, "") or (None, why not)."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as err:  # NVMLError_LibraryNotFound / DriverNotLoaded / ...
        return None, f"NVML: {err}"
    try:
        n = pynvml.nvmlDeviceGetCount()
        if n < 1:
            return None, "NVML: 0 devices"
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        h = handles[0]
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        links = 0
        for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
            state = _try(pynvml.nvmlDeviceGetNvLinkState, h, link)
            if state is None:
                break
            links += int(state == pynvml.NVML_FEATURE_ENABLED)
        power = _try(pynvml.nvmlDeviceGetPowerManagementLimit, h)
        topology = None
        if n > 1:
            matrix = []
            for i in range(n):
                row = []
                for j in range(n):
                    if i == j:
                        row.append("X")
                        continue
                    lvl = _try(pynvml.nvmlDeviceGetTopologyCommonAncestor, handles[i], handles[j])
                    row.append(_TOPO_NAMES.get(int(lvl), str(lvl)) if lvl is not None else "?")
                matrix.append(row)
            topology = {"levels": "X self, PIX one PCIe switch, PXB several switches, PHB host bridge, "
                                  "NODE same NUMA node, SYS across NUMA nodes (NVLink shown by nvlink_links)",
                        "matrix": matrix}
        info = DeviceInfo(
            kind="gpu",
            name=_s(pynvml.nvmlDeviceGetName(h)),
            memory_bytes=int(mem.total),
            count_per_node=n,
            sm_clock_mhz=_try(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_SM),
            mem_clock_mhz=_try(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_MEM),
            nvlink_links=links,
            pcie_gen=_try(pynvml.nvmlDeviceGetMaxPcieLinkGeneration, h),
            power_limit_w=power / 1000.0 if power is not None else None,
            topology=topology,
            driver=_try(lambda: _s(pynvml.nvmlSystemGetDriverVersion())),
        )
        extras = {"gpus": [_s(pynvml.nvmlDeviceGetName(x)) for x in handles]}
        return (info, extras), ""
    except Exception as err:  # an NVML error after init (GPU lost, no permission): the next source, not a traceback
        return None, f"NVML: {err}"
    finally:
        _try(pynvml.nvmlShutdown)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def host_memory_bytes() -> int:
    """This host's physical memory in bytes (sysconf, else /proc/meminfo; 1 when neither answers)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_inventory() -> DeviceInfo:
    """The CPU host as one device: model name, usable cores (as count_per_node is 1 process), memory."""
    # memory unknown (neither sysconf nor /proc/meminfo): the smallest value a profile accepts
    return DeviceInfo(kind="cpu", name=f"{_cpu_model()} ({_cores()} cores)",
                      memory_bytes=max(2**20, host_memory_bytes()))


def host_info() -> dict[str, Any]:
    """Software and host facts recorded in the profile (not used by planners)."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cores": _cores(),
        "memory_bytes": host_memory_bytes(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def torch_gpu_inventory() -> DeviceInfo | None:
    """GPU 0 as torch.cuda sees it (name, memory, count; no clocks, links or topology), or None without CUDA.
    The fallback when NVML is missing (nvidia-ml-py is the optional ``gpu`` extra) on a machine whose GPUs torch
    uses: the microbenchmarks run there, so the profile must describe them, not the CPU host."""
    try:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
            return None
        props = torch.cuda.get_device_properties(0)
        return DeviceInfo(kind="gpu", name=str(props.name), memory_bytes=int(props.total_memory),
                          count_per_node=int(torch.cuda.device_count()))
    except (ImportError, RuntimeError, AssertionError):  # a CPU-only torch, a broken driver
        return None


def inventory(verbose: bool = True) -> tuple[DeviceInfo, dict[str, Any]]:
    """(device, host facts): the GPUs when NVML finds any and torch uses the same ones, else torch.cuda's view of
    them, else the CPU host (with one line on stderr saying which)."""
    host = host_info()
    gpu, why = _nvml_inventory()
    seen = torch_gpu_inventory()  # what the benchmarks run on
    if gpu is not None:
        dev, extras = gpu
        host.update(extras)
        if seen is None:
            # NVML answers for the driver, torch for the process: a CPU-only torch build, a driver too old for
            # torch's CUDA or CUDA_VISIBLE_DEVICES="" left the benchmarks on the CPU while the profile named the
            # GPUs (and skipped the per-rank split of the host's RAM)
            if verbose:
                print(f"NVML describes {dev.count_per_node} GPU(s) ({dev.name}) but torch cannot use any (a "
                      "CPU-only torch build, a driver too old for its CUDA, or CUDA_VISIBLE_DEVICES hides them): "
                      "the benchmarks run on the CPU, describing the CPU host", file=sys.stderr)
            return cpu_inventory(), host
        if (seen.name, seen.count_per_node) != (dev.name, dev.count_per_node):
            # CUDA_VISIBLE_DEVICES (which NVML ignores) hides some GPUs or reorders them: NVML's GPU 0 and count
            # are not the ones this process measures; torch's view, NVML's per-device details dropped
            if verbose:
                print(f"NVML's GPU 0 and count ({dev.name}, {dev.count_per_node}) differ from what torch uses "
                      f"({seen.name}, {seen.count_per_node}; CUDA_VISIBLE_DEVICES?): described from torch.cuda",
                      file=sys.stderr)
            return seen.model_copy(update={"driver": dev.driver}), host
        return dev, host
    dev = seen
    if dev is not None:
        if verbose:
            print(f"NVML unavailable ({why}); {dev.count_per_node} GPU(s) described from torch.cuda "
                  "(no clocks, NVLink or topology: pip install nvidia-ml-py for those)", file=sys.stderr)
        return dev, host
    if verbose:
        print(f"no NVIDIA GPU/driver found ({why}); describing the CPU host instead", file=sys.stderr)
    return cpu_inventory(), host
