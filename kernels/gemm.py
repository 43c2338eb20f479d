"""A Triton GEMM whose pipelining knobs come from a config (for Twill's plan-vs-sweep comparison).

    C = A @ B          A [M, K], B [K, N] (any strides), C [M, N] in A's dtype, fp32 accumulation

``GemmConfig`` carries the tile shape and the knobs Twill emits: ``num_stages`` (software-pipelining depth of
the K loop), ``num_warps``, ``warp_specialize`` (``tl.range(..., warp_specialize=True)``; upstream Triton
supports it mainly on Blackwell) and ``maxnreg`` (register cap per thread). Layers: ``_gemm_kernel`` (Triton),
``gemm`` (host launcher), ``GemmFunction`` (autograd: dA = dC B^T, dB = A^T dC with the same kernel),
``gemm_reference`` (torch, same signature).

fp32 operands multiply in IEEE fp32, not Triton's TF32 default (``dot_acc``); operands whose element offsets reach
2**31 are indexed in int64 (``_offs_64``).

Off the GPU the kernel runs under ``TRITON_INTERPRET=1`` (tiles upcast to float32 after loading; the knobs are
parsed and ignored there). Without a GPU and without the interpreter, ``gemm`` falls back to the reference.
"""
from __future__ import annotations

import numbers
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    HAVE_TRITON = False

__all__ = ["GemmConfig", "gemm", "gemm_reference", "GemmFunction", "gemm_autograd", "backend_for", "tma_layout",
           "tma_unit_axis", "set_descriptor_allocator", "launch_maxnreg"]


@dataclass(frozen=True, kw_only=True)
class GemmConfig:
    block_m: int = 128
    """Rows of C per program (a multiple of 16)."""
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    """Programs along M sharing one B column panel (L2 reuse)."""
    num_stages: int = 3
    """Software-pipelining depth of the K loop (shared-memory buffers per operand)."""
    num_warps: int = 4
    warp_specialize: bool = False
    """tl.range(warp_specialize=True): producer/consumer partitions (Blackwell; may fail elsewhere)."""
    maxnreg: Optional[int] = None
    """Registers per thread cap (None: compiler's choice)."""
    tma: bool = False
    """Load the operand tiles through TMA tensor descriptors (sm_90+) instead of pointer tiles, where the
    operands allow it (unit stride along the loaded rows, 16-byte aligned bases and row strides, rows that
    neither overlap nor repeat). The descriptors are made in the kernel (one global write and fence per
    program)."""
    persistent: bool = False
    """LoRA GEMMs only (``kernels.lora``): one program per resident CTA slot looping over the output tiles
    (the plain ``gemm`` refuses it)."""

    def __post_init__(self):
        # types first: 64.0 failed on `&` with a TypeError, group_m 2.5 inside the Triton interpreter, and
        # num_stages 2.5 / maxnreg 168.5 were taken
        for name in ("block_m", "block_n", "block_k", "group_m", "num_stages", "num_warps", "maxnreg"):
            v = getattr(self, name)
            if not (v is None and name == "maxnreg") and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                raise ValueError(f"GemmConfig.{name} = {v!r} must be an int")
        for name in ("warp_specialize", "tma", "persistent"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"GemmConfig.{name} = {getattr(self, name)!r} must be True or False")
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"GemmConfig.{name} = {v} must be a power of two >= 16")
        if self.num_stages < 1:
            raise ValueError(f"GemmConfig.num_stages = {self.num_stages} must be >= 1")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemmConfig.num_warps = {self.num_warps} must be 1, 2, 4, 8 or 16")
        if self.maxnreg is not None and not 24 <= self.maxnreg <= 255:
            raise ValueError(f"GemmConfig.maxnreg = {self.maxnreg} must be in [24, 255]")
        if self.group_m < 1:
            raise ValueError(f"GemmConfig.group_m = {self.group_m} must be >= 1")

    @classmethod
    def from_knobs(cls, knobs: dict, *, block_m: int, block_n: int, block_k: int, **extra) -> "GemmConfig":
        """A config from a knobs dict (num_stages, num_warps, warp_specialize, maxnreg) and a tile shape.

        Warp-specialized knobs come with ``tma=True`` (unless ``extra`` says otherwise): Twill's GEMM graph models
        TMA loads, and its ``maxnreg`` fits the register file with the one worker warpgroup Triton adds to a TMA
        main loop; with pointer loads Triton adds as many worker warps as default ones (an offline sm_100 compile,
        ``launch/kernel_report.py --arch 100 --only gemm,lora``, 2026-11-30, triton 3.7.1, maxnreg left to Triton:
        at 8 warps 168 = 65,536 / (12 x 32) on the TMA GEMMs, 128 = 65,536 / (16 x 32) on the pointer-load ones;
        at 4 warps 256 on both), so at 8 warps the knob would over-ask the register file (see
        :func:`launch_maxnreg`)."""
        missing = [k for k in ("num_stages", "num_warps") if k not in knobs]
        if missing:  # (a bare KeyError)
            raise ValueError(f"knobs: lacks {missing[0]!r} (num_stages, num_warps; warp_specialize, maxnreg optional)")
        ws = knobs.get("warp_specialize", False)  # (bool("false") was True: a warp-specialised TMA config)
        extra.setdefault("tma", ws)
        return cls(block_m=block_m, block_n=block_n, block_k=block_k, num_stages=knobs["num_stages"],
                   num_warps=knobs["num_warps"], warp_specialize=ws, maxnreg=knobs.get("maxnreg"), **extra)

    def label(self) -> str:
        s = f"{self.block_m}x{self.block_n}x{self.block_k} s{self.num_stages} w{self.num_warps}"
        if self.warp_specialize:
            s += " ws"
        if self.maxnreg:
            s += f" r{self.maxnreg}"
        if self.tma:
            s += " tma"
        if self.persistent:
            s += " persistent"
        return s

    def as_dict(self) -> dict:
        return asdict(self)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_maxnreg(cfg: GemmConfig, used_tma: bool) -> Optional[int]:
    """The ``maxnreg`` a launch of ``cfg`` passes to Triton: ``cfg.maxnreg``, except for a warp-specialized config
    that asked for TMA loads (``tma=True``, as :meth:`GemmConfig.from_knobs` gives Twill's knobs) whose operands
    fell back to pointer tiles: then None, Triton's own choice. Such a cap was sized for one worker warpgroup
    beside the ``num_warps`` default warps; pointer loads get ``num_warps`` worker warps (two warpgroups at 8), and
    Triton sets every warp's registers to maxnreg at launch, so the CTA would ask for more than the register file
    (168 x 32 x (8 + 8) = 86,016 > 65,536 on sm_100 for the 128x256x64 knobs). A cap given without ``tma`` is
    passed as given."""
    if cfg.maxnreg is not None and cfg.warp_specialize and getattr(cfg, "tma", False) and not used_tma:
        return None  # (getattr: the LoRA launcher takes any object with GemmConfig's launch fields)
    return cfg.maxnreg


if HAVE_TRITON:

    @triton.jit
    def _tile_desc(ptr, rows, cols, stride_row, stride_col, COLS_UNIT: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                   BLOCK_COLS: tl.constexpr):
        """An in-kernel TMA descriptor of the [rows, cols] operand, in its memory order: [rows, cols] when the
        columns have unit stride, else [cols, rows] (``_tile_load`` transposes it back in shared memory)."""
        if COLS_UNIT:
            return tl.make_tensor_descriptor(ptr, shape=[rows, cols], strides=[stride_row, 1],
                                             block_shape=[BLOCK_ROWS, BLOCK_COLS])
        else:
            return tl.make_tensor_descriptor(ptr, shape=[cols, rows], strides=[stride_col, 1],
                                             block_shape=[BLOCK_COLS, BLOCK_ROWS])

    @triton.jit
    def dot_acc(a, b, acc):
        """acc + a @ b. fp32 operands multiply in IEEE fp32: Triton's default for them on NVIDIA GPUs is TF32
        (10-bit mantissa, ~1e-3 relative error), which torch's fp32 matmul does not use unless told to; the
        interpreter ignores the precision, so only a GPU would show the difference. Other dtypes: plain tl.dot."""
        if a.dtype == tl.float32:
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def dot_new(a, b):
        """a @ b into a new fp32 tile, fp32 operands in IEEE fp32 (see ``dot_acc``)."""
        if a.dtype == tl.float32:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _tile_load(desc, row0, col0, COLS_UNIT: tl.constexpr):
        """The [BLOCK_ROWS, BLOCK_COLS] tile at (row0, col0) of a ``_tile_desc`` operand."""
        if COLS_UNIT:
            return desc.load([row0, col0])
        else:
            return tl.trans(desc.load([col0, row0]))

    @triton.jit
    def _gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                     stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     WARP_SPECIALIZE: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr = False,
                     A_K_UNIT: tl.constexpr = True, B_N_UNIT: tl.constexpr = True, OFFS_64: tl.constexpr = False):
        """USE_TMA: A and B tiles through in-kernel TMA descriptors; A_K_UNIT / B_N_UNIT say which axis of each
        has unit stride (a transposed operand is loaded in its memory order and transposed in shared memory).
        OFFS_64: row, column and K indices in int64, for operands whose element offsets reach 2**31
        (``_offs_64``); in int32 ``offs_m * stride_am`` (or ``offs_k * stride_bk``, the K step) wraps there and
        reads out of bounds."""
        pid = tl.program_id(0)
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * grid_n
        group = pid // width
        first_m = group * GROUP_M
        rows = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % rows
        pid_n = (pid % width) // rows
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if OFFS_64:
            offs_m = offs_m.to(tl.int64)
            offs_n = offs_n.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_TMA:
            a_desc = _tile_desc(a_ptr, M, K, stride_am, stride_ak, A_K_UNIT, BLOCK_M, BLOCK_K)
            b_desc = _tile_desc(b_ptr, K, N, stride_bk, stride_bn, B_N_UNIT, BLOCK_K, BLOCK_N)
            for kt in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=WARP_SPECIALIZE):
                a = _tile_load(a_desc, pid_m * BLOCK_M, kt * BLOCK_K, A_K_UNIT)
                b = _tile_load(b_desc, kt * BLOCK_K, pid_n * BLOCK_N, B_N_UNIT)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = dot_acc(a, b, acc)
        else:
            offs_k = tl.arange(0, BLOCK_K)
            if OFFS_64:  # the K axis too: offs_k * stride_bk and the K step wrap in int32 for a wide B row
                offs_k = offs_k.to(tl.int64)
            a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
            b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
            for kt in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=WARP_SPECIALIZE):
                k_left = K - kt * BLOCK_K
                if OFFS_64:  # rebuilt from int64 K offsets (BLOCK_K * stride is an int32 product)
                    ks = kt * BLOCK_K + offs_k
                    a_ptrs = a_ptr + offs_m[:, None] * stride_am + ks[None, :] * stride_ak
                    b_ptrs = b_ptr + ks[:, None] * stride_bk + offs_n[None, :] * stride_bn
                a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
                b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = dot_acc(a, b, acc)
                if not OFFS_64:
                    a_ptrs += BLOCK_K * stride_ak
                    b_ptrs += BLOCK_K * stride_bk
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def backend_for(x: torch.Tensor) -> str:
    """'triton' on CUDA or, under the interpreter, on the CPU; else 'torch' (reference: a meta tensor gets its
    shape there - the interpreter failed to copy out of it)."""
    if HAVE_TRITON and (x.is_cuda or (x.device.type == "cpu" and _interpreting())):
        return "triton"
    return "torch"


def _transformed(t: torch.Tensor) -> bool:
    """A forward-mode AD dual or a torch.func-wrapped tensor (vmap, grad, jvp): the kernel reads raw storage, so it
    dropped a dual's tangent without a word (a dual does not require grad) and failed inside the launcher on a
    wrapper; torch's matmul carries both."""
    from torch.autograd import forward_ad

    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    if wrapped is not None and wrapped(t):
        return True
    return forward_ad.unpack_dual(t).tangent is not None


def computable_float(dtype: torch.dtype) -> bool:
    """float16, bfloat16, float32 or float64: what the kernels take. Not integers (they went through float32:
    2**24 + 1 came back as 2**24), and not float8: under the Triton interpreter its float32 -> float8 cast drops the
    carry when rounding crosses a power of two (1.977 stored as 1.0), and torch's own matmul has no float8 either
    (scaled float8 GEMMs take per-tensor scales this API has no place for)."""
    return dtype.is_floating_point and dtype.itemsize >= 2


def float_dtype_error(what: str, dtype: torch.dtype) -> str:
    """The one line for a dtype :func:`computable_float` refuses, naming ``what``."""
    return f"{what}: {dtype} is not float16, bfloat16, float32 or float64"


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"gemm: A and B must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"gemm: inner dimensions differ: A {tuple(a.shape)} @ B {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"gemm: dtypes differ: {a.dtype} and {b.dtype}")
    if not computable_float(a.dtype):  # (int64: 2**24 + 1 came back as 2**24; bool "products"; float8 up to 50 %)
        raise ValueError(float_dtype_error("gemm", a.dtype))
    if a.device != b.device:
        raise ValueError(f"gemm: devices differ: {a.device} and {b.device}")


def gemm(a: torch.Tensor, b: torch.Tensor, config: Optional[GemmConfig] = None) -> torch.Tensor:
    """C = A @ B with the Triton kernel launched with ``config``'s tile shape and knobs. Differentiable (first
    order, as :func:`gemm_autograd`) whenever an input requires grad under grad mode, on every path (the kernel
    path returned a result without a graph while the reference path kept one: a training loop got gradients on a
    CPU and none on the GPU)."""
    _check(a, b)
    if config is not None and not isinstance(config, GemmConfig):  # (a knobs dict: AttributeError 'persistent')
        raise ValueError(f"gemm: config is a {type(config).__name__}, not a GemmConfig (a plan's knobs: "
                         "GemmConfig.from_knobs(knobs, block_m=..., block_n=..., block_k=...))")
    # (under torch.compile dynamo handles those transforms itself, and the functorch query is a builtin it cannot
    # trace: fullgraph compiles of gemm failed)
    if not torch.compiler.is_compiling() and (_transformed(a) or _transformed(b)):
        return gemm_reference(a, b, config)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return GemmFunction.apply(a, b, config)
    cfg = config or GemmConfig()
    if cfg.persistent:
        raise ValueError("GemmConfig.persistent: only the LoRA GEMMs (kernels.lora) have a persistent grid")
    if backend_for(a) == "torch" or a.dtype == torch.float64:
        # (float64: the kernel's tiles were cast to float32 - 3e-7 error, gradcheck failed; as kernels.lora does)
        return gemm_reference(a, b, cfg)
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    opts = {"num_stages": cfg.num_stages, "num_warps": cfg.num_warps}
    interp = _interpreting()
    tma = {}
    if cfg.tma:
        layout = tma_layout(a, b)
        if layout is not None:
            tma = dict(USE_TMA=True, A_K_UNIT=layout[0], B_N_UNIT=layout[1])
            if a.is_cuda:
                set_descriptor_allocator()
    maxnreg = launch_maxnreg(cfg, used_tma=bool(tma))
    if maxnreg is not None and not interp:
        opts["maxnreg"] = maxnreg
    _gemm_kernel[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
                       c.stride(1), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                       GROUP_M=cfg.group_m, WARP_SPECIALIZE=bool(cfg.warp_specialize),
                       UPCAST=interp or a.dtype == torch.float32, OFFS_64=_offs_64(a, b, c), **tma, **opts)
    return c


def _offs_64(*tensors: torch.Tensor, pad: int = 1024) -> bool:
    """Whether some element offset of these 2-D operands - counting up to ``pad`` rows/columns past each edge,
    where a ragged last tile computes (masked) addresses - reaches 2**31: then ``_gemm_kernel`` indexes in int64
    (Triton passes strides and sizes below 2**31 as int32, and int32 products wrap)."""
    return any(sum((size + pad) * abs(stride) for size, stride in zip(t.shape, t.stride())) >= 2 ** 31
               for t in tensors)


def tma_unit_axis(t: torch.Tensor) -> Optional[int]:
    """The axis of a 2-D tensor a TMA descriptor can read it along (unit stride; the other stride 16-byte
    aligned and at least that axis's length, so rows neither overlap nor repeat; a 16-byte aligned base), or
    None."""
    e = t.element_size()
    if t.data_ptr() % 16:
        return None
    for axis in (1, 0):
        other = t.stride(1 - axis)
        if t.stride(axis) == 1 and (other * e) % 16 == 0 and (t.shape[1 - axis] == 1 or other >= t.shape[axis]):
            return axis
    return None


def tma_layout(a: torch.Tensor, b: torch.Tensor) -> Optional[tuple[bool, bool]]:
    """(A has unit stride along K, B has unit stride along N) when both A [M, K] and B [K, N] can be read through
    TMA descriptors, else None (the launch then uses pointer tiles)."""
    ua, ub = tma_unit_axis(a), tma_unit_axis(b)
    if ua is None or ub is None:
        return None
    return ua == 1, ub == 1


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


def set_descriptor_allocator() -> None:
    """In-kernel TMA descriptors need Triton's global scratch allocator. Triton keeps it in a ContextVar, which a
    new thread (autograd's backward worker) does not inherit, so launchers call this before every TMA launch; an
    allocator the caller set stays in place."""
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # another Triton layout: set ours
        pass
    triton.set_allocator(_descriptor_scratch)


def gemm_reference(a: torch.Tensor, b: torch.Tensor, config: Optional[GemmConfig] = None) -> torch.Tensor:
    """torch reference: fp32 (fp64 for fp64 inputs) matmul, cast to A's dtype."""
    _check(a, b)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    return (a.to(acc) @ b.to(acc)).to(a.dtype)


def first_order_only(message: str, coupled):
    """A decorator for an autograd Function's ``backward`` computed with kernels that build no graph: under
    ``create_graph=True`` its outputs raise ``message`` when a second backward reaches them. Like torch's
    ``once_differentiable``, which arms that only when a grad-output requires grad; ``coupled(ctx)`` says when the
    outputs depend on trainable forward inputs anyway (a loss linear in the output makes the grad-output a constant
    while dA = dC B^T still depends on B): armed then too, else those second-order terms were dropped silently."""
    import functools

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *args):
            with torch.no_grad():
                outputs = backward(ctx, *args)
            needs = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args) or coupled(ctx)
            if not torch.is_grad_enabled() or not needs:
                return outputs
            outs = outputs if isinstance(outputs, tuple) else (outputs,)
            # the error node also takes the tensors the gradients depend on (the saved forward inputs and the
            # grad-outputs that require grad): tied only to detached copies, a second backward that asked for A's
            # gradient alone (autograd.grad(loss, [A])) never ran it and dropped A's second-order terms silently
            try:
                saved = ctx.saved_tensors
            except RuntimeError:  # (freed: nothing to tie to)
                saved = ()
            ties = [t for t in (*saved, *args) if isinstance(t, torch.Tensor) and t.requires_grad]
            err = torch._C._functions.DelayedError(message.encode(), len(outs) + len(ties))

            def armed(t):
                if t is None:
                    return None
                t = t.detach()
                t.requires_grad = True
                return t

            res = err(*[armed(t) for t in outs], *ties)
            res = (res,) if isinstance(res, torch.Tensor) else tuple(res)  # (torch unpacks a single output)
            return tuple(res[:len(outs)]) if isinstance(outputs, tuple) else res[0]

        return wrapper

    return decorate


class GemmFunction(torch.autograd.Function):
    """First order only: the backward's GEMMs build no graph (a double backward raises)."""

    @staticmethod
    def forward(ctx, a, b, config):
        ctx.save_for_backward(a, b)
        ctx.config = config
        return gemm(a, b, config)

    @staticmethod
    @first_order_only("gemm_autograd: double backward is not supported (the Triton GEMMs' backward builds no graph)",
                      lambda ctx: ctx.needs_input_grad[0] and ctx.needs_input_grad[1])  # dA needs B, dB needs A
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        dc = dc.contiguous()
        da = gemm(dc, b.t(), ctx.config) if ctx.needs_input_grad[0] else None
        db = gemm(a.t(), dc, ctx.config) if ctx.needs_input_grad[1] else None
        return da, db, None


def gemm_autograd(a: torch.Tensor, b: torch.Tensor, config: Optional[GemmConfig] = None) -> torch.Tensor:
    """Differentiable ``gemm``."""
    return GemmFunction.apply(a, b, config)
