"""`adasched bench kernels`: every kernel's benchmark (and, with --checks, correctness) in one table."""
from __future__ import annotations

from typing import Optional

import typer

__all__ = ["register"]


def register(groups) -> None:
    @groups.bench.command("kernels")
    def bench_kernels(
        only: Optional[str] = typer.Option(None, "--only", help="Comma-separated kernel groups: lora, moe, gemm."),
        quick: bool = typer.Option(False, "--quick", help="A few small shapes (smoke test; CPU: tiny shapes)."),
        as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
        run_checks: bool = typer.Option(False, "--checks", help="Also run each kernel's correctness checks "
                                        "(on a GPU: bf16 LoRA and MoE, fp16 plain GEMM) and exit 1 if one fails."),
        device: str = typer.Option("auto", "--device", help="auto | cuda | cpu (CPU: Triton interpreter, "
                                   "times meaningless for performance)."),
        host_calls: bool = typer.Option(False, "--host-calls", help="Only the LoRA host work per fwd+bwd call: "
                                        "aten ops dispatched, Triton launches and wall us per call for each "
                                        "base_gemm, 1 and 4 adapters, dropout 0 and 0.1 (CPU: tiny shape, times "
                                        "only for the pure-torch rows). Not with --checks, --quick or "
                                        "--only other than lora."),
    ) -> int:
        """Fused kernels vs their baselines (eager torch, frozen base), ratios from the same run."""
        from adasched.profiler.io import InputError

        if host_calls:  # it times the LoRA host work only, at one fixed shape, and runs no checks
            if run_checks:
                raise InputError("--checks", "has no effect with --host-calls (it counts host work, runs no checks)")
            if quick:
                raise InputError("--quick", "has no effect with --host-calls (it always uses one small LoRA shape)")
            if only is not None and {g.strip() for g in only.split(",") if g.strip()} - {"lora"}:
                raise InputError("--only", f"{only}: --host-calls measures the LoRA kernels only (use --only lora "
                                 "or leave --only out)")
        from . import bench

        dev = bench.resolve_device(device)
        # once each, in the order given: `--only lora,lora` ran (and printed) the LoRA cases twice
        groups_sel = list(dict.fromkeys(g.strip() for g in only.split(",") if g.strip())) if only else None
        if only is not None and not groups_sel:
            raise ValueError("--only: empty; use lora, moe or gemm")
        bench._modules(groups_sel)  # validates --only before any work
        bench.prepare_device(dev)
        env = bench.environment(dev)
        if host_calls:
            from . import lora_bench

            rows = lora_bench.host_call_rows(dev)
            if as_json:
                from adasched.planner.ui import emit_json

                emit_json({**env, "host_calls": rows})
            else:
                shape = rows[0]["shape"] if rows else ""
                typer.echo(bench.format_table(
                    lora_bench.host_call_table_rows(rows), lora_bench.HOST_CALL_COLUMNS,
                    title=f"LoRA host work per fwd+bwd call, {shape}, on {env['device_name']} ({dev}; torch "
                          f"{env['torch']}): aten ops dispatched (kernel ops: not views/allocations), Triton "
                          "launches, median wall us per call" + (" - CPU host-side, NOT GPU times" if dev == "cpu"
                                                                 else "")))
            return 0
        checks = bench.run_checks(groups_sel, dev) if run_checks else []
        out = bench.run_benchmarks(groups_sel, quick=quick, device=dev)
        failed = [c for c in checks if not c["ok"]]
        if as_json:
            from adasched.planner.ui import emit_json

            emit_json({**env, "quick": quick, "checks": checks, **out})
        else:
            title = f"bench kernels on {env['device_name']} ({dev}; torch {env['torch']}, triton {env['triton']})"
            if dev == "cpu":
                title += " - CPU/interpreter (torch on one thread): smoke test, NOT performance numbers"
            if checks:  # plain text tables: wide rows stay on one line in logs and pipes
                typer.echo(bench.format_table(
                    [[c["group"], c["check"], "ok" if c["ok"] else "FAIL", c["detail"]] for c in checks],
                    ["group", "check", "result", "detail"], title="correctness checks") + "\n")
            typer.echo(bench.format_table(bench.result_rows(out["results"]), bench.RESULT_COLUMNS, title=title))
            for s in out["skipped"]:
                typer.echo(f"skipped: {s}")
        return 1 if failed else 0
