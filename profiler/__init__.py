"""adasched.profiler: what the cluster is and how fast.

Inventory (NVML or the CPU host), microbenchmarks, collective profiling over torch.distributed, fitted cost
models, and the typed ClusterProfile with its built-ins. Heavy modules (torch) are imported only by
``inventory``, ``microbench``, ``collectives`` and ``local``; importing this package stays light.
"""
from .io import InputError, atomic_write_json, atomic_write_text, load_model, read_json
from .profile import AttentionFit, ClusterProfile, CollectiveFit, DeviceInfo, LinearFit, ModelCost, load_profile, save_profile

__all__ = [
    "InputError", "atomic_write_json", "atomic_write_text", "load_model", "read_json",
    "AttentionFit", "ClusterProfile", "CollectiveFit", "DeviceInfo", "LinearFit", "ModelCost",
    "load_profile", "save_profile",
]
