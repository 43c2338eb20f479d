"""What a non-editable install on another Python or without Triton met (h51): pydantic before 2.10 on the 'model_'
fields, a 'created' time ending in Z on Python 3.10, the MoE kernels' error without triton, a launch module that
could not run with -m, and kernel-bench rows that ran without Triton unlabelled."""

import datetime as datetime_module
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys

import pytest
import torch
from pydantic import BaseModel

from adasched.planner.plan import Plan
from adasched.profiler.io import check_iso_time, parse_iso_time


def _models():
    seen = {}
    for sub in ("planner", "profiler", "runtime", "schedules"):
        pkg = importlib.import_module(f"adasched.{sub}")
        for info in pkgutil.walk_packages(pkg.__path__, f"adasched.{sub}."):
            if info.name.endswith(".__main__"):  # (runs the CLI)
                continue
            mod = importlib.import_module(info.name)
            for _, cls in inspect.getmembers(mod, inspect.isclass):
                if issubclass(cls, BaseModel) and cls.__module__.startswith("adasched."):
                    seen[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return seen


def test_model_prefixed_fields_are_outside_pydantics_protected_namespace():
    """pydantic 2.0 refused a field named model_costs / model_shape at import (every command a traceback); 2.1 to
    2.9 warned on every command (a bad-input error became 9 lines). Each model with such a field opts out."""
    models = _models()
    assert "adasched.profiler.profile.ClusterProfile" in models and "adasched.planner.flexsp.plan.SPPlan" in models
    prefixed = {name: [f for f in cls.model_fields if f.startswith("model_")] for name, cls in models.items()}
    prefixed = {name: fs for name, fs in prefixed.items() if fs}
    assert set(prefixed) >= {"adasched.profiler.profile.ClusterProfile", "adasched.planner.flexsp.plan.SPPlan"}
    for name, fs in prefixed.items():
        assert models[name].model_config.get("protected_namespaces") == (), (name, fs)


class _Py310Datetime(datetime_module.datetime):
    """fromisoformat as Python 3.10 had it: no trailing Z."""

    @classmethod
    def fromisoformat(cls, v):
        if v.endswith(("Z", "z")):
            raise ValueError(f"Invalid isoformat string: {v!r}")
        return super().fromisoformat(v)


@pytest.mark.parametrize("suffix", ["Z", "z"])
def test_a_created_time_in_z_reads_as_utc_on_python_310_too(monkeypatch, suffix):
    monkeypatch.setattr(datetime_module, "datetime", _Py310Datetime)
    v = f"2026-12-05T08:03:28{suffix}"
    assert check_iso_time(v) == v
    t = parse_iso_time(v)
    assert t.utcoffset() == datetime_module.timedelta(0)
    assert (t.year, t.month, t.day, t.hour, t.minute, t.second) == (2026, 12, 5, 8, 3, 28)
    with pytest.raises(ValueError, match="is not an ISO 8601 time"):
        check_iso_time("2026-12-05T08:03:28Q")
    plan = Plan.model_construct(created=v)
    assert plan.made_before("2026-12-05T08:03:29+00:00") and not plan.made_before("2026-12-05T08:03:28+00:00")


@pytest.mark.parametrize("backend", ["triton", "triton_gmm"])
def test_moe_kernels_without_triton_name_the_missing_package(monkeypatch, backend):
    from adasched.kernels import moe as K

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(K, "HAS_TRITON", False)
    x = torch.randn(5, 8)
    ix = K.make_index(torch.arange(5), torch.tensor([2, 3]), 5)
    with pytest.raises(ValueError, match=f"backend: '{backend}' needs triton, which is not installed"):
        K.permute(x, ix, backend)
    # 'auto' takes the torch path: the same rows, exactly
    assert torch.equal(K.permute(x, ix, "auto"), K.permute_ref(x, ix))


def test_lora_kernel_sweep_runs_as_a_module():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "adasched.launch.lora_kernel_sweep", "--help"], env=env,
                         capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "--only" in out.stdout


def test_bench_rows_say_when_triton_is_missing(monkeypatch):
    from adasched.kernels import bench

    real = importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name, *a: None if name == "triton" else
                        real(name, *a))
    a = torch.randn(16, 16)
    case = bench.BenchCase(name="mm", shape="16x16", providers={"base": lambda: a @ a, "other": lambda: a + a},
                           baseline="base", note="a note")
    rows = bench._run_case("g", case, "cpu", True)
    assert [r["provider"] for r in rows] == ["base", "other"]
    for r in rows:
        assert r["note"].startswith("a note; triton is not installed: these providers ran without Triton")
    monkeypatch.setattr(bench.importlib.util, "find_spec", real)
    assert [r["note"] for r in bench._run_case("g", case, "cpu", True)] == ["a note", "a note"]
