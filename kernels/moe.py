"""MoE token permute / unpermute and grouped GEMM over uneven expert batches (Triton + torch references).

Data layout. A routing gives N assignments (token, expert, gate) sorted by (expert, token) (see
``adasched.runtime.moe.router``). :func:`make_index` turns them into a :class:`MoEIndex`:

- ``src_token`` (N,): token of each sorted row; ``counts``/``offsets`` (E,)/(E+1,): rows per expert;
- ``tok_perm``/``tok_offsets``: the same rows grouped by token (CSR), so the combine is a gather-sum
  without atomics.

Ops (each: Triton kernel, host launcher, autograd.Function, torch reference):

- ``permute(x, index)``: rows ``x[src_token]`` (T,H) -> (N,H). Backward = segment sum by token.
- ``unpermute(y, gate, index)``: ``out[t] = sum_{rows r of t} gate[r] * y[r]`` (N,H) -> (T,H). Backward:
  ``dy = gate * dout[src_token]``, ``dgate[r] = <dout[src_token[r]], y[r]>`` (one gather kernel).
- ``grouped_mm(x, w, index)``: ``y[rows of e] = x[rows of e] @ w[e]``, x (N,K), w (E,K,M). A host tile
  schedule lists (expert, first row) per BLOCK_M tile, so uneven and empty experts cost nothing.
  Backward: ``dx`` is the same kernel on ``w`` transposed (a stride view); ``dw[e] = x_e^T dy_e`` is a
  second kernel reducing over each expert's rows (an expert with 0 rows gets a zero gradient).
- ``activation_triton(a, activation)`` / ``activation_backward_triton(a, dh, activation)``: fused SwiGLU / GELU
  (erf form) and their gradients, one pass each (the backward re-emits h for the w2 gradient).
- ``expert_mlp(x, w1, w2, index, activation)``: SwiGLU (w1 (E,H,2F) = [gate | up], w2 (E,F,H)) or GELU
  (w1 (E,H,F), w2 (E,F,H)) experts on the sorted rows. :func:`expert_mlp_forward` /
  :func:`expert_mlp_backward` are exposed so the expert-parallel runtime can run the backward on
  re-chunked rows from saved activations.

Backends: "triton" (these kernels), "torch" (the references), "triton_gmm" (these permute / activation / combine
kernels with every expert GEMM - forward, dgrad, wgrad - on ``torch._grouped_mm``, cuBLAS/CUTLASS grouped GEMM;
shapes that are not 16-byte aligned fall back to the Triton GEMMs), "auto" (on a GPU: "triton_gmm" where torch
has ``_grouped_mm``, measured faster on an H200; under the interpreter: "triton"; else "torch").

All kernels load in the tensor's dtype and accumulate in float32; under ``TRITON_INTERPRET=1`` (CPU) the
GEMM operands are cast to float32 after loading (the interpreter's low-precision dot is unreliable) and
the block sizes are small and fixed (no autotune). If Triton cannot run (no GPU and no interpreter) the
torch references are used.
"""
from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .gemm import computable_float, first_order_only, float_dtype_error

try:  # optional dependency: a CPU-only install still imports this module
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only without triton
    HAS_TRITON = False

__all__ = [
    "MoEIndex", "make_index", "permute", "unpermute", "grouped_mm", "expert_mlp",
    "expert_mlp_forward", "expert_mlp_backward", "expert_mlp_backward_data", "expert_mlp_backward_weight",
    "ExpertWgradInputs", "permute_ref", "unpermute_ref", "grouped_mm_ref",
    "expert_mlp_ref", "triton_usable", "Backend", "BACKENDS", "activation_triton", "activation_backward_triton",
    "grouped_mm_gmm", "grouped_wgrad_gmm", "gmm_aligned", "gemm_engine",
]

Backend = Literal["auto", "triton", "triton_gmm", "torch"]
#: "triton_gmm": the Triton permute / activation / combine kernels with the expert GEMMs on
#: ``torch._grouped_mm`` (cuBLAS/CUTLASS grouped GEMM on a GPU) instead of our Triton grouped GEMM kernels.
BACKENDS = ("auto", "triton", "triton_gmm", "torch")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(t: torch.Tensor) -> bool:
    """True when the Triton path can run on ``t``'s device (GPU, or CPU under the interpreter)."""
    return HAS_TRITON and (t.is_cuda or (t.device.type == "cpu" and _interpreting()))


def _pick(backend: Backend, t: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    if backend == "triton_gmm" and not hasattr(torch, "_grouped_mm"):
        raise ValueError(f"backend: 'triton_gmm' needs torch._grouped_mm (torch {torch.__version__} has none)")
    if backend in ("triton", "triton_gmm"):
        if not HAS_TRITON:  # (the line below blamed TRITON_INTERPRET when it was set: h51)
            raise ValueError(f"backend: {backend!r} needs triton, which is not installed (pip install "
                             "'adasched[gpu]', or backend='torch')")
        if not triton_usable(t):
            raise ValueError(f"backend: 'triton' cannot run on device {t.device} "
                             "(needs a GPU or TRITON_INTERPRET=1)")
        return True
    return triton_usable(t)


# ---------------------------------------------------------------------------------------------------
# index
# ---------------------------------------------------------------------------------------------------
@dataclass
class MoEIndex:
    """Row bookkeeping for N sorted assignments over E experts and T tokens."""

    src_token: torch.Tensor      # (N,) int64
    counts: torch.Tensor         # (E,) int64
    offsets: torch.Tensor        # (E+1,) int64
    tok_perm: torch.Tensor       # (N,) int64 rows ordered by token
    tok_offsets: torch.Tensor    # (T+1,) int64
    num_tokens: int
    _tiles: dict | None = None

    @property
    def num_experts(self) -> int:
        return self.counts.numel()

    @property
    def num_rows(self) -> int:
        return self.src_token.numel()

    def tiles(self, block_m: int):
        """(tile_expert, tile_row) int32 for BLOCK_M row tiles over the experts' segments (cached)."""
        if self._tiles is None:
            self._tiles = {}
        if block_m not in self._tiles:
            per = (self.counts + block_m - 1) // block_m
            n = int(per.sum())
            te = torch.repeat_interleave(torch.arange(self.num_experts, device=per.device), per)
            first = torch.cumsum(per, 0) - per
            within = torch.arange(n, device=per.device) - first[te]
            tr = self.offsets[:-1][te] + within * block_m
            self._tiles[block_m] = (te.to(torch.int32).contiguous(), tr.to(torch.int32).contiguous())
        return self._tiles[block_m]


def make_index(token_idx: torch.Tensor, counts: torch.Tensor, num_tokens: int) -> MoEIndex:
    """Index for assignments already sorted by expert (``counts[e]`` rows of expert e, in order)."""
    if token_idx.is_floating_point() or token_idx.is_complex() or counts.is_floating_point() or counts.is_complex():
        raise ValueError(f"make_index: token ids ({token_idx.dtype}) and counts ({counts.dtype}) must be integer "
                         f"tensors")
    if token_idx.dim() != 1 or counts.dim() != 1:  # (bincount's / expand's RuntimeErrors from inside)
        raise ValueError(f"make_index: token ids {tuple(token_idx.shape)} and counts {tuple(counts.shape)} must be "
                         f"1-D")
    try:
        n_tok = operator.index(num_tokens)  # (an int, numpy integer or integer 0-d tensor)
    except TypeError:
        n_tok = None
    if n_tok is None or isinstance(num_tokens, bool) or n_tok < 0:  # (-1: bincount's "minlength should be >= 0")
        raise ValueError(f"make_index: num_tokens must be an integer >= 0, got {num_tokens!r}")
    num_tokens = n_tok
    token_idx = token_idx.to(torch.int64)
    counts = counts.to(torch.int64)
    # (a negative count made offsets that run past the rows: the grouped GEMM wrote beyond its output)
    if counts.numel() and counts.device.type == "cpu" and int(counts.min()) < 0:
        raise ValueError(f"make_index: expert count {int(counts.min())} is negative")
    # (an id >= num_tokens made bincount longer than tok_offsets: "the expanded size of the tensor (3) must match";
    # checked where it costs nothing - on a GPU min/max would wait for the device)
    if token_idx.numel() and token_idx.device.type == "cpu":
        lo, hi = int(token_idx.min()), int(token_idx.max())
        if lo < 0 or hi >= num_tokens:
            raise ValueError(f"make_index: token id {lo if lo < 0 else hi} is outside [0, num_tokens={num_tokens})")
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    offsets[1:] = torch.cumsum(counts, 0)
    tok_perm = torch.argsort(token_idx, stable=True)
    tok_offsets = torch.zeros(num_tokens + 1, dtype=torch.int64, device=token_idx.device)
    tok_offsets[1:] = torch.cumsum(torch.bincount(token_idx, minlength=num_tokens), 0)
    return MoEIndex(token_idx.contiguous(), counts, offsets, tok_perm.contiguous(), tok_offsets, num_tokens)


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------
if HAS_TRITON:
    from .gemm import dot_acc  # fp32 operands in IEEE fp32, not Triton's TF32 default

    @triton.jit
    def _gather_rows_kernel(src_ptr, idx_ptr, scale_ptr, out_ptr, dot_ptr, dot_out_ptr, H,
                            stride_src, stride_out, stride_dot,
                            HAS_SCALE: tl.constexpr, HAS_DOT: tl.constexpr, BLOCK_H: tl.constexpr):
        """out[r] = scale[r] * src[idx[r]]; optionally dot_out[r] = <src[idx[r]], dot[r]>."""
        r = tl.program_id(0)
        s = tl.load(idx_ptr + r).to(tl.int64)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + r).to(tl.float32)
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs = h0 + tl.arange(0, BLOCK_H)
            m = offs < H
            v = tl.load(src_ptr + s * stride_src + offs, mask=m, other=0.0).to(tl.float32)
            if HAS_DOT:
                d = tl.load(dot_ptr + r.to(tl.int64) * stride_dot + offs, mask=m, other=0.0).to(tl.float32)
                acc += v * d
            if HAS_SCALE:
                v = v * sc
            tl.store(out_ptr + r.to(tl.int64) * stride_out + offs, v.to(out_ptr.dtype.element_ty), mask=m)
        if HAS_DOT:
            tl.store(dot_out_ptr + r, tl.sum(acc, axis=0))

    @triton.jit
    def _segment_sum_kernel(y_ptr, perm_ptr, off_ptr, w_ptr, out_ptr, H, stride_y, stride_out,
                            HAS_W: tl.constexpr, BLOCK_H: tl.constexpr):
        """out[t] = sum_{j in [off[t], off[t+1])} w[perm[j]] * y[perm[j]] (one token, one H block)."""
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        m = offs < H
        start = tl.load(off_ptr + t)
        end = tl.load(off_ptr + t + 1)
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for j in range(start, end):
            row = tl.load(perm_ptr + j).to(tl.int64)
            v = tl.load(y_ptr + row * stride_y + offs, mask=m, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + row).to(tl.float32)
            acc += v
        tl.store(out_ptr + t.to(tl.int64) * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _grouped_mm_kernel(x_ptr, w_ptr, y_ptr, tile_e_ptr, tile_row_ptr, off_ptr, K, M,
                           sxm, sxk, swe, swk, swn, sym, syn,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           CAST_F32: tl.constexpr):
        """One (BLOCK_M rows of one expert) x (BLOCK_N columns) tile of y = x @ w[e]."""
        pid_t = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(tile_e_ptr + pid_t).to(tl.int64)
        row0 = tl.load(tile_row_ptr + pid_t).to(tl.int64)
        row_end = tl.load(off_ptr + e + 1)
        rm = row0 + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < row_end
        n_ok = rn < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            a = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + e * swe + kk[:, None] * swk + rn[None, :] * swn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if CAST_F32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = dot_acc(a, b, acc)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _grouped_wgrad_kernel(x_ptr, dy_ptr, dw_ptr, off_ptr, K, M,
                              sxm, sxk, sdm, sdn, swe, swk, swn,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              CAST_F32: tl.constexpr):
        """dw[e][k-block, n-block] = sum over expert e's rows of x^T dy."""
        e = tl.program_id(0)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        start = tl.load(off_ptr + e)
        end = tl.load(off_ptr + e + 1)
        k_ok = rk < K
        n_ok = rn < M
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            m_ok = rm < end
            a = tl.load(x_ptr + rm[None, :] * sxm + rk[:, None] * sxk, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
            b = tl.load(dy_ptr + rm[:, None] * sdm + rn[None, :] * sdn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            if CAST_F32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = dot_acc(a, b, acc)
        tl.store(dw_ptr + e.to(tl.int64) * swe + rk[:, None] * swk + rn[None, :] * swn,
                 acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])


    @triton.jit
    def _act_fwd_kernel(a_ptr, h_ptr, Fd, stride_a, stride_h, SWIGLU: tl.constexpr, BLOCK: tl.constexpr):
        """h = silu(a[:, :F]) * a[:, F:] (SwiGLU) or gelu(a) (exact erf form), one row block."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < Fd
        g = tl.load(a_ptr + row * stride_a + cols, mask=m, other=0.0).to(tl.float32)
        if SWIGLU:
            u = tl.load(a_ptr + row * stride_a + Fd + cols, mask=m, other=0.0).to(tl.float32)
            h = g * tl.sigmoid(g) * u
        else:
            h = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
        tl.store(h_ptr + row * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _act_bwd_kernel(a_ptr, dh_ptr, da_ptr, h_ptr, Fd, stride_a, stride_dh, stride_da, stride_h,
                        SWIGLU: tl.constexpr, BLOCK: tl.constexpr):
        """da from dh and the saved pre-activation a; also re-emits h (needed for the w2 gradient)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < Fd
        g = tl.load(a_ptr + row * stride_a + cols, mask=m, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + row * stride_dh + cols, mask=m, other=0.0).to(tl.float32)
        if SWIGLU:
            u = tl.load(a_ptr + row * stride_a + Fd + cols, mask=m, other=0.0).to(tl.float32)
            sg = tl.sigmoid(g)
            silu = g * sg
            dg = dh * u * sg * (1.0 + g * (1.0 - sg))
            tl.store(da_ptr + row * stride_da + cols, dg.to(da_ptr.dtype.element_ty), mask=m)
            tl.store(da_ptr + row * stride_da + Fd + cols, (dh * silu).to(da_ptr.dtype.element_ty), mask=m)
            h = silu * u
        else:
            cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
            pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327
            tl.store(da_ptr + row * stride_da + cols, (dh * (cdf + g * pdf)).to(da_ptr.dtype.element_ty), mask=m)
            h = g * cdf
        tl.store(h_ptr + row * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------------
# host launchers
# ---------------------------------------------------------------------------------------------------
def _block_h(H: int, device: torch.device) -> int:
    cap = 1024 if device.type == "cuda" else 64
    return max(16, min(cap, triton.next_power_of_2(H)))


def _gemm_blocks(device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); fixed small tiles off-GPU."""
    if device.type == "cuda":
        return 128, 128, 64, 8, 3
    return 16, 16, 16, 4, 1


def gather_rows(src: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor | None = None,
                dot_with: torch.Tensor | None = None):
    """Triton: out[r] = scale[r] * src[idx[r]] (N,H); with dot_with also returns <src[idx[r]], dot_with[r]>."""
    src = src.contiguous()
    N, H = idx.numel(), src.shape[1]
    out = torch.empty((N, H), dtype=src.dtype, device=src.device)
    dot_out = torch.empty(N, dtype=torch.float32, device=src.device) if dot_with is not None else out
    if N:
        dw = dot_with.contiguous() if dot_with is not None else src
        _gather_rows_kernel[(N,)](
            src, idx.contiguous(), scale.contiguous() if scale is not None else src, out, dw, dot_out, H,
            src.stride(0), out.stride(0), dw.stride(0),
            HAS_SCALE=scale is not None, HAS_DOT=dot_with is not None, BLOCK_H=_block_h(H, src.device))
    return (out, dot_out) if dot_with is not None else out


def segment_sum(y: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, num_out: int,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """Triton: out[t] = sum_{j in [offsets[t], offsets[t+1])} weight[perm[j]] * y[perm[j]] -> (num_out, H)."""
    y = y.contiguous()
    H = y.shape[1]
    out = torch.empty((num_out, H), dtype=y.dtype, device=y.device)
    if num_out:
        bh = _block_h(H, y.device)
        _segment_sum_kernel[(num_out, triton.cdiv(H, bh))](
            y, perm, offsets, weight.contiguous() if weight is not None else y, out, H, y.stride(0), out.stride(0),
            HAS_W=weight is not None, BLOCK_H=bh)
    return out


# On a GPU the two GEMM kernels are autotuned over a few tile shapes (BLOCK_M of the forward kernel stays 128:
# the host tile schedule depends on it). Off-GPU one small fixed configuration is used (no autotune).
_GPU_BLOCK_M = 128
_TUNED: dict = {}
AUTOTUNE_ERRORS: list[str] = []   # an autotune failure falls back to the fixed tiles and is recorded here


def _tuned(name: str):
    if name not in _TUNED:
        if name == "mm":
            cfgs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                    for bn, bk, w, st in ((128, 64, 8, 3), (128, 64, 4, 4), (256, 64, 8, 3), (128, 128, 8, 3),
                                          (64, 64, 4, 4))]
            _TUNED[name] = triton.autotune(configs=cfgs, key=["K", "M", "swk"])(_grouped_mm_kernel)
        else:
            cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                    for bm, bn, bk, w, st in ((64, 128, 128, 8, 3), (64, 128, 64, 4, 4), (32, 128, 128, 8, 3),
                                              (64, 64, 64, 4, 4), (128, 128, 64, 8, 3))]
            _TUNED[name] = triton.autotune(configs=cfgs, key=["K", "M", "sxk"])(_grouped_wgrad_kernel)
    return _TUNED[name]


def _one_dtype(what: str, *tensors: torch.Tensor) -> None:
    """The expert GEMMs take operands of one dtype, as tl.dot and torch._grouped_mm on a GPU do. Under the
    interpreter the kernels cast both operands to float32, which would hide a mix the GPU refuses to compile."""
    if len({t.dtype for t in tensors}) > 1:
        raise ValueError(f"{what}: operand dtypes differ ({', '.join(str(t.dtype) for t in tensors)}); "
                         "cast them to one dtype")


def _check_operands(what: str, x: torch.Tensor, w: torch.Tensor, index: MoEIndex) -> None:
    """x (N, K) rows the index describes, w (E, K, M) of its experts (the launchers are public: x of more rows
    than the index came back with uninitialised rows, of fewer wrote past the output - heap corruption)."""
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"{what}: x {tuple(x.shape)} and w {tuple(w.shape)} do not multiply (x (N, K), w (E, K, M))")
    if index.num_experts != w.shape[0]:
        raise ValueError(f"{what}: index has {index.num_experts} experts, weight has {w.shape[0]}")
    _check_index(what, index, x)


def _check_wgrad_operands(x: torch.Tensor, dy: torch.Tensor, index: MoEIndex) -> None:
    """x (N, K) and dy (N, M), the N rows the index describes (the kernel read rows of both past a short one)."""
    if x.dim() != 2 or dy.dim() != 2 or x.shape[0] != dy.shape[0]:
        raise ValueError(f"grouped_wgrad: x {tuple(x.shape)} and dy {tuple(dy.shape)} must be 2-D with one row "
                         f"count")
    _check_index("grouped_wgrad", index, x)


def grouped_mm_triton(x: torch.Tensor, w: torch.Tensor, index: MoEIndex) -> torch.Tensor:
    """Triton: y (N,M) with y[rows of e] = x[rows of e] @ w[e]; w (E,K,M), any strides."""
    _check_operands("grouped_mm", x, w, index)
    _one_dtype("grouped_mm", x, w)
    N, K = x.shape
    M = w.shape[2]
    y = torch.empty((N, M), dtype=x.dtype, device=x.device)
    if N == 0:
        return y
    args = (x, w, y)
    strides = (x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1))
    if x.device.type == "cuda" and not AUTOTUNE_ERRORS:
        te, tr = index.tiles(_GPU_BLOCK_M)
        try:
            _tuned("mm")[lambda meta: (te.numel(), triton.cdiv(M, meta["BLOCK_N"]))](
                *args, te, tr, index.offsets, K, M, *strides, BLOCK_M=_GPU_BLOCK_M, CAST_F32=False)
            return y
        except Exception as err:  # pragma: no cover - GPU only
            AUTOTUNE_ERRORS.append(f"grouped_mm: {type(err).__name__}: {err}"[:300])
    bm, bn, bk, warps, stages = _gemm_blocks(x.device)
    te, tr = index.tiles(bm)
    _grouped_mm_kernel[(te.numel(), triton.cdiv(M, bn))](
        *args, te, tr, index.offsets, K, M, *strides, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        CAST_F32=x.device.type != "cuda", num_warps=warps, num_stages=stages)
    return y


def grouped_wgrad_triton(x: torch.Tensor, dy: torch.Tensor, index: MoEIndex, num_experts: int) -> torch.Tensor:
    """Triton: dw (E,K,M) with dw[e] = x[rows of e]^T @ dy[rows of e] (float32 accumulation, x's dtype)."""
    if index.num_experts != num_experts:
        raise ValueError(f"grouped_wgrad: index has {index.num_experts} experts, expected {num_experts}")
    _check_wgrad_operands(x, dy, index)
    _one_dtype("grouped_wgrad", x, dy)
    K, M = x.shape[1], dy.shape[1]
    dw = torch.empty((num_experts, K, M), dtype=x.dtype, device=x.device)
    args = (x, dy, dw, index.offsets, K, M, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
            dw.stride(0), dw.stride(1), dw.stride(2))
    if x.device.type == "cuda" and not AUTOTUNE_ERRORS:
        try:
            _tuned("wgrad")[lambda meta: (num_experts, triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(M, meta["BLOCK_N"]))](
                *args, CAST_F32=False)
            return dw
        except Exception as err:  # pragma: no cover - GPU only
            AUTOTUNE_ERRORS.append(f"grouped_wgrad: {type(err).__name__}: {err}"[:300])
    bm, bn, bk, warps, stages = _gemm_blocks(x.device)
    _grouped_wgrad_kernel[(num_experts, triton.cdiv(K, bk), triton.cdiv(M, bn))](
        *args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, CAST_F32=x.device.type != "cuda",
        num_warps=warps, num_stages=stages)
    return dw


def _gmm_offsets(index: MoEIndex) -> torch.Tensor:
    return index.offsets[1:].to(torch.int32)


def grouped_mm_gmm(x: torch.Tensor, w: torch.Tensor, index: MoEIndex) -> torch.Tensor:
    """``torch._grouped_mm``: y (N,M) with y[rows of e] = x[rows of e] @ w[e]; w (E,K,M)."""
    _check_operands("grouped_mm", x, w, index)
    _one_dtype("grouped_mm", x, w)
    if x.shape[0] == 0 and w.shape[0] > 0:  # an EP chunk that brought no rows (see grouped_wgrad_gmm); a plain
        return x.matmul(w[0])                 # (0, K) @ (K, M) keeps the result in autograd's graph
    return torch._grouped_mm(x, w, offs=_gmm_offsets(index))


def grouped_wgrad_gmm(x: torch.Tensor, dy: torch.Tensor, index: MoEIndex, num_experts: int) -> torch.Tensor:
    """``torch._grouped_mm`` over the shared row dimension: dw[e] = x[rows of e]^T @ dy[rows of e]."""
    if index.num_experts != num_experts:
        raise ValueError(f"grouped_wgrad: index has {index.num_experts} experts, expected {num_experts}")
    _check_wgrad_operands(x, dy, index)
    _one_dtype("grouped_wgrad", x, dy)
    if x.shape[0] == 0:
        # no rows (an EP chunk that brought none, common with r_bwd > 1 on small batches): every dw[e] is 0. A
        # zero-length contraction operand is refused by CUDA's _grouped_mm stride checks (pytorch/pytorch#192497,
        # on the 2D x 3D form; this 2D x 2D call is not confirmed on a GPU either way) - not asked at all now
        return x.new_zeros((num_experts, x.shape[1], dy.shape[1]))
    return torch._grouped_mm(x.t(), dy, offs=_gmm_offsets(index))


def gmm_aligned(*tensors: torch.Tensor, check_ptr: bool = True) -> bool:
    """``torch._grouped_mm`` needs 16-byte aligned data, one of the last two dims of unit stride and every other
    stride a multiple of 16 bytes (whatever the dim's size: a (N, 1) operand, hidden or FFN size 1, was judged
    aligned and _grouped_mm refused its strides), and no broadcast (stride-0) dims; other shapes take our kernels.
    ``check_ptr=False``: strides only (what a ``torch.compile`` trace can see)."""
    for t in tensors:
        es, st = t.element_size(), t.stride()
        if check_ptr and t.data_ptr() % 16:
            return False
        if t.dim() < 2 or any(s == 0 and n > 1 for s, n in zip(st, t.shape)):
            return False
        lead, last = st[-2], st[-1]
        if not ((last == 1 and (lead * es) % 16 == 0) or (lead == 1 and (last * es) % 16 == 0)):
            return False
        if any((s * es) % 16 for s in st[:-2]):
            return False
    return True


def gemm_engine(backend: Backend, x: torch.Tensor) -> str:
    """Which expert-GEMM engine a Triton-path backend uses on ``x``: "triton_gmm" when asked for, and for
    "auto" on a GPU whose torch has ``torch._grouped_mm`` (on an H200, 2026-11-28, the layer fwd+bwd was 1.21x /
    1.13x a FLOP-matched dense MLP with it against 1.57x / 1.61x with our Triton grouped GEMM); else "triton"."""
    if backend == "triton_gmm" or (backend == "auto" and x.is_cuda and hasattr(torch, "_grouped_mm")):
        return "triton_gmm"
    return "triton"


#: dtypes torch._grouped_mm takes (float64 raised "Expected mat_a to be Float32, BFloat16 or Float16")
GMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _mm(x, w, index, backend):
    if backend == "triton_gmm" and x.dtype in GMM_DTYPES and gmm_aligned(x, w):
        return grouped_mm_gmm(x, w, index)
    return grouped_mm_triton(x, w, index)


def _wgrad(x, dy, index, num_experts, backend):
    if backend == "triton_gmm" and x.dtype in GMM_DTYPES and gmm_aligned(x, dy):
        return grouped_wgrad_gmm(x, dy, index, num_experts)
    return grouped_wgrad_triton(x, dy, index, num_experts)


ACTIVATIONS = ("swiglu", "gelu")


def _check_activation(activation) -> None:
    if activation not in ACTIVATIONS:  # (every other name computed GELU silently on both backends)
        raise ValueError(f"activation: {activation!r} is not 'swiglu' or 'gelu'")


def _act_width(a: torch.Tensor, activation: str, who: str) -> int:
    """The activation's output width for a pre-activation ``a`` (N, 2F) (SwiGLU) or (N, F) (GELU)."""
    _check_activation(activation)
    if not computable_float(a.dtype):  # (int32 came back as truncated zeros; the reference raises)
        raise ValueError(float_dtype_error(who, a.dtype))
    if a.dim() != 2 or (activation == "swiglu" and a.shape[1] % 2):
        form = "2F" if activation == "swiglu" else "F"
        raise ValueError(f"{who}: pre-activation of shape {tuple(a.shape)} is not (N, {form})")
    return a.shape[1] // 2 if activation == "swiglu" else a.shape[1]


def activation_triton(a: torch.Tensor, activation: str) -> torch.Tensor:
    """Triton: SwiGLU (a (N,2F) -> (N,F)) or GELU (a (N,F) -> (N,F)) in float32 math, a's dtype out."""
    _act_width(a, activation, "activation_triton")
    a = a.contiguous()
    N = a.shape[0]
    Fd = a.shape[1] // 2 if activation == "swiglu" else a.shape[1]
    h = torch.empty((N, Fd), dtype=a.dtype, device=a.device)
    if N and Fd:
        bl = _block_h(Fd, a.device)
        _act_fwd_kernel[(N, triton.cdiv(Fd, bl))](a, h, Fd, a.stride(0), h.stride(0),
                                                  SWIGLU=activation == "swiglu", BLOCK=bl)
    return h


def activation_backward_triton(a: torch.Tensor, dh: torch.Tensor, activation: str):
    """Triton: (da, h) from the pre-activation a and the output gradient dh."""
    width = _act_width(a, activation, "activation_backward_triton")
    if dh.dim() != 2 or tuple(dh.shape) != (a.shape[0], width):  # (the kernel read past a's rows)
        raise ValueError(f"activation_backward_triton: dh {tuple(dh.shape)} is not ({a.shape[0]}, {width}) for a "
                         f"{tuple(a.shape)} ({activation})")
    a, dh = a.contiguous(), dh.contiguous()
    N, Fd = dh.shape
    da = torch.empty_like(a)
    h = torch.empty((N, Fd), dtype=a.dtype, device=a.device)
    if N and Fd:
        bl = _block_h(Fd, a.device)
        _act_bwd_kernel[(N, triton.cdiv(Fd, bl))](a, dh, da, h, Fd, a.stride(0), dh.stride(0), da.stride(0),
                                                  h.stride(0), SWIGLU=activation == "swiglu", BLOCK=bl)
    return da, h


# ---------------------------------------------------------------------------------------------------
# torch references (same signatures; also the fallback path)
# ---------------------------------------------------------------------------------------------------
def permute_ref(x: torch.Tensor, index: MoEIndex) -> torch.Tensor:
    """(T,H) -> (N,H) rows x[src_token]."""
    return x[index.src_token]


def unpermute_ref(y: torch.Tensor, gate: torch.Tensor, index: MoEIndex) -> torch.Tensor:
    """(N,H) -> (T,H), out[t] = sum of gate * y over t's rows (float32 accumulation; float64 for float64)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    out = torch.zeros((index.num_tokens, y.shape[1]), dtype=acc, device=y.device)
    out.index_add_(0, index.src_token, y.to(acc) * gate.to(acc).unsqueeze(1))
    return out.to(y.dtype)


def grouped_mm_ref(x: torch.Tensor, w: torch.Tensor, index_or_counts) -> torch.Tensor:
    """The naive per-expert loop: y[rows of e] = x[rows of e] @ w[e]."""
    counts = index_or_counts.counts if isinstance(index_or_counts, MoEIndex) else index_or_counts
    outs, start = [], 0
    for e, c in enumerate(counts.tolist()):
        outs.append(x[start:start + c] @ w[e])
        start += c
    if not outs:  # (no experts: x[:0] @ the empty sum of w, kept in autograd's graph as the kernels' result is)
        return x[:0] @ w.sum(0).to(x.dtype)
    return torch.cat(outs, 0)


def _act_ref(a: torch.Tensor, activation: str) -> torch.Tensor:
    _check_activation(activation)
    if activation == "swiglu":
        g, u = a.chunk(2, dim=-1)
        return F.silu(g) * u
    return F.gelu(a)


def expert_mlp_ref(x, w1, w2, index_or_counts, activation: str = "swiglu") -> torch.Tensor:
    """Per-expert loop MLP (float32 math at least - float64 inputs in float64 -, output in x's dtype)."""
    dt = torch.promote_types(x.dtype, torch.float32)  # (float64 was computed in float32: 1e-7 off, yet the
    # MoE bench's "vs f64" reference)
    a = grouped_mm_ref(x.to(dt), w1.to(dt), index_or_counts)
    return grouped_mm_ref(_act_ref(a, activation), w2.to(dt), index_or_counts).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------------
class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index):
        ctx.index = index
        return gather_rows(x, index.src_token)

    @staticmethod
    @first_order_only("permute: double backward is not supported by the Triton kernels (use backend='torch')",
                      lambda ctx: False)
    def backward(ctx, g):
        idx = ctx.index
        return segment_sum(g, idx.tok_perm, idx.tok_offsets, idx.num_tokens), None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, gate, index):
        ctx.index = index
        ctx.save_for_backward(y, gate)
        return segment_sum(y, index.tok_perm, index.tok_offsets, index.num_tokens, weight=gate)

    @staticmethod
    @first_order_only("unpermute: double backward is not supported by the Triton kernels (use backend='torch')",
                      lambda ctx: ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
    def backward(ctx, g):
        y, gate = ctx.saved_tensors
        idx = ctx.index
        dy, dgate = gather_rows(g, idx.src_token, scale=gate, dot_with=y)
        return dy, dgate.to(gate.dtype), None


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, index, backend="triton"):
        ctx.index, ctx.backend = index, backend
        ctx.save_for_backward(x, w)
        return _mm(x, w, index, backend)

    @staticmethod
    @first_order_only("grouped_mm: double backward is not supported by the Triton kernels (use backend='torch')",
                      lambda ctx: ctx.needs_input_grad[0] and ctx.needs_input_grad[1])
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _mm(dy, w.transpose(1, 2), ctx.index, ctx.backend) if ctx.needs_input_grad[0] else None
        dw = _wgrad(x, dy, ctx.index, w.shape[0], ctx.backend) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def _check_device(what: str, x: torch.Tensor, index: MoEIndex, *others: torch.Tensor) -> None:
    """The index (and ``others``: a gate) on x's device: a meta or other-device index otherwise failed inside
    torch's indexing with an error that named neither operand."""
    for name, t in (("the index", index.src_token), *(("gate", o) for o in others)):
        if t.device != x.device:
            raise ValueError(f"{what}: {name} is on {t.device}, the input on {x.device}; build the index on the "
                             f"input's device")


def _check_index(what: str, index: MoEIndex, x: torch.Tensor, *others: torch.Tensor) -> None:
    """The index describes x's rows, on x's device (``others`` too: a gate): its counts add up to them (else the
    Triton kernels read or left rows no expert segment covers: uninitialised output, reads past the tensor)."""
    _check_device(what, x, index, *others)
    rows = x.shape[0]
    if index.num_rows != rows:
        raise ValueError(f"{what}: the index holds {index.num_rows} rows, the input {rows}")
    # the counts' sum only where reading it costs nothing: on a GPU it would wait for the device on every call
    if index.counts.device.type == "cpu" and int(index.counts.sum()) != rows:
        raise ValueError(f"{what}: the index's expert counts add up to {int(index.counts.sum())} rows, the input "
                         f"has {rows}")


def _check_rows(what: str, *ts: torch.Tensor) -> None:
    """2-D rows of floating point (3-D weights for grouped_mm): the Triton kernels read a row as shape[1]
    contiguous elements (a (T, 3, 2) input came back as (T, 3) of the first elements) and move values through
    float32 (2**24 + 1 came back as 2**24)."""
    x = ts[0]
    if x.dim() != 2:
        raise ValueError(f"{what}: rows must be 2-D (tokens, hidden), got shape {tuple(x.shape)}")
    for t in ts:
        if not computable_float(t.dtype):
            raise ValueError(float_dtype_error(what, t.dtype) + " (the kernels compute in float32)")


def permute(x: torch.Tensor, index: MoEIndex, backend: Backend = "auto") -> torch.Tensor:
    """Rows of x in expert order: (T,H) -> (N,H). float64 takes the reference (a plain gather, exact): the Triton
    kernel moves rows through float32."""
    _check_rows("permute", x)
    if x.shape[0] != index.num_tokens:
        raise ValueError(f"permute: x has {x.shape[0]} tokens, the index {index.num_tokens}")
    _check_device("permute", x, index)
    if x.dtype == torch.float64:
        _pick(backend, x)  # (still refuses an unknown backend)
        return permute_ref(x, index)
    return _Permute.apply(x, index) if _pick(backend, x) else permute_ref(x, index)


def unpermute(y: torch.Tensor, gate: torch.Tensor, index: MoEIndex, backend: Backend = "auto") -> torch.Tensor:
    """Gate-weighted combine of expert rows back to tokens: (N,H) -> (T,H); float64 takes the reference (the
    Triton kernel accumulates in float32)."""
    _check_rows("unpermute", y)
    _check_index("unpermute", index, y, gate)
    if gate.dim() != 1 or gate.shape[0] != y.shape[0]:  # the Triton path read past a short gate
        raise ValueError(f"unpermute: gate has shape {tuple(gate.shape)}, expected ({y.shape[0]},): one weight per "
                         f"expert row")
    if y.dtype == torch.float64:
        _pick(backend, y)
        return unpermute_ref(y, gate, index)
    return _Unpermute.apply(y, gate.to(torch.float32), index) if _pick(backend, y) else unpermute_ref(y, gate, index)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, index: MoEIndex, backend: Backend = "auto") -> torch.Tensor:
    """Grouped GEMM over the experts' row segments: x (N,K), w (E,K,M) -> (N,M)."""
    if index.num_experts != w.shape[0]:
        raise ValueError(f"grouped_mm: index has {index.num_experts} experts, weight has {w.shape[0]}")
    # every backend refuses what the torch reference refuses (the Triton kernel read w[e, k] for k < x's K
    # whatever w's K: garbage, or reads past the weight)
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_mm: x {tuple(x.shape)} and w {tuple(w.shape)} do not multiply (x (N, K), "
                         f"w (E, K, M))")
    _check_index("grouped_mm", index, x)
    _check_rows("grouped_mm", x, w)
    _one_dtype("grouped_mm", x, w)  # (every backend: the torch one's error came from inside the reference)
    if x.dtype == torch.float64:  # exact, as permute/unpermute (the kernels accumulate in float32, and their
        _pick(backend, x)         # float32 accumulator does not compile for float64 operands on a GPU)
        return grouped_mm_ref(x, w, index)
    if _pick(backend, x):
        return _GroupedMM.apply(x.contiguous(), w, index, gemm_engine(backend, x))
    return grouped_mm_ref(x, w, index)


# -- expert MLP with explicit forward/backward (used by the expert-parallel pipeline) -----------------
def expert_mlp_forward(x, w1, w2, index: MoEIndex, activation: str = "swiglu", backend: Backend = "auto"):
    """Returns (y, a): y (N,H) expert outputs, a (N, F or 2F) pre-activation saved for the backward."""
    _check_expert_mlp(x, w1, w2, index, activation, "expert_mlp_forward")
    use_triton = _pick(backend, x) and x.dtype != torch.float64  # float64: the exact reference (see grouped_mm)
    with torch.no_grad():
        a = grouped_mm(x, w1, index, backend)
        h = activation_triton(a, activation) if use_triton else _act_ref(a, activation)
        return grouped_mm(h, w2, index, backend), a


@dataclass
class ExpertWgradInputs:
    """What the weight gradients of the expert MLP need, kept by :func:`expert_mlp_backward_data` so that
    :func:`expert_mlp_backward_weight` can run later (after the data gradient has been sent on)."""

    x: torch.Tensor
    h: torch.Tensor
    da: torch.Tensor
    dy: torch.Tensor
    index: MoEIndex
    backend: str
    """The GEMM engine the data gradient used ("triton" / "triton_gmm"), or "torch" for the reference path."""


def expert_mlp_backward_data(x, a, dy, w1, w2, index: MoEIndex, activation: str = "swiglu",
                             backend: Backend = "auto") -> tuple[torch.Tensor, ExpertWgradInputs]:
    """The data gradient dx of the expert MLP (two GEMMs + the activation backward) and what the weight
    gradients need; the activation is recomputed from the saved pre-activation ``a``."""
    _check_expert_mlp(x, w1, w2, index, activation, "expert_mlp_backward_data")
    if tuple(a.shape) != (x.shape[0], w1.shape[-1]) or tuple(dy.shape) != (x.shape[0], w2.shape[-1]):
        raise ValueError(f"expert_mlp_backward_data: a {tuple(a.shape)} and dy {tuple(dy.shape)} do not fit x "
                         f"{tuple(x.shape)}, w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)}")
    dy = dy.contiguous().to(x.dtype)
    if _pick(backend, x) and x.dtype != torch.float64:
        engine = gemm_engine(backend, x)
        with torch.no_grad():
            dh = _mm(dy, w2.transpose(1, 2), index, engine)
            da, h = activation_backward_triton(a, dh, activation)
            dx = _mm(da, w1.transpose(1, 2), index, engine)
        return dx, ExpertWgradInputs(x.contiguous(), h, da, dy, index, engine)
    with torch.enable_grad():
        a_ = a.detach().requires_grad_(True)
        h_ = _act_ref(a_, activation)
    h = h_.detach()
    with torch.no_grad():
        dh = grouped_mm_ref(dy, w2.transpose(1, 2), index)
    (da,) = torch.autograd.grad(h_, a_, dh.to(h_.dtype))
    da = da.to(x.dtype)
    with torch.no_grad():
        dx = grouped_mm_ref(da, w1.transpose(1, 2), index)
    return dx, ExpertWgradInputs(x, h, da, dy, index, "torch")


def expert_mlp_backward_weight(saved: ExpertWgradInputs, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dw1, dw2) from what :func:`expert_mlp_backward_data` kept."""
    if saved.index.num_experts != num_experts:  # (the Triton path read offsets past the index, or dropped experts)
        raise ValueError(f"expert_mlp_backward_weight: index has {saved.index.num_experts} experts, expected "
                         f"{num_experts}")
    rows = saved.index.num_rows  # (a short saved dy was read past its end: dw2 of garbage, no error)
    for name in ("x", "h", "da", "dy"):
        t = getattr(saved, name)
        if t.dim() != 2 or t.shape[0] != rows:
            raise ValueError(f"expert_mlp_backward_weight: saved {name} {tuple(t.shape)} is not 2-D of the index's "
                             f"{rows} rows")
    with torch.no_grad():
        if saved.backend != "torch":
            dw2 = _wgrad(saved.h, saved.dy, saved.index, num_experts, saved.backend)
            dw1 = _wgrad(saved.x, saved.da, saved.index, num_experts, saved.backend)
        else:
            dw2 = _wgrad_ref(saved.h, saved.dy, saved.index, num_experts)
            dw1 = _wgrad_ref(saved.x, saved.da, saved.index, num_experts)
    return dw1, dw2


def expert_mlp_backward(x, a, dy, w1, w2, index: MoEIndex, activation: str = "swiglu",
                        backend: Backend = "auto"):
    """Gradients (dx, dw1, dw2) of the expert MLP from the saved input x and pre-activation a
    (the activation is recomputed from a, not stored)."""
    dx, saved = expert_mlp_backward_data(x, a, dy, w1, w2, index, activation, backend)
    dw1, dw2 = expert_mlp_backward_weight(saved, w1.shape[0])
    return dx, dw1, dw2


def _wgrad_ref(x, dy, index: MoEIndex, E: int):
    dw = x.new_zeros((E, x.shape[1], dy.shape[1]))
    for e, (s, t) in enumerate(zip(index.offsets[:-1].tolist(), index.offsets[1:].tolist())):
        if t > s:
            dw[e] = x[s:t].t() @ dy[s:t]
    return dw


class _ExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, index, activation, backend):
        y, a = expert_mlp_forward(x, w1, w2, index, activation, backend)
        ctx.save_for_backward(x, a, w1, w2)
        ctx.index, ctx.activation, ctx.backend = index, activation, backend
        return y

    @staticmethod
    @first_order_only("expert_mlp: double backward is not supported (its backward is computed explicitly, on "
                      "every backend)", lambda ctx: True)
    def backward(ctx, dy):
        x, a, w1, w2 = ctx.saved_tensors
        dx, dw1, dw2 = expert_mlp_backward(x, a, dy, w1, w2, ctx.index, ctx.activation, ctx.backend)
        return dx, dw1, dw2, None, None, None


def expert_mlp(x, w1, w2, index: MoEIndex, activation: str = "swiglu", backend: Backend = "auto"):
    """Expert MLP on expert-sorted rows x (N,H): SwiGLU (w1 (E,H,2F)) or GELU (w1 (E,H,F)); w2 (E,F,H)."""
    _check_expert_mlp(x, w1, w2, index, activation, "expert_mlp")
    return _ExpertMLP.apply(x, w1, w2, index, activation, backend)


def _check_expert_mlp(x, w1, w2, index: MoEIndex, activation: str, who: str) -> None:
    _check_activation(activation)
    # the rows the index describes (the backward's Triton path returned uninitialised rows for more, and wrote
    # past its buffers for fewer - heap corruption; a 3-D x gave dw1 of another shape)
    _check_rows(who, x)
    _check_index(who, index, x)
    E, H = index.num_experts, x.shape[-1]
    width = w1.shape[-1] if w1.dim() == 3 else -1
    F = width // 2 if activation == "swiglu" else width
    if (w1.dim() != 3 or tuple(w1.shape[:2]) != (E, H) or (activation == "swiglu" and width % 2)
            or tuple(w2.shape) != (E, F, H)):  # (the Triton path computed odd or mismatched widths silently)
        raise ValueError(f"{who}: w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)} do not fit x {tuple(x.shape)} "
                         f"and {E} experts (w1 (E, H, {'2F' if activation == 'swiglu' else 'F'}), w2 (E, F, H))")
