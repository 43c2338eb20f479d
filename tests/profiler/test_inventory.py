"""Device inventory: the CPU fallback on this machine and the NVML path against a fake NVML."""
import sys
import types

import pytest

from adasched.profiler import inventory as inv


class _NVMLError(Exception):
    pass


def _fake_pynvml(n_gpus: int, fail_init: bool = False):
    m = types.ModuleType("pynvml")
    m.NVML_CLOCK_SM, m.NVML_CLOCK_MEM, m.NVML_FEATURE_ENABLED, m.NVML_NVLINK_MAX_LINKS = 1, 2, 1, 18
    calls = {"shutdown": 0}

    def init():
        if fail_init:
            raise _NVMLError("NVML Shared Library Not Found")

    def nvlink_state(h, link):
        if link >= 6:
            raise _NVMLError("Not Supported")
        return 1 if link < 4 else 0

    def topo(a, b):
        return 10 if abs(a - b) == 1 else 50

    def shutdown():
        calls["shutdown"] += 1

    m.nvmlInit = init
    m.nvmlShutdown = shutdown
    m.nvmlDeviceGetCount = lambda: n_gpus
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetName = lambda h: b"NVIDIA Fake100"
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 * 2**30)
    m.nvmlDeviceGetMaxClockInfo = lambda h, kind: {1: 1980, 2: 2619}[kind]
    m.nvmlDeviceGetNvLinkState = nvlink_state
    m.nvmlDeviceGetMaxPcieLinkGeneration = lambda h: 5
    m.nvmlDeviceGetPowerManagementLimit = lambda h: 700000

    def no_power(h):
        raise _NVMLError("Not Supported")

    m.no_power = no_power
    m.nvmlDeviceGetTopologyCommonAncestor = topo
    m.nvmlSystemGetDriverVersion = lambda: "580.1"
    m.calls = calls
    return m


def test_cpu_fallback_on_this_machine(capsys):
    dev, host = inv.inventory()
    err = capsys.readouterr().err
    if dev.kind == "gpu":
        pytest.skip("this machine has a GPU; the fake-NVML tests cover the GPU path")
    assert err.count("\n") == 1 and err.startswith("no NVIDIA GPU/driver found") and "CPU host" in err
    assert "Traceback" not in err
    assert dev.memory_bytes > 2**28 and "cores" in dev.name and host["cores"] >= 1


def test_nvml_missing_library(monkeypatch, capsys):
    import torch

    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(0, fail_init=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU box: see the torch fallback below
    dev, _ = inv.inventory()
    err = capsys.readouterr().err
    assert dev.kind == "cpu"
    assert err == "no NVIDIA GPU/driver found (NVML: NVML Shared Library Not Found); describing the CPU host instead\n"


def _torch_sees(monkeypatch, n: int, name: str = "NVIDIA Fake100", memory: int = 80 * 2**30):
    """torch.cuda as on a machine where this process can use ``n`` GPUs named ``name`` (none: n = 0)."""
    import torch

    props = types.SimpleNamespace(name=name, total_memory=memory)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)


def test_nvml_gpus(monkeypatch, capsys):
    fake = _fake_pynvml(4)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    _torch_sees(monkeypatch, 4)
    dev, host = inv.inventory()
    assert capsys.readouterr().err == ""
    assert (dev.kind, dev.name, dev.memory_bytes, dev.count_per_node) == ("gpu", "NVIDIA Fake100", 80 * 2**30, 4)
    assert (dev.sm_clock_mhz, dev.mem_clock_mhz, dev.nvlink_links, dev.pcie_gen) == (1980, 2619, 4, 5)
    assert dev.power_limit_w == 700.0 and dev.driver == "580.1"
    m = dev.topology["matrix"]
    assert [m[i][i] for i in range(4)] == ["X"] * 4 and m[0][1] == "PIX" and m[0][2] == "SYS" and m[3][2] == "PIX"
    assert host["gpus"] == ["NVIDIA Fake100"] * 4 and fake.calls["shutdown"] == 1


def test_nvml_unsupported_fields_become_none(monkeypatch):
    fake = _fake_pynvml(1)
    fake.nvmlDeviceGetPowerManagementLimit = fake.no_power
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    _torch_sees(monkeypatch, 1)
    dev, _ = inv.inventory()
    assert dev.power_limit_w is None and dev.topology is None and dev.count_per_node == 1


def test_gpus_without_nvml_are_described_from_torch(monkeypatch, capsys):
    """Review finding: on a GPU machine without nvidia-ml-py (the optional `gpu` extra) the profile described the
    CPU host (kind cpu, the host's RAM as memory_bytes) while its microbenchmarks ran on the GPU, so planners
    sized memory from the host RAM. torch.cuda's view of the GPUs is used now."""
    import torch

    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(0, fail_init=True))
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=85520809984)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props if i == 0 else pytest.fail("GPU 0"))
    dev, host = inv.inventory()
    err = capsys.readouterr().err
    assert (dev.kind, dev.name, dev.memory_bytes, dev.count_per_node) == ("gpu", "NVIDIA H100 80GB HBM3",
                                                                         85520809984, 8)
    assert dev.sm_clock_mhz is None and dev.topology is None and "gpus" not in host
    assert err == ("NVML unavailable (NVML: NVML Shared Library Not Found); 8 GPU(s) described from torch.cuda "
                   "(no clocks, NVLink or topology: pip install nvidia-ml-py for those)\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dev, _ = inv.inventory()
    assert dev.kind == "cpu" and "describing the CPU host" in capsys.readouterr().err


def test_gpus_torch_cannot_use_leave_the_cpu_host_described(monkeypatch, capsys):
    """NVML answers for the driver, torch for the process: with a CPU-only torch build, a driver too old for
    torch's CUDA or CUDA_VISIBLE_DEVICES="" the benchmarks ran on the CPU while the profile named 8 H100s (and the
    host's RAM was not split per rank). The CPU host is described now, with one line saying why."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(8))
    _torch_sees(monkeypatch, 0)
    dev, host = inv.inventory()
    err = capsys.readouterr().err
    assert dev.kind == "cpu" and "cores" in dev.name and dev.memory_bytes == inv.cpu_inventory().memory_bytes
    assert err.count("\n") == 1 and err.startswith("NVML describes 8 GPU(s) (NVIDIA Fake100) but torch cannot use "
                                                   "any") and err.endswith("describing the CPU host\n"), err
    assert host["gpus"] == ["NVIDIA Fake100"] * 8  # what NVML saw stays in the host facts


@pytest.mark.parametrize("count, name", [(2, "NVIDIA Fake100"), (4, "NVIDIA Other50")])
def test_gpus_hidden_or_reordered_by_cuda_visible_devices_are_described_from_torch(monkeypatch, capsys, count,
                                                                                    name):
    """NVML ignores CUDA_VISIBLE_DEVICES: with 2 of 4 GPUs visible the profile said 4 per node, and on a node
    with mixed GPUs NVML's GPU 0 (PCI order) named a card this process does not measure."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(4))
    _torch_sees(monkeypatch, count, name, memory=24 * 2**30)
    dev, _ = inv.inventory()
    err = capsys.readouterr().err
    assert (dev.kind, dev.name, dev.memory_bytes, dev.count_per_node) == ("gpu", name, 24 * 2**30, count)
    assert dev.driver == "580.1" and dev.sm_clock_mhz is None and dev.topology is None
    assert err == (f"NVML's GPU 0 and count (NVIDIA Fake100, 4) differ from what torch uses ({name}, {count}; "
                   "CUDA_VISIBLE_DEVICES?): described from torch.cuda\n"), err
