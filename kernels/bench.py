"""Kernel benchmark framework behind ``adasched bench kernels`` and ``launch/device_check.py``.

Each module in ``BENCH_MODULES`` exports

    cases(quick: bool, device: str) -> list[BenchCase]
    checks(device: str) -> list[tuple[str, bool, str]]          (optional: correctness, name / ok / detail)

A ``BenchCase`` names one shape and several providers (zero-argument callables doing the work once); one of them
is the baseline, and every provider is reported as a ratio to the baseline measured in the same run. ``providers``
may also be a zero-argument callable that builds the dict, so large inputs are allocated only while their case
runs. Missing modules are skipped (other kernels land later).

Timing: on CUDA rounds of ``triton.testing.do_bench`` medians (events, L2 flushed between runs), the providers
interleaved (:func:`time_interleaved`); the table's median and 20th/80th percentiles (in ms) are over those 3
(``--quick``) or 5 round medians, the percentiles interpolated (:func:`spread`). On the CPU the same statistics
of ``time.perf_counter`` over a few calls (under the Triton interpreter: a smoke test only, meaningless for
performance).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

__all__ = ["BENCH_MODULES", "BenchCase", "group_of", "resolve_device", "prepare_device", "time_fn",
           "run_benchmarks", "run_checks", "time_interleaved", "profile_providers", "format_profile",
           "host_profile", "format_host_profile", "environment", "format_table", "RESULT_COLUMNS", "result_rows"]

#: group -> module. The kernels package knows these only by name: the MoE layer benchmark lives with the runtime
#: (it times the whole layer), the plan-derived GEMM configuration check with the launch scripts (it needs Twill).
BENCH_MODULES = {
    "lora": "adasched.kernels.lora_bench",
    "moe": "adasched.runtime.moe.bench",
    "gemm": "adasched.launch.gemm_check",
}

Providers = dict[str, Callable[[], Any]]


@dataclass
class BenchCase:
    """One benchmarked shape: providers {name: fn} (or a builder returning them) and the baseline's name."""

    name: str  # what is measured, e.g. "lora fwd+bwd"
    shape: str  # human-readable shape, e.g. "T=8192 K=4096 N=4096 r=16"
    providers: Union[Providers, Callable[[], Providers]]
    baseline: str
    note: str = ""
    params: dict = field(default_factory=dict)  # machine-readable shape parameters for --json
    priority: int = 1  # 0: a target shape (the device check times these before the rest of the grid)


def group_of(module: str) -> str:
    """'adasched.kernels.lora_bench' -> 'lora' (the BENCH_MODULES key; else the module name without '_bench')."""
    for group, mod in (BENCH_MODULES.items() if isinstance(BENCH_MODULES, dict) else ()):
        if mod == module:
            return group
    name = module.rsplit(".", 1)[-1]
    return name[: -len("_bench")] if name.endswith("_bench") else name


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device: {device!r} must be auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but torch sees no GPU")
    return device


def prepare_device(device: str) -> None:
    """On the CPU run Triton kernels under the interpreter (set before any kernel module is imported)."""
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        if not any(m.startswith("adasched.kernels.") and m.split(".")[-1] not in ("bench", "cli")
                   for m in sys.modules):
            os.environ["TRITON_INTERPRET"] = "1"


def spread(vals: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of ``vals``, the percentiles interpolated linearly between order statistics (numpy's
    default). (An index rule, vals[int(0.2 n)] and vals[ceil(0.8 n)], picked the minimum and the maximum of the 3 or
    5 round medians the tables are made of, under a p20-p80 heading; h52.)"""
    vals = sorted(float(v) for v in vals)
    if len(vals) == 1:
        return vals[0], vals[0], vals[0]
    q = statistics.quantiles(vals, n=5, method="inclusive")  # the cut points at 20, 40, 60 and 80 %
    return statistics.median(vals), q[0], q[3]


def time_fn(fn: Callable[[], Any], device: str, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) in ms of one call of ``fn``."""
    if device == "cuda":
        import torch
        from triton.testing import do_bench

        fn()
        torch.cuda.synchronize()
        q = do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    import torch

    # one torch thread while timing: the interpreter's kernels run on one, and on a loaded 2-core host torch's
    # threads stalled in ~16 ms steps - a 0.008 ms baseline GEMM read 32 ms in one run (time / baseline 1.29x,
    # then 2319x in the next)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn()  # warm-up (first call compiles / traces)
        times = []
        for _ in range(3 if quick else 7):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return spread(times)


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module:
            return None
        raise


def _modules(only: Optional[Iterable[str]]) -> list[str]:
    modules = list(BENCH_MODULES.values()) if isinstance(BENCH_MODULES, dict) else list(BENCH_MODULES)
    groups = {group_of(m): m for m in modules}
    if not only:
        return modules
    only = list(only)
    bad = [g for g in only if g not in groups]
    if bad:
        raise ValueError(f"--only: {', '.join(bad)} not in {', '.join(groups)}")
    return [groups[g] for g in only]


def run_benchmarks(only: Optional[Iterable[str]] = None, quick: bool = False, device: str = "cpu",
                   budget_s: Optional[float] = None, log: Optional[Callable[[str], None]] = None,
                   priority: Optional[int] = None, on_result: Optional[Callable[[dict], None]] = None) -> dict:
    """Time every case of every selected module. Returns {"results": [...], "skipped": [...]}; a provider that
    raises is recorded with its error instead of a time; once ``budget_s`` seconds have passed the remaining
    cases are skipped (and listed). ``priority`` keeps only the cases of that priority (0: target shapes);
    ``on_result`` sees each finished case's rows (the device check saves partial results with it)."""
    t_start = time.perf_counter()
    results, skipped = [], []
    for module in _modules(only):
        group = group_of(module)
        try:
            mod = _load(module)
        except Exception as err:  # a broken module must not hide the others' numbers
            results.append(_row(group, "(import)", "", "", error=f"{type(err).__name__}: {err}"))
            continue
        if mod is None:
            skipped.append(f"{group}: module {module} not present")
            continue
        try:
            cases = mod.cases(quick, device)
        except Exception as err:
            results.append(_row(group, "(cases)", "", "", error=f"{type(err).__name__}: {err}"))
            continue
        for case in cases:
            if priority is not None and case.priority != priority:
                continue
            if budget_s is not None and time.perf_counter() - t_start > budget_s:
                skipped.append(f"{group}: {case.name} {case.shape} (time budget {budget_s:.0f} s spent)")
                continue
            if log:
                log(f"[bench] {group}: {case.name} {case.shape}")
            rows = _run_case(group, case, device, quick)
            results.extend(rows)
            if on_result:
                on_result({"results": results, "skipped": skipped})
    return {"results": results, "skipped": skipped}


def _row(group, case, shape, provider, median=math.nan, p20=math.nan, p80=math.nan, ratio=math.nan,
         baseline="", error="", params=None, note="") -> dict:
    return {"group": group, "case": case, "shape": shape, "provider": provider, "median_ms": median,
            "p20_ms": p20, "p80_ms": p80, "ratio_vs_baseline": ratio, "baseline": baseline, "error": error,
            "params": params or {}, "note": note}


def time_interleaved(fns: dict[str, Callable[[], Any]], device: str, quick: bool,
                     rounds: Optional[int] = None) -> dict[str, Any]:
    """Times several providers fairly on a GPU: each is called once (compile, warm-up), then ``rounds`` rounds each
    time every provider once (``do_bench``'s median, ~20 ms per provider per round) in a rotating order, so clock
    ramps, throttling and drift hit every provider alike. Returns {name: (median, p20, p80) ms over the rounds'
    medians (:func:`spread`)} or {name: the exception it raised}. On the CPU (a smoke test: see the module's
    docstring) each provider is timed in a block of its own by :func:`time_fn`, not interleaved."""
    out: dict[str, Any] = {}
    live = {}
    for name, fn in fns.items():
        try:
            fn()
            live[name] = fn
        except Exception as err:
            out[name] = err
    if device == "cuda" and live:
        import torch
        from triton.testing import do_bench

        torch.cuda.synchronize()
        rounds = rounds or (3 if quick else 5)
        per: dict[str, list[float]] = {n: [] for n in live}
        names = list(live)
        for rnd in range(rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                try:
                    per[name].append(float(do_bench(live[name], warmup=5, rep=20, return_mode="median")))
                except Exception as err:
                    out[name] = err
        for name, vals in per.items():
            if name in out or not vals:
                continue
            out[name] = spread(vals)
        return out
    for name, fn in live.items():
        try:
            out[name] = time_fn(fn, device, quick)
        except Exception as err:
            out[name] = err
    return out


def _run_case(group: str, case: BenchCase, device: str, quick: bool) -> list[dict]:
    rows = []
    try:
        providers = case.providers() if callable(case.providers) else case.providers
    except Exception as err:
        return [_row(group, case.name, case.shape, "(setup)", error=f"{type(err).__name__}: {err}",
                     params=case.params)]
    if case.baseline not in providers:
        return [_row(group, case.name, case.shape, "(setup)", error=f"baseline {case.baseline!r} not a provider")]
    timed = {}
    for name, t in time_interleaved(providers, device, quick).items():
        if isinstance(t, BaseException):
            timed[name] = None
            rows.append(_row(group, case.name, case.shape, name, error=f"{type(t).__name__}: {t}"[:300],
                             params=case.params, baseline=case.baseline))
        else:
            timed[name] = t
    base = timed.get(case.baseline)
    note = case.note
    if importlib.util.find_spec("triton") is None:  # (fused LoRA rows timed the torch fallback unlabelled: h51)
        note = "; ".join(filter(None, (note, "triton is not installed: these providers ran without Triton (the "
                                             "kernels' torch fallback)")))
    for name in providers:
        t = timed.get(name)
        if t is None:
            continue
        ratio = t[0] / base[0] if base else math.nan
        rows.append(_row(group, case.name, case.shape, name, t[0], t[1], t[2], ratio, case.baseline,
                         params=case.params, note=note))
    del providers
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    return rows


def run_checks(only: Optional[Iterable[str]] = None, device: str = "cpu",
               deadline: Optional[float] = None) -> list[dict]:
    """Every selected module's ``checks(device)``: rows {group, check, ok, detail}. ``deadline`` (a
    ``time.perf_counter()`` value) is passed on to the checks that take one (long sweeps stop there)."""
    import inspect

    rows = []
    for module in _modules(only):
        group = group_of(module)
        try:
            mod = _load(module)
            if mod is None or not hasattr(mod, "checks"):
                continue
            kw = {"deadline": deadline} if "deadline" in inspect.signature(mod.checks).parameters else {}
            for name, ok, detail in mod.checks(device, **kw):
                rows.append({"group": group, "check": name, "ok": bool(ok), "detail": detail})
        except Exception as err:
            rows.append({"group": group, "check": "(checks)", "ok": False,
                         "detail": f"{type(err).__name__}: {err}"[:300]})
    return rows


def _per_provider(case: BenchCase, names: Sequence[str], measure) -> dict:
    """``measure(fn)`` for each named provider of ``case`` that exists; an exception becomes that provider's
    ``{"error": ...}`` (a profiler problem must not cost the run)."""
    providers = case.providers() if callable(case.providers) else case.providers
    out = {}
    for name in names:
        fn = providers.get(name)
        if fn is None:
            continue
        try:
            out[name] = measure(fn)
        except Exception as err:
            out[name] = {"error": f"{type(err).__name__}: {err}"[:200]}
    del providers
    return out


def profile_providers(case: BenchCase, names: Sequence[str], steps: int = 3, top: int = 8,
                      device: str = "cuda") -> dict:
    """Device-time breakdown of some providers of one case (GPU): torch.profiler over ``steps`` calls after a
    warm-up; per provider {"total_us": device time per call, "kernels": [(name, us per call, calls per call)]}
    for the ``top`` kernels by device time. Where the time goes, for the notes (not a benchmark number)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def measure(fn) -> dict:
        fn()
        sync()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fn()
            sync()
        rows = []
        for ev in prof.key_averages():
            if cuda:
                t = getattr(ev, "self_device_time_total", None)
                if t is None:
                    t = getattr(ev, "self_cuda_time_total", 0.0)
            else:
                t = ev.self_cpu_time_total
            if t and t > 0:
                rows.append((ev.key[:90], float(t) / steps, ev.count / steps))
        rows.sort(key=lambda r: -r[1])
        return {"total_us": sum(r[1] for r in rows), "kernels": rows[:top]}

    out = _per_provider(case, names, measure)
    if cuda:
        torch.cuda.empty_cache()
    return out


def host_profile(case: BenchCase, names: Sequence[str], calls: int = 30, top: int = 12,
                 device: str = "cuda") -> dict:
    """Host-side cost of some providers of one case: per provider the CPU time per call spent issuing the work
    (``calls`` calls back to back, no synchronisation inside) and the wall time per call including the device
    (synchronised at the end), and for each the ``top`` Python functions by own time under cProfile (name, us
    per call, calls per call). Small shapes are bound by this, not by the kernels."""
    import cProfile
    import pstats

    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def measure(fn) -> dict:
        for _ in range(3):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        sync()
        stats = pstats.Stats(prof).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}
        rows = sorted(((f"{Path(k[0]).name}:{k[1]}({k[2]})", v[2] / calls * 1e6, v[1] / calls)
                       for k, v in stats.items()), key=lambda r: -r[1])
        return {"issue_us": (t1 - t0) / calls * 1e6, "wall_us": (t2 - t0) / calls * 1e6, "functions": rows[:top]}

    return _per_provider(case, names, measure)


def _format_breakdown(header: str, prof: dict, headline, rows_key: str, count_width: int) -> str:
    lines = [header]
    for name, p in prof.items():
        if "error" in p:
            lines.append(f"  {name}: {p['error']}")
            continue
        lines.append(f"  {name}: {headline(p)}")
        for k, us, n in p[rows_key]:
            lines.append(f"    {us:9.1f} us  x{n:<{count_width}g} {k}")
    return "\n".join(lines)


def format_host_profile(title: str, prof: dict) -> str:
    return _format_breakdown(f"-- host profile: {title}", prof,
                             lambda p: f"{p['issue_us']:.0f} us to issue a call, {p['wall_us']:.0f} us wall per call",
                             "functions", 5)


def format_profile(title: str, prof: dict) -> str:
    return _format_breakdown(f"-- profile: {title}", prof, lambda p: f"{p['total_us']:.0f} us device time per call",
                             "kernels", 4)


def environment(device: str) -> dict:
    import platform

    import torch

    env = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
           "interpret": os.environ.get("TRITON_INTERPRET") == "1",
           "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


RESULT_COLUMNS = ["group", "case", "shape", "provider", "median ms", "p20-p80 ms", "time / baseline (<1 faster)"]


def result_rows(results: Sequence[dict]) -> list[list]:
    """Table rows for people: times, spread and the ratio to the case's baseline (or the error)."""
    out = []
    for r in results:
        if r["error"]:
            out.append([r["group"], r["case"], r["shape"], r["provider"], "error", r["error"][:80], ""])
            continue
        spread = f"{r['p20_ms']:.4g}-{r['p80_ms']:.4g}"
        ratio = "baseline" if r["provider"] == r["baseline"] else f"{r['ratio_vs_baseline']:.3f}"
        out.append([r["group"], r["case"], r["shape"], r["provider"], f"{r['median_ms']:.4g}", spread, ratio])
    return out


def format_table(rows: Sequence[Sequence[Any]], columns: Sequence[str], title: str = "") -> str:
    """Plain-text table (no rich needed: the GPU image may lack this project's extras)."""
    cells = [[str(c) for c in columns]] + [[str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [title] if title else []
    for j, r in enumerate(cells):
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
