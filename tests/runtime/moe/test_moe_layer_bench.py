"""MoE kernel-bench contract: cases/checks run on the CPU; the providers compute the same layer."""
import torch

from adasched.runtime.moe import bench as moe_bench
from adasched.kernels.bench import BenchCase


def test_checks_pass_on_cpu_interpreter():
    rows = moe_bench.checks("cpu")
    assert len(rows) == 3 and "triton_gmm" in rows[2][0]
    for name, ok, detail in rows:
        assert ok, f"{name}: {detail}"


def test_cases_and_providers_agree():
    gpu = moe_bench.cases(False, "cuda")            # only described, not built (no GPU here)
    assert [(c.params["E"], c.params["k"], c.params["hidden"], c.params["ffn"], c.params["T"]) for c in gpu] == \
        [(8, 2, 2048, 4096, 16384), (64, 6, 4096, 3584, 16384)]
    (case,) = moe_bench.cases(True, "cpu")
    assert isinstance(case, BenchCase) and case.baseline == "dense"
    prov = case.providers()
    assert {"dense", "naive", "ours", "ours_gmm"} <= set(prov)
    g_naive, g_ours = prov["naive"](), prov["ours"]()
    assert len(g_naive) == len(g_ours) == 4          # dx, router, w1, w2
    for a, b in zip(g_naive, g_ours):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    for a, b in zip(g_naive, prov["ours_gmm"]()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    assert all(g.abs().sum() > 0 for g in prov["dense"]())
