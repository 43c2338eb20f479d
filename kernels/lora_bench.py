"""Benchmarks and correctness checks of the fused LoRA kernels for ``adasched bench kernels``.

Providers per shape (same inputs, same run):
  base   frozen base linear only: Y = X W^T, backward dX = dY W (the floor LoRA is measured against);
  eager  PEFT-style eager torch LoRA: X W^T + scale * B(A(dropout(X))) (grads for X, A, B);
  fused  ``lora_linear(..., base_gemm="triton")``: every GEMM in our Triton kernels (the interpreter on the CPU);
  fused_tma  ``base_gemm="triton_tma"``: the same with the big GEMMs' X and W tiles through TMA descriptors;
  fused_cublas  ``lora_linear(..., base_gemm="torch")``: the same fused LoRA kernels, the two big GEMMs in torch's
         GEMM (cuBLAS) with the LoRA term added through its C input;
  fused_cublas_all  ``lora_linear(..., base_gemm="torch_all")``: cuBLAS for every GEMM, the thin LoRA ones too;
         our kernels only for the dropout mask / Xd and the masked dX term;
  fused_grouped  (multi-LoRA only) ``base_gemm="torch_grouped"``: the same with each thin GEMM one
         ``torch._grouped_mm`` over all segments;
  triton_base  the same Triton GEMM kernels with no LoRA rows (fused / triton_base = the cost of the fusion,
         triton_base / base = our GEMM against cuBLAS); triton_base_tma the same through TMA descriptors.
Dropout 0.1 and scale 2.0, as in the measured H100 profile (../shared/data/profiles/h100-sxm-measured-*.json);
one extra GPU case repeats the target shape with dropout 0.
Multi-LoRA: 4 adapters with different ranks over uneven segments of one packed batch; eager = base + one LoRA
branch per segment (mLoRA-style loop), fused = ``multi_lora_linear``.
On a GPU also "lora fwd+bwd graphed": base, eager and ``torch_all`` replayed from CUDA graphs (no host cost).

Host work (``adasched bench kernels --host-calls``): per base_gemm mode, 1 and 4 adapters, dropout 0 and 0.1, the
aten ops one warm fwd+bwd dispatches (``HostCallCounter``: a TorchDispatchMode; the Triton interpreter's own ops
inside a launch not counted), the Triton kernels it launches, and the median wall time per call;
``compare_host_time(rev)`` sets a git revision's ``kernels/lora.py`` beside the current one in one process.
"""
from __future__ import annotations

import math
from typing import Optional

from .bench import BenchCase

__all__ = ["cases", "checks", "summarize", "GPU_TOKENS", "GPU_SHAPES", "GPU_RANKS", "FUSED_PROVIDERS",
           "HostCallCounter", "count_host_calls", "host_call_rows", "time_per_call_us", "compare_host_time",
           "lora_at_revision"]

#: the fused LoRA variants timed per shape: our GEMM kernel with the LoRA term in its accumulator, and the same
#: fused LoRA kernels around cuBLAS for the two big GEMMs (``base_gemm="torch"``), and cuBLAS for every GEMM
#: around our dropout and masked-term kernels (``base_gemm="torch_all"``)
FUSED_PROVIDERS = ("fused", "fused_tma", "fused_cublas", "fused_cublas_all", "fused_grouped")

TMA_PROVIDERS = ("fused_tma", "triton_base_tma")
"""The providers through TMA descriptors (``base_gemm="triton_tma"``, never run on a GPU yet)."""
TMA_ENABLED = True
"""False drops :data:`TMA_PROVIDERS` from the cases (device_check: their checks failed in a child process)."""
TMA_CHECKS_IN_PROCESS = True
"""False leaves :func:`tma_checks` out of :func:`checks` (device_check runs them in a child process: a CUDA fault
poisons the process's context for every later check and benchmark)."""

GPU_TOKENS = (2048, 4096, 8192, 16384)
GPU_SHAPES = ((4096, 4096), (8192, 8192), (4096, 14336))  # (K = in features, N = out features)
GPU_RANKS = (16, 64)
DROPOUT, SCALE = 0.1, 2.0
MULTI_RANKS = (16, 16, 32, 64)
MULTI_FRACTIONS = (0.4, 0.3, 0.2, 0.1)


def _dtype(device: str):
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def _single_inputs(T, K, N, r, device):
    import torch

    dt = _dtype(device)
    g = torch.Generator(device=device).manual_seed(T * 7 + K + N + r)  # drawn on the device: big inputs are quick

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    x = rnd(T, K).requires_grad_()
    w = rnd(N, K, scale=K ** -0.5)
    a = rnd(r, K, scale=K ** -0.5).requires_grad_()
    b = rnd(N, r, scale=r ** -0.5).requires_grad_()
    dy = rnd(T, N)
    return x, w, a, b, dy


def _single_providers(T, K, N, r, device, backward: bool, p: float = DROPOUT):
    def build():
        import torch
        import torch.nn.functional as F

        from .lora import LoRAAdapterWeights, lora_linear, multi_lora_linear

        x, w, a, b, dy = _single_inputs(T, K, N, r, device)
        no_rows = [LoRAAdapterWeights(a, b, SCALE, p)]

        def base():
            return F.linear(x, w)

        def eager():
            xd = F.dropout(x, p, True) if p > 0 else x  # PEFT uses nn.Identity for p = 0
            return F.linear(x, w) + F.linear(F.linear(xd, a), b) * SCALE

        def fused():
            return lora_linear(x, w, a, b, SCALE, p, base_gemm="triton")

        def fused_tma():
            return lora_linear(x, w, a, b, SCALE, p, base_gemm="triton_tma")

        def fused_cublas():  # same fused LoRA kernels, the two big GEMMs in cuBLAS (LoRA term via C)
            return lora_linear(x, w, a, b, SCALE, p, base_gemm="torch")

        def fused_cublas_all():  # cuBLAS for every GEMM; Triton for the dropout mask and masked dX term only
            return lora_linear(x, w, a, b, SCALE, p, base_gemm="torch_all")

        def triton_base():  # our GEMM kernels with no row covered: separates GEMM quality from fusion cost
            return multi_lora_linear(x, w, no_rows, [], base_gemm="triton")

        def triton_base_tma():
            return multi_lora_linear(x, w, no_rows, [], base_gemm="triton_tma")

        fns = {"base": base, "eager": eager, "fused": fused, "fused_tma": fused_tma, "fused_cublas": fused_cublas,
               "fused_cublas_all": fused_cublas_all, "triton_base": triton_base, "triton_base_tma": triton_base_tma}
        fns = {k: v for k, v in fns.items() if TMA_ENABLED or k not in TMA_PROVIDERS}
        if not backward:
            return fns
        inputs = {"base": (x,), "triton_base": (x,), "triton_base_tma": (x,)}
        return {name: (lambda fn=fn, ins=inputs.get(name, (x, a, b)): torch.autograd.grad(fn(), ins, dy))
                for name, fn in fns.items()}

    return build


def _graphed(step):
    """``step`` (a zero-argument fwd+bwd call) captured into a CUDA graph on its first call (after a warm-up on
    a side stream, as torch's whole-network capture recipe does) and replayed afterwards: the device time of the
    call without the host's per-op cost."""
    import torch

    state = {}

    def run():
        if "graph" not in state:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                state["out"] = step()
            state["graph"] = graph
        state["graph"].replay()
        return state["out"]

    return run


def _graphed_providers(T, K, N, r, device, p: float = DROPOUT):
    """fwd+bwd of base, eager and ``torch_all`` each replayed from a CUDA graph (GPU only): what the small shapes
    cost once the host is out of the way. The fused call takes its seed as a device tensor advanced in the
    graph, so every replay draws a new mask, as eager's dropout does with torch's graph-safe generator."""
    def build():
        import torch
        import torch.nn.functional as F

        from .lora import lora_linear

        x, w, a, b, dy = _single_inputs(T, K, N, r, device)
        seed = torch.zeros(1, dtype=torch.int64, device=device)

        def base():
            return torch.autograd.grad(F.linear(x, w), (x,), dy)

        def eager():
            xd = F.dropout(x, p, True) if p > 0 else x
            return torch.autograd.grad(F.linear(x, w) + F.linear(F.linear(xd, a), b) * SCALE, (x, a, b), dy)

        def fused_cublas_all():
            seed.add_(1)
            return torch.autograd.grad(lora_linear(x, w, a, b, SCALE, p, seed=seed, base_gemm="torch_all"),
                                       (x, a, b), dy)

        return {"base": _graphed(base), "eager": _graphed(eager), "fused_cublas_all": _graphed(fused_cublas_all)}

    return build


def _segments(T, fractions):
    """Contiguous segments covering [0, T) in the given proportions; on big batches the cuts are moved 37 rows
    off the 128-row tile grid, so every segment pays its padding to the M tile."""
    shift = 37 if T >= 2048 else 0
    bounds, acc = [0], 0.0
    for f in fractions[:-1]:
        acc += f
        bounds.append(int(round(T * acc)) + shift)
    bounds.append(T)
    return [(i, bounds[i], bounds[i + 1]) for i in range(len(fractions))]


def _multi_providers(T, K, N, ranks, device, backward: bool):
    def build():
        import torch
        import torch.nn.functional as F

        from .lora import LoRAAdapterWeights, multi_lora_linear

        x, w, _, _, dy = _single_inputs(T, K, N, 1, device)
        dt, g = _dtype(device), torch.Generator(device=device).manual_seed(1234)
        adapters = [LoRAAdapterWeights(
            (torch.randn(r, K, generator=g, device=device) * K ** -0.5).to(dt).requires_grad_(),
            (torch.randn(N, r, generator=g, device=device) * r ** -0.5).to(dt).requires_grad_(),
            SCALE, DROPOUT) for r in ranks]
        segs = _segments(T, MULTI_FRACTIONS[: len(ranks)])
        params = [x] + [t for ad in adapters for t in (ad.lora_a, ad.lora_b)]

        def base():
            return F.linear(x, w)

        def eager():
            parts = [F.linear(F.linear(F.dropout(x[s:e], ad.dropout_p, True), ad.lora_a), ad.lora_b) * ad.scale
                     for ad, (_, s, e) in zip(adapters, segs)]
            return F.linear(x, w) + torch.cat(parts, dim=0)

        def fused():
            return multi_lora_linear(x, w, adapters, segs, base_gemm="triton")

        def fused_tma():
            return multi_lora_linear(x, w, adapters, segs, base_gemm="triton_tma")

        def fused_cublas():
            return multi_lora_linear(x, w, adapters, segs, base_gemm="torch")

        def fused_cublas_all():
            return multi_lora_linear(x, w, adapters, segs, base_gemm="torch_all")

        def fused_grouped():  # torch_all with one torch._grouped_mm per thin GEMM over all segments
            return multi_lora_linear(x, w, adapters, segs, base_gemm="torch_grouped")

        fns = {"base": base, "eager": eager, "fused": fused, "fused_tma": fused_tma, "fused_cublas": fused_cublas,
               "fused_cublas_all": fused_cublas_all, "fused_grouped": fused_grouped}
        fns = {k: v for k, v in fns.items() if TMA_ENABLED or k not in TMA_PROVIDERS}
        if not backward:
            return fns
        return {name: (lambda fn=fn, ins=((x,) if name == "base" else params): torch.autograd.grad(fn(), ins, dy))
                for name, fn in fns.items()}

    return build


def cases(quick: bool, device: str) -> list[BenchCase]:
    """The GPU grid (T x (K, N) x r, fwd and fwd+bwd) plus 4-adapter multi-LoRA; tiny shapes on the CPU."""
    if device == "cuda" and not quick:
        grid = [(T, K, N, r) for T in GPU_TOKENS for (K, N) in GPU_SHAPES for r in GPU_RANKS]
        multi = [(8192, 4096, 4096), (16384, 4096, 4096), (8192, 4096, 14336)]
    elif device == "cuda":
        grid = [(8192, 4096, 4096, 16), (4096, 4096, 14336, 64)]
        multi = [(8192, 4096, 4096)]
    elif quick:
        grid, multi = [(70, 48, 40, 8)], [(70, 48, 40)]
    else:
        grid = [(T, 64, 96, r) for T in (64, 130) for r in (4, 16)]
        multi = [(130, 64, 96)]
    out = []
    target, target_multi = (8192, 4096, 4096, 16), (8192, 4096, 4096)  # the target shapes (priority 0)
    for T, K, N, r in grid:
        for backward in (False, True):
            out.append(BenchCase(
                name="lora fwd+bwd" if backward else "lora fwd", shape=f"T={T} K={K} N={N} r={r}",
                providers=_single_providers(T, K, N, r, device, backward), baseline="base",
                params={"T": T, "K": K, "N": N, "r": r, "dropout": DROPOUT, "backward": backward},
                priority=0 if (T, K, N, r) == target else 1 if backward else 2))
    if device == "cuda":  # the target shape without dropout: what the dropout pass costs
        T, K, N, r = target
        out.append(BenchCase(name="lora fwd+bwd p=0", shape=f"T={T} K={K} N={N} r={r}",
                             providers=_single_providers(T, K, N, r, device, True, p=0.0), baseline="base",
                             params={"T": T, "K": K, "N": N, "r": r, "dropout": 0.0, "backward": True}, priority=0))
        # the same calls replayed from CUDA graphs, a host-bound small shape and the target shape: first of the
        # priority-1 phase (after the targets, so a capture problem cannot cost them)
        for T, K, N, r in ((2048, 4096, 4096, 16), target):
            out.insert(0, BenchCase(name="lora fwd+bwd graphed", shape=f"T={T} K={K} N={N} r={r}",
                                    providers=_graphed_providers(T, K, N, r, device), baseline="base",
                                    params={"T": T, "K": K, "N": N, "r": r, "dropout": DROPOUT, "backward": True},
                                    priority=1))
    ranks = MULTI_RANKS if device == "cuda" else (2, 4, 8, 16)
    for T, K, N in multi:
        for backward in (False, True):
            out.append(BenchCase(
                name="multi-lora x4 fwd+bwd" if backward else "multi-lora x4 fwd",
                shape=f"T={T} K={K} N={N} r={'/'.join(map(str, ranks))}",
                providers=_multi_providers(T, K, N, ranks, device, backward), baseline="base",
                params={"T": T, "K": K, "N": N, "ranks": list(ranks), "dropout": DROPOUT, "backward": backward},
                priority=0 if (T, K, N) == target_multi else 2))
    return out


# ------------------------------------------------------------------------------------------------------------
# Host work per call: aten ops dispatched and Triton kernels launched per forward+backward (``--host-calls``)
# ------------------------------------------------------------------------------------------------------------
#: the providers whose host work ``host_call_rows`` counts
HOST_CALL_MODES = ("torch_all", "torch", "torch_grouped", "triton")
#: aten ops that launch no device kernel (allocations, views, metadata); every other op is a ``kernel op``
NO_KERNEL_OPS = frozenset({
    "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "alias", "view", "_unsafe_view",
    "slice", "select", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "as_strided", "detach",
    "_reshape_alias", "unbind", "split", "split_with_sizes", "narrow", "lift_fresh", "set_", "_local_scalar_dense"})
#: the Triton kernels of ``kernels.lora`` a launch counter watches (and the autotuned GEMMs on a GPU)
LORA_KERNELS = ("_lora_down_kernel", "_lora_gemm_kernel", "_lora_dy_kernel", "_lora_masked_term_kernel",
                "_gemm_fwd_tuned", "_gemm_bwd_tuned", "_gemm_fwd_tuned_tma", "_gemm_bwd_tuned_tma")
#: (T, K, N, r) of the host-call rows: tiny on the CPU (compute negligible), the host-bound H200 shape on a GPU
HOST_SHAPE = {"cpu": (64, 64, 64, 8), "cuda": (2048, 4096, 4096, 16)}


class HostCallCounter:
    """Counts, inside its ``with`` block, the aten ops dispatched (a ``TorchDispatchMode``: every op the
    dispatcher sees from Python or from autograd's backward, views and allocations included) and the Triton
    launches of ``module``'s kernels (``LORA_KERNELS``, swapped for counting proxies while the block runs). Ops a
    kernel launch issues itself (the interpreter's copies on the CPU) are not counted: they are not host work on
    a GPU. ``ops`` / ``launches``: name -> calls."""

    def __init__(self, module=None):
        import collections

        from torch.utils._python_dispatch import TorchDispatchMode

        if module is None:
            from . import lora as module
        self.module, self.ops, self.launches = module, collections.Counter(), collections.Counter()
        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not counter._in_launch:
                    counter.ops[func.overloadpacket.__name__] += 1
                return func(*args, **(kwargs or {}))

        self._mode, self._in_launch, self._saved = _Mode(), False, {}

    def _proxy(self, name, kernel):
        counter = self

        class _Launch:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    counter.launches[name] += 1
                    counter._in_launch = True
                    try:
                        return kernel[grid](*args, **kw)
                    finally:
                        counter._in_launch = False
                return launch

            def __getattr__(self, attr):  # anything else (e.g. autotuner attributes) from the real kernel
                return getattr(kernel, attr)

        return _Launch()

    def __enter__(self):
        for name in LORA_KERNELS:
            kernel = getattr(self.module, name, None)
            if kernel is not None:
                self._saved[name] = kernel
                setattr(self.module, name, self._proxy(name, kernel))
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for name, kernel in self._saved.items():
            setattr(self.module, name, kernel)
        self._saved.clear()
        return False

    @property
    def aten_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def kernel_ops(self) -> int:
        """Aten ops that launch device work (not allocations, views or metadata)."""
        return sum(n for op, n in self.ops.items() if op not in NO_KERNEL_OPS)


def host_call_step(base_gemm: str, n_adapters: int, p: float, device: str = "cpu", shape=None, module=None):
    """A zero-argument fwd+bwd call (``lora_linear`` for one adapter, ``multi_lora_linear`` over ``n_adapters``
    segments covering the batch, ranks r (i + 1) / n_adapters - 2, 4, 6, 8 for 4 at r = 8 -, seed drawn per call as
    in training) of ``module`` (default ``kernels.lora``; another revision's copy for before/after timings),
    gradients for x and every adapter."""
    import torch

    L = module
    if L is None:
        from . import lora as L
    T, K, N, r = shape or HOST_SHAPE["cuda" if device == "cuda" else "cpu"]
    dt = _dtype(device)
    g = torch.Generator(device="cpu").manual_seed(T + K + N + r + n_adapters)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dt)

    ranks = [r] if n_adapters == 1 else [max(1, r * (i + 1) // n_adapters) for i in range(n_adapters)]
    ads = [L.LoRAAdapterWeights(rnd(rk, K, scale=K ** -0.5).requires_grad_(),
                                rnd(N, rk, scale=rk ** -0.5).requires_grad_(), SCALE, p) for rk in ranks]
    x, w, dy = rnd(T, K).requires_grad_(), rnd(N, K, scale=K ** -0.5), rnd(T, N)
    leaves = [x] + [t for ad in ads for t in (ad.lora_a, ad.lora_b)]
    segs = _segments(T, [1.0 / n_adapters] * n_adapters)

    def step():
        if n_adapters == 1:
            y = L.lora_linear(x, w, ads[0].lora_a, ads[0].lora_b, SCALE, p, base_gemm=base_gemm)
        else:
            y = L.multi_lora_linear(x, w, ads, segs, base_gemm=base_gemm)
        return torch.autograd.grad(y, leaves, dy)

    return step


def count_host_calls(base_gemm: str, n_adapters: int, p: float, device: str = "cpu", shape=None,
                     module=None) -> HostCallCounter:
    """The host work of one warm fwd+bwd call (the tile plan already cached by a first call)."""
    step = host_call_step(base_gemm, n_adapters, p, device, shape, module)
    step()
    with HostCallCounter(module) as counter:
        step()
    return counter


def time_per_call_us(steps: dict, device: str = "cpu", calls: int = 2000, block: int = 50) -> dict:
    """Median wall time per call (us) of each zero-argument ``step``, interleaved: blocks of ``block`` calls
    rotating over the steps until each made ``calls`` calls, every call timed on its own (on a GPU the device is
    synchronised after each call: with host-bound shapes that is the host's time plus one sync)."""
    import statistics
    import time

    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {name: [] for name in steps}
    for step in steps.values():
        for _ in range(3):
            step()
    sync()
    names = list(steps)
    for rnd in range(-(-calls // block)):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            step, out = steps[name], times[name]
            for _ in range(block):
                t0 = time.perf_counter()
                step()
                sync()
                out.append((time.perf_counter() - t0) * 1e6)
    return {name: statistics.median(v) for name, v in times.items()}


def host_call_rows(device: str = "cpu", modes=HOST_CALL_MODES, adapters=(1, 4), ps=(0.0, DROPOUT),
                   time_calls: int = 400) -> list[dict]:
    """Per (mode, adapters, p): aten ops, kernel ops and Triton launches per fwd+bwd call, and the median wall
    time per call (``time_per_call_us``; on the CPU only where no kernel runs - the interpreter's time is not host
    time: None there). ``time_calls=0`` skips the timing."""
    rows = []
    shape = HOST_SHAPE["cuda" if device == "cuda" else "cpu"]
    for n in adapters:
        for p in ps:
            for mode in modes:
                row = {"base_gemm": mode, "adapters": n, "dropout": p, "shape": "T={} K={} N={} r={}".format(*shape)}
                try:
                    c = count_host_calls(mode, n, p, device)
                    row.update(aten_ops=c.aten_ops, kernel_ops=c.kernel_ops, triton_launches=sum(c.launches.values()),
                               ops=dict(c.ops), launches=dict(c.launches), us_per_call=None, error="")
                    if time_calls and (device == "cuda" or not c.launches):
                        step = host_call_step(mode, n, p, device)
                        row["us_per_call"] = time_per_call_us({"s": step}, device, time_calls)["s"]
                except Exception as err:  # one mode failing must not cost the others' rows
                    row.update(aten_ops=None, kernel_ops=None, triton_launches=None, ops={}, launches={},
                               us_per_call=None, error=f"{type(err).__name__}: {err}"[:200])
                rows.append(row)
    return rows


HOST_CALL_COLUMNS = ["base_gemm", "adapters", "dropout", "aten ops", "kernel ops", "triton launches", "us/call"]


def host_call_table_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        if r["error"]:
            out.append([r["base_gemm"], r["adapters"], r["dropout"], "error", r["error"][:60], "", ""])
            continue
        us = "-" if r["us_per_call"] is None else f"{r['us_per_call']:.0f}"
        out.append([r["base_gemm"], r["adapters"], r["dropout"], r["aten_ops"], r["kernel_ops"],
                    r["triton_launches"], us])
    return out


def lora_at_revision(rev: str, repo=None):
    """``kernels/lora.py`` as it was at git revision ``rev``, imported as a separate module (its torch.compile
    custom ops not registered again), for before/after host timings in one process. Dev tool: needs the git
    checkout, and ``rev`` in it (a shallow clone holds only its tip: ``git fetch --unshallow`` first). The source
    goes to a real file (in the temp dir, named by the commit): ``triton.jit`` reads its functions' source back,
    which exec'd code without a file does not have. Only lora.py is old: its relative imports (``.gemm``, ...)
    are the working tree's. A revision that is not there: ValueError."""
    import importlib.util
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(repo) if repo else Path(__file__).resolve().parents[1]

    def git(*args, what: str = "") -> str:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        except OSError as e:  # no git at all
            raise ValueError(f"rev: {rev!r}: cannot run git ({e})") from None
        if done.returncode != 0:
            raise ValueError(f"rev: {rev!r}: {done.stderr.strip() or what or 'git failed'} (in {root})")
        return done.stdout

    sha = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}",
              what="no such commit in this checkout (a shallow clone: git fetch --unshallow)").strip()
    src = git("show", f"{sha}:kernels/lora.py")
    src = src.replace("from . import lora_op as _lora_op", "_lora_op = None")
    path = Path(tempfile.gettempdir()) / f"adasched_lora_at_{sha[:12]}.py"
    if not path.exists() or path.read_text() != src:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(src)
        os.replace(tmp, path)  # atomic: another process may be reading the same revision's file
    name = f"adasched.kernels._lora_at_{sha[:12]}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "adasched.kernels"
    mod.__file__ = str(path)
    sys.modules[name] = mod
    exec(compile(src, str(path), "exec"), mod.__dict__)
    return mod


def compare_host_time(rev: str, device: str = "cpu", modes=("torch_all",), adapters=(1, 4), p: float = 0.0,
                      calls: int = 3000) -> list[dict]:
    """Host work of ``kernels/lora.py`` at git revision ``rev`` against the working tree's, in one process: per
    (mode, adapters) the aten ops / kernel ops / Triton launches per fwd+bwd of each, and the median wall time
    per call of each and of eager torch LoRA (the PEFT-style provider: X W^T + scale B(A(X))), interleaved
    (``time_per_call_us``). On the CPU only meaningful where no Triton kernel runs (p = 0 with "torch_all"):
    interpreter time is not host time. Run with TRITON_INTERPRET=1 (else the CPU takes the torch reference)."""
    import torch
    import torch.nn.functional as F

    old = lora_at_revision(rev)
    rows = []
    for mode in modes:
        for n in adapters:
            c_old, c_new = (count_host_calls(mode, n, p, device, module=m) for m in (old, None))
            steps = {"before": host_call_step(mode, n, p, device, module=old), "after": host_call_step(mode, n, p, device)}
            if n == 1:
                T, K, N, r = HOST_SHAPE["cuda" if device == "cuda" else "cpu"]
                x, w, a, b, dy = _single_inputs(T, K, N, r, device)

                def eager():
                    xd = F.dropout(x, p, True) if p > 0 else x
                    return torch.autograd.grad(F.linear(x, w) + F.linear(F.linear(xd, a), b) * SCALE, (x, a, b), dy)

                steps["eager"] = eager
            us = time_per_call_us(steps, device, calls)
            rows.append({"base_gemm": mode, "adapters": n, "dropout": p, "rev": rev,
                         "before": {"aten_ops": c_old.aten_ops, "kernel_ops": c_old.kernel_ops,
                                    "triton_launches": sum(c_old.launches.values()), "us_per_call": us["before"]},
                         "after": {"aten_ops": c_new.aten_ops, "kernel_ops": c_new.kernel_ops,
                                   "triton_launches": sum(c_new.launches.values()), "us_per_call": us["after"]},
                         "eager_us_per_call": us.get("eager")})
    return rows


# ------------------------------------------------------------------------------------------------------------
# Correctness checks (bf16 on the GPU, float16/float32 under the interpreter) against a float64 reference
# ------------------------------------------------------------------------------------------------------------
def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not bool(a.isfinite().all()):
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _poison(device: str) -> None:
    """Fill freed allocator blocks with NaN, so an output element the kernel forgets to write shows up."""
    import torch

    if device == "cuda":
        torch.full((64 * 1024 * 1024,), float("nan"), device=device)   # freed at once, its blocks stay NaN


def _check_single(T, K, N, r, p, dtype, device, tol, base_gemm="auto"):
    import torch

    from .lora import lora_linear, lora_linear_reference

    g = torch.Generator(device="cpu").manual_seed(T + K + N + r)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x, w = rnd(T, K), rnd(N, K, scale=K ** -0.5)
    a, b, bias = rnd(r, K, scale=K ** -0.5), rnd(N, r, scale=r ** -0.5), rnd(N)
    dy = rnd(T, N)
    leaves = [t.requires_grad_() for t in (x, a, b, bias)]
    _poison(device)
    y = lora_linear(x, w, a, b, SCALE, p, bias, seed=77, base_gemm=base_gemm)
    grads = torch.autograd.grad(y, leaves, dy)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = lora_linear_reference(l64[0], w.double(), l64[1], l64[2], SCALE, p, l64[3], seed=77)
    g64 = torch.autograd.grad(y64, l64, dy.double())
    ye = lora_linear_reference(x, w, a, b, SCALE, p, bias, seed=77)  # same-dtype eager torch, same mask
    ge = torch.autograd.grad(ye, leaves, dy)
    names = ["y", "dx", "dA", "dB", "dbias"]
    ours = [_rel(u, v) for u, v in zip([y, *grads], [y64, *g64])]
    eager = [_rel(u, v) for u, v in zip([ye, *ge], [y64, *g64])]
    ok = all(o <= max(tol, 2 * e) for o, e in zip(ours, eager))
    detail = " ".join(f"{n}={o:.1e}(eager {e:.1e})" for n, o, e in zip(names, ours, eager))
    return (f"lora {str(dtype).split('.')[-1]} T={T} K={K} N={N} r={r} p={p} {base_gemm}", ok,
            "rel err vs f64: " + detail)


def _check_mask(device):
    import torch

    from . import lora as L

    T, K = (300, 520) if device == "cuda" else (40, 72)
    x = torch.randn(T, K, device=device, dtype=_dtype(device))
    a = torch.randn(16, K, device=device, dtype=x.dtype)
    b = torch.randn(64, 16, device=device, dtype=x.dtype)
    w = torch.randn(64, K, device=device, dtype=x.dtype)
    plan = L._tile_plan(T, ((0, 0, T),), (16,), (1.0,), (0.3,), L.default_block_m(device), x.device)
    _, _, xd, mask = L._fused_forward(x, w, None, a, b, plan, 2 ** 31 + 5)
    want = L.dropout_keep_mask(2 ** 31 + 5, T, K, 0.3, device)
    keep = L.unpack_keep_bits(mask, K)
    same = bool(torch.equal(keep, want))
    frac = 1 - keep.float().mean().item()
    again = L._fused_forward(x, w, None, a, b, plan, 2 ** 31 + 5)[3]
    _, xd_only, mask_only = L._down(x, a, plan, 2 ** 31 + 5, with_s=False)  # the launch base_gemm="torch_all" uses
    sigma = math.sqrt(0.3 * 0.7 / keep.numel())
    same_only = bool(torch.equal(mask_only, mask)) and bool(torch.equal(xd_only, xd))
    ok = same and same_only and bool(torch.equal(again, mask)) and abs(frac - 0.3) < 5 * sigma
    return ("dropout mask = torch Philox mirror, reproducible", ok,
            f"kernel mask == mirror: {same}; mask-only launch identical: {same_only}; dropped fraction {frac:.4f} "
            "(p=0.3)")


def _check_multi(T, K, N, ranks, dtype, device, tol, block_m=None, base_gemm="auto"):
    import torch

    from .lora import LoRAAdapterWeights, multi_lora_linear, multi_lora_linear_reference

    g = torch.Generator(device="cpu").manual_seed(T + K)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    adapters = [LoRAAdapterWeights(rnd(r, K, scale=K ** -0.5).requires_grad_(),
                                   rnd(N, r, scale=r ** -0.5).requires_grad_(), 0.5 + i, 0.1 * (i % 3))
                for i, r in enumerate(ranks)]
    # adapters' segments unsorted, gaps of uncovered rows between them
    n = len(ranks)
    cut = [int(T * i / n) for i in range(n + 1)]
    segs = [(i, cut[i] + 3, cut[i + 1] - 2) for i in reversed(range(n))]
    x, w, dy = rnd(T, K).requires_grad_(), rnd(N, K, scale=K ** -0.5), rnd(T, N)
    leaves = [x] + [t for ad in adapters for t in (ad.lora_a, ad.lora_b)]
    _poison(device)
    y = multi_lora_linear(x, w, adapters, segs, seed=5, block_m=block_m, base_gemm=base_gemm)
    grads = torch.autograd.grad(y, leaves, dy)
    a64 = [LoRAAdapterWeights(ad.lora_a.detach().double().requires_grad_(),
                              ad.lora_b.detach().double().requires_grad_(), ad.scale, ad.dropout_p)
           for ad in adapters]
    x64 = x.detach().double().requires_grad_()
    l64 = [x64] + [t for ad in a64 for t in (ad.lora_a, ad.lora_b)]
    y64 = multi_lora_linear_reference(x64, w.double(), a64, segs, seed=5)
    g64 = torch.autograd.grad(y64, l64, dy.double())
    errs = [_rel(u, v) for u, v in zip([y, *grads], [y64, *g64])]
    ok = all(e <= tol for e in errs)
    return (f"multi-lora x{n} {str(dtype).split('.')[-1]} T={T} K={K} N={N} r={'/'.join(map(str, ranks))} "
            f"{base_gemm}", ok,
            f"max rel err vs f64 over y and {len(grads)} grads: {max(errs):.1e} (tol {tol:g})")


def _check_compile(device, dtype):
    """torch.compile(fullgraph=True, aot_eager) of a single- and a 3-adapter call with dropout: outputs and every
    gradient equal the eager call's bit for bit (the same kernels behind the custom ops)."""
    import torch

    from .lora import LoRAAdapterWeights, multi_lora_linear

    torch._dynamo.reset()
    g = torch.Generator(device="cpu").manual_seed(11)
    T, K, N = (1000, 1536, 1032) if device == "cuda" else (45, 48, 40)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    x, w = rnd(T, K), rnd(N, K, scale=K ** -0.5).detach()
    ads = [LoRAAdapterWeights(rnd(r, K, scale=K ** -0.5), rnd(N, r, scale=r ** -0.5), 0.5 + i, p)
           for i, (r, p) in enumerate(((16, 0.1), (8, 0.0), (32, 0.2)))]
    dy = torch.randn(T, N, generator=g).to(device=device, dtype=dtype)
    leaves = [x] + [t for ad in ads for t in (ad.lora_a, ad.lora_b)]
    calls = {"single": lambda: multi_lora_linear(x, w, ads[:1], [(0, 0, T)], seed=3),
             "multi x3": lambda: multi_lora_linear(x, w, ads, [(2, 0, T // 3), (0, T // 3 + 5, 2 * T // 3),
                                                              (1, 2 * T // 3, T - 7)], seed=3)}
    bad = []
    for name, fn in calls.items():
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        outs = []
        for f in (fn, compiled):
            y = f()
            outs.append([y.detach()] + [t if t is not None else torch.zeros(0)
                                        for t in torch.autograd.grad(y, leaves, dy, allow_unused=True)])
        if not all(torch.equal(u, v) for u, v in zip(*outs)):
            bad.append(name)
    torch._dynamo.reset()
    return (f"lora torch.compile {str(dtype).split('.')[-1]} (aot_eager, fullgraph) = eager", not bad,
            "outputs and grads bit-identical: " + ("yes" if not bad else "NO for " + ", ".join(bad)))


def _check_fp32_ieee(device):
    """fp32 operands on the GPU: our Triton GEMM (an explicit tile: no autotuning, whose bf16-sized rings do not
    all fit fp32) against float64. Under TF32 products (Triton's default for fp32 tl.dot on NVIDIA) the error
    would be ~1e-3; IEEE fp32 stays ~1e-6. (The MoE and LoRA kernels' fp32 dots are checked to lower without TF32
    by tests/kernels/test_gpu_hazards.py, offline; the LoRA fp32 check above runs the dropout/term kernels.)"""
    import torch

    from .gemm import GemmConfig, gemm

    g = torch.Generator(device="cpu").manual_seed(3)
    M, K, N = (1000, 1536, 1032) if device == "cuda" else (40, 48, 36)
    a = torch.randn(M, K, generator=g).to(device)
    b = (torch.randn(K, N, generator=g) * K ** -0.5).to(device)
    err = _rel(gemm(a, b, GemmConfig(block_m=64, block_n=64, block_k=32, num_stages=2, num_warps=4)),
               a.double() @ b.double())
    return ("gemm fp32 operands in IEEE fp32 (not TF32)", err <= 1e-5,
            f"rel err vs f64: {err:.1e} (tol 1e-5; TF32 would be ~1e-3)")


def large_offset_checks(device: str) -> list[tuple[str, bool, str]]:
    """int64 addressing on a GPU: an input of >= 2**31 elements (T=131109 x K=16384 bf16, 4.3 GB), where an
    int32 ``row * stride`` wraps. Our GEMM (``gemm``; int64 indices by ``_offs_64``) and the LoRA kernels (rows
    from the int64 tile table) in the modes that run them on X ("triton" with an explicit tile: the GEMM kernel,
    the S kernel and the dY kernel; "torch": the S and dY kernels), p=0 (the torch mirror of a 2**31-element
    mask is too slow here). Judged against eager torch in the same dtype on the same tensors (a float64 copy would
    not fit): a wrapped offset reads garbage or faults, far beyond bf16 rounding. ``device_check`` runs this in a
    child process, so a fault cannot poison the parent's CUDA context. Off the GPU: tiny shapes (the plumbing
    only, not the offsets)."""
    import torch

    from .gemm import GemmConfig, gemm
    from .lora import lora_linear, lora_linear_reference

    T, K, N, r = (131109, 16384, 64, 16) if device == "cuda" else (37, 48, 24, 4)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(9)
    x = torch.randn(T, K, device=device, dtype=dt, generator=g)
    out = []
    w = torch.randn(N, K, device=device, dtype=dt, generator=g) * K ** -0.5
    tile = GemmConfig(block_m=128 if device == "cuda" else 16, block_n=64 if device == "cuda" else 16,
                      block_k=64 if device == "cuda" else 16, num_stages=3, num_warps=4)
    y = gemm(x, w.t(), tile)
    tail = slice(max(0, T - 300), T)  # the rows whose offsets pass 2**31
    err = _rel(y[tail], x[tail].float() @ w.t().float())
    out.append((f"gemm int64 offsets T={T} K={K} {str(dt).split('.')[-1]}", err <= 2e-2,
                f"rel err of the last 300 rows vs torch: {err:.1e} (tol 2e-2)"))
    del y
    a = (torch.randn(r, K, device=device, dtype=dt, generator=g) * K ** -0.5).requires_grad_()
    b = (torch.randn(N, r, device=device, dtype=dt, generator=g) * r ** -0.5).requires_grad_()
    dy = torch.randn(T, N, device=device, dtype=dt, generator=g)
    xg = x.requires_grad_()
    ye = lora_linear_reference(xg, w, a, b, SCALE, 0.0)
    want = torch.autograd.grad(ye, [xg, a, b], dy)
    want = [ye.detach()[tail], want[0][tail], want[1], want[2]]
    del ye
    for base_gemm, cfg in (("triton", tile), ("torch", None)):
        try:
            y = lora_linear(xg, w, a, b, SCALE, 0.0, gemm_config=cfg, base_gemm=base_gemm)
            got = torch.autograd.grad(y, [xg, a, b], dy)
            errs = [_rel(u, v) for u, v in zip([y.detach()[tail], got[0][tail], got[1], got[2]], want)]
            del y, got
            out.append((f"lora int64 offsets T={T} K={K} {base_gemm}", max(errs) <= 2e-2,
                        "rel err vs eager torch (same dtype), y/dx last 300 rows, dA, dB: "
                        + " ".join(f"{e:.1e}" for e in errs) + " (tol 2e-2)"))
        except Exception as err:
            out.append((f"lora int64 offsets {base_gemm}", False, f"{type(err).__name__}: {err}"[:300]))
    return out


def tma_checks(device: str) -> list[tuple[str, bool, str]]:
    """The bf16 checks of ``base_gemm="triton_tma"`` on the GPU (single and multi-LoRA), each guarded."""
    import torch

    out = []
    for name, fn in (("lora single bf16 triton_tma", lambda: _check_single(
            1000, 1536, 1032, 16, 0.1, torch.bfloat16, device, 1e-2, base_gemm="triton_tma")),
                     ("lora multi bf16 triton_tma", lambda: _check_multi(
            3000, 2048, 1536, MULTI_RANKS, torch.bfloat16, device, 1e-2, base_gemm="triton_tma"))):
        try:
            out.append(fn())
        except Exception as err:
            out.append((name, False, f"{type(err).__name__}: {err}"[:300]))
    return out


def checks(device: str) -> list[tuple[str, bool, str]]:
    """bf16 on the GPU (tolerance 1e-2 relative, or 2x eager torch's own bf16 error); float16 and float32 on the
    CPU interpreter."""
    import torch

    out = []
    if device == "cuda":
        bf = torch.bfloat16

        def guarded(name, fn):  # one check failing (a mode not compiling on this GPU) must not cost the others
            try:
                out.append(fn())
            except Exception as err:
                out.append((name, False, f"{type(err).__name__}: {err}"[:300]))

        # triton_tma (TMA descriptor loads, never run on a GPU yet) is checked last: a CUDA fault there would
        # spoil every check after it in this process
        for base_gemm in ("triton", "torch", "torch_all"):
            guarded(f"lora single bf16 {base_gemm}",
                    lambda: _check_single(1000, 1536, 1032, 16, 0.1, bf, device, 1e-2, base_gemm=base_gemm))
            guarded(f"lora multi bf16 {base_gemm}",
                    lambda: _check_multi(3000, 2048, 1536, MULTI_RANKS, bf, device, 1e-2, base_gemm=base_gemm))
        guarded("lora multi bf16 torch_grouped",
                lambda: _check_multi(3000, 2048, 1536, MULTI_RANKS, bf, device, 1e-2, base_gemm="torch_grouped"))
        for T, K, N, r, p, dt in ((4096, 4096, 4096, 64, 0.0, bf), (777, 4096, 14336, 16, 0.1, bf),
                                  (513, 1024, 768, 16, 0.1, torch.float16)):
            guarded(f"lora {str(dt).split('.')[-1]} T={T} K={K} N={N} r={r} p={p}",
                    lambda: _check_single(T, K, N, r, p, dt, device, 1e-2))
        guarded("lora dropout mask", lambda: _check_mask(device))
        # fp32 operands: IEEE products, not Triton's TF32 default
        guarded("lora float32 torch_all", lambda: _check_single(
            1000, 1536, 1032, 16, 0.1, torch.float32, device, 1e-5, base_gemm="torch_all"))
        guarded("gemm fp32", lambda: _check_fp32_ieee(device))
        guarded("lora torch.compile bf16", lambda: _check_compile(device, bf))
        if TMA_CHECKS_IN_PROCESS and TMA_ENABLED:
            out += tma_checks(device)
    else:
        out.append(_check_single(37, 48, 40, 8, 0.2, torch.float32, device, 1e-5))
        out.append(_check_single(37, 48, 40, 4, 0.1, torch.float16, device, 5e-3))
        out.append(_check_mask(device))
        out.append(_check_multi(61, 40, 36, (2, 4, 8, 16), torch.float32, device, 1e-5))
        out.append(_check_multi(61, 300, 36, (2, 4, 8, 16), torch.float32, device, 1e-5, base_gemm="torch_all"))
        out.append(_check_multi(61, 40, 32, (2, 4, 8, 16), torch.float32, device, 1e-5, base_gemm="torch_grouped"))
        out.append(_check_multi(61, 40, 32, (2, 4, 8, 16), torch.float32, device, 1e-5, base_gemm="triton_tma"))
        out.append(_check_compile(device, torch.float32))
        out.append(_check_fp32_ieee(device))
    return out


# ------------------------------------------------------------------------------------------------------------
# Issue targets (H100): read off one run's results
# ------------------------------------------------------------------------------------------------------------
def summarize(results: list[dict]) -> list[tuple[str, float, str, Optional[bool]]]:
    """(target, measured, goal, met; None for an informational row) for the LoRA kernel targets, from the
    ``run_benchmarks`` rows of one run: fused fwd+bwd / base at T=8192 K=N=4096 r=16 <= 1.10; mean eager/fused fwd+bwd speedup over the grid >= 1.3;
    4-adapter multi-LoRA fwd+bwd / base <= 1.15. Missing measurements give no row."""
    ok = [r for r in results if r.get("group") == "lora" and not r["error"]]

    def ms(case, provider, **params):
        for r in ok:
            if r["case"] == case and r["provider"] == provider and all(r["params"].get(k) == v
                                                                       for k, v in params.items()):
                return r["median_ms"]
        return None

    out = []
    b = ms("lora fwd+bwd", "base", T=8192, K=4096, N=4096, r=16)
    e = ms("lora fwd+bwd", "eager", T=8192, K=4096, N=4096, r=16)
    if e and b:
        out.append(("eager fwd+bwd / base, T=8192 4096x4096 r=16", e / b, "(H100 profile: 1.56)", None))
    for T in (2048, 8192):  # replayed from CUDA graphs: no host cost in any provider
        bg = ms("lora fwd+bwd graphed", "base", T=T, K=4096, N=4096, r=16)
        eg = ms("lora fwd+bwd graphed", "eager", T=T, K=4096, N=4096, r=16)
        fg = ms("lora fwd+bwd graphed", "fused_cublas_all", T=T, K=4096, N=4096, r=16)
        if bg and fg:
            out.append((f"graphed fused_cublas_all fwd+bwd / base, T={T} 4096x4096 r=16", fg / bg, "(info)", None))
        if eg and fg:
            out.append((f"graphed eager / fused_cublas_all, T={T} 4096x4096 r=16", eg / fg, "(info)", None))
    b0 = ms("lora fwd+bwd p=0", "base", T=8192, K=4096, N=4096, r=16)
    for prov in FUSED_PROVIDERS:
        f = ms("lora fwd+bwd", prov, T=8192, K=4096, N=4096, r=16)
        if f and b:
            out.append((f"{prov} fwd+bwd / base, T=8192 4096x4096 r=16", f / b, "<= 1.10", f / b <= 1.10))
        f0 = ms("lora fwd+bwd p=0", prov, T=8192, K=4096, N=4096, r=16)
        if f0 and b0:
            out.append((f"{prov} fwd+bwd / base, same shape, dropout 0", f0 / b0, "(info)", None))
        for case in ("lora fwd+bwd", "lora fwd"):
            speed = []
            for r in ok:
                if r["case"] == case and r["provider"] == prov:
                    eg = ms(case, "eager", **{k: r["params"][k] for k in ("T", "K", "N", "r")})
                    if eg:
                        speed.append(eg / r["median_ms"])
            if speed:
                mean = sum(speed) / len(speed)
                target = case == "lora fwd+bwd"
                out.append((f"eager / {prov} {case.split()[-1]}, mean over {len(speed)} shapes", mean,
                            ">= 1.3" if target else "(no target)", mean >= 1.3 if target else None))
                out.append((f"eager / {prov} {case.split()[-1]}, max over {len(speed)} shapes", max(speed),
                            "(paper: 1.39 max)" if target else "", None))
        for r in ok:
            if r["case"] == "multi-lora x4 fwd+bwd" and r["provider"] == prov:
                p = r["params"]
                bm = ms("multi-lora x4 fwd+bwd", "base", T=p["T"], K=p["K"], N=p["N"])
                if bm:
                    out.append((f"multi-lora x4 {prov} fwd+bwd / base, T={p['T']} {p['K']}x{p['N']}",
                                r["median_ms"] / bm, "<= 1.15", r["median_ms"] / bm <= 1.15))
    return out
