"""Single-device microbenchmarks and their fitted cost models.

- GEMM rate (TFLOP/s) of one square matmul;
- device copy bandwidth (GB/s, bytes read + bytes written);
- causal attention (torch SDPA) forward+backward time over sequence lengths -> a1*s^2 + a2*s + b;
- the linear layers of one transformer layer (QKV, O, SwiGLU MLP) forward+backward over token counts
  -> ms/token + b.

On a CUDA device the timings are medians of CUDA-event times over ``repeats`` calls, in bf16; on the CPU
they are medians of ``time.perf_counter`` over repeats, in float32, with shapes small enough for a CI box. ``quick`` keeps everything CI-sized on either.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .fit import fit_affine, fit_quadratic
from .profile import MAX_FIT_REL_ERROR, AttentionFit, LinearFit

__all__ = ["MicrobenchConfig", "microbench_config", "cpu_threads_per_rank", "time_ms", "bench_gemm", "bench_copy", "bench_attention",
           "bench_linear", "run_microbenchmarks"]


@dataclass(frozen=True, kw_only=True)
class MicrobenchConfig:
    device: str
    """'cuda' or 'cpu'."""
    dtype: str
    """'bfloat16' on GPUs, 'float32' on the CPU."""
    gemm_n: int
    """Square GEMM size n (n x n @ n x n)."""
    copy_bytes: int
    """Bytes copied per timed copy."""
    attn_seqlens: tuple[int, ...]
    """Sequence lengths (tokens) of the attention sweep."""
    attn_heads: int
    attn_head_dim: int
    linear_hidden: int
    linear_ffn: int
    linear_tokens: tuple[int, ...]
    """Token counts of the linear-layer sweep."""
    warmup: int = 2
    repeats: int = 5

    def __post_init__(self):
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        if len(set(self.attn_seqlens)) < 3 or len(set(self.linear_tokens)) < 2:
            raise ValueError(f"need >= 3 distinct attention sequence lengths and >= 2 distinct token counts to fit "
                             f"the models, got {list(self.attn_seqlens)} and {list(self.linear_tokens)}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats}, {self.warmup}")

    @property
    def steps(self) -> int:
        return 2 + len(self.attn_seqlens) + len(self.linear_tokens)


def microbench_config(quick: bool, device: str | None = None) -> MicrobenchConfig:
    """Sizes for this device: the 7B-layer shapes on a GPU, tiny float32 shapes on a CPU."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        if quick:
            return MicrobenchConfig(device="cuda", dtype="bfloat16", gemm_n=4096, copy_bytes=1 << 28,
                                    attn_seqlens=(1024, 2048, 4096, 8192), attn_heads=32, attn_head_dim=128,
                                    linear_hidden=4096, linear_ffn=11008, linear_tokens=(1024, 4096, 8192))
        return MicrobenchConfig(device="cuda", dtype="bfloat16", gemm_n=8192, copy_bytes=1 << 30,
                                attn_seqlens=(1024, 2048, 4096, 8192, 16384, 32768), attn_heads=32,
                                attn_head_dim=128, linear_hidden=4096, linear_ffn=11008,
                                linear_tokens=(1024, 4096, 16384, 32768), warmup=5, repeats=20)
    if quick:
        return MicrobenchConfig(device="cpu", dtype="float32", gemm_n=256, copy_bytes=1 << 24,
                                attn_seqlens=(64, 128, 256, 512), attn_heads=2, attn_head_dim=32,
                                linear_hidden=128, linear_ffn=344, linear_tokens=(64, 256, 1024), warmup=1, repeats=3)
    return MicrobenchConfig(device="cpu", dtype="float32", gemm_n=1024, copy_bytes=1 << 27,
                            attn_seqlens=(128, 256, 512, 1024, 2048), attn_heads=4, attn_head_dim=64,
                            linear_hidden=512, linear_ffn=1376, linear_tokens=(128, 512, 2048, 4096),
                            warmup=2, repeats=5)


def time_ms(fn: Callable[[], Any], device: str, warmup: int, repeats: int) -> float:
    """Median time of ``fn()`` in ms over ``repeats`` timed calls, after ``warmup`` untimed ones.

    GPU: each call between two CUDA events on the current stream, one synchronize after the last (nothing
    waits on the host inside the timed calls), so exactly ``repeats`` samples whatever the call's length
    (triton's do_bench takes its warmup/rep in ms and ran 1-2 samples of a 50 ms call). CPU: perf_counter
    around each call (CPU ops are synchronous)."""
    import torch

    if device == "cuda":
        return _cuda_median_ms(fn, warmup, repeats, torch.cuda)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cuda_median_ms(fn: Callable[[], Any], warmup: int, repeats: int, cuda) -> float:
    """``cuda`` is ``torch.cuda`` (a parameter so the event bookkeeping can be tested without a GPU)."""
    for _ in range(warmup):
        fn()
    cuda.synchronize()
    events = [(cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _dtype(cfg: MicrobenchConfig):
    import torch

    return getattr(torch, cfg.dtype)


def bench_gemm(cfg: MicrobenchConfig) -> dict[str, float]:
    """n^3 matmul: returns {'n', 'ms', 'tflops'} (2 n^3 flops)."""
    import torch

    n = cfg.gemm_n
    a = torch.randn(n, n, device=cfg.device, dtype=_dtype(cfg))
    b = torch.randn(n, n, device=cfg.device, dtype=_dtype(cfg))
    ms = time_ms(lambda: a @ b, cfg.device, cfg.warmup, cfg.repeats)
    return {"n": n, "ms": ms, "tflops": 2.0 * n**3 / (ms * 1e-3) / 1e12}


def bench_copy(cfg: MicrobenchConfig) -> dict[str, float]:
    """dst.copy_(src) of ``copy_bytes``: returns {'bytes', 'ms', 'GBps'} counting read + write."""
    import torch

    n = cfg.copy_bytes // 4
    src = torch.randn(n, device=cfg.device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), cfg.device, cfg.warmup, cfg.repeats)
    return {"bytes": n * 4, "ms": ms, "GBps": 2.0 * n * 4 / (ms * 1e-3) / 1e9}


def _check_fit(what: str, rel_error: float, rows: list[dict], key: str) -> None:
    """A fit beyond the profile's error bound is one line naming the measurement (it was a pydantic traceback at
    the end of the run: timings of a busy host, or sizes so small that launch noise is all they measure)."""
    if not rel_error <= MAX_FIT_REL_ERROR:
        times = ", ".join(f"{r[key]:.3g}" for r in rows)
        raise ValueError(f"{what}: the fit's mean relative error is {rel_error:.3g} (a fit within "
                         f"{MAX_FIT_REL_ERROR:g} is kept) over timings {times} ms: the host was busy or the sizes "
                         f"are too small to time - measure again on a quiet host, or larger sizes")


def bench_attention(cfg: MicrobenchConfig, advance: Callable[[], None] = lambda: None) -> tuple[AttentionFit, list[dict]]:
    """Causal SDPA forward+backward of one layer (batch 1) per sequence length, fitted a1 s^2 + a2 s + b."""
    import torch
    import torch.nn.functional as F

    rows = []
    for s in cfg.attn_seqlens:
        q, k, v = (torch.randn(1, cfg.attn_heads, s, cfg.attn_head_dim, device=cfg.device, dtype=_dtype(cfg),
                               requires_grad=True) for _ in range(3))
        g = torch.randn(1, cfg.attn_heads, s, cfg.attn_head_dim, device=cfg.device, dtype=_dtype(cfg))

        def step():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(g)
            q.grad = k.grad = v.grad = None

        rows.append({"seq": s, "heads": cfg.attn_heads, "fwd_bwd_ms": time_ms(step, cfg.device, cfg.warmup, cfg.repeats)})
        advance()
    fit = fit_quadratic([r["seq"] for r in rows], [r["fwd_bwd_ms"] for r in rows])
    _check_fit("attention (causal SDPA fwd+bwd)", fit.rel_error, rows, "fwd_bwd_ms")
    att = AttentionFit(a1_ms_per_tok2=fit.coef[0], a2_ms_per_tok=fit.coef[1], b_ms=fit.coef[2],
                       heads=cfg.attn_heads, head_dim=cfg.attn_head_dim, fit_rel_error=fit.rel_error,
                       source=f"measured: causal SDPA fwd+bwd, {cfg.dtype}, {cfg.device}"
                              + (f"; {fit.note}" if fit.note else ""))
    return att, rows


def bench_linear(cfg: MicrobenchConfig, advance: Callable[[], None] = lambda: None) -> tuple[LinearFit, list[dict]]:
    """QKV + O + SwiGLU MLP of one layer, forward+backward (weight and input grads) per token count."""
    import torch

    h, f = cfg.linear_hidden, cfg.linear_ffn
    kw = dict(device=cfg.device, dtype=_dtype(cfg))
    w_qkv = (torch.randn(3 * h, h, **kw) / h**0.5).requires_grad_()
    w_o = (torch.randn(h, h, **kw) / h**0.5).requires_grad_()
    w_up = (torch.randn(2 * f, h, **kw) / h**0.5).requires_grad_()
    w_down = (torch.randn(h, f, **kw) / f**0.5).requires_grad_()
    weights = (w_qkv, w_o, w_up, w_down)
    rows = []
    for t in cfg.linear_tokens:
        x = torch.randn(t, h, **kw, requires_grad=True)

        def step():
            qkv = x @ w_qkv.T
            o = qkv[:, :h] @ w_o.T
            gate, up = (o @ w_up.T).chunk(2, dim=-1)
            y = (torch.nn.functional.silu(gate) * up) @ w_down.T
            y.sum().backward()
            x.grad = None
            for w in weights:
                w.grad = None

        rows.append({"tokens": t, "fwd_bwd_ms": time_ms(step, cfg.device, cfg.warmup, cfg.repeats)})
        advance()
    tokens, ms = [r["tokens"] for r in rows], [r["fwd_bwd_ms"] for r in rows]
    fit = fit_affine(tokens, ms)
    ms_per_token, b_ms, err = fit.coef[0], fit.coef[1], fit.rel_error
    note = ""
    if not ms_per_token > 0:  # noise (a loaded machine) flattened the slope: proportional model, its own error
        ms_per_token = sum(t * y for t, y in zip(tokens, ms)) / sum(t * t for t in tokens)
        b_ms = 0.0
        err = sum(abs(ms_per_token * t - y) / y for t, y in zip(tokens, ms)) / len(ms)
        note = "; no growth with tokens resolved by the data: a proportional model (no constant term)"
    _check_fit("linear layers (QKV+O+SwiGLU MLP fwd+bwd)", err, rows, "fwd_bwd_ms")
    lin = LinearFit(ms_per_token=ms_per_token, b_ms=b_ms, hidden=h, ffn_hidden=f, fit_rel_error=err,
                    source=f"measured: QKV+O+SwiGLU MLP fwd+bwd, {cfg.dtype}, {cfg.device}{note}")
    return lin, rows


@dataclass
class MicrobenchResult:
    gemm_tflops: float
    copy_GBps: float
    attention: AttentionFit
    linear: LinearFit
    raw: dict[str, Any] = field(default_factory=dict)


def cpu_threads_per_rank(ranks: int) -> int:
    """Threads one of ``ranks`` CPU ranks sharing this host gets: its usable cores split evenly, at least one."""
    from .inventory import _cores

    return max(1, _cores() // max(1, ranks))


def run_microbenchmarks(cfg: MicrobenchConfig, *, show_progress: bool = True,
                        threads: int | None = None) -> MicrobenchResult:
    """Every single-device benchmark with a progress bar on stderr; returns the fitted models and raw points.
    ``threads`` (CPU): torch's intra-op threads while measuring (restored after), recorded in the raw config - a
    CPU profile of N ranks per host measures one rank's share of the cores (:func:`cpu_threads_per_rank`), as its
    memory is one rank's share; every core's speed was recorded for each of N ranks."""
    import torch

    from adasched.planner.ui import progress

    torch.manual_seed(0)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    try:
        label = f"microbenchmarks ({cfg.device}, {cfg.dtype}" + (f", {threads} threads)" if threads else ")")
        with progress(label, cfg.steps, enabled=show_progress) as advance:
            gemm = bench_gemm(cfg)
            advance()
            copy = bench_copy(cfg)
            advance()
            att, att_rows = bench_attention(cfg, advance)
            lin, lin_rows = bench_linear(cfg, advance)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    raw = {"microbench_config": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
                                 **({"threads": used} if cfg.device == "cpu" else {})},
           "gemm": gemm, "copy": copy, "attention": att_rows, "linear": lin_rows}
    return MicrobenchResult(gemm["tflops"], copy["GBps"], att, lin, raw)
