"""Launch alternatives of the two bandwidth-bound LoRA kernels, timed on a GPU at one shape.

    python3 launch/lora_kernel_sweep.py                  # T=8192 K=4096 r=16 p=0.1, bf16
    python3 launch/lora_kernel_sweep.py --T 16384 --K 8192 --r 64

Kernels, in this order (``--only gemm,dy,term,down`` picks some):
- gemm: our two big LoRA GEMMs (``base_gemm="triton"``; N = ``--N``) at four tile configs, each with pointer
  tiles and with TMA descriptor loads (``GemmConfig.tma``, ``base_gemm="triton_tma"``; at the 8-warp tiles also
  on a persistent grid, ``GemmConfig.persistent``) - the forward
  (X W^T + scale S B^T) and the dX GEMM (dY W + the masked LoRA term; pointer tiles also with the masked epilogue
  full width and per column half, ``kernels.lora.epi_split``) - next to cuBLAS running the plain X W^T and dY W
  on the same tensors (the column "x cuBLAS": our GEMM with its LoRA term over cuBLAS without it);
- dy: the dY kernel of ``base_gemm="triton"`` (dS = dY B and dB = dY^T S from one read of dY; 92 us at the
  default shape on the H200, 0.7 TB/s) over columns per step x programs per SM x warps x copies of dB its atomic
  adds are spread over (``kernels.lora.DY_LAUNCH``);
- term: the masked dX term over rows per program x warps x programs per row;
- down: the dropout kernel (Xd and the mask bits; with ``--with-s`` also S = Xd A^T, the launch
  ``base_gemm="torch"`` uses) over rows per program x warps x programs per SM.
The small kernels (dy, term, down) are timed twice: the host function as called ("call us", ``do_bench``:
allocations and launch included) and the kernel alone ("kernel us", torch.profiler device time; GB/s from it).
Every alternative's output is checked: the dropout outputs bit-identical to the default launch's
(``kernels.lora.DOWN_LAUNCH``), the term within bf16 rounding of ``TERM_LAUNCH``'s, every GEMM against a float32
torch reference within 1 % of its largest element. Prints one table per kernel (time, TFLOP/s or GB/s against
the bytes each must move) and writes ``lora_kernel_sweep[-TAG].json`` (and .txt) to $OUT when set. Runs from a bare checkout like
``device_check.py``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import time
from pathlib import Path

try:
    from device_check import ensure_namespace  # as a script: launch/ is on sys.path (a bare checkout on a GPU image)
except ImportError:  # python -m adasched.launch.lora_kernel_sweep (it failed: no module named 'device_check'; h51)
    from .device_check import ensure_namespace

#: around the defaults the H200 sweep of 2026-11-28 picked (dropout 32 rows / 4 warps / 8 per SM; term 64 rows /
#: 4 warps / 8 per row), one step further in each direction it was still improving in
DOWN_GRID = {"sub_m": (16, 32, 64), "warps": (4, 8), "per_sm": (8, 16)}
TERM_GRID = {"sub_m": (64, 128), "warps": (4, 8), "split": (8, 16)}
#: the dY kernel: around DY_LAUNCH (64 / 2 / 4 / 1), more programs and dB copies (64 = one per 128-row tile at
#: T=8192: no two tiles add into the same address)
DY_GRID = {"block_n": (64, 128), "per_sm": (2, 8), "warps": (4,), "copies": (1, 8, 64)}
#: past 64 rank columns the default takes 8 warps (``kernels.lora.dy_knobs``): both are swept there
DY_GRID_WIDE = {**DY_GRID, "warps": (4, 8)}
#: (block_n, num_stages, num_warps) of the dX GEMM: the two tiles of the Twill plans and of the autotuner
DX_TILES = ((256, 3, 8), (256, 4, 8), (128, 4, 4), (128, 4, 8))


def gbps(nbytes: float, ms: float, kernel_us: float | None = None) -> float:
    """GB/s of moving ``nbytes``: over the kernel's own device time when the profiler gave one (microseconds),
    else over the call's time (milliseconds). (It divided by kernel_us * 1e3 as if that were milliseconds: 10^6 x
    too low.)"""
    seconds = kernel_us * 1e-6 if kernel_us else ms * 1e-3
    return nbytes / seconds / 1e9


def _configs(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                 epilog="Without a GPU (CPU smoke run under TRITON_INTERPRET=1) the shape is a fixed "
                                        "tiny one: --T/--K/--r/--N apply on a GPU only.")
    ap.add_argument("--T", type=int, default=8192, help="tokens (rows of X; default: %(default)s)")
    ap.add_argument("--K", type=int, default=4096, help="input features of the layer (default: %(default)s)")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank (default: %(default)s)")
    ap.add_argument("--p", type=float, default=0.1, help="dropout probability on the LoRA input "
                    "(default: %(default)s)")
    ap.add_argument("--N", type=int, default=4096, help="output features of the layer (the dX GEMM's reduction; "
                    "default: %(default)s)")
    ap.add_argument("--with-s", action="store_true", help="also time the dropout kernel that accumulates S")
    ap.add_argument("--only", default="gemm,dy,term,down",
                    help="comma-separated parts: gemm, dy, term, down (default: all; the GEMM part runs last: its "
                         "TMA / persistent variants are the ones never run on a GPU, and a CUDA fault there would "
                         "spoil everything after it)")
    ap.add_argument("--tag", default="", help="written as lora_kernel_sweep-TAG.json/.txt (several runs into one "
                    "$OUT: gpu_session.sh runs the GEMM part in a process of its own)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="no new variant starts after this many seconds (default: no limit); the rest is listed "
                         "as skipped")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.tag and not re.fullmatch(r"[A-Za-z0-9_-]+", args.tag):
        ap.error(f"argument --tag: {args.tag!r}: letters, digits, '-' and '_' only (it names files)")
    stem = "lora_kernel_sweep" + (f"-{args.tag}" if args.tag else "")
    parts = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in parts if x not in ("gemm", "dy", "term", "down")]
    if bad or not parts:
        print(f"lora_kernel_sweep: --only: {', '.join(bad) or 'nothing given'}: choose from gemm, dy, term, down",
              file=sys.stderr)
        return 2
    ensure_namespace()
    import torch

    from adasched.kernels import bench
    from adasched.kernels import lora as L

    smoke = not torch.cuda.is_available()
    if smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("lora_kernel_sweep: needs a GPU (or TRITON_INTERPRET=1 for a CPU smoke run)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if smoke else "cuda")
    T, K, r, p = (48, 300, 4, args.p) if smoke else (args.T, args.K, args.r, args.p)
    N = 40 if smoke else args.N
    if smoke:
        print("NO GPU: CPU smoke run under the Triton interpreter, tiny shape; times are NOT performance numbers",
              flush=True)
    g = torch.Generator(device=dev).manual_seed(T + K + r)
    dt = torch.float32 if smoke else torch.bfloat16  # the interpreter gets bf16 arithmetic wrong
    x = torch.randn(T, K, device=dev, generator=g).to(dt)
    a = (torch.randn(r, K, device=dev, generator=g) * K ** -0.5).to(dt)
    pmat = (torch.randn(T, r, device=dev, generator=g)).to(dt)  # dY B, the term's thin input
    plan = L._tile_plan(T, ((0, 0, T),), (r,), (2.0,), (p,), 16 if smoke else 128, dev)
    seed = 12345
    mb = L.mask_bytes(K)
    env = bench.environment(dev.type)
    out = {**env, "smoke": smoke, "shape": {"T": T, "K": K, "r": r, "p": p, "N": N}, "down": [], "term": [],
           "gemm": [], "dy": []}

    def time_ms(fn) -> float:
        if smoke:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))  # (default: mean)

    def kernel_us(fn, kernel, steps: int = 5):
        """Device time per call of the Triton kernel ``kernel`` alone (torch.profiler; GPU only, else None): the
        H200 run of 2026-11-30 timed the dY host function at 82 us by ``do_bench`` while the profiler put its
        kernel at 27-29 us - the allocations and the launch around it, not the kernel, set that time."""
        if smoke:
            return None
        from torch.profiler import ProfilerActivity, profile

        try:  # never run yet: a profiler fault (CUPTI, an attribute of another torch) costs this column only - the
            # row's do_bench time is measured already and record() would turn the exception into an error row
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    fn()
                torch.cuda.synchronize()
            total = 0.0
            for ev in prof.key_averages():
                if ev.key.startswith(kernel):  # (a str or a tuple of name prefixes)
                    t = getattr(ev, "self_device_time_total", None)
                    total += float(t if t is not None else getattr(ev, "self_cuda_time_total", 0.0))
        except Exception as err:  # noqa: BLE001
            print(f"kernel_us: torch.profiler failed ({type(err).__name__}: {err}); kernel us left out", flush=True)
            return None
        return total / steps if total > 0 else None

    def save() -> None:
        """Everything so far to $OUT/lora_kernel_sweep[-TAG].json (a run cut off by its time limit still reports)."""
        if os.environ.get("OUT"):
            Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
            tmp = Path(os.environ["OUT"]) / f"{stem}.json.tmp"
            tmp.write_text(json.dumps(out, indent=1, default=str))
            tmp.replace(Path(os.environ["OUT"]) / f"{stem}.json")

    out["skipped"] = []

    def record(section: str, row: dict, measure) -> None:
        """``row`` updated with what ``measure()`` returns (a config that fails to compile or run is a result:
        ms NaN and the error), added to ``out[section]``, saved, echoed. Past --budget-s the row is listed as
        skipped instead."""
        if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
            out["skipped"].append({"section": section, **row})
            save()
            return
        try:
            row.update(measure())
        except Exception as err:
            row.update(ms=float("nan"), same=False, error=f"{type(err).__name__}: {err}"[:160])
        out[section].append(row)
        save()
        print(f"{section} {row}", file=sys.stderr, flush=True)

    _, xd_ref, mask_ref = L._down(x, a, plan, seed, with_s=False)  # the default launch: reference outputs

    if "dy" in parts:
        # dY kernel: reads dY [T, N] once, dS [T, r] and dB [N, r] in fp32; float64 references
        dy_in = torch.randn(T, N, device=dev, generator=g).to(dt)
        b_in = (torch.randn(N, r, device=dev, generator=g) * r ** -0.5).to(dt)
        s_in = torch.zeros(T, plan.block_r, device=dev, dtype=torch.float32)
        s_in[:, :r] = torch.randn(T, r, device=dev, generator=g)
        ds_ref = 2.0 * dy_in.double() @ b_in.double()
        db_ref = 2.0 * dy_in.double().t() @ s_in[:, :r].double()
        dy_bytes = T * N * 2
        for cfg in _configs(DY_GRID if plan.block_r <= 64 else DY_GRID_WIDE):
            def measure(cfg=cfg):
                ds_got, db_got, _ = L._dy_pass(dy_in, s_in, b_in, plan, False, launch=cfg)
                err = max(float((ds_got[:, :r].double() - ds_ref).abs().max() / ds_ref.abs().max()),
                          float((db_got[:, :r].double() - db_ref).abs().max() / db_ref.abs().max()))
                ms = time_ms(lambda: L._dy_pass(dy_in, s_in, b_in, plan, False, launch=cfg))
                # with copies > 1 the call also sums the dB copies (torch's reduce kernel): counted, or the
                # "kernel alone" ranking would flatter the copies it was meant to judge
                kus = kernel_us(lambda: L._dy_pass(dy_in, s_in, b_in, plan, False, launch=cfg),
                                ("_lora_dy_kernel", "void at::native::reduce_kernel"))
                # fp32 sums of bf16 products (the interpreter: float32 inputs)
                return dict(ms=ms, kernel_us=kus, gbps=gbps(dy_bytes, ms, kus), rel_err=err,
                            same=err <= (1e-5 if smoke else 1e-2), default=cfg == L.dy_knobs(plan.block_r))
            record("dy", dict(cfg), measure)
    if "term" in parts:
        # masked dX term: reads the mask, writes [T, K]
        term_bytes = T * K * 2 + T * mb
        dx_ref = torch.empty(T, K, device=dev, dtype=dt)
        L._masked_term(pmat, a, mask_ref, dx_ref, plan, apply_scale=True)
        for cfg in _configs(TERM_GRID):
            def measure(cfg=cfg):
                dx = torch.empty_like(dx_ref)
                L._masked_term(pmat, a, mask_ref, dx, plan, apply_scale=True, launch=cfg)
                diff = float((dx.float() - dx_ref.float()).abs().max())
                ms = time_ms(lambda: L._masked_term(pmat, a, mask_ref, dx, plan, apply_scale=True, launch=cfg))
                kus = kernel_us(lambda: L._masked_term(pmat, a, mask_ref, dx, plan, apply_scale=True, launch=cfg),
                                "_lora_masked_term_kernel")
                return dict(ms=ms, kernel_us=kus, gbps=gbps(term_bytes, ms, kus),
                            max_abs_diff=diff,
                            same=diff <= 1e-2 * float(dx_ref.float().abs().max()), default=cfg == L.TERM_LAUNCH)
            record("term", dict(cfg), measure)

    if "down" in parts:
        # dropout kernel: reads X, writes Xd and the mask bits
        down_bytes = T * K * 2 * 2 + T * mb
        kinds = [False, True] if args.with_s else [False]
        s_ref = L._down(x, a, plan, seed, with_s=True)[0]
        for with_s, cfg in itertools.product(kinds, _configs(DOWN_GRID)):
            def measure(with_s=with_s, cfg=cfg):
                s, xd, mask = L._down(x, a, plan, seed, with_s=with_s, launch=cfg)
                same = bool(torch.equal(xd, xd_ref)) and bool(torch.equal(mask, mask_ref))
                if with_s:
                    same = same and bool(torch.allclose(s, s_ref, rtol=1e-3, atol=1e-3))
                ms = time_ms(lambda: L._down(x, a, plan, seed, with_s=with_s, launch=cfg))
                kus = kernel_us(lambda: L._down(x, a, plan, seed, with_s=with_s, launch=cfg), "_lora_down_kernel")
                return dict(ms=ms, kernel_us=kus, gbps=gbps(down_bytes, ms, kus), same=same,
                            default=cfg == L.DOWN_LAUNCH)
            record("down", {"with_s": with_s, **cfg}, measure)

    if "gemm" in parts:
        # our two big GEMMs (pointer tiles vs TMA descriptors) and cuBLAS on the same tensors
        from adasched.kernels.gemm import GemmConfig

        dy = torch.randn(T, N, device=dev, generator=g).to(dt)
        w = (torch.randn(N, K, device=dev, generator=g) * N ** -0.5).to(dt)
        bmat = (torch.randn(N, r, device=dev, generator=g) * r ** -0.5).to(dt)
        ds = torch.randn(T, plan.block_r, device=dev, generator=g, dtype=torch.float32)
        s_fp32 = torch.zeros(T, plan.block_r, device=dev, dtype=torch.float32)
        s_fp32[:, :r] = torch.randn(T, r, device=dev, generator=g)
        flops = 2.0 * T * N * K
        keep = L.unpack_keep_bits(mask_ref, K)
        # independent float32 references: X W^T + scale S B^T, dY W + keep * (dS A) / (1 - p)
        refs = {"fwd": x.float() @ w.float().t() + 2.0 * s_fp32[:, :r] @ bmat.float().t(),
                "dX": dy.float() @ w.float() + torch.where(keep, ds[:, :r] @ a.float(), 0.0) / (1.0 - p)}
        cublas = {"fwd": lambda: torch.mm(x, w.t()), "dX": lambda: torch.mm(dy, w)}
        cublas_ms = {}
        # (gemm, tma, dX epilogue split (None: the rule), persistent grid)
        variants = [("fwd", False, None, False), ("fwd", True, None, False), ("fwd", True, None, True),
                    ("dX", False, 0, False), ("dX", False, 1, False), ("dX", True, None, False), ("dX", True, None, True)]
        for kind in ("fwd", "dX"):
            ms = time_ms(cublas[kind])
            cublas_ms[kind] = ms
            out["gemm"].append({"gemm": kind, "impl": "cuBLAS (no LoRA term)", "tile": "", "stages": "", "warps": "",
                                "epilogue": "", "ms": ms, "tflops": flops / ms / 1e9, "same": True,
                                "x_cublas": 1.0})
        # pointer tiles first, the TMA / persistent variants (never run on a GPU yet) last
        grid = sorted(itertools.product(DX_TILES if not smoke else ((32, 2, 4),), variants),
                      key=lambda tv: bool(tv[1][1] or tv[1][3]))
        for (bn, stages, warps), (kind, tma, split, persistent) in grid:
            if persistent and warps != 8 and not smoke:  # the persistent grid at the two 8-warp tiles only
                continue
            cfg = GemmConfig(block_m=plan.block_m, block_n=bn, block_k=64 if not smoke else 16, num_stages=stages,
                             num_warps=warps, tma=tma, persistent=persistent)
            rule = L.epi_split(plan.block_m, bn, warps)
            impl = ("ours, TMA" if tma else "ours, pointers") + (", persistent" if persistent else "")
            # whether descriptors really read the operands (else the launch fell back to pointer tiles)
            tma_used = tma and (L._tma_ok(x, w, w.stride(1), w.stride(0)) if kind == "fwd"
                                else L._tma_ok(dy, w, w.stride(0), w.stride(1)))
            if tma and not tma_used:
                impl += " (fell back to pointers)"
            row = {"gemm": kind, "impl": impl, "tma_used": tma_used, "tile": f"{plan.block_m}x{bn}x{cfg.block_k}",
                   "stages": stages, "warps": warps,
                   "epilogue": "" if kind == "fwd" else ("split" if (rule if split is None else split) else "full")}

            def run(cfg=cfg, kind=kind, split=split, buf=None):
                if kind == "fwd":
                    buf = torch.empty(T, N, device=dev, dtype=dt) if buf is None else buf
                    L._gemm(x, w, w.stride(1), w.stride(0), s_fp32, bmat, bmat.stride(1), bmat.stride(0), None, None,
                            buf, plan, N, K, apply_scale=True, backward=False, config=cfg)
                else:
                    buf = torch.empty(T, K, device=dev, dtype=dt) if buf is None else buf
                    L._gemm(dy, w, w.stride(0), w.stride(1), ds, a, a.stride(0), a.stride(1), mask_ref, None, buf, plan,
                            K, N, apply_scale=False, backward=True, config=cfg, epi_split=split)
                return buf

            def measure(run=run, kind=kind):
                got = run()
                ref = refs[kind]
                diff = float((got.float() - ref).abs().max())
                buf = torch.empty_like(got)
                ms = time_ms(lambda: run(buf=buf))
                base = time_ms(cublas[kind])  # cuBLAS again, next to this variant (not minutes before it)
                # bf16 output of a long fp32 sum: within 1 % of the largest element (float32 smoke: 1e-4)
                return dict(ms=ms, tflops=flops / ms / 1e9, max_abs_diff=diff, x_cublas=ms / base, cublas_ms=base,
                            same=diff <= (1e-4 if smoke else 1e-2) * float(ref.abs().max()))
            record("gemm", row, measure)

    text = [f"lora kernel sweep: {env['device_name']}, torch {env['torch']}, triton {env['triton']}, "
            f"T={T} K={K} N={N} r={r} p={p}"]
    for kind, title in (("fwd", "forward GEMM (X W^T + scale S B^T)"), ("dX", "dX GEMM (dY W + masked LoRA term)")):
        rows = [rw for rw in out["gemm"] if rw["gemm"] == kind]
        ok = sorted((rw for rw in rows if rw["ms"] == rw["ms"]), key=lambda rw: rw["ms"])
        table = [[rw["impl"], rw["tile"], str(rw["stages"]), str(rw["warps"]), rw["epilogue"], f"{rw['ms'] * 1e3:.1f}",
                  f"{rw['tflops']:.0f}", f"{rw['x_cublas']:.3f}", "yes" if rw["same"] else "NO"] for rw in ok]
        table += [[rw["impl"], rw["tile"], str(rw["stages"]), str(rw["warps"]), rw["epilogue"], "error",
                   rw.get("error", ""), "", ""] for rw in rows if rw["ms"] != rw["ms"]]
        if table:
            text.append(bench.format_table(table, ["impl", "tile", "stages", "warps", "epilogue", "us", "TFLOP/s",
                                                   "x cuBLAS", "same output"], title=f"== {title} =="))
    for name, rows, keys in (("dY kernel (dS, dB)", out["dy"], list(DY_GRID)),
                             ("dropout (Xd + mask)", out["down"], ["with_s", *DOWN_GRID]),
                             ("masked dX term", out["term"], list(TERM_GRID))):
        if not rows:
            continue
        # by the kernel's own device time where the profiler gave one (GB/s from it too), else the call's
        ok = sorted((rw for rw in rows if rw["ms"] == rw["ms"]), key=lambda rw: rw.get("kernel_us") or rw["ms"] * 1e3)
        table = [[*(str(rw[k]) for k in keys), f"{rw['ms'] * 1e3:.1f}",
                  f"{rw['kernel_us']:.1f}" if rw.get("kernel_us") else "-", f"{rw['gbps']:.0f}",
                  "yes" if rw["same"] else "NO", "default" if rw.get("default") else ""] for rw in ok]
        table += [[*(str(rw[k]) for k in keys), "error", "", rw.get("error", ""), "", ""] for rw in rows
                  if rw["ms"] != rw["ms"]]
        text.append(bench.format_table(table, [*keys, "call us", "kernel us", "GB/s", "same output", ""],
                                       title=f"== {name} =="))
    if out["skipped"]:
        text.append(f"skipped past --budget-s {args.budget_s:g}: {len(out['skipped'])} variants "
                    f"({', '.join(sorted({sk['section'] for sk in out['skipped']}))})")
    print("\n".join(text), flush=True)
    save()
    if os.environ.get("OUT"):  # the tables too: a reply's output tail keeps only its last 12,000 characters
        (Path(os.environ["OUT"]) / f"{stem}.txt").write_text("\n".join(text) + "\n")
    # a variant that raised (a config that does not compile, a CUDA fault: ms NaN) fails the run as a wrong output
    # does (only wrong outputs did: a sweep of "error" rows exited 0)
    rows = out["down"] + out["term"] + out["gemm"] + out["dy"]
    wrong = [rw for rw in rows if rw["ms"] == rw["ms"] and not rw["same"]]
    errors = [rw for rw in rows if rw["ms"] != rw["ms"]]
    print(f"lora_kernel_sweep: {len(rows)} variants, {len(wrong)} wrong outputs, {len(errors)} errors, "
          f"{len(out['skipped'])} skipped", flush=True)
    return 1 if wrong or errors else 0


if __name__ == "__main__":
    sys.exit(main())
