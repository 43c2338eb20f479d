"""float8 inputs are refused by name (h48): under the Triton interpreter the kernels' float32 -> float8 store drops
the carry when rounding crosses a power of two (gemm returned 1.0 where the product was 1.977, up to 50 % off), and
torch's own matmul has no float8 either. And a knobs dict passed as gemm's config gets a line saying what to pass
(it was an AttributeError about 'persistent')."""

import pytest
import torch

from adasched.kernels import lora as L
from adasched.kernels import moe as K
from adasched.kernels.gemm import GemmConfig, computable_float, gemm, gemm_autograd

FLOAT8 = [d for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                        "float8_e5m2fnuz")) if d is not None]
LINE = "is not float16, bfloat16, float32 or float64"


def _f8(t, dtype):
    return t.to(dtype)


def test_computable_float_is_exactly_the_four_dtypes():
    ok = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
    every = [v for v in vars(torch).values() if isinstance(v, torch.dtype)]
    assert ok <= set(every) and set(FLOAT8) <= set(every)
    for d in every:
        assert computable_float(d) == (d in ok), d


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_gemm_refuses_float8(dtype):
    a, b = torch.randn(20, 33), torch.randn(33, 17)
    for fn in (gemm, gemm_autograd):
        with pytest.raises(ValueError, match=f"gemm: {dtype} {LINE}"):
            fn(_f8(a, dtype), _f8(b, dtype))


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_moe_ops_refuse_float8(dtype, backend):
    T, E, H, F = 7, 3, 8, 4
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    ex = torch.randint(0, E, (T,), generator=g)
    order = torch.argsort(ex, stable=True)
    idx = K.make_index(order, torch.bincount(ex, minlength=E), T)
    x8 = _f8(torch.randn(T, H, generator=g), dtype)
    with pytest.raises(ValueError, match=f"permute: {dtype} {LINE}"):
        K.permute(x8, idx, backend)
    with pytest.raises(ValueError, match=f"unpermute: {dtype} {LINE}"):
        K.unpermute(x8, torch.rand(T, generator=g), idx, backend)
    with pytest.raises(ValueError, match=f"grouped_mm: {dtype} {LINE}"):
        K.grouped_mm(x8, _f8(torch.randn(E, H, F, generator=g), dtype), idx, backend)
    with pytest.raises(ValueError, match=f"{dtype} {LINE}"):
        K.expert_mlp(x8, _f8(torch.randn(E, H, 2 * F, generator=g), dtype), _f8(torch.randn(E, F, H, generator=g),
                                                                                     dtype), idx, "swiglu", backend)
    with pytest.raises(ValueError, match=f"activation_triton: {dtype} {LINE}"):
        K.activation_triton(_f8(torch.randn(T, 2 * F, generator=g), dtype), "swiglu")


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_lora_refuses_float8_x_weight_and_adapters(dtype):
    x, w = torch.randn(6, 8), torch.randn(5, 8)
    a, b = torch.randn(2, 8), torch.randn(5, 2)
    for fn in (L.lora_linear, L.lora_linear_reference):
        with pytest.raises(ValueError, match=f"x: {dtype} {LINE}"):
            fn(_f8(x, dtype), _f8(w, dtype), a, b, 0.5)
    ads = [L.LoRAAdapterWeights(lora_a=_f8(a, dtype), lora_b=b, scale=0.5)]
    for fn in (L.multi_lora_linear, L.multi_lora_linear_reference):
        with pytest.raises(ValueError, match=f"adapters\\[0\\].lora_a: {dtype} {LINE}"):
            fn(x, w, ads, [(0, 0, 6)])
        with pytest.raises(ValueError, match=f"x: {dtype} {LINE}"):
            fn(_f8(x, dtype), _f8(w, dtype), [L.LoRAAdapterWeights(lora_a=a, lora_b=b, scale=0.5)], [(0, 0, 6)])


def test_gemm_config_dict_gets_one_line_naming_what_to_pass():
    a, b = torch.randn(3, 3), torch.randn(3, 2)
    for fn in (gemm, gemm_autograd):
        with pytest.raises(ValueError, match="gemm: config is a dict, not a GemmConfig .*GemmConfig.from_knobs"):
            fn(a, b, {"block_m": 16})
    # the documented route works, and gives the product
    cfg = GemmConfig.from_knobs({"num_stages": 3, "num_warps": 4}, block_m=16, block_n=16, block_k=16)
    a, b = torch.randn(37, 21), torch.randn(21, 19)
    torch.testing.assert_close(gemm(a, b, cfg), (a.double() @ b.double()).float(), rtol=1e-5, atol=1e-5)
