"""An MoE index on another device than its rows (a meta index from a shape pass, an index built on the CPU for
GPU rows) is one ValueError naming the function, the index's device and the input's; it failed inside torch's
indexing before, with an error that named neither."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from adasched.kernels import moe


def _index(device: str, T: int = 6, k: int = 2, E: int = 3):
    g = torch.Generator().manual_seed(11)
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    order = torch.argsort(experts.reshape(-1), stable=True)
    token_idx = (torch.arange(T * k) // k)[order]
    counts = torch.bincount(experts.reshape(-1), minlength=E)
    index = moe.make_index(token_idx, counts, T)
    if device == "cpu":
        return index
    # (make_index has no meta kernels to run on: the fields moved as a shape pass would have them)
    return dataclasses.replace(index, **{f: getattr(index, f).to(device) for f in
                                         ("src_token", "counts", "offsets", "tok_perm", "tok_offsets")})


@pytest.mark.parametrize("where", ["index", "gate"])
def test_a_meta_index_or_gate_is_one_value_error(where):
    T, H, E = 6, 5, 3
    cpu = _index("cpu")
    meta = _index("meta") if where == "index" else cpu
    x = torch.randn(T, H)
    y = torch.randn(cpu.num_rows, H)
    gate = torch.rand(cpu.num_rows, device="meta" if where == "gate" else "cpu")
    w = torch.randn(E, H, 4)
    calls = {"unpermute": lambda: moe.unpermute(y, gate, meta)}
    if where == "index":
        calls.update(permute=lambda: moe.permute(x, meta), grouped_mm=lambda: moe.grouped_mm(y, w, meta))
    for name, call in calls.items():
        thing = "the index" if where == "index" else "gate"
        with pytest.raises(ValueError, match=rf"^{name}: {thing} is on meta, the input on cpu; build the index on "
                                             r"the input's device$"):
            call()


def test_the_same_device_still_runs_the_kernels():
    """Rows and index on one device pass the check: the Triton permute and unpermute (interpreter) equal a gather
    and a per-token weighted sum."""
    T, H = 6, 5
    index = _index("cpu")
    x = torch.randn(T, H)
    torch.testing.assert_close(moe.permute(x, index, backend="triton"), x[index.src_token], rtol=0, atol=0)
    y, gate = torch.randn(index.num_rows, H), torch.rand(index.num_rows)
    want = torch.zeros(T, H, dtype=torch.float64).index_add_(0, index.src_token, (y * gate[:, None]).double())
    torch.testing.assert_close(moe.unpermute(y, gate, index, backend="triton"), want.float(), rtol=1e-6, atol=1e-6)
