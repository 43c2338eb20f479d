"""One command for a GPU machine: every kernel's correctness checks (bf16) and `bench kernels`, one table.

    python3 launch/device_check.py --budget-s 320   # what the H200 run of 2026-11-28 used: ~335 s, 54 grid cases
                                                    # left for a later run by the budget
    python3 launch/device_check.py --quick          # two shapes per kernel

Order: kernel checks (lora, moe), the target shapes (priority 0) with a profiler breakdown, the Twill sweeps
(gemm checks; they stop at the budget), the rest of the fwd+bwd grid (priority 1), then everything else
(priority 2). Partial results are saved to $OUT after every case.

Runs from a plain checkout (the adasched package need not be installed: the folders are mapped onto the
``adasched.*`` namespace here) on torch 2.11 / triton 3.6 as well as our pins. Prints the checks, the benchmark
ratios against baselines measured in the same run, and the LoRA targets; writes device_check.json and
device_check.txt to $OUT when that is set. Exit status 1 if a check fails or a provider errors. Without a GPU it
runs the CPU smoke path (Triton interpreter, tiny shapes): useful to test this script, meaningless as timings.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "planner", "profiler", "runtime", "schedules", "launch")


def ensure_namespace() -> None:
    """Make ``import adasched.kernels...`` work from a bare checkout (no pip install on the GPU image)."""
    try:
        import adasched.kernels  # noqa: F401
        return
    except ImportError:
        pass
    pkg = types.ModuleType("adasched")
    pkg.__path__ = []
    sys.modules["adasched"] = pkg
    # The top folders become bare namespace packages: their __init__ files are NOT run, so nothing imports
    # pydantic/ortools/pulp (absent from the GPU image) unless a benchmark really needs it.
    for folder in FOLDERS:
        if not (ROOT / folder).is_dir():
            continue
        mod = types.ModuleType(f"adasched.{folder}")
        mod.__path__ = [str(ROOT / folder)]
        sys.modules[mod.__name__] = mod
        setattr(pkg, folder, mod)


def autotune_choices() -> dict:
    """The GEMM configs Triton's autotuner picked per key (for the notes)."""
    out = {}
    lora = sys.modules.get("adasched.kernels.lora")
    for name in ("_gemm_fwd_tuned", "_gemm_bwd_tuned", "_gemm_fwd_tuned_tma", "_gemm_bwd_tuned_tma"):
        tuner = getattr(lora, name, None) if lora else None
        if tuner is not None:
            out[name] = {str(k): str(v) for k, v in getattr(tuner, "cache", {}).items()}
    return out


#: (group, case name, shape, providers) whose device time is broken down by kernel after the target benchmarks
PROFILE_TARGETS = (
    ("lora", "lora fwd+bwd", "T=8192 K=4096 N=4096 r=16", ("base", "fused", "fused_tma", "fused_cublas",
                                                           "fused_cublas_all")),
    ("moe", "moe layer fwd+bwd", "T=16384 E=8 k=2 H=2048 F=4096", ("dense", "ours", "ours_gmm")),
    # 4 adapters took 2.2-2.9x base on the H200 (2026-11-30) against 1.44x forward only: where the backward goes
    ("lora", "multi-lora x4 fwd+bwd", "T=8192 K=4096 N=4096 r=16/16/32/64", ("base", "fused_cublas_all",
                                                                             "fused_grouped")),
)


#: (group, case name, shape, providers) whose host-side cost is profiled: a shape small enough that issuing the
#: work, not the kernels, sets the time (on the H200 image every fused LoRA variant took ~1 ms a call there)
HOST_PROFILE_TARGETS = (
    ("lora", "lora fwd+bwd", "T=2048 K=4096 N=4096 r=16", ("base", "eager", "fused", "fused_cublas_all")),
)


def _targets(results: list[dict], log) -> list[tuple]:
    rows = []
    for module in ("adasched.kernels.lora_bench", "adasched.runtime.moe.bench"):
        try:
            rows += importlib.import_module(module).summarize(results)
        except Exception as err:  # the targets table is a convenience; never lose the numbers over it
            log(f"[targets] {module}: {type(err).__name__}: {err}")
    return rows


def large_offset_child(log) -> list[dict]:
    """``lora_bench.large_offset_checks`` (inputs of >= 2**31 elements: int64 addressing) in a child process: a
    wrapped offset would fault, and a CUDA fault poisons the process's context for every later check and
    benchmark; in a child it costs this one row."""
    import subprocess

    proc = None
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--large-offsets"],
                              capture_output=True, text=True, timeout=150)
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
        return [{"group": "lora", "check": n, "ok": bool(ok), "detail": d} for n, ok, d in rows]
    except Exception as err:
        why = f"{type(err).__name__}: {err}"[:150]
        if proc is not None:
            why += f"; exit {proc.returncode}; stderr: {proc.stderr.strip()[-300:]}"
        log(f"[checks] int64 offsets child: {why}")
        return [{"group": "lora", "check": "int64 offsets (child process)", "ok": False, "detail": why}]


def tma_child(log) -> list[dict]:
    """``lora_bench.tma_checks`` (TMA descriptor loads, never run on a GPU yet) in a child process, as
    :func:`large_offset_child`: a CUDA fault there would poison every later check and benchmark of this process.
    When they fail (or the child dies) the TMA providers are dropped from this run's benchmark cases."""
    import subprocess

    from adasched.kernels import lora_bench

    proc = None
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--tma-checks"],
                              capture_output=True, text=True, timeout=180)
        rows = [{"group": "lora", "check": n, "ok": bool(ok), "detail": d}
                for n, ok, d in json.loads(proc.stdout.strip().splitlines()[-1])]
    except Exception as err:
        why = f"{type(err).__name__}: {err}"[:150]
        if proc is not None:
            why += f"; exit {proc.returncode}; stderr: {proc.stderr.strip()[-300:]}"
        log(f"[checks] TMA child: {why}")
        rows = [{"group": "lora", "check": "triton_tma (child process)", "ok": False, "detail": why}]
    if not all(r["ok"] for r in rows):
        lora_bench.TMA_ENABLED = False
        log(f"[checks] TMA checks failed: {', '.join(lora_bench.TMA_PROVIDERS)} left out of the benchmarks")
    return rows


def phases(args, groups, device, deadline, log, checks, run_bench, save, save_extra, profiles, host_profiles):
    """Phase 1: correctness of the kernels; 2: the target shapes (at most half the time left); 3: the Twill sweeps;
    4: the profiler breakdown of the target shapes; 5: the rest of the fwd+bwd grid; 6: everything else (fwd-only
    grid, other multi-LoRA shapes, GEMM bench)."""
    from adasched.kernels import bench

    fast = [g for g in groups if g != "gemm"]
    if "lora" in fast and device == "cuda":
        from adasched.kernels import lora_bench

        lora_bench.TMA_CHECKS_IN_PROCESS = False  # in a child, below
    log(f"[checks] {', '.join(fast)}")
    checks += bench.run_checks(fast, device)
    if "lora" in fast:
        log("[checks] lora: int64 offsets (child process)")
        checks += large_offset_child(log)
        if device == "cuda":
            log("[checks] lora: triton_tma (child process)")
            checks += tma_child(log)
    save()
    # the target shapes get at most half of what is left when the Twill plan-vs-sweep (a target of its own) is to
    # run after them: it came last and got nothing once the LoRA checks and benchmarks had used the budget
    run_bench(priority=0, until=(time.perf_counter() + 0.5 * max(0.0, deadline - time.perf_counter()))
              if "gemm" in groups else None)
    if "gemm" in groups:
        log("[checks] gemm (Twill plan vs sweep)")
        checks += bench.run_checks(["gemm"], device, deadline=deadline)
        save()
    if device == "cuda" and not args.no_profile:  # where the time of the target shapes goes
        def breakdown(targets, profile, label, out):
            for group, case_name, shape, names in targets:
                if group not in groups or time.perf_counter() > deadline:
                    continue
                try:
                    mod = importlib.import_module(bench.BENCH_MODULES[group])
                    case = next(c for c in mod.cases(False, device) if c.name == case_name and c.shape == shape)
                    log(f"[{label}] {group}: {case_name} {shape}")
                    out[f"{case_name} {shape}"] = profile(case, names, device=device)
                except Exception as err:
                    out[f"{case_name} {shape}"] = {f"({label})": {"error": f"{type(err).__name__}: {err}"[:200]}}

        breakdown(PROFILE_TARGETS, bench.profile_providers, "profile", profiles)
        breakdown(HOST_PROFILE_TARGETS, bench.host_profile, "host profile", host_profiles)
        save_extra["profiles"] = profiles
        save_extra["host_profiles"] = host_profiles
        save()
    run_bench(priority=1)
    run_bench(priority=2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--quick", action="store_true", help="two shapes per kernel instead of the full grid")
    ap.add_argument("--only", default=None, help="comma-separated groups (lora, moe, gemm)")
    ap.add_argument("--budget-s", type=float, default=390.0,
                    help="no new benchmark case or sweep config starts after this many seconds (default 390)")
    ap.add_argument("--no-bench", action="store_true", help="checks only")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiler breakdown of the target shapes")
    ap.add_argument("--large-offsets", action="store_true",
                    help="only the >= 2**31-element input checks, one JSON line (what the child process runs)")
    ap.add_argument("--tma-checks", action="store_true",
                    help="only the triton_tma checks, one JSON line (what the child process runs)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    ensure_namespace()
    import torch

    if args.large_offsets:
        from adasched.kernels import lora_bench

        print(json.dumps(lora_bench.large_offset_checks("cuda" if torch.cuda.is_available() else "cpu")))
        return 0
    if args.tma_checks:
        from adasched.kernels import lora_bench

        print(json.dumps(lora_bench.tma_checks("cuda" if torch.cuda.is_available() else "cpu")))
        return 0

    from adasched.kernels import bench

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick or device == "cpu"
    bench.prepare_device(device)
    groups = [g.strip() for g in args.only.split(",")] if args.only else list(bench.BENCH_MODULES)
    bad = [g for g in groups if g not in bench.BENCH_MODULES]
    if bad or not groups:  # (--only nothing ended in a ValueError traceback)
        ap.error(f"argument --only: {', '.join(bad) or 'nothing given'}: choose from {', '.join(bench.BENCH_MODULES)}")
    env = bench.environment(device)
    print(f"device check: {env['device_name']} ({device}), torch {env['torch']}, triton {env['triton']}, "
          f"{env['date_utc']} UTC", flush=True)
    if device == "cpu":
        print("NO GPU: CPU smoke path under the Triton interpreter; times are NOT performance numbers", flush=True)

    log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    out_dir = os.environ.get("OUT")
    checks: list[dict] = []
    results: list[dict] = []  # rows of the finished benchmark phases
    skipped: list[str] = []
    save_extra: dict = {}

    def save(partial: dict | None = None) -> None:
        """Everything so far to $OUT/device_check.json (a run cut off by its time limit still reports)."""
        if not out_dir:
            return
        rows = results + (partial["results"] if partial else [])
        sweeps = getattr(sys.modules.get("adasched.launch.gemm_check"), "LAST_SWEEPS", {})
        payload = {**env, "quick": quick, "wall_s": time.perf_counter() - t0, "checks": checks,
                   "results": rows, "skipped": skipped + (partial["skipped"] if partial else []), "sweeps": sweeps,
                   "autotune": autotune_choices(), **save_extra}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(out_dir) / "device_check.json.tmp"
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        tmp.replace(Path(out_dir) / "device_check.json")

    def run_bench(priority: int, until: float | None = None) -> None:
        if args.no_bench:
            return
        stop = deadline if until is None else min(until, deadline)
        got = bench.run_benchmarks(groups, quick=quick, device=device, priority=priority, log=log,
                                   budget_s=max(0.0, stop - time.perf_counter()), on_result=save)
        results.extend(got["results"])
        skipped.extend(got["skipped"])
        save()

    # Phase 1: correctness of the kernels; 2: the target shapes (at most half the time left); 3: the Twill sweeps;
    # 4: the profiler breakdown of the target shapes; 5: the rest of the fwd+bwd grid; 6: everything else (fwd-only
    # grid, other multi-LoRA shapes, GEMM bench).
    class Stopped(BaseException):  # (not Exception: the benchmarks record a case's Exception as its error and go on)
        pass

    def on_sigterm(signum, frame):  # (gpu_session's `timeout` overrun: the text report was lost, only the JSON left)
        raise Stopped()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    profiles, host_profiles = {}, {}
    try:
        phases(args, groups, device, deadline, log, checks, run_bench, save, save_extra, profiles, host_profiles)
    except Stopped:
        skipped.append(f"stopped by SIGTERM after {time.perf_counter() - t0:.0f} s: the tables hold what had "
                       f"finished (the budget was --budget-s {args.budget_s:g})")
        log(skipped[-1])
    finally:
        signal.signal(signal.SIGTERM, previous)
    targets = _targets(results, log)

    text = [bench.format_table([[c["group"], c["check"], "ok" if c["ok"] else "FAIL", c["detail"]] for c in checks],
                               ["group", "check", "result", "detail"], title="== correctness checks =="), ""]
    text.append(bench.format_table(bench.result_rows(results), bench.RESULT_COLUMNS,
                                   title=f"== bench kernels ({'quick' if quick else 'full grid'}; ratios vs "
                                         f"baseline from this run; {env['device_name']}) =="))
    for s in skipped:
        text.append(f"skipped: {s}")
    for title, prof in profiles.items():
        text += ["", bench.format_profile(title, prof)]
    for title, prof in host_profiles.items():
        text += ["", bench.format_host_profile(title, prof)]
    if targets:
        text += ["", bench.format_table([[n, f"{v:.3f}", g, "" if m is None else ("met" if m else "NOT MET")]
                                         for n, v, g, m in targets],
                                        ["target", "measured", "goal", ""],
                                        title=f"== targets (goals: the issues' H100 figures; measured on "
                                              f"{env['device_name']}) ==")]
    failed = [c for c in checks if not c["ok"]]
    errors = [r for r in results if r["error"]]
    wall = time.perf_counter() - t0
    text.append(f"\n{len(checks) - len(failed)}/{len(checks)} checks ok, {len(errors)} provider errors, "
                f"{len(skipped)} cases skipped, {wall:.0f} s")
    report = "\n".join(text)
    print(report, flush=True)
    if out_dir:
        save()
        path = Path(out_dir) / "device_check.json"
        payload = json.loads(path.read_text())
        payload["targets"] = [{"target": n, "measured": v, "goal": g, "met": m} for n, v, g, m in targets]
        path.write_text(json.dumps(payload, indent=1, default=str))
        (Path(out_dir) / "device_check.txt").write_text(report + "\n")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
