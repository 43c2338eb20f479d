"""Fused LoRA linear layers (single adapter and packed multi-adapter batches) in Triton.

    Y = X W^T + scale * (dropout(X) A^T) B^T + bias          X [T, K], W [N, K] frozen, A [r, K], B [N, r]

The work is cut at the thin tensors S = Xd A^T [T, r] and dS [T, r] (LoRAFusion's "graph splitting"), so every
memory-bound step rides inside a kernel that reads the big tensors anyway:

forward
  1. ``_lora_down_kernel``: reads X once, draws the dropout mask, writes Xd = X * mask / (1 - p) and the mask
     as bits (only when some adapter has p > 0), and accumulates S = Xd A^T (fp32, split over K, atomic adds);
  2. ``_lora_gemm_kernel``: Y = X W^T, the LoRA term scale * S B^T joining its accumulator after the K loop,
     bias in the epilogue.
backward
  3. ``_lora_dy_kernel``: reads dY once for dS = scale dY B and dB = scale dY^T S (and d bias), atomic adds;
  4. dA = dS^T Xd, a thin GEMM per adapter segment (torch.matmul);
  5. ``_lora_gemm_kernel`` again: dX = dY W plus mask * (dS A) / (1 - p).
Xd and the mask are saved for backward; nothing is recomputed.

``base_gemm`` picks who runs the GEMMs: "triton" is the above; "torch" keeps steps 1, 3 and 4 but lets cuBLAS run
the two big GEMMs, accumulating onto the LoRA term through their C input (the term written first: by cuBLAS,
or for dX with dropout by ``_lora_masked_term_kernel``); "torch_all" also moves the thin GEMMs (S, dS, dB) to
cuBLAS, leaving our kernels only the dropout mask / Xd (step 1 without S) and the masked dX term.

Multi-LoRA: the rows of one packed batch are cut into tiles of ``block_m`` rows that never straddle two adapter
segments (each segment is padded to the M tile in the launch grid, not in memory). A per-tile table holds
(row_start, valid_rows, rank, rank_offset, dropout_threshold, adapter_id) and (scale, 1/(1-p)); the adapters'
A and B are concatenated along r, so "pointers" are rank offsets and there is no cap on adapters per batch. Rows that no
segment covers get the base projection only. The single-adapter path is the same kernels with one segment.

Dropout RNG and mask layout: the columns of the [T, K] input go in blocks of 256, each cut into 8 planes of 32
columns; column c is in block c // 256, plane b = (c // 32) % 8, lane l = c % 32. Element (row, c) is kept iff word
b // 2 of ``philox4x32_10(seed, counter=(row * 64 * ceil(K/256) + 64 * (c // 256) + 32 * (b % 2) + l, 0, 0, 0))``
is >= floor(p * 2**32) (Triton's ``tl.randint4x``: one Philox call per 4 elements, and each of its 4 words feeds
a whole plane, so the kernel never interleaves words). The saved mask is bit b of byte (row, 32 * (c // 256) + l)
- 8 contiguous planes make one contiguous row of 32 bytes, again without any reshape. ``dropout_uniforms`` /
``dropout_keep_mask`` / ``unpack_keep_bits`` below are the bit-exact torch mirror, so the torch reference draws the
identical mask.

Under ``torch.compile`` the public functions trace as one custom op per call (``kernels/lora_op.py``): same
kernels, no graph break.

fp32 operands multiply in IEEE fp32 (``kernels.gemm.dot_acc``): Triton's default for fp32 ``tl.dot`` on NVIDIA GPUs
is TF32, ~1e-3 relative, which torch's fp32 matmul does not do unless allowed to (and the interpreter never does).
Row offsets come from the int64 tile table, so ``row * stride`` never wraps at 2**31 elements; the forward's
weight offsets (output column x K) are int64 too.

Off the GPU the kernels run under ``TRITON_INTERPRET=1`` (tiles are upcast to float32 after loading, because the
interpreter gets bf16 arithmetic wrong). Without a GPU and without the interpreter, the public functions fall back
to the torch reference with a one-time warning. In eager mode float64 inputs take the torch reference too (exact
float64; the kernels accumulate in float32), without a warning; a compiled graph runs the kernels for them (fp32
accumulation: the reference would break ``fullgraph=True``). The backward is once-differentiable: a double
backward that reaches it raises (also with a loss linear in the output, where torch's ``once_differentiable``
would have let it drop the second-order terms).
"""
from __future__ import annotations

import math
import operator
import os
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .gemm import (computable_float, first_order_only, float_dtype_error, launch_maxnreg, set_descriptor_allocator,
                   tma_unit_axis)

try:  # a CPU-only install may lack triton: everything still imports and runs on the torch path
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    HAVE_TRITON = False

__all__ = [
    "LoRAAdapterWeights",
    "lora_linear",
    "lora_linear_reference",
    "multi_lora_linear",
    "multi_lora_linear_reference",
    "dropout_keep_mask",
    "unpack_keep_bits",
    "mask_bytes",
    "philox_uint32",
    "philox4x32",
    "dropout_uniforms",
    "keep_threshold",
    "backend_for",
    "default_block_m",
]

#: Triton kernels were decorated in interpreter mode (read once at import, as Triton itself does).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TABLE_COLS = 6  # row_start, n_valid, rank, rank_offset, keep_threshold, adapter_id (-1: base only)
_warned_fallback = False


# ----------------------------------------------------------------------------------------------------------------
# RNG: a torch mirror of Triton's Philox 4x32-10 (tl.randint), used by the reference to draw identical masks
# ----------------------------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


#: ``EPI_SPLIT`` of the interpreter's LoRA GEMM launches: -1 = the rule of ``epi_split`` (its 16x16 tiles are
#: small, so never split: the form the GPU runs for its 128x128 w8 tiles); tests set 1 to run the split form.
_INTERPRET_EPI_SPLIT = -1


def epi_split(block_m: int, block_o: int, num_warps: int) -> bool:
    """Whether ``_lora_gemm_kernel`` (EPI_SPLIT=-1) runs its masked dX epilogue per column half: when the fp32
    accumulator alone takes >= 128 registers per thread (block_m * block_o / (32 * num_warps)). There a
    full-width second tile spilled on sm_90 (128x256 w8: 2060 bytes, 128x128 w4: 1044-1168) and the split
    removes it (252 / 255 registers, no spill; ``kernel_report``); smaller accumulators keep the full-width
    epilogue (128x128 w8: 170 registers, the configuration measured fastest on the H200). Never below 32 columns:
    a half of 8 would be a tl.dot with N = 8, which Triton versions with a 16 minimum refuse. Not yet timed on a
    GPU."""
    return block_o >= 32 and block_m * block_o // (32 * max(1, num_warps)) >= 128  # halves of >= 16 columns


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a 32-bit constant a and int64 tensor b in [0, 2**32), no overflow."""
    p_lo = a * (b & 0xFFFF)  # < 2**48
    p_hi = a * (b >> 16)  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox4x32(seed: int, offsets: torch.Tensor, n_rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """The four output words of Philox4x32 (``n_rounds`` rounds) for counters (offset, 0, 0, 0) and key
    (seed low 32 bits, seed high 32 bits), as int64 values in [0, 2**32). Bit-exact with
    ``tl.randint4x(seed, offset)`` for int32 offsets."""
    c0 = offsets.to(torch.int64) & _M32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def philox_uint32(seed: int, offsets: torch.Tensor, n_rounds: int = 10) -> torch.Tensor:
    """First Philox4x32 output word (``tl.randint(seed, offset)``), int64 values in [0, 2**32)."""
    return philox4x32(seed, offsets, n_rounds)[0]


#: dropout layout (see the module docstring): 32-column planes, 8 planes (256 columns, 64 Philox counters) a block
DROP_PLANE, DROP_PLANES = 32, 8
DROP_BLOCK = DROP_PLANE * DROP_PLANES
#: Launch knobs of the dropout kernel (``DOWN_LAUNCH``: rows per program, warps, programs per SM - the K loop is
#: split to reach that many) and of the masked dX term (``TERM_LAUNCH``: rows per program, warps, programs per
#: row of column blocks), no software pipelining (streaming kernels want occupancy). Picked by
#: ``launch/lora_kernel_sweep.py`` on an H200 (2026-11-28, T=8192 K=4096 r=16 p=0.1; every alternative's output
#: identical): dropout 32 rows / 4 warps / 8 per SM 77 us (1.79 TB/s) against 90 us for the 8-warp launch first
#: chosen, 121 us with S fused (178 us before); term 64 rows / 4 warps / 8 per row 42 us (1.71 TB/s) against 64
#: us. sm_90 ptxas (kernel_report): 128 rows on 4 warps took 255 registers + spills and serialized its wgmma
#: (C7515); 32 rows on 4 warps take 166 (dropout + S) / 96 (dropout only), no spills. Without dropout
#: (S = X A^T only) 4 warps and a 3-stage pipelined K loop: 38 registers.
_DOWN_STAGES = 1
_DOWN_PLAIN_WARPS, _DOWN_PLAIN_STAGES = 4, 3
DOWN_LAUNCH = {"sub_m": 32, "warps": 4, "per_sm": 8}
TERM_LAUNCH = {"sub_m": 64, "warps": 4, "split": 8}
#: Launch knobs of the dY kernel (``base_gemm="triton"``): columns per step, programs per SM (the N loop is split to
#: reach that many), warps, and copies of dB the tiles' atomic adds are spread over (tile i adds into copy
#: i % copies, summed afterwards: fewer adds landing on one address at a time). The defaults are what the
#: H200 runs of 2026-11-28 measured (92 us at T=8192 N=4096 r=16, 0.7 TB/s; 27-29 us in the 2026-11-30 profile).
#: ``launch/lora_kernel_sweep.py --only dy`` times the alternatives through the host function, allocations
#: included (H200 2026-11-30: default 82 us, 8 copies 42 us - not the kernel's own time, so not taken).
DY_LAUNCH = {"block_n": 64, "per_sm": 2, "warps": 4, "copies": 1}


#: What the LoRA GEMMs' autotuner keys its choice on. The constexpr flags matter: Triton's autotuner keys on the
#: listed arguments and the tensors' dtypes only, so without HAS_MASK the dX GEMM with the dropout mask (a second
#: fp32 tile in the epilogue: more registers, spills at some tiles) reused the tile tuned for dX without it.
GEMM_TUNE_KEY = ("m_bucket", "OUT_DIM", "RED_DIM", "BLOCK_R", "HAS_MASK", "HAS_BIAS")


def _drop_blocks(cols: int) -> int:
    return -(-cols // DROP_BLOCK)


def dropout_uniforms(seed: int, rows: int, cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 32-bit draws (int64 in [0, 2**32)) behind the dropout mask of a [rows, cols] input, in the kernels'
    plane layout (module docstring): one Philox call per 4 elements, word j feeding planes 2j and 2j + 1."""
    nb = _drop_blocks(cols)
    per_row = nb * DROP_BLOCK // 4
    offs = torch.arange(rows, device=device, dtype=torch.int64)[:, None] * per_row + \
        torch.arange(per_row, device=device, dtype=torch.int64)[None, :]
    words = torch.stack(philox4x32(seed, offs), dim=-1)  # [rows, counter = (blk, h, l), word j]
    words = words.reshape(rows, nb, 2, DROP_PLANE, 4).permute(0, 1, 4, 2, 3)  # [rows, blk, j, h, l]: b = 2j + h
    return words.reshape(rows, nb * DROP_BLOCK)[:, :cols]


def keep_threshold(p: float) -> int:
    """A uniform 32-bit draw u keeps its element iff u >= keep_threshold(p) = floor(p * 2**32)."""
    return min(int(math.floor(p * 4294967296.0)), _M32)


def mask_bytes(cols: int) -> int:
    """Bytes per row of the kernels' saved keep mask for ``cols`` input columns (ceil(cols / 256) * 32)."""
    return _drop_blocks(cols) * DROP_PLANE


def unpack_keep_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The kernels' saved mask (uint8 [rows, mask_bytes(cols)]: column c is bit (c // 32) % 8 of byte
    32 * (c // 256) + c % 32) as a bool [rows, cols]."""
    rows = packed.shape[0]
    shifts = torch.arange(DROP_PLANES, device=packed.device, dtype=torch.int32)
    bits = (packed.to(torch.int32).reshape(rows, -1, DROP_PLANE)[..., None] >> shifts) & 1  # [rows, blk, l, b]
    return bits.transpose(2, 3).reshape(rows, -1)[:, :cols].bool()


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float | torch.Tensor,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean keep mask [rows, cols] of the fused kernels for ``seed``: keep (i, j) iff its draw (see
    ``dropout_uniforms``) >= floor(p * 2**32); ``p`` is one probability or a per-row tensor (multi-LoRA)."""
    _check_seed(seed)
    _check_counters(rows, cols)
    u = dropout_uniforms(int(seed), rows, cols, device)
    if isinstance(p, torch.Tensor):
        thr = torch.tensor([keep_threshold(float(v)) for v in p.tolist()], dtype=torch.int64, device=device)
        return u >= thr[:, None]
    return u >= keep_threshold(float(p))


def _check_counters(rows: int, cols: int) -> None:
    per_row = _drop_blocks(cols) * DROP_BLOCK // 4
    if rows * per_row >= 2 ** 31:
        raise ValueError(f"dropout: rows={rows} x {per_row} Philox counters per row must be < 2**31")


def _check_seed(seed) -> None:
    try:  # ints and int-likes (numpy integers); not bools, floats or strings
        ok = not isinstance(seed, (bool, torch.Tensor)) and 0 <= operator.index(seed) < 2 ** 63
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"seed: {seed!r} must be an int in [0, 2**63)")


# Drawn seeds lie in [2**31, 2**63): always int64 for Triton (one compiled variant, as a seed below 2**31 is an
# int32 argument) and ~2**62 of them, so two calls of a long run practically never share a mask (from [0, 2**31)
# a million dropout calls held ~230 pairs of equal seeds: equal masks for equal shapes)
SEED_DRAW_RANGE = (2 ** 31, 2 ** 63 - 1)


def _draw_seed() -> int:
    """A seed from torch's default CPU generator, so ``torch.manual_seed`` makes dropout reproducible."""
    return int(torch.randint(*SEED_DRAW_RANGE, (1,)).item())


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
if HAVE_TRITON:
    from .gemm import _tile_desc, _tile_load  # TMA descriptors shared with the plain GEMM kernel
    from .gemm import dot_acc, dot_new  # fp32 operands in IEEE fp32 (Triton's GPU default for them is TF32)

    @triton.jit
    def _mma(a, b, acc, UPCAST: tl.constexpr):
        """acc + a @ b; UPCAST (the interpreter) multiplies in float32, which it gets right for bf16 inputs."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        return dot_acc(a, b, acc)

    @triton.jit
    def _tile_entry(TABLE, pid_m):
        """Row start, valid rows, LoRA rank (0: no adapter) and rank offset of M tile ``pid_m`` of the tile table
        (6 int64 per tile: those four, the dropout keep threshold, the adapter index)."""
        return (tl.load(TABLE + pid_m * 6 + 0), tl.load(TABLE + pid_m * 6 + 1), tl.load(TABLE + pid_m * 6 + 2),
                tl.load(TABLE + pid_m * 6 + 3))

    @triton.jit
    def _load_plane(X, rows, row_ok, col0, K, stride_xm, PLANE: tl.constexpr):
        """X[rows, col0:col0 + PLANE] (zeros past K and past the valid rows)."""
        cols = col0 + tl.arange(0, PLANE)
        return tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :],
                       other=0.0)

    @triton.jit
    def _x_planes(X, rows, row_ok, col0, K, stride_xm, PLANE: tl.constexpr):
        """The 8 planes of X of one dropout block (columns col0 .. col0 + 8 * PLANE), loaded together."""
        return (_load_plane(X, rows, row_ok, col0, K, stride_xm, PLANE),
                _load_plane(X, rows, row_ok, col0 + PLANE, K, stride_xm, PLANE),
                _load_plane(X, rows, row_ok, col0 + 2 * PLANE, K, stride_xm, PLANE),
                _load_plane(X, rows, row_ok, col0 + 3 * PLANE, K, stride_xm, PLANE),
                _load_plane(X, rows, row_ok, col0 + 4 * PLANE, K, stride_xm, PLANE),
                _load_plane(X, rows, row_ok, col0 + 5 * PLANE, K, stride_xm, PLANE),
                _load_plane(X, rows, row_ok, col0 + 6 * PLANE, K, stride_xm, PLANE),
                _load_plane(X, rows, row_ok, col0 + 7 * PLANE, K, stride_xm, PLANE))

    @triton.jit
    def _down_plane(x, XD, A, acc, packed, word, thr, inv_keep, rows, row_ok, col0, K, r_off, rr, r_ok,
                    stride_dm, stride_ar, BIT: tl.constexpr, PLANE: tl.constexpr,
                    HAS_DOT: tl.constexpr, UPCAST: tl.constexpr):
        """One 32-column plane of the dropout block, x already loaded: Xd = X * keep / (1 - p) from one Philox
        word per element, keep bit -> bit BIT of the block's mask bytes, S += Xd A^T over the plane."""
        cols = col0 + tl.arange(0, PLANE)
        c_ok = cols < K
        io_mask = row_ok[:, None] & c_ok[None, :]
        keep = word >= thr
        xd = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(XD.dtype.element_ty)
        tl.store(XD + rows[:, None] * stride_dm + cols[None, :], xd, mask=io_mask)
        packed = packed | (keep.to(tl.int32) << BIT)
        if HAS_DOT:
            a = tl.load(A + (r_off + rr)[None, :] * stride_ar + cols[:, None],
                        mask=r_ok[None, :] & c_ok[:, None], other=0.0)
            acc = _mma(xd, a, acc, UPCAST)
        return acc, packed

    # seed: not specialised. Triton compiles a separate variant for an int argument equal to 1 and for one divisible
    # by 16, so per-call seeds recompiled this kernel mid-training (on average at the 16th call) and could compile
    # inside a CUDA-graph capture; only int32 vs int64 seeds (below / above 2**31) still differ
    @triton.jit(do_not_specialize=["seed"])
    def _lora_down_kernel(
        X, A, S, XD, MASK, TABLE, FTABLE, seed, K,
        stride_xm, stride_ar, stride_sm, stride_dm, stride_mm,
        SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, HAS_DOT: tl.constexpr, UPCAST: tl.constexpr, PLANE: tl.constexpr = 32,
        SUB_M: tl.constexpr = 32, SEED_FROM_PTR: tl.constexpr = False, ALL_ROWS: tl.constexpr = False,
    ):
        """Per (SUB_M rows of a tile, K split): S[rows] += X[rows, ksplit] A^T[ksplit]; with dropout, per block
        of 8 planes of PLANE columns: Xd = dropout(X), its keep bits (one byte row per block), S from Xd.
        HAS_DOT=False: only Xd and the mask (S is left to a cuBLAS GEMM). Rows go SUB_M at a time (a tile of
        BLOCK_M rows is BLOCK_M // SUB_M programs), so four Philox words per element stay in registers."""
        PREFETCH_X: tl.constexpr = (not HAS_DOT) or BLOCK_R <= 32
        pid_m = tl.program_id(0) // (BLOCK_M // SUB_M)
        sub = tl.program_id(0) % (BLOCK_M // SUB_M)
        pid_k = tl.program_id(1)
        row_start, n_valid, rank, r_off = _tile_entry(TABLE, pid_m)
        # ALL_ROWS: rows no adapter covers get Xd = X too (their keep threshold is 0), for consumers that read
        # every row of Xd (the grouped GEMMs of base_gemm="torch_grouped")
        if (rank > 0 or ALL_ROWS) and sub * SUB_M < n_valid:
            rm = sub * SUB_M + tl.arange(0, SUB_M)
            rows = row_start + rm
            row_ok = rm < n_valid
            rr = tl.arange(0, BLOCK_R)
            r_ok = rr < rank
            acc = tl.zeros((SUB_M, BLOCK_R), dtype=tl.float32)
            if HAS_DROPOUT:
                # a device-side seed (CUDA-graph friendly) under its own name: rebinding `seed` (a pointer) to
                # the loaded int64 inside this runtime `if` failed Triton's type check on a GPU (the interpreter
                # does not check types)
                if SEED_FROM_PTR:
                    seed_val = tl.load(seed)
                else:
                    seed_val = seed
                thr = tl.load(TABLE + pid_m * 6 + 4).to(tl.uint32)
                inv_keep = tl.load(FTABLE + pid_m * 2 + 1)
                n_blk = tl.cdiv(K, 8 * PLANE)
                lanes = tl.arange(0, PLANE)
                for kb in range(pid_k, n_blk, SPLIT_K):
                    col0 = kb * (8 * PLANE)
                    packed = tl.zeros((SUB_M, PLANE), dtype=tl.int32)
                    # all 8 planes' loads go out first: interleaved with the Xd stores (which may alias X as
                    # far as the compiler knows) each load waited for the previous plane's store - one load in
                    # flight per thread (sm_90 PTX: ld st ld st ...). Not with S at rank blocks above 32: there
                    # the 8 planes took 173 registers (124 one at a time)
                    if PREFETCH_X:
                        xs = _x_planes(X, rows, row_ok, col0, K, stride_xm, PLANE)
                    for h in tl.static_range(2):
                        # counters (row, block, h, lane): 64 per block; word j feeds plane 2j + h
                        offs = (rows[:, None] * (n_blk * 2 * PLANE) + (kb * 2 + h) * PLANE + lanes[None, :])
                        words = tl.randint4x(seed_val, offs.to(tl.int32))
                        for j in tl.static_range(4):  # plane 2j + h, bit 2j + h of the mask bytes
                            if PREFETCH_X:
                                x = xs[2 * j + h]
                            else:
                                x = _load_plane(X, rows, row_ok, col0 + (2 * j + h) * PLANE, K, stride_xm, PLANE)
                            acc, packed = _down_plane(x, XD, A, acc, packed, words[j], thr, inv_keep, rows, row_ok,
                                                      col0 + (2 * j + h) * PLANE, K, r_off, rr, r_ok, stride_dm,
                                                      stride_ar, 2 * j + h, PLANE, HAS_DOT, UPCAST)
                    tl.store(MASK + rows[:, None] * stride_mm + (kb * PLANE + lanes)[None, :], packed.to(tl.uint8),
                             mask=row_ok[:, None])
            else:
                for kb in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
                    cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
                    c_ok = cols < K
                    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=row_ok[:, None] & c_ok[None, :],
                                other=0.0)
                    a = tl.load(A + (r_off + rr)[None, :] * stride_ar + cols[:, None],
                                mask=r_ok[None, :] & c_ok[:, None], other=0.0)
                    acc = _mma(x, a, acc, UPCAST)
            if HAS_DOT:
                s_ptrs = S + rows[:, None] * stride_sm + rr[None, :]
                if SPLIT_K > 1:
                    tl.atomic_add(s_ptrs, acc, mask=row_ok[:, None], sem="relaxed")
                else:
                    tl.store(s_ptrs, acc, mask=row_ok[:, None])

    @triton.jit
    def _lora_gemm_kernel(
        X, W, L, P, MASK, BIAS, OUT, TABLE, FTABLE,
        n_tiles, OUT_DIM, RED_DIM, m_bucket, X_ROWS,
        stride_xm, stride_wr, stride_wo, stride_lm, stride_pr, stride_po, stride_mm, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, APPLY_SCALE: tl.constexpr,
        UPCAST: tl.constexpr, WARP_SPECIALIZE: tl.constexpr = False, EPI_WARPS: tl.constexpr = 4,
        EPI_SPLIT: tl.constexpr = -1, USE_TMA: tl.constexpr = False, W_OUT_MAJOR: tl.constexpr = False,
        PERSISTENT: tl.constexpr = False, P_R_UNIT: tl.constexpr = False, R_ALIGN: tl.constexpr = 1,
    ):
        """OUT[tile, oblk] = X[tile, :] @ W[:, oblk] + lora_term (+ bias), W element (red, out) at
        W + red*stride_wr + out*stride_wo. LoRA term, added to the accumulator after the K loop:
        L[tile, :r] @ P[r_off:r_off+r, oblk], times scale (forward) or times mask/(1-p) (backward). Used for
        Y = X W^T + scale S B^T + b and dX = dY W + mask (dS A)/(1-p).

        With the mask the LoRA product is a second fp32 tile. Where the accumulator alone takes >= 128 registers
        per thread (BLOCK_M * BLOCK_O / (32 * EPI_WARPS), EPI_WARPS = the launch's num_warps) the epilogue runs
        on the tile's two column halves in turn (the accumulator split in registers), so that second tile is
        half as wide: on sm_90 the 128x256 w8 and 128x128 w4 tiles spilled 1-2 KiB with a full-width one
        (kernel_report). EPI_SPLIT: -1 by that rule, 0 never, 1 always (tests).

        USE_TMA: the K loop's X and W tiles come through TMA tensor descriptors (made in the kernel, sm_90+)
        instead of pointer tiles: no per-element address registers, the copy engine fills the shared-memory ring.
        X is a [X_ROWS, RED_DIM] descriptor read from the tile's first row (rows past the tile's n_valid are
        read but never stored; past X_ROWS the unit fills zeros); W_OUT_MAJOR: W is [OUT_DIM, RED_DIM] with
        unit stride along RED (the forward's W [N, K]; the tile is transposed in shared memory), else
        [RED_DIM, OUT_DIM] with unit stride along OUT (dX's W). Needs 16-byte aligned bases and row strides
        (``_tma_ok``). The epilogue stays masked pointer stores (a tile's valid rows end anywhere).

        PERSISTENT: a grid of at most one program per resident CTA slot, each looping over output tiles
        pid, pid + grid, ... (the descriptors made once per program, not once per tile). The tile loop is not
        flattened into the K loop: with ``flatten=True`` ptxas serialised the warpgroup MMAs on sm_90 (C7514 /
        C7515, offline compile, Triton 3.7.1).

        P_R_UNIT (the forward's B [N, R_total], contiguous rows): the unmasked LoRA term reads P as [BLOCK_O,
        BLOCK_R] rows and transposes it, instead of gathering it one element per load (sm_90: 16 scalar loads per
        thread at 128x256); R_ALIGN: every adapter's rank offset is a multiple of it (8 lets the rows load as
        16-byte vectors)."""
        n_out = n_tiles * tl.cdiv(OUT_DIM, BLOCK_O)
        x_desc = None
        w_desc = None
        if USE_TMA:  # W as a [RED_DIM, OUT_DIM] operand; out-major (stride_wr == 1) is read transposed
            x_desc = _tile_desc(X, X_ROWS, RED_DIM, stride_xm, 1, True, BLOCK_M, BLOCK_RED)
            w_desc = _tile_desc(W, RED_DIM, OUT_DIM, stride_wr, stride_wo, not W_OUT_MAJOR, BLOCK_RED, BLOCK_O)
        if PERSISTENT:
            for tile in tl.range(tl.program_id(0), n_out, tl.num_programs(0)):
                _lora_gemm_tile(tile, x_desc, w_desc, X, W, L, P, MASK, BIAS, OUT, TABLE, FTABLE, n_tiles, OUT_DIM,
                                RED_DIM, stride_xm, stride_wr, stride_wo, stride_lm, stride_pr, stride_po,
                                stride_mm, stride_om, BLOCK_M, BLOCK_O, BLOCK_RED, BLOCK_R, GROUP_M, HAS_BIAS,
                                HAS_MASK, APPLY_SCALE, UPCAST, WARP_SPECIALIZE, EPI_WARPS, EPI_SPLIT, USE_TMA,
                                W_OUT_MAJOR, P_R_UNIT, R_ALIGN)
        else:
            _lora_gemm_tile(tl.program_id(0), x_desc, w_desc, X, W, L, P, MASK, BIAS, OUT, TABLE, FTABLE, n_tiles,
                            OUT_DIM, RED_DIM, stride_xm, stride_wr, stride_wo, stride_lm, stride_pr, stride_po,
                            stride_mm, stride_om, BLOCK_M, BLOCK_O, BLOCK_RED, BLOCK_R, GROUP_M, HAS_BIAS, HAS_MASK,
                            APPLY_SCALE, UPCAST, WARP_SPECIALIZE, EPI_WARPS, EPI_SPLIT, USE_TMA, W_OUT_MAJOR,
                            P_R_UNIT, R_ALIGN)

    @triton.jit
    def _lora_gemm_tile(
        pid, x_desc, w_desc, X, W, L, P, MASK, BIAS, OUT, TABLE, FTABLE, n_tiles, OUT_DIM, RED_DIM,
        stride_xm, stride_wr, stride_wo, stride_lm, stride_pr, stride_po, stride_mm, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, APPLY_SCALE: tl.constexpr,
        UPCAST: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, EPI_WARPS: tl.constexpr, EPI_SPLIT: tl.constexpr,
        USE_TMA: tl.constexpr, W_OUT_MAJOR: tl.constexpr, P_R_UNIT: tl.constexpr, R_ALIGN: tl.constexpr,
    ):
        """Output tile ``pid`` of ``_lora_gemm_kernel`` (grouped along M for L2 reuse): the K loop, then the LoRA
        term and the epilogue."""

        num_pid_o = tl.cdiv(OUT_DIM, BLOCK_O)
        num_pid_in_group = GROUP_M * num_pid_o
        group_id = pid // num_pid_in_group
        first_m = group_id * GROUP_M
        group_size = tl.minimum(n_tiles - first_m, GROUP_M)
        pid_m = first_m + ((pid % num_pid_in_group) % group_size)
        pid_o = (pid % num_pid_in_group) // group_size

        row_start, n_valid, rank, r_off = _tile_entry(TABLE, pid_m)
        rm = tl.arange(0, BLOCK_M)
        rows = row_start + rm
        row_ok = rm < n_valid
        outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        o_ok = outs < OUT_DIM

        # The K loop first, on a zero accumulator that only MMAs write: a LoRA term placed in the accumulator
        # before the loop made ptxas serialize the warpgroup MMAs on sm_90 (C7515, "non wgmma instructions
        # defining accumulator registers"); added after the loop it stays in registers all the same.
        acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
        if USE_TMA:
            for rb in tl.range(0, tl.cdiv(RED_DIM, BLOCK_RED), warp_specialize=WARP_SPECIALIZE):
                xt = x_desc.load([row_start.to(tl.int32), rb * BLOCK_RED])
                wt = _tile_load(w_desc, rb * BLOCK_RED, pid_o * BLOCK_O, not W_OUT_MAJOR)
                acc = _mma(xt, wt, acc, UPCAST)
        else:
            reds = tl.arange(0, BLOCK_RED)
            x_ptrs = X + rows[:, None] * stride_xm + reds[None, :]
            # int64: the forward's stride_wo is K, and (N-1) K reaches 2**31 for a large frozen weight (a wrapped
            # offset read another part of memory); once, outside the K loop
            w_ptrs = W + reds[:, None] * stride_wr + outs[None, :].to(tl.int64) * stride_wo
            for rb in tl.range(0, tl.cdiv(RED_DIM, BLOCK_RED), warp_specialize=WARP_SPECIALIZE):
                red_ok = reds < RED_DIM - rb * BLOCK_RED
                xt = tl.load(x_ptrs, mask=row_ok[:, None] & red_ok[None, :], other=0.0)
                wt = tl.load(w_ptrs, mask=red_ok[:, None] & o_ok[None, :], other=0.0)
                x_ptrs += BLOCK_RED
                w_ptrs += BLOCK_RED * stride_wr
                acc = _mma(xt, wt, acc, UPCAST)
        if HAS_MASK:
            if EPI_SPLIT == 1 or (EPI_SPLIT == -1 and BLOCK_O >= 32 and BLOCK_M * BLOCK_O // (32 * EPI_WARPS) >= 128):
                HALF: tl.constexpr = BLOCK_O // 2
                # acc[:, :HALF] and acc[:, HALF:] as two register tiles (row-major reshape, split the pair axis)
                acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
                _masked_epilogue(acc_lo, pid_o * BLOCK_O, rows, row_ok, rank, r_off, pid_m, L, P, MASK, BIAS, OUT,
                                 FTABLE, OUT_DIM, stride_lm, stride_pr, stride_po, stride_mm, stride_om,
                                 HALF, BLOCK_R, HAS_BIAS, APPLY_SCALE, UPCAST)
                _masked_epilogue(acc_hi, pid_o * BLOCK_O + HALF, rows, row_ok, rank, r_off, pid_m, L, P, MASK, BIAS,
                                 OUT, FTABLE, OUT_DIM, stride_lm, stride_pr, stride_po, stride_mm, stride_om,
                                 HALF, BLOCK_R, HAS_BIAS, APPLY_SCALE, UPCAST)
            else:
                _masked_epilogue(acc, pid_o * BLOCK_O, rows, row_ok, rank, r_off, pid_m, L, P, MASK, BIAS, OUT,
                                 FTABLE, OUT_DIM, stride_lm, stride_pr, stride_po, stride_mm, stride_om,
                                 BLOCK_O, BLOCK_R, HAS_BIAS, APPLY_SCALE, UPCAST)
        else:
            if rank > 0:
                rr = tl.arange(0, BLOCK_R)
                lt = tl.load(L + rows[:, None] * stride_lm + rr[None, :], mask=row_ok[:, None], other=0.0)
                if P_R_UNIT:  # rows of B [N, R_total] (contiguous: stride_po = R_total), transposed in registers
                    # the load is bounded by the row (a mask constant over aligned groups, so it vectorises);
                    # columns of other adapters are zeroed in registers
                    cols_r = tl.max_contiguous(tl.multiple_of(r_off + rr, R_ALIGN), BLOCK_R)
                    pt = tl.load(P + outs[:, None] * stride_po + cols_r[None, :],
                                 mask=o_ok[:, None] & (cols_r < stride_po)[None, :], other=0.0)
                    pt = tl.trans(tl.where((rr < rank)[None, :], pt, 0.0))
                else:
                    pt = tl.load(P + (r_off + rr)[:, None] * stride_pr + outs[None, :] * stride_po,
                                 mask=(rr < rank)[:, None] & o_ok[None, :], other=0.0)
                lt, pt = _thin_operands(lt, pt, FTABLE + pid_m * 2, APPLY_SCALE, UPCAST)
                if WARP_SPECIALIZE:
                    # sm_100 + Triton 3.7.1: a dot into the loop's (TMEM) accumulator after a warp-specialised
                    # loop fails to compile (TritonGPUHoistTMEMAlloc), and acc + dot is combined into exactly that;
                    # the row select keeps the LoRA product a separate tile, as in the masked path (rows past
                    # n_valid are not stored anyway)
                    acc += tl.where(row_ok[:, None], dot_new(lt, pt), 0.0)
                else:  # accumulate straight into the MMA accumulator: no second tile
                    acc = dot_acc(lt, pt, acc)
            if HAS_BIAS:
                acc += tl.load(BIAS + outs, mask=o_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(OUT + rows[:, None] * stride_om + outs[None, :], acc.to(OUT.dtype.element_ty),
                     mask=row_ok[:, None] & o_ok[None, :])

    @triton.jit
    def _thin_operands(lt, pt, SCALE, APPLY_SCALE: tl.constexpr, UPCAST: tl.constexpr):
        """The LoRA term's two thin operands for ``tl.dot``: L (fp32) times the tile's scale (at SCALE) when
        APPLY_SCALE - on the thin operand, not on the [BLOCK_M, width] product - and both in P's dtype, or both
        float32 under the interpreter (UPCAST)."""
        if APPLY_SCALE:
            lt = lt * tl.load(SCALE)
        if UPCAST:
            return lt.to(tl.float32), pt.to(tl.float32)
        return lt.to(pt.dtype), pt

    @triton.jit
    def _masked_epilogue(acc, col0, rows, row_ok, rank, r_off, pid_m, L, P, MASK, BIAS, OUT, FTABLE, OUT_DIM,
                         stride_lm, stride_pr, stride_po, stride_mm, stride_om, WIDTH: tl.constexpr,
                         BLOCK_R: tl.constexpr, HAS_BIAS: tl.constexpr, APPLY_SCALE: tl.constexpr,
                         UPCAST: tl.constexpr):
        """Columns [col0, col0 + WIDTH) of a tile with the dropout mask: acc + mask * (L P) / (1-p) (times the
        scale with APPLY_SCALE) (+ bias), stored. The dropout mask acts on the product, a second [BLOCK_M, WIDTH]
        fp32 tile; mask layout: column c is bit (c // 32) % 8 of byte 32 * (c // 256) + c % 32."""
        outs = col0 + tl.arange(0, WIDTH)
        o_ok = outs < OUT_DIM
        if rank > 0:
            rr = tl.arange(0, BLOCK_R)
            lt = tl.load(L + rows[:, None] * stride_lm + rr[None, :], mask=row_ok[:, None], other=0.0)
            pt = tl.load(P + (r_off + rr)[:, None] * stride_pr + outs[None, :] * stride_po,
                         mask=(rr < rank)[:, None] & o_ok[None, :], other=0.0)
            lt, pt = _thin_operands(lt, pt, FTABLE + pid_m * 2, APPLY_SCALE, UPCAST)
            packed = tl.load(MASK + rows[:, None] * stride_mm + ((outs // 256) * 32 + outs % 32)[None, :],
                             mask=row_ok[:, None] & o_ok[None, :], other=0)
            keep = (packed.to(tl.int32) >> ((outs // 32) % 8)[None, :]) & 1
            acc += tl.where(keep != 0, dot_new(lt, pt) * tl.load(FTABLE + pid_m * 2 + 1), 0.0)
        if HAS_BIAS:
            acc += tl.load(BIAS + outs, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + rows[:, None] * stride_om + outs[None, :], acc.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & o_ok[None, :])

    @triton.jit
    def _lora_dy_kernel(
        DY, S, B, DS, DB, DBIAS, TABLE, FTABLE, N, db_copies,
        stride_dym, stride_sm, stride_bn, stride_dsm, stride_dbn, stride_dbc,
        SPLIT_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        HAS_DBIAS: tl.constexpr, UPCAST: tl.constexpr, B_ROWS: tl.constexpr = False, R_ALIGN: tl.constexpr = 1,
    ):
        """One read of dY per (tile, N split): dS[tile] += scale dY B, dB += scale dY^T S[tile], dbias += sum dY.
        dB goes to copy ``pid_m % db_copies`` (copies ``stride_dbc`` elements apart; the host sums them).
        B_ROWS: B is [N, R_total] with contiguous rows (stride_bn = R_total), read row-wise; R_ALIGN as in
        ``_lora_gemm_kernel``."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        DB = DB + (pid_m % db_copies) * stride_dbc
        row_start, n_valid, rank, r_off = _tile_entry(TABLE, pid_m)
        scale = tl.load(FTABLE + pid_m * 2 + 0)
        rm = tl.arange(0, BLOCK_M)
        rows = row_start + rm
        row_ok = rm < n_valid
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < rank
        cols_r = tl.max_contiguous(tl.multiple_of(r_off + rr, R_ALIGN), BLOCK_R)
        st = tl.load(S + rows[:, None] * stride_sm + rr[None, :], mask=row_ok[:, None], other=0.0)
        ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        n_end = tl.cdiv(N, BLOCK_N)
        if not HAS_DBIAS:  # a tile no adapter covers has nothing to do here
            n_end = n_end * (rank > 0).to(tl.int32)
        for nb in range(pid_n, n_end, SPLIT_N):
            cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            c_ok = cols < N
            dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :], mask=row_ok[:, None] & c_ok[None, :],
                         other=0.0)
            # rank 0 (only reached with HAS_DBIAS): B loads and dB adds are fully masked, no branch in the loop
            if B_ROWS:  # B [N, R_total] with contiguous rows: 16-byte row loads bounded by the row (a rank mask
                # along the row made them one-element loads). Other adapters' columns only reach dS columns
                # >= rank (dY B sums over N, not over R), which the dS add masks out.
                bt = tl.load(B + cols[:, None] * stride_bn + cols_r[None, :],
                             mask=c_ok[:, None] & (cols_r < stride_bn)[None, :] & (rank > 0), other=0.0)
            else:
                bt = tl.load(B + cols[:, None] * stride_bn + (r_off + rr)[None, :],
                             mask=c_ok[:, None] & r_ok[None, :], other=0.0)
            if UPCAST:
                ds = tl.dot(dy.to(tl.float32), bt.to(tl.float32), ds)
                db = tl.dot(tl.trans(dy.to(tl.float32)), st)
            else:
                ds = dot_acc(dy, bt, ds)
                db = dot_new(tl.trans(dy), st.to(DY.dtype.element_ty))
            # relaxed: only the sums matter, nothing in the kernel reads them back (Triton's default, acq_rel,
            # makes every add a fence: sm_90 PTX atom.global.gpu.acq_rel)
            tl.atomic_add(DB + cols[:, None] * stride_dbn + (r_off + rr)[None, :], db * scale,
                          mask=c_ok[:, None] & r_ok[None, :], sem="relaxed")
            if HAS_DBIAS:
                tl.atomic_add(DBIAS + cols, tl.sum(dy.to(tl.float32), axis=0), mask=c_ok, sem="relaxed")
        if rank > 0:
            tl.atomic_add(DS + rows[:, None] * stride_dsm + rr[None, :], ds * scale,
                          mask=row_ok[:, None] & r_ok[None, :], sem="relaxed")

    @triton.jit
    def _p_plane(P, col0, r_off, rr, r_ok, OUT_DIM, stride_pr, stride_po, PLANE: tl.constexpr):
        """P[r_off + rr, col0:col0 + PLANE] (zeros past the rank and past OUT_DIM)."""
        cols = col0 + tl.arange(0, PLANE)
        return tl.load(P + (r_off + rr)[:, None] * stride_pr + cols[None, :] * stride_po,
                       mask=r_ok[:, None] & (cols < OUT_DIM)[None, :], other=0.0)

    @triton.jit
    def _p_planes(P, col0, r_off, rr, r_ok, OUT_DIM, stride_pr, stride_po, PLANE: tl.constexpr):
        """The 8 planes of P that one dropout block of columns starting at col0 needs, loaded together."""
        return (_p_plane(P, col0, r_off, rr, r_ok, OUT_DIM, stride_pr, stride_po, PLANE),
                _p_plane(P, col0 + PLANE, r_off, rr, r_ok, OUT_DIM, stride_pr, stride_po, PLANE),
                _p_plane(P, col0 + 2 * PLANE, r_off, rr, r_ok, OUT_DIM, stride_pr, stride_po, PLANE),
                _p_plane(P, col0 + 3 * PLANE, r_off, rr, r_ok, OUT_DIM, stride_pr, stride_po, PLANE),
                _p_plane(P, col0 + 4 * PLANE, r_off, rr, r_ok, OUT_DIM, stride_pr, stride_po, PLANE),
                _p_plane(P, col0 + 5 * PLANE, r_off, rr, r_ok, OUT_DIM, stride_pr, stride_po, PLANE),
                _p_plane(P, col0 + 6 * PLANE, r_off, rr, r_ok, OUT_DIM, stride_pr, stride_po, PLANE),
                _p_plane(P, col0 + 7 * PLANE, r_off, rr, r_ok, OUT_DIM, stride_pr, stride_po, PLANE))

    @triton.jit
    def _lora_masked_term_kernel(
        L, P, MASK, OUT, TABLE, FTABLE, OUT_DIM,
        stride_lm, stride_pr, stride_po, stride_mm, stride_om,
        BLOCKS_PER_PROG: tl.constexpr, BLOCK_M: tl.constexpr, SUB_M: tl.constexpr, BLOCK_R: tl.constexpr,
        UPCAST: tl.constexpr, PLANE: tl.constexpr = 32, APPLY_SCALE: tl.constexpr = False,
    ):
        """dX's LoRA term alone: OUT[rows, cols] = keep * (L[rows, :r] @ P[r_off:r_off+r, cols]) / (1 - p) over
        BLOCKS_PER_PROG dropout blocks (8 planes of PLANE columns: one mask byte row per block, bit = plane), so
        the mask is read as bytes and expanded by shifts, never gathered. Rows no adapter covers get zeros."""
        PREFETCH_P: tl.constexpr = BLOCK_R <= 32
        pid_m = tl.program_id(0) // (BLOCK_M // SUB_M)
        sub = tl.program_id(0) % (BLOCK_M // SUB_M)
        pid_c = tl.program_id(1)
        row_start, n_valid, rank, r_off = _tile_entry(TABLE, pid_m)
        if sub * SUB_M < n_valid:
            rm = sub * SUB_M + tl.arange(0, SUB_M)
            rows = row_start + rm
            row_ok = rm < n_valid
            rr = tl.arange(0, BLOCK_R)
            r_ok = rr < rank  # rank 0: every load masked, the term is zero
            lanes = tl.arange(0, PLANE)
            lt = tl.load(L + rows[:, None] * stride_lm + rr[None, :], mask=row_ok[:, None] & r_ok[None, :],
                         other=0.0)
            inv_keep = tl.load(FTABLE + pid_m * 2 + 1)
            if APPLY_SCALE:  # L is dY B without the adapter's scale
                inv_keep = inv_keep * tl.load(FTABLE + pid_m * 2 + 0)
            if UPCAST:
                lt = lt.to(tl.float32)
            else:
                lt = lt.to(P.dtype.element_ty)
            n_blk = tl.cdiv(OUT_DIM, 8 * PLANE)
            for kb in range(pid_c * BLOCKS_PER_PROG, tl.minimum(n_blk, (pid_c + 1) * BLOCKS_PER_PROG)):
                packed = tl.load(MASK + rows[:, None] * stride_mm + (kb * PLANE + lanes)[None, :],
                                 mask=row_ok[:, None] & (rank > 0), other=0).to(tl.int32)
                # the block's 8 P planes are loaded before any store (interleaved, each load waited for the
                # previous plane's stores, which may alias P as far as the compiler knows); up to rank blocks of
                # 32 - at 128 the 8 planes took 188 registers (95 one at a time) for loads that hit L2 anyway
                if PREFETCH_P:
                    pts = _p_planes(P, kb * (8 * PLANE), r_off, rr, r_ok, OUT_DIM, stride_pr, stride_po, PLANE)
                for b in tl.static_range(8):
                    cols = kb * (8 * PLANE) + b * PLANE + lanes
                    c_ok = cols < OUT_DIM
                    if PREFETCH_P:
                        pt = pts[b]
                    else:
                        pt = _p_plane(P, kb * (8 * PLANE) + b * PLANE, r_off, rr, r_ok, OUT_DIM, stride_pr,
                                      stride_po, PLANE)
                    if UPCAST:
                        pt = pt.to(tl.float32)
                    term = dot_new(lt, pt)
                    term = tl.where(((packed >> b) & 1) != 0, term * inv_keep, 0.0)
                    tl.store(OUT + rows[:, None] * stride_om + cols[None, :], term.to(OUT.dtype.element_ty),
                             mask=row_ok[:, None] & c_ok[None, :])

    def _gemm_configs(tma: bool = False):
        def cfg(bo, bk, stages, warps):  # EPI_WARPS: the kernel's split rule needs the launch's warp count
            return triton.Config({"BLOCK_O": bo, "BLOCK_RED": bk, "GROUP_M": 8, "EPI_WARPS": warps, "USE_TMA": tma},
                                 num_stages=stages, num_warps=warps)
        return [cfg(256, 64, 3, 8), cfg(256, 64, 4, 8), cfg(128, 64, 3, 4), cfg(128, 64, 4, 4), cfg(128, 64, 3, 8),
                cfg(128, 128, 3, 8), cfg(64, 64, 4, 4)]

    if not INTERPRET:
        # Two tuners over one kernel: forward (OUT=N, RED=K) and dX (OUT=K, RED=N) keep separate caches.
        _KEY = list(GEMM_TUNE_KEY)
        _gemm_fwd_tuned = triton.autotune(configs=_gemm_configs(), key=_KEY)(_lora_gemm_kernel)
        _gemm_bwd_tuned = triton.autotune(configs=_gemm_configs(), key=_KEY)(_lora_gemm_kernel)
        # base_gemm="triton_tma": the same tiles with X and W through TMA descriptors
        _gemm_fwd_tuned_tma = triton.autotune(configs=_gemm_configs(tma=True), key=_KEY)(_lora_gemm_kernel)
        _gemm_bwd_tuned_tma = triton.autotune(configs=_gemm_configs(tma=True), key=_KEY)(_lora_gemm_kernel)


# ----------------------------------------------------------------------------------------------------------------
# Host side: tile table, launchers
# ----------------------------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def default_block_m(device: torch.device | str) -> int:
    """Rows per M tile: 128 on a GPU (the paper's padding unit), 16 under the interpreter."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return 128 if kind == "cuda" and not INTERPRET else 16


@dataclass(frozen=True)
class _TilePlan:
    """Per-tile metadata of one packed batch (host copy + device tensors)."""

    table: torch.Tensor  # int64 [n_tiles, 6]: row_start, n_valid, rank, rank_offset, keep_threshold, adapter_id
    ftable: torch.Tensor  # float32 [n_tiles, 2]: scale, 1/(1-p)
    n_tiles: int
    block_m: int
    block_r: int
    r_total: int
    has_dropout: bool
    segments: tuple  # ((adapter, start, end, rank, rank_offset), ...) covered segments, sorted
    scales: tuple  # per adapter
    r_align: int = 1  # every adapter's rank offset is a multiple of this (8 or 1)
    rank_of: tuple = ()  # per adapter
    extras: dict = field(default_factory=dict, compare=False, repr=False)  # lazily built per-plan tensors


_PLAN_CACHE: "OrderedDict[tuple, _TilePlan]" = OrderedDict()


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without stalling the host: a copy from pageable memory to a GPU waits for the
    GPU to drain; from pinned memory it is queued (a packed multi-LoRA batch changes its segments every step, so
    its tile table is built and uploaded on every call). ``t`` is built with ``device="cpu"`` explicitly: under
    ``torch.set_default_device("cuda")`` it was a CUDA tensor, which pin_memory refuses."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _tile_plan(T: int, segments: tuple, ranks: tuple, scales: tuple, ps: tuple, block_m: int,
               device: torch.device) -> _TilePlan:
    key = (T, segments, ranks, scales, ps, block_m, str(device))
    plan = _PLAN_CACHE.get(key)
    if plan is not None:
        _PLAN_CACHE.move_to_end(key)
        return plan
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + r)
    rows, frows = [], []

    def emit(start: int, end: int, aid: int) -> None:
        for s in range(start, end, block_m):
            n = min(block_m, end - s)
            if aid < 0:
                rows.append((s, n, 0, 0, 0, -1))
                frows.append((0.0, 1.0))
            else:
                rows.append((s, n, ranks[aid], offs[aid], keep_threshold(ps[aid]), aid))
                frows.append((float(scales[aid]), 1.0 / (1.0 - ps[aid])))

    pos = 0
    covered = []
    for aid, s, e in segments:
        if pos < s:
            emit(pos, s, -1)
        emit(s, e, aid)
        covered.append((aid, s, e, ranks[aid], offs[aid]))
        pos = e
    if pos < T:
        emit(pos, T, -1)
    has_dropout = any(ps[aid] > 0 for aid, _, _ in segments)
    plan = _TilePlan(
        table=_upload(torch.tensor(rows, dtype=torch.int64, device="cpu").reshape(-1, _TABLE_COLS), device),
        ftable=_upload(torch.tensor(frows, dtype=torch.float32, device="cpu").reshape(-1, 2), device),
        n_tiles=len(rows), block_m=block_m, block_r=max(16, _next_pow2(max(ranks) if ranks else 1)),
        r_total=offs[-1], has_dropout=has_dropout, segments=tuple(covered), scales=tuple(scales),
        r_align=8 if all(o % 8 == 0 for o in offs) else 1, rank_of=tuple(ranks),
    )
    _PLAN_CACHE[key] = plan
    if len(_PLAN_CACHE) > 64:
        _PLAN_CACHE.popitem(last=False)
    return plan


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda" and not INTERPRET:
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _split(n_tiles: int, n_blocks: int, device: torch.device, per_sm: int = 2) -> int:
    """How many programs share one tile's loop, so that a thin batch still fills the GPU (``per_sm`` programs
    per SM)."""
    if INTERPRET or device.type != "cuda":
        return max(1, min(2, n_blocks))  # exercise the atomic-add path in tests
    want = -(-per_sm * _num_sms(device) // max(n_tiles, 1))
    return max(1, min(want, n_blocks))


def _launch_opts(num_warps: int = 4, num_stages: int = 3) -> dict:
    return {} if INTERPRET else {"num_warps": num_warps, "num_stages": num_stages}


def _check_gemm_config(cfg, block_m: Optional[int]) -> int:
    """Validates an explicit ``gemm_config`` (a ``kernels.gemm.GemmConfig``) for the LoRA GEMMs; returns the M
    tile it implies (the tile table's rows per tile are the GEMM's BLOCK_M)."""
    for name in ("block_m", "block_n", "block_k", "group_m", "num_stages", "num_warps", "warp_specialize",
                 "maxnreg"):
        if not hasattr(cfg, name):
            raise ValueError(f"gemm_config: {cfg!r} has no field {name!r} (pass a kernels.gemm.GemmConfig)")
    if block_m is not None and int(block_m) != cfg.block_m:
        raise ValueError(f"block_m: {block_m} differs from gemm_config.block_m = {cfg.block_m}")
    return int(cfg.block_m)


def _config_launch(config, interpret: bool, used_tma: bool = False) -> tuple[dict, dict]:
    """(tile constexprs, compile options) of ``_lora_gemm_kernel`` for a GemmConfig: BLOCK_O = block_n,
    BLOCK_RED = block_k, GROUP_M = group_m; num_warps, num_stages and maxnreg (when set; not for a
    warp-specialized TMA config whose operands fell back to pointer tiles: ``kernels.gemm.launch_maxnreg``)
    except under the interpreter, which takes none of them."""
    consts = {"BLOCK_O": config.block_n, "BLOCK_RED": config.block_k, "GROUP_M": config.group_m,
              "WARP_SPECIALIZE": bool(config.warp_specialize),
              "EPI_WARPS": config.num_warps, "EPI_SPLIT": _INTERPRET_EPI_SPLIT if interpret else -1}
    opts = {} if interpret else {"num_warps": config.num_warps, "num_stages": config.num_stages}
    maxnreg = launch_maxnreg(config, used_tma)
    if maxnreg is not None and not interpret:
        opts["maxnreg"] = maxnreg
    return consts, opts


BASE_GEMMS = ("auto", "triton", "triton_tma", "torch", "torch_all", "torch_grouped")


def resolve_base_gemm(base_gemm: str, x: torch.Tensor) -> str:
    """"auto" -> "torch_all" (cuBLAS for every GEMM) on a GPU, "triton" elsewhere (the interpreter runs the fully
    fused kernel). On an H200 (2026-11-28 06:38 UTC, ``launch/device_check.py``, fwd+bwd over 24 grid shapes)
    "torch_all" was the fastest of the three on the 16 shapes with T >= 8192 or T = 4096 and a big layer
    (1.09-2.06x the frozen base at T=8192-16384 against 1.17-2.17x for "torch" and 1.37-2.58x for "triton");
    on the 8 smaller ones every variant was bound by host-side launch cost, since cut for "torch_all" (the dense
    form for one adapter over one run of rows: 8 GEMM calls per fwd+bwd whatever its segments, the scale on
    alpha; 15 aten ops per fwd+bwd without dropout instead of 38 - ``lora_bench.count_host_calls``, CPU; not
    re-measured on a GPU)."""
    if base_gemm not in BASE_GEMMS:
        raise ValueError(f"base_gemm: {base_gemm!r} must be one of {', '.join(BASE_GEMMS)}")
    if base_gemm == "auto":
        return "torch_all" if x.device.type == "cuda" else "triton"
    return base_gemm


#: per SM on sm_90: shared memory CTAs can use (228 KiB, 1 KiB of it reserved per CTA), threads, registers
_SMEM_PER_SM, _THREADS_PER_SM, _REGS_PER_SM = 228 * 1024, 2048, 65536


def _ctas_per_sm(config, elem_bytes: int) -> int:
    """CTAs of a GemmConfig that fit one SM (the persistent grid's programs per SM): by their operand rings in
    shared memory, by threads, and by registers counted at the 255-per-thread cap (the count is known only
    after compiling; these GEMMs sit near it, 166-255 on sm_90)."""
    ring = config.num_stages * (config.block_m + config.block_n) * config.block_k * elem_bytes + 1024
    threads = 32 * config.num_warps
    return max(1, min(_SMEM_PER_SM // ring, _THREADS_PER_SM // threads, _REGS_PER_SM // (255 * threads)))


def _tma_ok(x: torch.Tensor, w: torch.Tensor, stride_wr: int, stride_wo: int) -> bool:
    """Whether X [rows, RED] and W (element (red, out) at ``stride_wr``/``stride_wo``) can be read through TMA
    descriptors (``kernels.gemm.tma_unit_axis``): X with unit stride along RED, W along either axis, 16-byte
    aligned base addresses and row strides, rows that neither overlap nor repeat (a broadcast dY has row stride
    0: pointer tiles)."""
    if tma_unit_axis(x) != 1:
        return False
    axis = tma_unit_axis(w)
    return axis is not None and (stride_wr == 1 or stride_wo == 1) and w.stride(axis) == 1


def _gemm(x, w, stride_wr, stride_wo, lmat, pmat, stride_pr, stride_po, mask, bias, out, plan: _TilePlan,
          out_dim: int, red_dim: int, *, apply_scale: bool, backward: bool, config=None,
          epi_split: Optional[int] = None, tma: bool = False) -> None:
    """Y = X W^T (+ LoRA term, bias) or dX = dY W (+ masked LoRA term) in our kernel, the LoRA term joining
    the register accumulator after the K loop. ``config`` (GemmConfig or None): None autotunes on a GPU and uses
    a fixed 16x16 tile under the interpreter; a config launches with its block_n (BLOCK_O), block_k
    (BLOCK_RED), group_m, num_stages, num_warps and maxnreg (its block_m is the tile table's ``plan.block_m``;
    the knobs are ignored by the interpreter, as in ``kernels.gemm``). ``epi_split`` (with a config only):
    overrides the masked epilogue's form, 0 full width, 1 per column half (``launch/lora_kernel_sweep.py``).
    ``tma`` (or a config with ``tma=True``) reads X and W through TMA descriptors where ``_tma_ok`` allows, else
    pointer tiles (autotuned over the same tiles either way)."""
    if epi_split is not None and config is None:
        raise ValueError("epi_split: only with an explicit config (the autotuned launch applies the split rule)")
    dummy = plan.table
    args = (x, w, lmat, pmat, mask if mask is not None else dummy, bias if bias is not None else dummy, out,
            plan.table, plan.ftable, plan.n_tiles, out_dim, red_dim, _next_pow2(x.shape[0]), x.shape[0],
            x.stride(0), stride_wr, stride_wo, lmat.stride(0), stride_pr, stride_po,
            mask.stride(0) if mask is not None else 0, out.stride(0))
    flags = dict(BLOCK_M=plan.block_m, BLOCK_R=plan.block_r, HAS_BIAS=bias is not None,
                 HAS_MASK=mask is not None, APPLY_SCALE=apply_scale, UPCAST=INTERPRET,
                 # the forward's B [N, R_total] only (dX's A [R_total, K] with K = 1 has the same strides)
                 P_R_UNIT=not backward and stride_pr == 1 and stride_po == pmat.shape[1], R_ALIGN=plan.r_align)
    use_tma = (tma or bool(getattr(config, "tma", False))) and _tma_ok(x, w, stride_wr, stride_wo)
    if use_tma:
        flags["W_OUT_MAJOR"] = stride_wr == 1
        if x.is_cuda:
            set_descriptor_allocator()
    if config is not None:
        grid = (plan.n_tiles * triton.cdiv(out_dim, config.block_n),)
        if getattr(config, "persistent", False):
            grid = (min(grid[0], _num_sms(x.device) * _ctas_per_sm(config, x.element_size())),)
            flags["PERSISTENT"] = True
        consts, opts = _config_launch(config, INTERPRET, use_tma)
        if epi_split is not None:
            consts["EPI_SPLIT"] = int(epi_split)
        _lora_gemm_kernel[grid](*args, **consts, USE_TMA=use_tma, **flags, **opts)
    elif INTERPRET:
        grid = (plan.n_tiles * triton.cdiv(out_dim, 16),)
        _lora_gemm_kernel[grid](*args, BLOCK_O=16, BLOCK_RED=16, GROUP_M=2, EPI_SPLIT=_INTERPRET_EPI_SPLIT,
                                USE_TMA=use_tma, **flags)
    elif use_tma:
        kernel = _gemm_bwd_tuned_tma if backward else _gemm_fwd_tuned_tma
        grid = lambda meta: (plan.n_tiles * triton.cdiv(out_dim, meta["BLOCK_O"]),)  # noqa: E731
        kernel[grid](*args, **flags)
    else:
        kernel = _gemm_bwd_tuned if backward else _gemm_fwd_tuned
        grid = lambda meta: (plan.n_tiles * triton.cdiv(out_dim, meta["BLOCK_O"]),)  # noqa: E731
        kernel[grid](*args, **flags)


def _down(x2, a_cat, plan: _TilePlan, seed, with_s: bool, launch: Optional[dict] = None, all_rows: bool = False):
    """Step 1: S (fp32 [T, BLOCK_R], or None when ``with_s`` is False), Xd (or X) and the packed keep bits
    (uint8 [T, mask_bytes(K)]) or None, from one read of X."""
    T, K = x2.shape
    dev = x2.device
    s = torch.zeros((T, plan.block_r), device=dev, dtype=torch.float32) if with_s else None
    if plan.has_dropout:
        xd = torch.empty_like(x2)
        mask = torch.empty((T, mask_bytes(K)), device=dev, dtype=torch.uint8)
    else:
        xd, mask = x2, None
        if not with_s:
            return s, xd, mask
    block_k = 16 if INTERPRET else 64
    knobs = down_knobs(plan.block_r, with_s, launch)
    sub_m = min(knobs["sub_m"], plan.block_m)
    n_rows = plan.n_tiles * (plan.block_m // sub_m)
    n_blocks = triton.cdiv(K, DROP_BLOCK) if plan.has_dropout else triton.cdiv(K, block_k)
    split_k = _split(n_rows, n_blocks, dev, per_sm=knobs["per_sm"])
    dummy = s if s is not None else plan.ftable
    _lora_down_kernel[(n_rows, split_k)](
        x2, a_cat, dummy, xd, mask if mask is not None else dummy, plan.table, plan.ftable, seed, K,
        x2.stride(0), a_cat.stride(0), s.stride(0) if s is not None else 0, xd.stride(0),
        mask.stride(0) if mask is not None else 0,
        SPLIT_K=split_k, BLOCK_M=plan.block_m, BLOCK_K=block_k, BLOCK_R=plan.block_r,
        HAS_DROPOUT=plan.has_dropout, HAS_DOT=with_s, UPCAST=INTERPRET, PLANE=DROP_PLANE, SUB_M=sub_m,
        SEED_FROM_PTR=isinstance(seed, torch.Tensor), ALL_ROWS=all_rows,
        **(_launch_opts(knobs["warps"], _DOWN_STAGES) if plan.has_dropout
           else _launch_opts(_DOWN_PLAIN_WARPS, _DOWN_PLAIN_STAGES)))
    return s, xd, mask


def _uncovered(plan: _TilePlan, T: int):
    """Row ranges [start, end) that no segment covers."""
    pos, gaps = 0, []
    for _, start, end, _, _ in plan.segments:
        if pos < start:
            gaps.append((pos, start))
        pos = end
    if pos < T:
        gaps.append((pos, T))
    return gaps


def _masked_term(ds, a_cat, mask, out, plan: _TilePlan, apply_scale: bool = False,
                 launch: Optional[dict] = None) -> None:
    """dX's LoRA term with the dropout mask, mask * (dS A) / (1 - p), by ``_lora_masked_term_kernel``
    (``apply_scale``: ``ds`` lacks the adapter's scale, the kernel applies it)."""
    T, K = out.shape
    knobs = {**TERM_LAUNCH, **(launch or {})}
    sub_m = min(knobs["sub_m"], plan.block_m)
    n_rows = plan.n_tiles * (plan.block_m // sub_m)
    n_blk = triton.cdiv(K, DROP_BLOCK)
    per_prog = 1 if INTERPRET else max(1, -(-n_blk // knobs["split"]))
    _lora_masked_term_kernel[(n_rows, triton.cdiv(n_blk, per_prog))](
        ds, a_cat, mask, out, plan.table, plan.ftable, K,
        ds.stride(0), a_cat.stride(0), a_cat.stride(1), mask.stride(0), out.stride(0),
        BLOCKS_PER_PROG=per_prog, BLOCK_M=plan.block_m, SUB_M=sub_m, BLOCK_R=plan.block_r, UPCAST=INTERPRET,
        PLANE=DROP_PLANE, APPLY_SCALE=apply_scale, **_launch_opts(knobs["warps"], 1))


def _fill_uncovered(out, plan: _TilePlan, bias=None) -> None:
    """Rows no segment covers get the bias (or zeros): the LoRA term there is zero."""
    for start, end in _uncovered(plan, out.shape[0]):
        if bias is not None:
            out[start:end] = bias
        else:
            out[start:end].zero_()


def _cublas_lora_term(x2, weight, bias, b_cat, plan: _TilePlan, s_rows) -> torch.Tensor:
    """Y = scale S B^T (+ bias) per segment by cuBLAS into Y's rows (scale on alpha; beta = 0 on the
    uninitialised rows; rows no segment covers get the bias or zeros), then Y += X W^T through C.
    ``s_rows(aid, start, end, rank, r_off)`` gives the segment's S [rows, rank] in the input dtype."""
    y = torch.empty((x2.shape[0], weight.shape[0]), device=x2.device, dtype=x2.dtype)
    bias = bias.to(x2.dtype) if bias is not None else None  # cuBLAS takes C in the output dtype
    _fill_uncovered(y, plan, bias)
    for aid, start, end, rank, r_off in plan.segments:
        sv = s_rows(aid, start, end, rank, r_off)
        bt = b_cat[:, r_off:r_off + rank].t()
        if bias is not None:
            torch.addmm(bias, sv, bt, alpha=plan.scales[aid], out=y[start:end])
        else:
            y[start:end].addmm_(sv, bt, beta=0, alpha=plan.scales[aid])
    y.addmm_(x2, weight.t())
    return y


def _dense_run(plan: _TilePlan) -> Optional[tuple[int, int]]:
    """The rows [lo, hi) of ``torch_all``'s dense form, or None for the per-segment form; built once per plan. The
    dense form needs one adapter whose segments are one run of adjacent rows (any number of segments, rows before
    and after uncovered: a packed batch padded at its end). Its GEMMs then take that run's rows as one view, so
    no GEMM reads a row no segment covers. Why not a zero row mask over every row: the reductions over rows
    (dA = P^T Xd, dB = dY^T S) and S = Xd A^T would multiply an uncovered row's inf/nan (padding rows after a
    fully masked attention, garbage in an unused buffer) by zero - nan in the adapter's gradients and in that
    row's output - where per segment those rows are never read. Gaps between segments, several adapters (a GEMM
    over every adapter's rank columns sums one adapter's inf/nan weights or gradients, times zero, into the
    others' rows) or no segment: per segment, each adapter's GEMMs touching only its own weights and rows."""
    got = plan.extras.get("dense_run", False)
    if got is not False:
        return got
    segs = plan.segments
    got = None
    if len(plan.rank_of) == 1 and segs and all(segs[i][2] == segs[i + 1][1] for i in range(len(segs) - 1)):
        got = (segs[0][1], segs[-1][2])
    plan.extras["dense_run"] = got
    return got


def _run_rows(t: torch.Tensor, run: tuple[int, int]) -> torch.Tensor:
    """The rows [lo, hi) of ``t``: ``t`` itself when the run covers every row (no view op on the common path)."""
    lo, hi = run
    return t if lo == 0 and hi == t.shape[0] else t[lo:hi]


def _fill_outside(t: torch.Tensor, run: tuple[int, int], value=None) -> None:
    """Rows of ``t`` outside [lo, hi) get ``value`` (a row, e.g. the bias) or zeros."""
    lo, hi = run
    for a, b in ((0, lo), (hi, t.shape[0])):
        if a < b:
            if value is not None:
                t[a:b].copy_(value)
            else:
                t[a:b].zero_()


def _scaled_mm(a, b, alpha: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """alpha * (a @ b) as one GEMM call (alpha on cuBLAS's alpha; beta = 0 ignores the uninitialised C), into
    ``out`` when given."""
    if out is None:
        if alpha == 1.0:
            return torch.mm(a, b)
        out = torch.empty((a.shape[0], b.shape[1]), device=a.device, dtype=a.dtype)
    return out.addmm_(a, b, beta=0, alpha=alpha)


def _forward_torch_all(x2, weight, bias, a_cat, b_cat, plan: _TilePlan, seed):
    """``base_gemm="torch_all"``: cuBLAS for every GEMM. Dense form (one adapter over one run of rows,
    ``_dense_run``): S = scale * (Xd A^T) over the run's rows (the scale on alpha), Y[run] = S B^T (+ bias),
    the rows outside the run the bias or zeros, then Y += X W^T through C: 3 GEMMs whatever the number of
    segments (a run covering every row: no views, no fills). Saves S (scaled) in the input dtype, [T, r]: rows
    outside the run unwritten (never read). Otherwise per segment (``_forward_torch_all_segments``)."""
    T = x2.shape[0]
    run = _dense_run(plan)
    if run is None:
        return _forward_torch_all_segments(x2, weight, bias, a_cat, b_cat, plan, seed)
    alpha = plan.scales[0]
    _, xd, mask = _down(x2, a_cat, plan, seed, with_s=False)  # Xd and the bits on the covered rows
    bias = _as_dtype(bias, x2.dtype) if bias is not None else None  # cuBLAS takes C in the output dtype
    if run == (0, T):
        s = _scaled_mm(xd, a_cat.t(), alpha)
        y = torch.addmm(bias, s, b_cat.t()) if bias is not None else torch.mm(s, b_cat.t())
    else:
        s = torch.empty((T, a_cat.shape[0]), device=x2.device, dtype=x2.dtype)
        y = torch.empty((T, weight.shape[0]), device=x2.device, dtype=x2.dtype)
        sv, yv = _run_rows(s, run), _run_rows(y, run)
        _scaled_mm(_run_rows(xd, run), a_cat.t(), alpha, out=sv)
        if bias is not None:
            torch.addmm(bias, sv, b_cat.t(), out=yv)
        else:
            yv.addmm_(sv, b_cat.t(), beta=0)
        _fill_outside(y, run, bias)
    y.addmm_(x2, weight.t())
    return y, s, xd, mask


def _backward_torch_all(dy2, weight, a_cat, b_cat, s, xd, mask, plan: _TilePlan, need_dx: bool,
                        need_dbias: bool):
    """The backward of ``_forward_torch_all``. Dense form, on the run's rows only: P = scale * (dY B), dB = dY^T S,
    dA = P^T Xd; dX = dY W (every row) accumulated through C onto P A (zeros outside the run; without dropout) or
    onto mask * (P A) / (1 - p) (our kernel, zeros on uncovered rows): 5 GEMMs."""
    T = dy2.shape[0]
    run = _dense_run(plan)
    if run is None:
        return _backward_torch_all_segments(dy2, weight, a_cat, b_cat, s, xd, mask, plan, need_dx, need_dbias)
    alpha = plan.scales[0]
    dyv, sv, xv = _run_rows(dy2, run), _run_rows(s, run), _run_rows(xd, run)
    if run == (0, T):
        p = pv = _scaled_mm(dy2, b_cat, alpha)
    else:  # P on all T rows (our masked-term kernel indexes it by row), written on the run's
        p = torch.empty((T, b_cat.shape[1]), device=dy2.device, dtype=dy2.dtype)
        pv = _scaled_mm(dyv, b_cat, alpha, out=_run_rows(p, run))
    db = torch.mm(dyv.t(), sv)
    da = torch.mm(pv.t(), xv)
    dbias = torch.sum(dy2, dim=0, dtype=torch.float32) if need_dbias else None
    dx = None
    if need_dx:
        if mask is not None:
            dx = torch.empty_like(xd)
            _masked_term(p, a_cat, mask, dx, plan)  # P already carries the scale; uncovered rows get zeros
        elif run == (0, T):
            dx = torch.mm(p, a_cat)
        else:
            dx = torch.empty((T, a_cat.shape[1]), device=dy2.device, dtype=dy2.dtype)
            _run_rows(dx, run).addmm_(pv, a_cat, beta=0)
            _fill_outside(dx, run)
        dx.addmm_(dy2, weight)
    return dx, da, db, dbias


@dataclass(frozen=True)
class _Chunks:
    """A plan's rows as consecutive chunks covering [0, T) (segments and the gaps between them), so one
    ``split`` per tensor gives every segment's rows as views (one host call instead of a slice per segment)."""

    rows: tuple  # rows per chunk
    seg_chunk: tuple  # chunk index of each covered segment, in ``plan.segments`` order
    gap_chunk: tuple  # chunk indices of the gaps
    r_max: int  # the largest rank of a covered segment


def _chunks(plan: _TilePlan, T: int) -> _Chunks:
    got = plan.extras.get("chunks")
    if got is None:
        rows, seg_chunk, gap_chunk, pos = [], [], [], 0
        for _, start, end, _, _ in plan.segments:
            if pos < start:
                gap_chunk.append(len(rows))
                rows.append(start - pos)
            seg_chunk.append(len(rows))
            rows.append(end - start)
            pos = end
        if pos < T:
            gap_chunk.append(len(rows))
            rows.append(T - pos)
        got = _Chunks(tuple(rows), tuple(seg_chunk), tuple(gap_chunk),
                      max([rank for *_, rank, _ in plan.segments], default=1))
        plan.extras["chunks"] = got
    return got


def _rank_parts(t: torch.Tensor, plan: _TilePlan, dim: int) -> tuple:
    """Each adapter's rank rows (dim 0) or columns (dim 1) of a concatenated A / B / dA / dB as views, one call."""
    return (t,) if len(plan.rank_of) == 1 else t.split(plan.rank_of, dim=dim)


def _forward_torch_all_segments(x2, weight, bias, a_cat, b_cat, plan: _TilePlan, seed: int):
    """``base_gemm="torch_all"`` with several adapters: per segment two cuBLAS calls writing straight into views -
    S = Xd A^T into a [T, r_max] buffer, Y = scale S B^T (+ bias) into Y's rows, the scale on alpha - then
    Y += X W^T through C. No copies and no per-segment scaling passes; the segments' row views come from one
    ``split`` per tensor (``_chunks``), the adapters' A / B from one each: ~4 host calls per segment. Saves S in
    the input dtype."""
    T, N = x2.shape[0], weight.shape[0]
    ch = _chunks(plan, T)
    _, xd, mask = _down(x2, a_cat, plan, seed, with_s=False)
    s16 = torch.empty((T, ch.r_max), device=x2.device, dtype=x2.dtype)
    y = torch.empty((T, N), device=x2.device, dtype=x2.dtype)
    s_rows, x_rows, y_rows = s16.split(ch.rows), xd.split(ch.rows), y.split(ch.rows)
    a_parts, b_parts = _rank_parts(a_cat, plan, 0), _rank_parts(b_cat, plan, 1)
    bias = bias.to(x2.dtype) if bias is not None else None  # cuBLAS takes C in the output dtype
    for c in ch.gap_chunk:  # rows no segment covers: the bias or zeros (their LoRA term is zero)
        if bias is not None:
            y_rows[c].copy_(bias)
        else:
            y_rows[c].zero_()
    for (aid, _, _, rank, _), c in zip(plan.segments, ch.seg_chunk):
        sv = s_rows[c] if rank == ch.r_max else s_rows[c][:, :rank]
        sv.addmm_(x_rows[c], a_parts[aid].t(), beta=0)
        if bias is not None:
            torch.addmm(bias, sv, b_parts[aid].t(), alpha=plan.scales[aid], out=y_rows[c])
        else:
            y_rows[c].addmm_(sv, b_parts[aid].t(), beta=0, alpha=plan.scales[aid])
    y.addmm_(x2, weight.t())
    return y, s16, xd, mask


def _backward_torch_all_segments(dy2, weight, a_cat, b_cat, s16, xd, mask, plan: _TilePlan, need_dx: bool,
                                 need_dbias: bool):
    """The backward of ``_forward_torch_all_segments``: per segment P = dY B (dS = scale P), dB += scale dY^T S,
    dA += scale P^T Xd as cuBLAS calls into views (an adapter's first segment overwrites, beta = 0, later ones
    accumulate - in the parameters' dtype, as eager autograd sums per-segment grads); dX = dY W accumulated
    through C onto mask * scale (P A) / (1 - p) (our kernel, all segments in one launch) or, without dropout,
    onto scale P A per segment."""
    T = dy2.shape[0]
    ch = _chunks(plan, T)
    p = torch.empty((T, s16.shape[1]), device=dy2.device, dtype=dy2.dtype)
    # every adapter has a segment: each row of dA / dB gets written, no zero fill needed
    fresh = len({aid for aid, *_ in plan.segments}) == len(plan.scales)
    da = torch.empty_like(a_cat) if fresh else torch.zeros_like(a_cat)
    db = torch.empty_like(b_cat) if fresh else torch.zeros_like(b_cat)
    dy_rows, p_rows, s_rows, x_rows = dy2.split(ch.rows), p.split(ch.rows), s16.split(ch.rows), xd.split(ch.rows)
    b_parts, da_parts, db_parts = _rank_parts(b_cat, plan, 1), _rank_parts(da, plan, 0), _rank_parts(db, plan, 1)
    seen, pvs = set(), []
    for (aid, _, _, rank, _), c in zip(plan.segments, ch.seg_chunk):
        beta = 1 if (aid in seen or not fresh) else 0
        seen.add(aid)
        scale = plan.scales[aid]
        dyv = dy_rows[c]
        pv, sv = (p_rows[c], s_rows[c]) if rank == s16.shape[1] else (p_rows[c][:, :rank], s_rows[c][:, :rank])
        pv.addmm_(dyv, b_parts[aid], beta=0)
        db_parts[aid].addmm_(dyv.t(), sv, beta=beta, alpha=scale)
        da_parts[aid].addmm_(pv.t(), x_rows[c], beta=beta, alpha=scale)
        pvs.append(pv)
    dbias = torch.sum(dy2, dim=0, dtype=torch.float32) if need_dbias else None
    dx = None
    if need_dx:
        dx = torch.empty_like(xd)
        if mask is not None:
            _masked_term(p, a_cat, mask, dx, plan, apply_scale=True)
        else:
            dx_rows, a_parts = dx.split(ch.rows), _rank_parts(a_cat, plan, 0)
            for c in ch.gap_chunk:
                dx_rows[c].zero_()
            for (aid, *_), c, pv in zip(plan.segments, ch.seg_chunk, pvs):
                dx_rows[c].addmm_(pv, a_parts[aid], beta=0, alpha=plan.scales[aid])
        dx.addmm_(dy2, weight)
    return dx, da, db, dbias


#: torch's bf16 grouped GEMM takes fewer than 1024 groups; segments + gaps <= 2 * segments + 1
_MAX_GROUPS = 1024


@dataclass(frozen=True)
class _Groups:
    """A packed batch as ``torch._grouped_mm`` groups: contiguous row ranges covering [0, T) in order (segments
    and the gaps between them), each with its adapter's rank columns padded to ``r_pad``."""

    offs: torch.Tensor  # int32 [G]: cumulative row ends
    idx: torch.Tensor  # int64 [G * r_pad]: row of the rank-extended A (or column of B) for (group, j); r_total = zero
    col_scale: torch.Tensor  # float32 [r_total + 1]: the scale of each rank column, 0 for the zero row
    gscale: torch.Tensor  # float32 [G]: each group's scale (0 for gaps)
    r_pad: int
    n_groups: int


def _group_data(plan: _TilePlan, T: int, device) -> _Groups:
    got = plan.extras.get("groups")
    if got is not None:
        return got
    r_pad = -(-max(rank for *_, rank, _ in plan.segments) // 8) * 8  # 16-byte rows in bf16
    ends, idx, gscale, pos = [], [], [], 0
    col_scale = [0.0] * (plan.r_total + 1)

    def group(end, rank, r_off, scale):
        ends.append(end)
        idx.extend(r_off + j if j < rank else plan.r_total for j in range(r_pad))
        gscale.append(scale)

    for aid, start, end, rank, r_off in plan.segments:
        if pos < start:
            group(start, 0, 0, 0.0)
        group(end, rank, r_off, plan.scales[aid])
        col_scale[r_off:r_off + rank] = [plan.scales[aid]] * rank
        pos = end
    if pos < T:
        group(T, 0, 0, 0.0)
    got = _Groups(offs=_upload(torch.tensor(ends, dtype=torch.int32, device="cpu"), device),
                  idx=_upload(torch.tensor(idx, dtype=torch.int64, device="cpu"), device),
                  col_scale=_upload(torch.tensor(col_scale, dtype=torch.float32, device="cpu"), device),
                  gscale=_upload(torch.tensor(gscale, dtype=torch.float32, device="cpu"), device), r_pad=r_pad,
                  n_groups=len(ends))
    plan.extras["groups"] = got
    return got


def _grouped_ok(x2, weight, bias, a_cat, b_cat, check_ptr: bool = True) -> bool:
    """``torch._grouped_mm`` exists and takes these operands (16-byte aligned rows); no bias (it would cost a
    pass over Y: the per-segment path folds it into cuBLAS's C instead). ``check_ptr=False`` (a compile trace):
    X's address is not checked; the custom op copies an unaligned X when it runs."""
    if bias is not None or not hasattr(torch, "_grouped_mm"):
        return False
    # bf16 on a GPU (other dtypes take a path that copies the offsets to the host); fp32/fp16 on the CPU
    if x2.dtype not in ((torch.bfloat16,) if x2.is_cuda else (torch.float32, torch.float16, torch.bfloat16)):
        return False
    from .moe import gmm_aligned

    # the grouped operands: X / Xd [T, K], the gathered A rows [G, r_pad, K] and B rows [G, r_pad, N], dY [T, N]
    es = x2.element_size()
    return gmm_aligned(x2, check_ptr=check_ptr) and (x2.shape[1] * es) % 16 == 0 and (weight.shape[0] * es) % 16 == 0


def _grouped_rows(g: _Groups, a_cat, b_cat):
    """The groups' A rows [G, r_pad, K] and scaled B rows [G, r_pad, N], zero beyond each group's rank."""
    K, N = a_cat.shape[1], b_cat.shape[0]
    a_rows = torch.cat([a_cat, a_cat.new_zeros(1, K)]).index_select(0, g.idx)
    b_ext = torch.cat([b_cat, b_cat.new_zeros(N, 1)], dim=1) * g.col_scale.to(b_cat.dtype)
    b_rows = b_ext.t().index_select(0, g.idx)
    return a_rows.view(g.n_groups, g.r_pad, K), b_rows.view(g.n_groups, g.r_pad, N)


def _forward_grouped(x2, weight, a_cat, b_cat, plan: _TilePlan, seed):
    """``base_gemm="torch_grouped"``: ``torch_all`` with each thin GEMM one ``torch._grouped_mm`` over every
    segment (and the gaps, as zero-rank groups): a fixed number of host calls whatever the number of segments.
    S = Xd A_g^T, Y = (scale S) B_g^T, then Y += X W^T through C. Saves S [T, r_pad]."""
    T = x2.shape[0]
    g = _group_data(plan, T, x2.device)
    _, xd, mask = _down(x2, a_cat, plan, seed, with_s=False, all_rows=True)  # the gap groups read Xd too
    a_rows, b_rows = _grouped_rows(g, a_cat, b_cat)
    s = torch._grouped_mm(xd, a_rows.transpose(1, 2), offs=g.offs)
    y = torch._grouped_mm(s, b_rows, offs=g.offs)
    y.addmm_(x2, weight.t())
    return y, s, xd, mask


def _backward_grouped(dy2, weight, a_cat, b_cat, s, xd, mask, plan: _TilePlan, need_dx: bool, need_dbias: bool):
    """The backward of ``_forward_grouped``: dS = dY (scale B)_g, dB_g = scale dY_g^T S_g and dA_g = dS_g^T Xd_g
    as grouped GEMMs, summed into the adapters' rows by one ``index_add_`` each; dX = dY W through C onto the
    masked term (our kernel) or dS A_g (a grouped GEMM)."""
    from .moe import gmm_aligned

    T, N = dy2.shape
    K = xd.shape[1]
    if not gmm_aligned(dy2):  # an incoming gradient off the 16-byte grid, or broadcast (stride 0)
        dy2 = dy2.clone(memory_format=torch.contiguous_format)
    g = _group_data(plan, T, dy2.device)
    a_rows, b_rows = _grouped_rows(g, a_cat, b_cat)
    ds = torch._grouped_mm(dy2, b_rows.transpose(1, 2), offs=g.offs)  # scale already in B's rows
    dbg = torch._grouped_mm(dy2.t(), s, offs=g.offs) * g.gscale.to(s.dtype).view(-1, 1, 1)  # [G, N, r_pad]
    db = torch.zeros((plan.r_total + 1, N), device=dy2.device, dtype=b_cat.dtype)
    db.index_add_(0, g.idx, dbg.transpose(1, 2).reshape(-1, N))
    dag = torch._grouped_mm(ds.t(), xd, offs=g.offs)  # [G, r_pad, K]
    da = torch.zeros((plan.r_total + 1, K), device=dy2.device, dtype=a_cat.dtype)
    da.index_add_(0, g.idx, dag.view(-1, K))
    dbias = torch.sum(dy2, dim=0, dtype=torch.float32) if need_dbias else None
    dx = None
    if need_dx:
        if mask is not None:
            dx = torch.empty_like(xd)
            _masked_term(ds, a_cat, mask, dx, plan)
        else:
            dx = torch._grouped_mm(ds, a_rows, offs=g.offs)
        dx.addmm_(dy2, weight)
    return dx, da[:plan.r_total], db[:plan.r_total].t(), dbias


def down_knobs(block_r: int, with_s: bool, launch: Optional[dict] = None) -> dict:
    """The dropout / S kernel's launch knobs: ``DOWN_LAUNCH`` with ``launch``'s overrides; computing S over more
    than 16 rank columns, 8 warps unless ``launch`` sets them (4 warps: 252-255 registers and spills at sm_90 -
    kernel_report; 8 hold it in 124-181 without: a compiler report, not a timing, the sweep ran r=16 only)."""
    knobs = {**DOWN_LAUNCH, **(launch or {})}
    if with_s and block_r > 16 and "warps" not in (launch or {}):
        knobs["warps"] = max(int(knobs["warps"]), 8)
    return knobs


def dy_knobs(block_r: int, launch: Optional[dict] = None) -> dict:
    """The dY kernel's launch knobs for ``block_r`` rank columns: ``DY_LAUNCH`` with ``launch``'s overrides; past 64
    columns 8 warps unless ``launch`` sets them (128 columns on 4 warps: 255 registers and 1392 B of spills at
    sm_90; 8 warps: 236, none - an offline ptxas report of a kernel hunt, not a timing; 64 fit 4 warps in 248)."""
    knobs = {**DY_LAUNCH, **(launch or {})}
    if block_r > 64 and "warps" not in (launch or {}):
        knobs["warps"] = max(int(knobs["warps"]), 8)
    return knobs


def _dy_pass(dy2, s, b_cat, plan: _TilePlan, need_dbias: bool, launch: Optional[dict] = None):
    """Step 3 in our kernel: dS, dB (fp32) and dbias (fp32 or None) from one read of dY. ``launch`` overrides
    ``DY_LAUNCH`` (block_n is 16 under the interpreter)."""
    T, N = dy2.shape
    dev = dy2.device
    knobs = dy_knobs(plan.block_r, launch)
    copies = max(1, min(int(knobs["copies"]), plan.n_tiles))
    ds = torch.zeros((T, plan.block_r), device=dev, dtype=torch.float32)
    db = torch.zeros((copies, N, max(plan.r_total, 1)), device=dev, dtype=torch.float32)
    dbias = torch.zeros((N,), device=dev, dtype=torch.float32) if need_dbias else None
    block_n = 16 if INTERPRET else int(knobs["block_n"])
    split_n = _split(plan.n_tiles, triton.cdiv(N, block_n), dev, per_sm=int(knobs["per_sm"]))
    if plan.segments or dbias is not None:
        _lora_dy_kernel[(plan.n_tiles, split_n)](
            dy2, s, b_cat, ds, db, dbias if dbias is not None else ds, plan.table, plan.ftable, N, copies,
            dy2.stride(0), s.stride(0), b_cat.stride(0), ds.stride(0), db.stride(1), db.stride(0),
            SPLIT_N=split_n, BLOCK_M=plan.block_m, BLOCK_N=block_n, BLOCK_R=plan.block_r,
            HAS_DBIAS=dbias is not None, UPCAST=INTERPRET,
            B_ROWS=b_cat.stride(1) == 1 and b_cat.stride(0) == b_cat.shape[1], R_ALIGN=plan.r_align,
            **_launch_opts(int(knobs["warps"]), 3))
    return ds, db[0] if copies == 1 else db.sum(0), dbias


def _fused_forward(x2, weight, bias, a_cat, b_cat, plan: _TilePlan, seed: int, gemm_config=None,
                   base: str = "triton"):
    """Steps 1-2. Returns Y, S (fp32 [T, BLOCK_R]; "torch_all": input dtype [T, max rank]), Xd (or X), packed
    keep bits (uint8 [T, mask_bytes(K)]) or None."""
    if base == "torch_grouped":
        return _forward_grouped(x2, weight, a_cat, b_cat, plan, seed)
    if base == "torch_all":
        return _forward_torch_all(x2, weight, bias, a_cat, b_cat, plan, seed)
    T, K = x2.shape
    N = weight.shape[0]
    s, xd, mask = _down(x2, a_cat, plan, seed, with_s=True)
    if base == "torch":  # the LoRA term by cuBLAS from our S, the base GEMM through C
        y = _cublas_lora_term(x2, weight, bias, b_cat, plan, lambda aid, start, end, rank, r_off:
                              s[start:end, :rank].to(x2.dtype))
        return y, s, xd, mask
    y = torch.empty((T, N), device=x2.device, dtype=x2.dtype)
    _gemm(x2, weight, weight.stride(1), weight.stride(0), s, b_cat, b_cat.stride(1), b_cat.stride(0), None, bias, y,
          plan, N, K, apply_scale=True, backward=False, config=gemm_config, tma=base == "triton_tma")
    return y, s, xd, mask


def _grad_lora_a(ds: torch.Tensor, xd: torch.Tensor, plan: _TilePlan, K: int) -> torch.Tensor:
    """Step 4: dA = dS^T Xd per covered segment (thin GEMMs through torch.matmul; an adapter's segments are
    summed in fp32). One segment on a GPU: a single GEMM in the input dtype."""
    segs = plan.segments
    on_gpu = ds.device.type == "cuda"
    if on_gpu and len(segs) == 1 and segs[0][3] == plan.r_total:
        _, start, end, rank, _ = segs[0]
        return ds[start:end, :rank].to(xd.dtype).t() @ xd[start:end]
    da = torch.zeros((plan.r_total, K), device=ds.device, dtype=torch.float32)
    for _, start, end, rank, r_off in segs:
        if on_gpu:
            part = (ds[start:end, :rank].to(xd.dtype).t() @ xd[start:end]).float()
        else:
            part = ds[start:end, :rank].t() @ xd[start:end].float()
        da[r_off:r_off + rank] += part
    return da


def _fused_backward(dy2, weight, a_cat, b_cat, s, xd, mask, plan: _TilePlan, need_dx: bool, need_dbias: bool,
                    gemm_config=None, base: str = "triton"):
    """Steps 3-5. Returns dX (or None), dA_cat, dB_cat (fp32), dbias (fp32 or None)."""
    if base == "torch_grouped":
        return _backward_grouped(dy2, weight, a_cat, b_cat, s, xd, mask, plan, need_dx, need_dbias)
    if base == "torch_all":
        return _backward_torch_all(dy2, weight, a_cat, b_cat, s, xd, mask, plan, need_dx, need_dbias)
    T, N = dy2.shape
    K = weight.shape[1]
    ds, db, dbias = _dy_pass(dy2, s, b_cat, plan, need_dbias)
    da = _grad_lora_a(ds, xd, plan, K)
    dx = None
    if need_dx:
        dx = torch.empty((T, K), device=dy2.device, dtype=dy2.dtype)
        if base in ("triton", "triton_tma"):
            _gemm(dy2, weight, weight.stride(0), weight.stride(1), ds, a_cat, a_cat.stride(0), a_cat.stride(1),
                  mask, None, dx, plan, K, N, apply_scale=False, backward=True, config=gemm_config,
                  tma=base == "triton_tma")
        else:  # "torch": dX = dY W by cuBLAS through C onto the LoRA term (masked by our kernel, else cuBLAS)
            if mask is not None:
                _masked_term(ds, a_cat, mask, dx, plan)
            else:
                _fill_uncovered(dx, plan)
                for aid, start, end, rank, r_off in plan.segments:
                    torch.mm(ds[start:end, :rank].to(dy2.dtype), a_cat[r_off:r_off + rank], out=dx[start:end])
            dx.addmm_(dy2, weight)
    return dx, da, db[:, :plan.r_total], dbias


# torch's ``once_differentiable`` arms its double-backward error only when dY requires grad, but with a loss linear in
# Y (``y.sum()``, a masked sum) dY is a constant while dX = dY W^T + scale dY B A still depends on A and B (and dA, dB
# on x and on B, A): the second-order terms were dropped without a word (A's gradient off by 104 % in such a double
# backward). Armed also when A or B (forward inputs 3 and 4) needed a gradient; with only x (and the bias) trainable
# the backward is linear in dY alone, and a constant dY leaves nothing to drop.
_first_order_only = first_order_only(
    "lora_linear / multi_lora_linear: double backward is not supported (the fused kernels' backward builds no graph)",
    lambda ctx: ctx.needs_input_grad[3] or ctx.needs_input_grad[4])


class _FusedLoRAFunction(torch.autograd.Function):
    """Autograd over the fused kernels; inputs: x2 [T, K], weight, bias, A_cat [R, K], B_cat [N, R]."""

    @staticmethod
    def forward(ctx, x2, weight, bias, a_cat, b_cat, plan, seed, gemm_config=None, base="triton"):
        y, s, xd, mask = _fused_forward(x2, weight, bias, a_cat, b_cat, plan, seed, gemm_config, base)
        ctx.save_for_backward(weight, a_cat, b_cat, s, xd, mask)
        ctx.plan = plan
        ctx.gemm_config = gemm_config
        ctx.base = base
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    @_first_order_only  # the kernels' backward builds no graph: a double backward through it raises
    def backward(ctx, dy):
        weight, a_cat, b_cat, s, xd, mask = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_dbias = ctx.has_bias and ctx.needs_input_grad[2]
        dy2 = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx, da, db, dbias = _fused_backward(dy2, weight, a_cat, b_cat, s, xd, mask, ctx.plan, need_dx, need_dbias,
                                            ctx.gemm_config, ctx.base)
        return (dx, None, dbias.to(ctx.bias_dtype) if dbias is not None else None,
                _as_dtype(da, a_cat.dtype), _as_dtype(db, b_cat.dtype), None, None, None, None)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LoRAAdapterWeights:
    """One adapter of a packed multi-LoRA batch: lora_a [r, K], lora_b [N, r], scale (alpha/r, or alpha/sqrt(r)
    for rsLoRA), dropout probability p in [0, 1)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    dropout_p: float = 0.0


def _autocasting(device_type: str) -> bool:
    """torch.is_autocast_enabled for ``device_type``, False where autocast does not exist (the meta device: it
    raised "unknown device type for autocast", and meta-device shape inference of a fused-LoRA model failed)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def backend_for(x: torch.Tensor) -> str:
    """'triton' (GPU), 'interpret' (CPU under TRITON_INTERPRET=1) or 'torch' (reference fallback)."""
    if not HAVE_TRITON:
        return "torch"
    if INTERPRET:
        return "interpret" if x.device.type == "cpu" else "torch"
    return "triton" if x.device.type == "cuda" else "torch"


def _warn_fallback(x: torch.Tensor) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        why = "triton is not installed" if not HAVE_TRITON else (
            f"tensors on {x.device.type} and TRITON_INTERPRET={'1' if INTERPRET else 'unset'}")
        warnings.warn(f"adasched.kernels.lora: fused Triton kernels unavailable ({why}); using the torch "
                      "reference path (same results, unfused)", RuntimeWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside this package's kernels and torch (torch.compiler.disable's
    wrapper sits between the caller and the fallback)."""
    skip = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _number(value, name: str) -> float:
    """``float(value)``, or a ValueError naming the argument (scale=None raised "float() argument must be a string
    or a real number", naming nothing). A tensor that requires grad is refused: its gradient would be dropped (a
    trainable scale did not train)."""
    if isinstance(value, torch.Tensor) and value.requires_grad:
        raise ValueError(f"{name}: a tensor that requires grad is not supported (no gradient reaches it); pass a "
                         "number or a detached tensor")
    if isinstance(value, (bool, str, bytes)):  # (float() took "2" as 2.0 and True as 1.0)
        raise ValueError(f"{name}: {value!r} must be a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} must be a number") from None


def _check_types(x, weight, bias, adapters, segments) -> None:
    """The arguments' kinds, before anything reads them (None or a list for a tensor, a tuple for an adapter, None
    for the segments: AttributeErrors and TypeErrors from deep inside)."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) and not (name == "bias" and t is None):
            raise ValueError(f"{name}: must be a tensor{' or None' if name == 'bias' else ''}, got "
                             f"{type(t).__name__}")
    if not isinstance(adapters, (list, tuple)):
        raise ValueError(f"adapters: must be a list of LoRAAdapterWeights, got {type(adapters).__name__}")
    for i, ad in enumerate(adapters):
        if not isinstance(ad, LoRAAdapterWeights):
            raise ValueError(f"adapters[{i}]: must be a LoRAAdapterWeights, got {type(ad).__name__}")
        for name in ("lora_a", "lora_b"):
            if not isinstance(getattr(ad, name), torch.Tensor):
                raise ValueError(f"adapters[{i}].{name}: must be a tensor, got {type(getattr(ad, name)).__name__}")
    if segments is None or isinstance(segments, (str, bytes)) or not hasattr(segments, "__iter__"):
        raise ValueError(f"segments: must be a list of (adapter_index, row_start, row_end), got "
                         f"{type(segments).__name__}")


def _check_single(x, weight, bias, lora_a, lora_b) -> None:
    """:func:`_check_types` for one adapter's arguments, named as ``lora_linear`` names them."""
    _check_types(x, weight, bias, [], [])
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: must be a tensor, got {type(t).__name__}")


def _validate(x2, weight, bias, adapters: Sequence[LoRAAdapterWeights], segments) -> tuple:
    """Checks shapes/dtypes/segments; returns the segments sorted by start, empty ones dropped."""
    T, K = x2.shape
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight: shape {tuple(weight.shape)} must be [N, {K}] for x [..., {K}]")
    if weight.dtype != x2.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} must equal x dtype {x2.dtype}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight: must be frozen (requires_grad=False); LoRA trains lora_a/lora_b only")
    N = weight.shape[0]
    dev = x2.device
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != dev:
            raise ValueError(f"{name}: on {t.device}, x is on {dev}")
    for i, ad in enumerate(adapters):  # the names formatted only for an error (this runs on every call)
        for name in ("lora_a", "lora_b"):
            t = getattr(ad, name)
            if t.device != dev:
                raise ValueError(f"adapters[{i}].{name}: on {t.device}, x is on {dev}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias: shape {tuple(bias.shape)} must be [{N}]")
    if bias is not None and not computable_float(bias.dtype):  # (an int64 bias was taken and cast)
        raise ValueError(float_dtype_error("bias", bias.dtype))
    for i, ad in enumerate(adapters):
        a, b = ad.lora_a, ad.lora_b
        # (complex adapters lost their imaginary part with a warning; bool and int ones were taken as numbers)
        if not (computable_float(a.dtype) and computable_float(b.dtype)):
            bad = "lora_a" if not computable_float(a.dtype) else "lora_b"
            raise ValueError(float_dtype_error(f"adapters[{i}].{bad}", getattr(ad, bad).dtype))
        if a.dim() != 2 or a.shape[1] != K or a.shape[0] < 1:
            raise ValueError(f"adapters[{i}].lora_a: shape {tuple(a.shape)} must be [r, {K}] with r >= 1")
        if b.dim() != 2 or tuple(b.shape) != (N, a.shape[0]):
            raise ValueError(f"adapters[{i}].lora_b: shape {tuple(b.shape)} must be [{N}, {a.shape[0]}]")
        if not 0.0 <= _number(ad.dropout_p, f"adapters[{i}].dropout_p") < 1.0:
            raise ValueError(f"adapters[{i}].dropout_p: {ad.dropout_p} must be in [0, 1)")
        if not math.isfinite(_number(ad.scale, f"adapters[{i}].scale")):
            raise ValueError(f"adapters[{i}].scale: {ad.scale} must be finite")
    segs = []
    for j, seg in enumerate(segments):
        try:
            if any(isinstance(v, bool) for v in seg):  # True is an int to operator.index: adapter 1 by accident
                raise TypeError("bool")
            aid, s, e = (operator.index(v) for v in seg)  # ints only: 2.5 or "3" is not silently truncated
        except (TypeError, ValueError):
            raise ValueError(f"segments[{j}]: {seg!r} must be (adapter_index, row_start, row_end), three ints"
                             ) from None
        if not 0 <= aid < len(adapters):
            raise ValueError(f"segments[{j}]: adapter index {aid} not in [0, {len(adapters)})")
        if not 0 <= s <= e <= T:
            raise ValueError(f"segments[{j}]: rows [{s}, {e}) must satisfy 0 <= start <= end <= {T}")
        if e > s:
            segs.append((aid, s, e))
    segs.sort(key=lambda t: t[1])
    for (a0, s0, e0), (a1, s1, e1) in zip(segs, segs[1:]):
        if s1 < e0:
            raise ValueError(f"segments: rows [{s0}, {e0}) and [{s1}, {e1}) overlap")
    return tuple(segs)


def _resolve_seed(seed, adapters, segs, device=None):
    """The seed a call uses: an int, or a one-element int64 tensor on the activations' device (read by the
    dropout kernel on the device: nothing on the host depends on its value, so the call can be captured in a CUDA
    graph and the seed advanced in place between replays)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1 or (device is not None and seed.device != device):
            raise ValueError(f"seed: a tensor seed must be one int64 element on {device} (got {seed.dtype}, "
                             f"{seed.numel()} elements, on {seed.device})")
        return seed
    if any(adapters[aid].dropout_p > 0 for aid, _, _ in segs):
        if seed is None:
            return _draw_seed()
        _check_seed(seed)
        return int(seed)
    if seed is None:
        return 0
    _check_seed(seed)  # (unused without dropout, but 2**64 failed inside Triton and 1.5 was truncated)
    return int(seed)


def _host_seed(seed) -> int:
    """An int seed for the torch reference (reads a tensor seed back: a host sync, reference path only)."""
    if isinstance(seed, torch.Tensor):
        value = int(seed.reshape(()).item())
        _check_seed(value)
        return value
    return seed


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, adapters: Sequence[LoRAAdapterWeights],
                      segments: Sequence[tuple[int, int, int]], bias: Optional[torch.Tensor] = None,
                      seed: Optional[int] = None, block_m: Optional[int] = None,
                      gemm_config=None, base_gemm: str = "auto") -> torch.Tensor:
    """Packed multi-adapter LoRA linear over x [T, K]: rows [start, end) of each segment (adapter, start, end)
    get adapter ``adapter``'s LoRA term; rows no segment covers get x W^T + bias only. Differentiable w.r.t. x,
    bias and every adapter's lora_a/lora_b; weight [N, K] is frozen. Returns [T, N] in x's dtype.

    ``seed`` fixes the dropout masks (drawn from torch's default generator when None): an int, or a one-element
    int64 tensor on x's device that the dropout kernel reads on the device - then no host work depends on its
    value, so the call can sit in a CUDA graph with the seed advanced in place between replays (e.g.
    ``seed.add_(1)``; capture itself has not been run on a GPU yet; a negative value is not caught there, the
    kernel takes its 64 bits as unsigned). ``block_m`` is the M tile
    (rows per tile; default 128 on a GPU, 16 under the interpreter). ``gemm_config`` (a ``kernels.gemm.GemmConfig``,
    e.g. Twill's plan-derived one) fixes the launch of the two big GEMMs (Y = X W^T + LoRA, dX = dY W + LoRA):
    its block_m is the M tile, block_n / block_k / group_m / num_stages / num_warps / maxnreg are used as given
    (no autotuning); warp_specialize=True runs the K loop as ``tl.range(..., warp_specialize=True)`` (producer /
    consumer partitions; Triton supports it on Blackwell). None: autotuned on a GPU, a fixed small tile off it.
    Under ``torch.autocast`` every operand is cast to the autocast dtype first, as ``F.linear`` does (the LoRA
    parameters' gradients flow back through the casts in their own dtype). Without autocast, a segment whose
    adapter is wider than x (fp32 adapters, bf16 x: PEFT's default dtype mix) gets its LoRA term in the adapter's
    dtype, as PEFT's ``lora.Linear`` computes it (x cast up, the term added to the base output in that dtype,
    the sum rounded to x's dtype): that call runs torch ops (``_reference_impl``) with the dropout kernel's
    mask, not the fused GEMMs; under torch.compile the torch ops trace into the graph, only the mask's draw (with
    dropout) breaks it. Adapters narrower than x are cast up to x's dtype.

    ``base_gemm``: "triton" runs the two big GEMMs in our kernel with the LoRA term in its register
    accumulator; "triton_tma" the same with the K loop's X and W tiles through TMA descriptors where their rows
    are 16-byte aligned (sm_90+; compiled offline for sm_90, not yet timed on a GPU, so not what "auto" picks;
    with a ``gemm_config`` it sets its ``tma``); "torch" keeps our dropout/S and dY kernels but lets cuBLAS run the two big GEMMs, accumulating
    through their C input onto the LoRA term (+ bias) written first - by cuBLAS, or for dX with dropout by our
    masked-term kernel (``gemm_config`` then does not apply); "torch_all": cuBLAS for every GEMM, the thin LoRA ones too (S = Xd A^T, S B^T, dS, dB per
    segment), our kernels only for the dropout mask / Xd and the masked dX term (no gemm_config);
    "torch_grouped": "torch_all" with each thin GEMM one ``torch._grouped_mm`` over all segments - a fixed number
    of host calls for any number of adapters (falls back to "torch_all" with a bias, without ``_grouped_mm`` or
    with rows not 16-byte aligned; not measured on a GPU yet, so not what "auto" picks); "auto"
    (default): "torch_all" on a GPU, where it measured fastest, "triton" under the interpreter. Same results up
    to rounding."""
    _check_types(x, weight, bias, adapters, segments)
    dev = x.device.type
    if _autocasting(dev) and x.dtype != torch.float64:  # as F.linear: autocast leaves float64 alone
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return multi_lora_linear(
                x.to(dt), weight.to(dt), [replace(ad, lora_a=ad.lora_a.to(dt), lora_b=ad.lora_b.to(dt))
                                          for ad in adapters],
                segments, bias=bias.to(dt) if bias is not None else None, seed=seed, block_m=block_m,
                gemm_config=gemm_config, base_gemm=base_gemm)
    if gemm_config is not None:  # an explicit launch configuration is for our GEMM kernel
        if base_gemm in ("torch", "torch_all", "torch_grouped"):
            raise ValueError(f"base_gemm: {base_gemm!r} cannot take a gemm_config (it configures our Triton GEMM)")
        resolve_base_gemm(base_gemm, x)
        if base_gemm == "triton_tma" and not getattr(gemm_config, "tma", True):
            gemm_config = replace(gemm_config, tma=True)
        base_gemm = "triton"
    else:
        base_gemm = resolve_base_gemm(base_gemm, x)
    if x.dim() != 2:
        raise ValueError(f"x: shape {tuple(x.shape)} must be 2-D [T, K] for multi_lora_linear")
    if not computable_float(x.dtype):
        raise ValueError(float_dtype_error("x", x.dtype))
    if not adapters:
        raise ValueError("adapters: at least one adapter is required")
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    segs = _validate(x2, weight, bias, adapters, segments)
    # under torch.compile a None seed is drawn when the op runs (see kernels.lora_op), not while tracing
    compiling = torch.compiler.is_compiling()
    seed_v = None if (compiling and seed is None) else _resolve_seed(seed, adapters, segs, x2.device)
    if gemm_config is not None:
        block_m = _check_gemm_config(gemm_config, block_m)
    backend = backend_for(x2)
    if backend == "torch" and compiling and not _segments_drop(adapters, segs):
        # no kernel here (a CPU without TRITON_INTERPRET=1): without dropout the reference is plain torch ops, so
        # they trace into the graph (fullgraph=True works); with dropout the mask's seed is read on the host
        return _reference_impl(x2, weight, bias, adapters, segs, 0)
    if backend == "torch" or (x2.dtype == torch.float64 and not compiling):  # float64: the exact path (the kernels
        # accumulate in fp32); a compiled graph keeps the custom op (the reference would break fullgraph=True)
        return _reference_fallback(x2, weight, bias, adapters, segs, seed_v, warn=backend == "torch")
    bm = default_block_m(x2.device) if block_m is None else int(block_m)
    if bm < 16 or bm & (bm - 1):
        raise ValueError(f"block_m: {bm} must be a power of two >= 16")
    ranks = tuple(int(ad.lora_a.shape[0]) for ad in adapters)
    scales = tuple(float(ad.scale) for ad in adapters)
    ps = tuple(float(ad.dropout_p) for ad in adapters)
    if any(ps[aid] > 0 for aid, _, _ in segs):
        _check_counters(*x2.shape)
    if _wider_adapters(x2.dtype, adapters, segs):  # PEFT's numerics: the LoRA term in the adapters' dtype
        return _wider_adapter_call(x2, weight, bias, adapters, segs, seed_v, (ranks, scales, ps, bm))
    dt = x2.dtype
    if len(adapters) == 1:
        a_cat, b_cat = _as_dtype(adapters[0].lora_a, dt), _as_dtype(adapters[0].lora_b, dt)
    else:
        a_cat = torch.cat([_as_dtype(ad.lora_a, dt) for ad in adapters], dim=0)
        b_cat = torch.cat([_as_dtype(ad.lora_b, dt) for ad in adapters], dim=1)
    a_cat = a_cat if a_cat.stride(-1) == 1 else a_cat.contiguous()
    b_cat = b_cat if b_cat.stride(-1) == 1 else b_cat.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    if bias is not None and bias.stride(0) != 1:  # the GEMM epilogue reads the bias with unit stride
        bias = bias.contiguous()
    if x2.shape[0] == 0:  # no rows: the LoRA weights still get (zero) gradients, as with PEFT (DDP needs them)
        return F.linear(x2, w, bias.to(dt) if bias is not None else None) + F.linear(F.linear(x2, a_cat), b_cat)
    if base_gemm == "torch_grouped" and (not segs or 2 * len(segs) + 1 >= _MAX_GROUPS
                                         or not _grouped_ok(x2, w, bias, a_cat, b_cat, check_ptr=not compiling)):
        base_gemm = "torch_all"  # the per-segment cuBLAS path computes the same
    if compiling:  # one opaque custom op per call: no graph break, the tile table built when it runs
        return _lora_op.compiled_call(x2, w, bias, a_cat, b_cat, segs, ranks, scales, ps, seed_v, bm, gemm_config, base_gemm)
    plan = _tile_plan(x2.shape[0], segs, ranks, scales, ps, bm, x2.device)
    return _FusedLoRAFunction.apply(x2, w, bias, a_cat, b_cat, plan, seed_v, gemm_config, base_gemm)


def _as_dtype(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``t.to(dt)`` without the call when it already is (a host call saved on the common path)."""
    return t if t.dtype == dt else t.to(dt)


def _wider_adapter_call(x2, weight, bias, adapters, segs, seed, tiling) -> torch.Tensor:
    """Adapters wider than the input (fp32 adapters on a bf16 model without autocast, PEFT's default dtype mix):
    the base projection and each LoRA term by torch ops in PEFT's numerics (``_reference_impl``), the dropout mask
    drawn by the dropout kernel (the same bits as the fused path and the torch mirror; a tensor seed stays on the
    device). Unfused: what the kernels save here is only the mask's Philox draw. Under torch.compile the torch ops
    trace into the graph (``fullgraph=True`` works); only a call with dropout leaves it, for the mask's draw.
    ``tiling``: (ranks, scales, ps, block_m) of the tile plan the dropout kernel runs on."""
    keep = None
    if _segments_drop(adapters, segs):
        keep = _wider_keep_mask(x2, adapters, segs, seed, tiling)
    return _reference_impl(x2, weight, bias, adapters, segs, 0, keep=keep)


@torch.compiler.disable
def _wider_keep_mask(x2, adapters, segs, seed, tiling) -> torch.Tensor:
    """The boolean dropout mask [T, K] of a wider-adapter call, drawn by the dropout kernel (a mask-only launch:
    A is not read, HAS_DOT=False; Xd comes back in x's dtype and is not used); the torch mirror for no rows."""
    ranks, scales, ps, bm = tiling
    seed = _resolve_seed(seed, adapters, segs, x2.device)  # a None seed under torch.compile: drawn here, per call
    if not x2.shape[0]:
        return torch.zeros(x2.shape, dtype=torch.bool, device=x2.device)
    plan = _tile_plan(x2.shape[0], segs, ranks, scales, ps, bm, x2.device)
    _, _, bits = _down(x2.detach(), adapters[0].lora_a.detach(), plan, seed, with_s=False)
    return unpack_keep_bits(bits, x2.shape[1])


def _segments_drop(adapters, segs) -> bool:
    """Some row of some segment has dropout (decided on the host from the adapters' p: traceable)."""
    return any(float(adapters[aid].dropout_p) > 0 for aid, s, e in segs if e > s)


@torch.compiler.disable
def _reference_fallback(x2, weight, bias, adapters, segs, seed, warn: bool = True) -> torch.Tensor:
    """The torch reference where no fused kernel can run, or for float64 (outside any compiled graph: its seed is
    read on the host)."""
    if warn:
        _warn_fallback(x2)
    return _reference_impl(x2, weight, bias, adapters, segs, _host_seed(_resolve_seed(seed, adapters, segs)))


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                dropout_p: float = 0.0, bias: Optional[torch.Tensor] = None,
                seed: Optional[int] = None, gemm_config=None, base_gemm: str = "auto") -> torch.Tensor:
    """Fused LoRA linear: x [..., K] -> x W^T + scale * (dropout(x) A^T) B^T + bias, shape [..., N].

    weight [N, K] frozen; lora_a [r, K]; lora_b [N, r]; differentiable w.r.t. x, lora_a, lora_b and bias.
    Dropout keeps element (i, j) of x.reshape(-1, K) iff its Philox draw (module docstring) >= floor(p * 2**32)
    and scales kept elements by 1/(1-p); the same seed gives the same mask (see ``dropout_keep_mask``). ``gemm_config``:
    explicit launch configuration of the two big GEMMs (see ``multi_lora_linear``); None keeps the default.
    ``base_gemm``: "auto", "triton", "triton_tma" (TMA descriptor loads), "torch" (cuBLAS for the two big GEMMs),
    "torch_all" (cuBLAS for every GEMM) or "torch_grouped"; see ``multi_lora_linear``."""
    _check_single(x, weight, bias, lora_a, lora_b)
    if x.dim() == 0:
        raise ValueError("x: a 0-d tensor; must be [..., K]")
    flat = x.dim() == 2  # no reshape (a view and its backward: host calls) for a 2-D input
    # (rows spelled out: reshape(-1, 0) of a [..., 0] input is ambiguous and raised)
    x2 = x if flat else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    ad = LoRAAdapterWeights(lora_a, lora_b, _number(scale, "scale"), _number(dropout_p, "dropout_p"))
    y = multi_lora_linear(x2, weight, [ad], [(0, 0, x2.shape[0])], bias=bias, seed=seed, gemm_config=gemm_config,
                          base_gemm=base_gemm)
    return y if flat else y.reshape(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# Torch references (same signatures; plain autograd; identical dropout masks)
# ----------------------------------------------------------------------------------------------------------------
def _term_dtype(x_dtype: torch.dtype, ad: LoRAAdapterWeights) -> torch.dtype:
    """The dtype an adapter's LoRA term is computed in: the wider of the input's and lora_a's. With fp32 adapters
    on a bf16/fp16 input that is fp32, as PEFT's ``lora.Linear`` (it casts the input to lora_A's dtype); with
    adapters narrower than the input (bf16 adapters, fp32 input) the input's, where PEFT would round to bf16."""
    return torch.promote_types(x_dtype, ad.lora_a.dtype)


def _wider_adapters(x_dtype: torch.dtype, adapters, segs) -> bool:
    """Some segment's adapter is wider than the input (fp32 adapters on a bf16 input): its LoRA term is computed
    in the adapter's dtype, which the fused kernels (one dtype per launch) do not do."""
    return any(adapters[aid].lora_a.dtype != x_dtype and _term_dtype(x_dtype, adapters[aid]) != x_dtype
               for aid, _, _ in segs)  # the dtype test first: no torch call on the common path


def _reference_impl(x2, weight, bias, adapters, segs, seed: int, keep: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """``keep``: the boolean dropout mask [T, K] when already drawn (by the dropout kernel), else drawn here from
    ``seed`` by the torch mirror. Each segment's LoRA term is computed in ``_term_dtype`` (PEFT's numerics for fp32
    adapters on a bf16 input: the input cast up, S and the term in fp32, added to the base output in fp32, then
    rounded to the input's dtype); all in the input's dtype when the dtypes agree."""
    T, K = x2.shape
    y = F.linear(x2, weight, bias.to(x2.dtype) if bias is not None else None)  # a bias in another dtype: cast
    if keep is None and _segments_drop(adapters, segs):  # decided on the host: no tensor read (traceable)
        p_row = torch.zeros(T, dtype=torch.float64, device="cpu")
        for aid, s, e in segs:
            p_row[s:e] = float(adapters[aid].dropout_p)
        keep = dropout_keep_mask(seed, T, K, p_row, x2.device)
    acc = y.dtype
    for aid, _, _ in segs:
        acc = torch.promote_types(acc, _term_dtype(x2.dtype, adapters[aid]))
    delta = torch.zeros(y.shape, dtype=acc, device=y.device)
    for aid, s, e in segs:
        ad = adapters[aid]
        dt = _term_dtype(x2.dtype, ad)
        xs = x2[s:e].to(dt)
        if keep is not None and ad.dropout_p > 0:
            xs = xs * keep[s:e].to(dt) / (1.0 - float(ad.dropout_p))
        a, b = ad.lora_a.to(dt), ad.lora_b.to(dt)
        delta[s:e] = float(ad.scale) * F.linear(F.linear(xs, a), b)
    used = {aid for aid, _, _ in segs}
    for aid, ad in enumerate(adapters):  # an adapter without rows gets zero gradients (not None), as in the kernels
        if aid not in used:
            dt = _term_dtype(x2.dtype, ad)
            delta[0:0] = F.linear(F.linear(x2[0:0].to(dt), ad.lora_a.to(dt)), ad.lora_b.to(dt))
    return (y + delta).to(x2.dtype)


def multi_lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, adapters: Sequence[LoRAAdapterWeights],
                                segments: Sequence[tuple[int, int, int]], bias: Optional[torch.Tensor] = None,
                                seed: Optional[int] = None, block_m: Optional[int] = None,
                                gemm_config=None, base_gemm: str = "auto") -> torch.Tensor:
    """Plain-torch ``multi_lora_linear`` (``block_m`` and ``gemm_config`` are accepted and ignored); same masks for the same seed."""
    _check_types(x, weight, bias, adapters, segments)
    dev = x.device.type
    if _autocasting(dev) and x.dtype != torch.float64:  # as multi_lora_linear (the output was fp32
        dt = torch.get_autocast_dtype(dev)                            # under a bf16 autocast, the kernels' bf16)
        with torch.autocast(dev, enabled=False):
            return multi_lora_linear_reference(
                x.to(dt), weight.to(dt), [replace(ad, lora_a=ad.lora_a.to(dt), lora_b=ad.lora_b.to(dt))
                                          for ad in adapters],
                segments, bias=bias.to(dt) if bias is not None else None, seed=seed)
    if x.dim() != 2:
        raise ValueError(f"x: shape {tuple(x.shape)} must be 2-D [T, K] for multi_lora_linear")
    if not computable_float(x.dtype):
        raise ValueError(float_dtype_error("x", x.dtype))
    segs = _validate(x, weight, bias, adapters, segments)
    return _reference_impl(x, weight, bias, adapters, segs, _host_seed(_resolve_seed(seed, adapters, segs)))


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                          scale: float, dropout_p: float = 0.0, bias: Optional[torch.Tensor] = None,
                          seed: Optional[int] = None, gemm_config=None, base_gemm: str = "auto") -> torch.Tensor:
    """Plain-torch ``lora_linear`` with the identical dropout mask for the same seed (``gemm_config`` ignored)."""
    _check_single(x, weight, bias, lora_a, lora_b)
    if x.dim() == 0:  # (an IndexError here; lora_linear's message)
        raise ValueError("x: a 0-d tensor; must be [..., K]")
    K = x.shape[-1]
    x2 = x.reshape(math.prod(x.shape[:-1]), K)
    ad = LoRAAdapterWeights(lora_a, lora_b, _number(scale, "scale"), _number(dropout_p, "dropout_p"))
    y = multi_lora_linear_reference(x2, weight, [ad], [(0, 0, x2.shape[0])], bias=bias, seed=seed)
    return y.reshape(*x.shape[:-1], weight.shape[0])


from . import lora_op as _lora_op  # noqa: E402  (registers the torch.compile custom ops; imports this module)
