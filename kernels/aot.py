"""Offline compile of our Triton kernels for an NVIDIA target, without a GPU: the compiler's resource report.

``triton.compile`` lowers a kernel for a chosen target (sm_90 Hopper, sm_100 Blackwell, ...) on any machine, and
Triton ships the ``ptxas`` that assembles the PTX; ``ptxas -v`` then reports registers, spills and its own
performance warnings. That answers, at no device time, most "why is this kernel slow" questions worth asking
before a GPU run: did the loads get a shared-memory pipeline, which MMA instructions were emitted, did the loop
split into warp-specialised partitions, do the registers spill, and did ptxas serialise the warpgroup MMAs
(warning C7515 - found this way in the LoRA GEMM on 2026-11-28, see BENCHMARKS.md ``kernels``).

Must run in a process where ``TRITON_INTERPRET`` is not ``1`` (the interpreter replaces the kernels when they are
decorated); :func:`compile_report` refuses otherwise. ``python -m adasched.launch.kernel_report`` prints the
report for every kernel of ours at representative configurations.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Any, Iterable, Optional

__all__ = ["SIGNATURES", "compile_report", "ptxas_path", "kernel_cases"]

_BF = "*bf16"

#: argument types of our kernels for ``ASTSource`` (bf16 activations; constexpr arguments are given per call)
SIGNATURES: dict[str, dict[str, str]] = {
    "lora_gemm": dict(X=_BF, W=_BF, L="*fp32", P=_BF, MASK="*u8", BIAS=_BF, OUT=_BF, TABLE="*i64", FTABLE="*fp32",
                      n_tiles="i32", OUT_DIM="i32", RED_DIM="i32", m_bucket="i32", X_ROWS="i32", stride_xm="i32",
                      stride_wr="i32", stride_wo="i32", stride_lm="i32", stride_pr="i32", stride_po="i32",
                      stride_mm="i32", stride_om="i32"),
    "lora_down": dict(X=_BF, A=_BF, S="*fp32", XD=_BF, MASK="*u8", TABLE="*i64", FTABLE="*fp32", seed="i32",
                      K="i32", stride_xm="i32", stride_ar="i32", stride_sm="i32", stride_dm="i32", stride_mm="i32"),
    "lora_term": dict(L=_BF, P=_BF, MASK="*u8", OUT=_BF, TABLE="*i64", FTABLE="*fp32", OUT_DIM="i32",
                      stride_lm="i32", stride_pr="i32", stride_po="i32", stride_mm="i32", stride_om="i32"),
    "lora_dy": dict(DY=_BF, S="*fp32", B=_BF, DS="*fp32", DB="*fp32", DBIAS="*fp32", TABLE="*i64", FTABLE="*fp32",
                    N="i32", db_copies="i32", stride_dym="i32", stride_sm="i32", stride_bn="i32", stride_dsm="i32",
                    stride_dbn="i32", stride_dbc="i32"),
    "gemm": dict(a_ptr=_BF, b_ptr=_BF, c_ptr=_BF, M="i32", N="i32", K="i32", stride_am="i32", stride_ak="i32",
                 stride_bk="i32", stride_bn="i32", stride_cm="i32", stride_cn="i32"),
    "moe_mm": dict(x_ptr=_BF, w_ptr=_BF, y_ptr=_BF, tile_e_ptr="*i32", tile_row_ptr="*i32", off_ptr="*i64",
                   K="i32", M="i32", sxm="i32", sxk="i32", swe="i32", swk="i32", swn="i32", sym="i32", syn="i32"),
    "moe_wgrad": dict(x_ptr=_BF, dy_ptr=_BF, dw_ptr=_BF, off_ptr="*i64", K="i32", M="i32", sxm="i32", sxk="i32",
                      sdm="i32", sdn="i32", swe="i32", swk="i32", swn="i32"),
}


def ptxas_path(arch: int = 90) -> str:
    """The ``ptxas`` Triton itself uses for ``sm_<arch>`` (it ships a newer one for Blackwell)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError):  # older Triton: one bundled ptxas
        import triton

        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _sass_counts(cubin: bytes, arch: int) -> dict[str, int]:
    """Counts in the kernel's machine code (Triton's nvdisasm): GPU-wide memory barriers (``MEMBAR.ALL.GPU``: what an
    acq_rel atomic costs before each add), fire-and-forget reductions (``REDG``), value-returning atomics
    (``ATOMG``) and one-element 16-bit global loads (``LDG.E.U16``: a gather where a vector load was meant).
    Empty when nvdisasm is not there."""
    tool = os.path.join(os.path.dirname(ptxas_path(arch)), "nvdisasm")
    if not os.path.exists(tool):
        return {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        proc = subprocess.run([tool, "-c", path], capture_output=True, text=True)
    if proc.returncode != 0:
        return {}
    sass = proc.stdout
    return {"membar_gpu": len(re.findall(r"\bMEMBAR\.[\w.]*GPU\b", sass)),
            "red_global": len(re.findall(r"\bREDG\.", sass)), "atom_global": len(re.findall(r"\bATOMG\.", sass)),
            "ldg_16bit": len(re.findall(r"\bLDG\.E\.U16\b", sass))}


def _ptxas_verbose(ptx: str, arch: int) -> str:
    suffix = "a" if arch in (90, 100) else ""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        proc = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o",
                               os.path.join(d, "k.cubin")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch}: {proc.stderr.strip()[-500:]}")
    return proc.stderr


def compile_report(fn, types: dict[str, str], consts: dict[str, Any], options: dict[str, Any], arch: int = 90,
                   no_divisibility: Iterable[str] = ()) -> dict[str, Any]:
    """Compile the ``@triton.jit`` function ``fn`` for ``sm_<arch>`` and report what the compilers did.

    ``types``: Triton type of every non-constexpr argument; ``consts``: the constexpr values (and any argument to
    specialise, e.g. a unit stride); ``options``: num_warps / num_stages / maxnreg; every other argument is assumed
    16-divisible (as the JIT specialises pointers and sizes that are) except those in ``no_divisibility``.
    Returns {arch, regs, spill_bytes, stack_bytes, shared_bytes, stages (deepest shared-memory ring), mma
    ("tcgen05" | "wgmma" | "mma" | "fma"), ws_partitions, maxnreg (0: none), num_warps, async_loads,
    tma_loads (bulk tensor copies: TMA descriptors), warnings (ptxas codes such as "C7515"), wgmma_serialized,
    dot_precisions (the ``tt.dot`` input precisions in the TTIR: "tf32" on fp32 operands is TF32 rounding),
    membar_gpu / red_global / atom_global / ldg_16bit (machine-code counts, see ``_sass_counts``; absent without
    nvdisasm)}."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_report: TRITON_INTERPRET=1 is set; run in a process without it")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    skip = set(no_divisibility)
    # constexpr parameters not given take their declared defaults, as a launch that omits them does
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default and p.name not in consts},
              **consts}
    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n not in consts and n not in skip}
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                            options=dict(options))
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    log = _ptxas_verbose(ptx, arch)

    def first_int(pattern: str, text: str, default: int = 0) -> int:
        found = re.findall(pattern, text)
        return int(found[0]) if found else default

    mma = ("tcgen05" if "tcgen05.mma" in ptx else "wgmma" if "wgmma.mma_async" in ptx
           else "mma" if re.search(r"\bmma\.sync", ptx) else "fma")
    warnings = sorted(set(re.findall(r"\((C\d{4})\)", log)))
    return {
        "arch": arch,
        "regs": first_int(r"Used (\d+) registers", log),
        "spill_bytes": first_int(r"(\d+) bytes spill stores", log),
        "stack_bytes": first_int(r"(\d+) bytes stack frame", log),
        "shared_bytes": int(getattr(kernel.metadata, "shared", 0)),
        "stages": max([int(m) for m in re.findall(r"memdesc<(\d+)x\d+x\d+x", ttgir)] or [1]),
        "mma": mma,
        "ws_partitions": "ttg.warp_specialize" in ttgir,
        "maxnreg": first_int(r"\.maxnreg (\d+)", ptx),
        "num_warps": first_int(r'"ttg.num-warps" = (\d+)', ttgir),
        "async_loads": "async_copy" in ttgir or "async_tma" in ttgir,
        "tma_loads": "cp.async.bulk.tensor" in ptx,
        "warnings": warnings,
        "wgmma_serialized": "C7515" in warnings,
        "dot_precisions": sorted(set(re.findall(r"inputPrecision = (\w+)", kernel.asm["ttir"]))),
        **_sass_counts(kernel.asm["cubin"], arch),
    }


def kernel_cases(only: Optional[Iterable[str]] = None, arch: int = 90) -> list[tuple[str, str, Any, dict, dict, dict, tuple]]:
    """(group, label, fn, types, consts, options, no_divisibility) for our kernels at the configurations they run
    with: the LoRA GEMM at every autotune config (forward, and dX with the dropout mask; pointer tiles, and TMA
    descriptor loads as ``base_gemm="triton_tma"`` runs them) and the Twill-style 128x128 / 128x256 tiles
    (warp-specialised on sm_100), the dropout/S and dY kernels at their launch settings (the forward GEMM, dropout/S
    and dY again at 64 and 128 rank columns), the plain GEMM at the
    sweep's tiles (and with TMA at the two 8-warp ones), the MoE grouped GEMMs at their autotune configs."""
    from . import gemm as G
    from . import lora as L
    from . import moe as M

    groups = set(only) if only else {"lora", "gemm", "moe"}
    ws = arch >= 100
    cases = []
    if "lora" in groups:
        gemm_cfgs = [(dict(c.kwargs), dict(num_warps=c.num_warps, num_stages=c.num_stages))
                     for c in L._gemm_configs() + L._gemm_configs(tma=True)]
        for kw, opts in gemm_cfgs:
            tile = (f"128x{kw['BLOCK_O']}x{kw['BLOCK_RED']} s{opts['num_stages']} w{opts['num_warps']}"
                    f"{' ws' if ws else ''}{' tma' if kw['USE_TMA'] else ''}")
            base = dict(BLOCK_M=128, BLOCK_R=16, UPCAST=False, WARP_SPECIALIZE=ws, HAS_BIAS=False, EPI_SPLIT=-1, **kw)
            cases.append(("lora", f"lora GEMM fwd {tile}", L._lora_gemm_kernel,
                          SIGNATURES["lora_gemm"], dict(base, HAS_MASK=False, APPLY_SCALE=True, stride_wr=1,
                                                        stride_pr=1, W_OUT_MAJOR=True, P_R_UNIT=True, R_ALIGN=8),
                          opts, ()))
            cases.append(("lora", f"lora GEMM dX+mask {tile}", L._lora_gemm_kernel,
                          SIGNATURES["lora_gemm"], dict(base, HAS_MASK=True, APPLY_SCALE=False, stride_wo=1,
                                                        stride_po=1, W_OUT_MAJOR=False), opts, ()))
        for bo in (256, 128):  # the persistent grid (GemmConfig.persistent), TMA, at the 8-warp tiles
            kw = dict(BLOCK_M=128, BLOCK_R=16, UPCAST=False, WARP_SPECIALIZE=ws, HAS_BIAS=False, EPI_SPLIT=-1,
                      BLOCK_O=bo, BLOCK_RED=64, GROUP_M=8, EPI_WARPS=8, USE_TMA=True, PERSISTENT=True)
            tile = f"128x{bo}x64 s4 w8{' ws' if ws else ''} tma persistent"
            cases.append(("lora", f"lora GEMM fwd {tile}", L._lora_gemm_kernel, SIGNATURES["lora_gemm"],
                          dict(kw, HAS_MASK=False, APPLY_SCALE=True, stride_wr=1, stride_pr=1, W_OUT_MAJOR=True,
                               P_R_UNIT=True, R_ALIGN=8),
                          dict(num_warps=8, num_stages=4), ()))
            cases.append(("lora", f"lora GEMM dX+mask {tile}", L._lora_gemm_kernel, SIGNATURES["lora_gemm"],
                          dict(kw, HAS_MASK=True, APPLY_SCALE=False, stride_wo=1, stride_po=1, W_OUT_MAJOR=False),
                          dict(num_warps=8, num_stages=4), ()))
        down = dict(SPLIT_K=8, BLOCK_M=128, BLOCK_K=64, BLOCK_R=16, UPCAST=False, PLANE=L.DROP_PLANE,
                    SEED_FROM_PTR=False, ALL_ROWS=False)
        for name, drop, dot in (("dropout/S", True, True), ("dropout only", True, False), ("S, no dropout", False, True)):
            cases.append(("lora", f"lora down: {name}", L._lora_down_kernel, SIGNATURES["lora_down"],
                          dict(down, HAS_DROPOUT=drop, HAS_DOT=dot, SUB_M=L.DOWN_LAUNCH["sub_m"]),
                          dict(num_warps=L.DOWN_LAUNCH["warps"], num_stages=L._DOWN_STAGES) if drop else
                          dict(num_warps=L._DOWN_PLAIN_WARPS, num_stages=L._DOWN_PLAIN_STAGES), ("seed",)))
        cases.append(("lora", "lora masked dX term", L._lora_masked_term_kernel, SIGNATURES["lora_term"],
                      dict(BLOCKS_PER_PROG=2, BLOCK_M=128, SUB_M=L.TERM_LAUNCH["sub_m"], BLOCK_R=16, UPCAST=False,
                           PLANE=L.DROP_PLANE, APPLY_SCALE=True, stride_po=1),
                      dict(num_warps=L.TERM_LAUNCH["warps"], num_stages=1), ()))
        cases.append(("lora", "lora dY (split 5)", L._lora_dy_kernel, SIGNATURES["lora_dy"],
                      dict(SPLIT_N=5, BLOCK_M=128, BLOCK_N=64, BLOCK_R=16, HAS_DBIAS=False, UPCAST=False,
                           B_ROWS=True, R_ALIGN=8),
                      dict(num_warps=4, num_stages=3), ("db_copies",)))
        # the rank-column width grows with the adapters' ranks (BLOCK_R = next power of two of the largest r):
        # the register-heavy kernels again at r = 64 and 128, at the launch settings they get there (down_knobs and
        # dy_knobs: 8 warps for dropout/S past 16 columns, for dY past 64)
        kw0, opts0 = gemm_cfgs[0]
        for r in (64, 128):
            tile = f"128x{kw0['BLOCK_O']}x{kw0['BLOCK_RED']} s{opts0['num_stages']} w{opts0['num_warps']}"
            cases.append(("lora", f"lora GEMM fwd {tile} r{r}", L._lora_gemm_kernel, SIGNATURES["lora_gemm"],
                          dict(BLOCK_M=128, BLOCK_R=r, UPCAST=False, WARP_SPECIALIZE=ws, HAS_BIAS=False,
                               EPI_SPLIT=-1, **kw0, HAS_MASK=False, APPLY_SCALE=True, stride_wr=1, stride_pr=1,
                               W_OUT_MAJOR=True, P_R_UNIT=True, R_ALIGN=8), opts0, ()))
            dn = L.down_knobs(r, True)
            cases.append(("lora", f"lora down: dropout/S r{r} w{dn['warps']}", L._lora_down_kernel,
                          SIGNATURES["lora_down"],
                          dict(down, BLOCK_R=r, HAS_DROPOUT=True, HAS_DOT=True, SUB_M=int(dn["sub_m"])),
                          dict(num_warps=int(dn["warps"]), num_stages=L._DOWN_STAGES), ("seed",)))
            dy = L.dy_knobs(r)
            cases.append(("lora", f"lora dY (split 5) r{r} w{dy['warps']}", L._lora_dy_kernel, SIGNATURES["lora_dy"],
                          dict(SPLIT_N=5, BLOCK_M=128, BLOCK_N=int(dy["block_n"]), BLOCK_R=r, HAS_DBIAS=False,
                               UPCAST=False, B_ROWS=True, R_ALIGN=8),
                          dict(num_warps=int(dy["warps"]), num_stages=3), ("db_copies",)))
    if "gemm" in groups:
        for bn, warps, stages, tma in ((128, 4, 3, False), (128, 8, 4, False), (256, 8, 3, False),
                                       (256, 8, 4, False), (128, 8, 4, True), (256, 8, 4, True)):
            cases.append(("gemm", f"GEMM 128x{bn}x64 s{stages} w{warps}{' ws' if ws else ''}{' tma' if tma else ''}",
                          G._gemm_kernel, SIGNATURES["gemm"],
                          dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, WARP_SPECIALIZE=ws, UPCAST=False,
                               stride_ak=1, stride_bn=1, stride_cn=1, USE_TMA=tma, A_K_UNIT=True, B_N_UNIT=True),
                          dict(num_warps=warps, num_stages=stages), ()))
    if "moe" in groups:
        for bn, bk, warps, stages in ((128, 64, 8, 3), (256, 64, 8, 3), (128, 128, 8, 3)):
            cases.append(("moe", f"MoE grouped GEMM 128x{bn}x{bk} s{stages} w{warps}", M._grouped_mm_kernel,
                          SIGNATURES["moe_mm"], dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=bk, CAST_F32=False, sxk=1,
                                                     swn=1, syn=1), dict(num_warps=warps, num_stages=stages), ()))
        for bm, bn, bk, warps, stages in ((64, 128, 128, 8, 3), (128, 128, 64, 8, 3)):
            cases.append(("moe", f"MoE wgrad {bk}x{bn} rows {bm} s{stages} w{warps}", M._grouped_wgrad_kernel,
                          SIGNATURES["moe_wgrad"], dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, CAST_F32=False, sxk=1,
                                                        sdn=1, swn=1), dict(num_warps=warps, num_stages=stages), ()))
    return cases
