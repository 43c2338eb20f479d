"""``torch.compile`` support for the fused LoRA linear: the forward and backward as two opaque custom ops.

``multi_lora_linear`` / ``lora_linear`` (and ``FusedLoRALinear``) call ``_FusedLoRAFunction`` in eager mode; while
Dynamo traces them (``torch.compiler.is_compiling()``) they call ``adasched::lora_linear_fwd`` instead, whose
autograd formula calls ``adasched::lora_linear_bwd``. Both ops run the same ``_fused_forward`` /
``_fused_backward`` as the eager path, so a compiled model gets bit-identical outputs and gradients; the graph
does not break at the LoRA layer (``fullgraph=True`` works) and the fake (meta) implementations give the
compiler every output's shape, dtype and strides without launching a kernel.

What the ops take is plain data (the compiled graph holds no Python objects): the packed batch's segments as a
flat ``[adapter, start, end, ...]`` list, every adapter's rank, scale and dropout probability, the M tile, the
GEMM provider and a ``GemmConfig`` flattened to ints (``encode_config``). The tile table is built (and cached,
as in eager mode) when the op runs, not while tracing.

Seeds: ``seed=None`` draws the dropout seed in the graph on every call (``torch.randint`` on x's device, read by
the kernel from device memory), so a compiled step does not bake one mask into the graph and an activation-
checkpointed recompute replays the same draw. On the CPU that is the draw eager mode makes (bit-identical masks
under aot_eager; inductor uses its own random stream unless ``torch._inductor.config.fallback_random``); on a
GPU eager draws from the CPU generator and compiled code from the GPU's, so the masks differ between the two (as
for any random op under torch.compile). An int seed is a constant of the graph (Dynamo recompiles when it
changes: pass None or a tensor seed for per-step seeds); a one-element int64 tensor seed is read on the device,
as in eager mode.

Why not the custom ops in eager mode too: a custom op's dispatch costs host time per call, and the host side is
what small shapes pay for (BENCHMARKS.md, kernels); eager keeps the lighter ``autograd.Function``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import lora as L
from .gemm import GemmConfig

__all__ = ["lora_linear_fwd", "lora_linear_bwd", "encode_config", "decode_config", "compiled_call"]

#: GemmConfig fields as the ops carry them (ints; maxnreg None = -1)
_CFG_FIELDS = ("block_m", "block_n", "block_k", "group_m", "num_stages", "num_warps", "warp_specialize", "maxnreg",
               "tma", "persistent")


def encode_config(cfg: Optional[GemmConfig]) -> list[int]:
    """A GemmConfig as a list of ints (empty for None)."""
    if cfg is None:
        return []
    return [-1 if getattr(cfg, f) is None else int(getattr(cfg, f)) for f in _CFG_FIELDS]


def decode_config(values: list[int]) -> Optional[GemmConfig]:
    """The inverse of ``encode_config``."""
    if not values:
        return None
    kw = dict(zip(_CFG_FIELDS, values))
    for f in ("warp_specialize", "tma", "persistent"):
        kw[f] = bool(kw[f])
    kw["maxnreg"] = None if kw["maxnreg"] < 0 else kw["maxnreg"]
    return GemmConfig(**kw)


def _segments(flat: list[int]) -> tuple:
    return tuple((flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3))


def _plan(T: int, device, segs: list[int], ranks: list[int], scales: list[float], ps: list[float], block_m: int):
    return L._tile_plan(T, _segments(segs), tuple(ranks), tuple(scales), tuple(ps), block_m, device)


def _has_dropout(segs: list[int], ps: list[float]) -> bool:
    return any(ps[a] > 0 for a, _, _ in _segments(segs))


def _saved_lora_cols(segs: list[int], ranks: list[int], base: str) -> tuple[int, bool]:
    """Columns and fp32-ness of the S the forward saves, per provider (see ``_fused_forward``)."""
    covered = [ranks[a] for a, _, _ in _segments(segs)]
    if base == "torch_all":
        return max(covered, default=1), False
    if base == "torch_grouped":
        return -(-max(covered) // 8) * 8, False
    return max(16, L._next_pow2(max(ranks))), True


def _aligned_for(base: str, t: Tensor) -> Tensor:
    """``torch._grouped_mm`` reads X (or Xd) at a 16-byte aligned address; the trace could not check X's
    address (``_grouped_ok(check_ptr=False)``), so an unaligned one is copied here."""
    if base == "torch_grouped" and t.data_ptr() % 16:
        return t.clone(memory_format=torch.contiguous_format)
    return t


def _define_unwritten(plan, base: str, s: Tensor, xd: Tensor, mask: Optional[Tensor]) -> None:
    """Zeros where the forward leaves its saved buffers unwritten (nothing reads there): rows no segment covers
    in Xd and the keep bits, and in "torch_all"'s S also the columns past a segment's rank. The eager path skips
    this; an op's outputs should not depend on what the allocator handed out. (The dense "torch_all" form leaves
    the same rows unwritten: those outside its run, which no segment covers.)"""
    gaps = L._uncovered(plan, s.shape[0])
    for start, end in gaps:
        if plan.has_dropout and base != "torch_grouped":  # "torch_grouped" writes Xd on every row
            xd[start:end].zero_()
            mask[start:end].zero_()
        if base == "torch_all":
            s[start:end].zero_()
    if base == "torch_all":
        for _, start, end, rank, _ in plan.segments:
            if rank < s.shape[1]:
                s[start:end, rank:].zero_()


@torch.library.custom_op("adasched::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], a_cat: Tensor, b_cat: Tensor,
                    segs: list[int], ranks: list[int], scales: list[float], ps: list[float], seed: int,
                    seed_t: Optional[Tensor], block_m: int, base: str, config: list[int]
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Y and what the backward needs: (Y [T, N], S, Xd [T, K] or an empty tensor without dropout, the packed
    keep bits [T, mask_bytes(K)] or an empty uint8 tensor). The seed is ``seed_t`` (a device tensor) when given,
    else ``seed`` (< 0 only when no adapter of the batch has dropout: the op itself draws nothing)."""
    plan = _plan(x.shape[0], x.device, segs, ranks, scales, ps, block_m)
    x = _aligned_for(base, x)
    if seed_t is not None:
        seed_v = seed_t
    elif seed < 0:
        if plan.has_dropout:
            raise ValueError("seed: dropout needs a seed (compiled_call draws one when the caller gives none)")
        seed_v = 0
    else:
        seed_v = seed
    y, s, xd, mask = L._fused_forward(x, weight, bias, a_cat, b_cat, plan, seed_v, decode_config(config), base)
    _define_unwritten(plan, base, s, xd, mask)
    if not plan.has_dropout:
        xd = x.new_empty(0)  # the backward reads X itself (an op's output may not alias its input)
    if mask is None:
        mask = torch.empty(0, dtype=torch.uint8, device=x.device)
    return y.contiguous(), s.contiguous(), xd, mask


@lora_linear_fwd.register_fake
def _fwd_fake(x, weight, bias, a_cat, b_cat, segs, ranks, scales, ps, seed, seed_t, block_m, base, config):
    T, K = x.shape
    cols, fp32 = _saved_lora_cols(segs, ranks, base)
    drop = _has_dropout(segs, ps)
    return (x.new_empty((T, weight.shape[0])),
            x.new_empty((T, cols), dtype=torch.float32 if fp32 else x.dtype),
            x.new_empty((T, K) if drop else (0,)),
            x.new_empty((T, L.mask_bytes(K)) if drop else (0,), dtype=torch.uint8))


@torch.library.custom_op("adasched::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: Tensor, weight: Tensor, a_cat: Tensor, b_cat: Tensor, s: Tensor, xd: Tensor,
                    mask: Tensor, segs: list[int], ranks: list[int], scales: list[float], ps: list[float],
                    block_m: int, base: str, config: list[int], need_dx: bool, need_dbias: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dX or empty, dA_cat, dB_cat in the adapters' dtype, d bias fp32 [N] or empty); ``xd`` is X itself when
    no adapter has dropout, ``mask`` then empty."""
    plan = _plan(dy.shape[0], dy.device, segs, ranks, scales, ps, block_m)
    dy2 = dy if dy.stride(-1) == 1 else dy.contiguous()
    xd = _aligned_for(base, xd)
    dx, da, db, dbias = L._fused_backward(dy2, weight, a_cat, b_cat, s, xd, mask if mask.numel() else None, plan,
                                          need_dx, need_dbias, decode_config(config), base)
    return (dx.contiguous() if dx is not None else dy.new_empty(0),
            da.to(a_cat.dtype).contiguous(), db.to(b_cat.dtype).contiguous(),
            dbias if dbias is not None else dy.new_empty(0, dtype=torch.float32))


@lora_linear_bwd.register_fake
def _bwd_fake(dy, weight, a_cat, b_cat, s, xd, mask, segs, ranks, scales, ps, block_m, base, config, need_dx,
              need_dbias):
    return (dy.new_empty((dy.shape[0], weight.shape[1]) if need_dx else (0,)),
            torch.empty_like(a_cat, memory_format=torch.contiguous_format),
            torch.empty_like(b_cat, memory_format=torch.contiguous_format),
            dy.new_empty((dy.shape[1],) if need_dbias else (0,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, a_cat, b_cat, segs, ranks, scales, ps, _seed, _seed_t, block_m, base, config = inputs
    _, s, xd, mask = output
    ctx.save_for_backward(weight, a_cat, b_cat, s, xd if xd.numel() else x, mask)
    ctx.meta = (segs, ranks, scales, ps, block_m, base, config)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(s, xd, mask)


def _backward(ctx, dy, _ds, _dxd, _dmask):
    weight, a_cat, b_cat, s, xd, mask = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dbias = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
    dx, da, db, dbias = lora_linear_bwd(dy, weight, a_cat, b_cat, s, xd, mask, *ctx.meta, need_dx, need_dbias)
    return (dx if need_dx else None, None, dbias.to(ctx.bias_dtype) if need_dbias else None, da, db,
            None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("adasched::lora_linear_fwd", _backward, setup_context=_setup_context)


def compiled_call(x2: Tensor, weight: Tensor, bias: Optional[Tensor], a_cat: Tensor, b_cat: Tensor, segs: tuple,
                  ranks: tuple, scales: tuple, ps: tuple, seed, block_m: int, gemm_config, base: str) -> Tensor:
    """``multi_lora_linear``'s fused path as the custom op (what Dynamo traces)."""
    if isinstance(seed, Tensor):
        seed_i, seed_t = -1, seed
    elif seed is None and any(ps[a] > 0 for a, _, _ in segs):
        # drawn in the graph, from x's device generator, into a tensor the kernel reads (no host sync): an
        # activation-checkpointed region replays it in its recompute, so both passes see the same mask (a draw
        # inside the opaque op would not be replayed under inductor)
        seed_i, seed_t = -1, torch.randint(*L.SEED_DRAW_RANGE, (1,), dtype=torch.int64,
                                               device=x2.device)
    else:
        seed_i, seed_t = (-1 if seed is None else int(seed)), None
    flat = [int(v) for seg in segs for v in seg]
    y, *_ = lora_linear_fwd(x2, weight, bias, a_cat, b_cat, flat, list(ranks), [float(v) for v in scales],
                            [float(v) for v in ps], seed_i, seed_t, block_m, base, encode_config(gemm_config))
    return y
