"""MoE kernel-bench contract: cases/checks run on the CPU; the providers compute the same layer."""
import torch

from adasched.runtime.moe import bench as moe_bench
from adasched.kernels.bench import BenchCase


def test_checks_pass_on_cpu_interpreter():
    rows = moe_bench.checks("cpu")
    assert len(rows) == 4 and "triton_gmm" in rows[3][0]
    assert [r[0].split()[2:4] for r in rows[:3]] == [["swiglu", "float32"], ["gelu", "float16"], ["gelu", "float32"]]
    for name, ok, detail in rows:
        assert ok, f"{name}: {detail}"


def test_cpu_checks_catch_a_tanh_approximated_gelu(monkeypatch):
    """(h48) the float16 GELU check alone passed GELU's tanh approximation (the kernels promise the erf form): the
    float32 one refuses it."""
    import torch.nn.functional as F

    from adasched.kernels import moe as K

    real_fwd, real_bwd = K.activation_triton, K.activation_backward_triton

    def fwd(a, act):
        return F.gelu(a.float(), approximate="tanh").to(a.dtype) if act == "gelu" else real_fwd(a, act)

    def bwd(a, dh, act):
        if act != "gelu":
            return real_bwd(a, dh, act)
        with torch.enable_grad():
            a_ = a.float().requires_grad_(True)
            h = F.gelu(a_, approximate="tanh")
            (da,) = torch.autograd.grad(h, a_, dh.float())
        return da.to(a.dtype), h.detach().to(a.dtype)

    monkeypatch.setattr(K, "activation_triton", fwd)
    monkeypatch.setattr(K, "activation_backward_triton", bwd)
    rows = {r[0].split()[2] + " " + r[0].split()[3]: r[1] for r in moe_bench.checks("cpu")}
    assert rows["gelu float32"] is False
    assert rows["swiglu float32"] is True


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
