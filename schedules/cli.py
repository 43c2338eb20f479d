"""CLI plugin: ``adasched schedules refine|plot`` and ``adasched bench schedules``. Top level stays light
(torch, numpy and matplotlib are imported inside the commands)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

__all__ = ["register", "MAX_PLOT_STEPS", "MAX_SEEDS"]

#: `schedules plot --steps` at most this (one float per step and schedule; 10**9 held the CLI for minutes)
MAX_PLOT_STEPS = 10_000_000
#: `bench schedules --seeds` at most this (each seed trains every model; 10**20 overflowed a C size)
MAX_SEEDS = 1000


def register(groups) -> None:
    app = typer.Typer(help="LR schedules: refine a schedule from a run's gradient norms, plot schedules.",
                      no_args_is_help=True)
    groups.root.add_typer(app, name="schedules")

    @app.command("refine")
    def refine_cmd(
        norms: Path = typer.Argument(..., help="Norms CSV (columns step,l2,l1) written by GradNormRecorder."),
        out: Path = typer.Option(..., "--out", help="Write the refined schedule here (JSON: a name ending in .json)."),
        norm: str = typer.Option("l2", "--norm", help="l2 (SGD: weights 1/||g||_2^2) or l1 (Adam: 1/||g||_1)."),
        smoothing: float = typer.Option(0.1, "--smoothing", help="Median-filter width as a fraction of "
                                       "the run, in [0, 1)."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Expected number of optimizer steps (checked)."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Also plot refined vs linear (PNG)."),
        as_json: bool = typer.Option(False, "--json", help="Print the schedule JSON instead of a table."),
    ) -> None:
        """Refined schedule (Defazio et al. 2023) from the gradient norms of a previous run: median-filtered
        norms, lr_t ∝ w_t * sum_{p>t} w_p, 0 at the end, peak 1. Train with Refined.from_file(opt, OUT)."""
        import numpy as np

        from adasched.planner.ui import emit_json, print_table
        from adasched.profiler.io import (InputError, atomic_write_json, check_distinct_outputs, check_output_path,
                                          outputs_together)

        from .gradnorm import read_norms_csv
        from .lr import refined_multipliers, smooth_norms
        from .plots import curve_rows, plot_curves

        check_output_path(out, "--out")
        check_output_path(plot, "--plot")
        check_distinct_outputs(("--out", out), ("--plot", plot))
        # writing over the norms being read loses the previous run's record (it was replaced by the JSON)
        for option, path in (("--out", out), ("--plot", plot)):
            if path is not None and norms.exists() and Path(path).resolve() == norms.resolve():
                raise InputError(option, f"{path} is the norms file being read; write the schedule elsewhere")
        if Path(out).suffix.lower() != ".json":  # sched.txt was written, and then neither Refined.from_file nor
            # `schedules plot` read it back (both tell a schedule from a norms CSV by the suffix)
            raise InputError("--out", f"{out}: the schedule is JSON, told from a norms CSV by its suffix; name it "
                                      ".json")
        if norm not in ("l2", "l1"):
            raise InputError("--norm", f"must be l2 or l1, got {norm!r}")
        if steps is not None and steps < 1:
            raise InputError("--steps", f"must be >= 1, got {steps}")
        if not 0 <= smoothing < 1:
            raise InputError("--smoothing", f"must be a fraction in [0, 1), got {smoothing}")
        g = read_norms_csv(norms, norm)
        if steps is not None and steps != len(g):
            raise InputError(norms, f"has {len(g)} steps but --steps {steps} (wrong length)")
        if len(g) > 1 and len(set(g)) == 1 and g[0] > 0:
            # (clip_grad_norm_ before the recorded step, or DeepSpeed's default gradient_clipping 1.0: every row is
            # the clip value and the refinement is a plain linear decay)
            import sys

            sys.stderr.write(f"note: {norms}: every {norm} norm is {g[0]:g}: were the gradients clipped before they "
                             f"were recorded? GradNormRecorder.capture() before the clipping logs them unclipped\n")
        try:
            m = refined_multipliers(g, norm, smoothing)
        except ValueError as err:  # 'grad_norms: refinement is degenerate' named no file
            raise InputError(norms, str(err)) from None
        doc = {"kind": "refined_lr_schedule", "schema_version": 1, "source": str(norms), "norm": norm,
               "smoothing": smoothing, "steps": len(g), "grad_norms": g,
               "smoothed_norms": smooth_norms(g, smoothing).tolist(), "multipliers": m.tolist()}
        curves = [("refined", m), ("linear", 1 - np.arange(len(g) + 1) / len(g))]
        with outputs_together():  # both or neither
            atomic_write_json(out, doc)
            if plot:
                plot_curves(curves, plot, title=f"refined from {norms.name} ({norm})")
        if as_json:
            emit_json(doc)
            return
        rows, cols = curve_rows(curves)
        print_table(rows, cols, title=f"{out}: {len(g)} steps, peak at step {int(np.argmax(m))}")

    @app.command("plot")
    def plot_cmd(
        schedules: Optional[List[str]] = typer.Argument(
            None, help="Schedules: linear, cosine, rex, uba[:PHI], constant, or a norms .csv / refined .json file "
                       "(default: linear cosine rex uba:0.5 uba:1 uba:2 uba:4)."),
        out: Path = typer.Option(..., "--out", help="PNG to write."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Total optimizer steps (default: the file's "
                                                                   "length, else 100)."),
        warmup: int = typer.Option(0, "--warmup", help="Linear warmup steps."),
        norm: Optional[str] = typer.Option(None, "--norm", help="For a norms CSV: l2 (default) or l1."),
        smoothing: Optional[float] = typer.Option(None, "--smoothing", help="For a norms file: median-filter "
                                                  "width as a fraction of the run, in [0, 1) (default: a refined "
                                                  ".json's own, else 0.1)."),
        as_json: bool = typer.Option(False, "--json", help="Print the curves as JSON."),
    ) -> None:
        """Plot lr / peak lr per step for several schedules (and print their values at 0..100 %)."""
        from adasched.planner.ui import emit_json, print_table
        from adasched.profiler.io import InputError, check_output_path

        from .plots import DEFAULT_SPECS, curve_rows, is_file_spec, plot_curves, schedule_curve

        check_output_path(out, "--out", figure=True)
        if norm is not None and norm not in ("l2", "l1"):
            raise InputError("--norm", f"must be l2 or l1, got {norm!r}")
        if smoothing is not None and not 0 <= smoothing < 1:  # NaN too
            raise InputError("--smoothing", f"must be a fraction in [0, 1), got {smoothing}")
        specs = list(schedules) if schedules else list(DEFAULT_SPECS)
        is_file = [is_file_spec(s) for s in specs]  # (a path without .csv/.json was a file to the plot, a name here)
        has_file = any(is_file)
        if not has_file and (norm is not None or smoothing is not None):  # was silently ignored
            raise InputError("--norm" if norm is not None else "--smoothing",
                             "applies to a norms .csv or refined .json schedule, and none is given")
        n = steps if steps is not None else (None if has_file else 100)
        if n is not None and not 0 < n <= MAX_PLOT_STEPS:
            raise InputError("--steps", f"must be in [1, {MAX_PLOT_STEPS:,}], got {n}")
        if warmup < 0 or (n is not None and warmup > n):
            raise InputError("--warmup", f"must be in [0, steps] = [0, {n}], got {warmup}" if n is not None
                             else f"must be >= 0, got {warmup}")
        curves: list = [None] * len(specs)
        length_from = "--steps" if n is not None else None
        for i in sorted(range(len(specs)), key=lambda i: not is_file[i]):  # files first: they set the length
            try:  # (a file over its own length, then compared: a second file of another length was refused as
                # "has 240 steps but total_steps=20", an option the command does not have)
                label, m = schedule_curve(specs[i], None if is_file[i] else n, warmup, norm=norm,
                                          smoothing=smoothing)
            except InputError:  # names its file or option already
                raise
            except ValueError as err:  # e.g. 'phi: must be ...' from uba:-1: say which argument
                raise InputError(f"schedule {specs[i]!r}", str(err).removeprefix("schedule: ")) from None
            if n is None:
                n, length_from = len(m) - 1, specs[i]
            elif len(m) - 1 != n:
                raise InputError(specs[i], f"has {len(m) - 1} steps, " + (
                    f"--steps is {n}" if length_from == "--steps" else f"{length_from} has {n}: the curves of one "
                    f"plot share a length") + " (a norms file gives one per optimizer step of its run)")
            curves[i] = (label, m)
        seen: dict[str, int] = {}
        for i, (label, m) in enumerate(curves):  # two files of one name: the JSON kept one curve per label
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:
                curves[i] = (f"{label} #{seen[label]}", m)
        plot_curves(curves, out, title=f"{n} steps, warmup {warmup}")
        if as_json:
            emit_json({"out": str(out), "curves": {lab: m.tolist() for lab, m in curves}})
            return
        rows, cols = curve_rows(curves)
        print_table(rows, cols, title=f"lr / peak lr ({n} steps, warmup {warmup}); plot: {out}")

    @groups.bench.command("schedules")
    def bench_cmd(
        as_json: bool = typer.Option(False, "--json", help="Print all results as JSON."),
        quick: bool = typer.Option(False, "--quick", help="Tiny run (2 budgets, 2 seeds, one peak lr) for tests."),
        seeds: Optional[int] = typer.Option(None, "--seeds", help="Seeds per setting (default 5)."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Plot final test loss vs budget (PNG)."),
    ) -> None:
        """Budgeted training on digits: logistic regression and an MLP, SGD-momentum and AdamW, budgets of
        10/25/50/100 % of 30 epochs, 5 seeds; constant, step, linear, cosine, OneCycle, REX, UBA (phi 0.5/1/2/4),
        refined. Table: test loss mean±std and accuracy; * best mean loss, + best accuracy per budget."""
        import platform

        from adasched.planner.ui import emit_json, print_table, progress

        from adasched.profiler.io import check_output_path

        from .bench import BenchConfig, bench_rows, plot_bench, run_bench, summary

        check_output_path(plot, "--plot")
        cfg = BenchConfig.quick() if quick else BenchConfig()
        if seeds is not None:
            if not 0 < seeds <= MAX_SEEDS:
                raise ValueError(f"--seeds: must be in [1, {MAX_SEEDS}], got {seeds}")
            cfg.seeds = seeds
        total = len(cfg.models) * len(cfg.optimizers) * len(cfg.budgets)
        with progress("bench schedules", total, enabled=not as_json) as advance:
            res = run_bench(cfg, advance)
        summ = summary(res)
        if plot:
            plot_bench(res, plot)
        if as_json:
            emit_json({"config": res.config, "wall_s": res.wall_s, "machine": platform.platform(),
                       "results": res.results, "summary": summ})
            return
        for model in cfg.models:
            for opt in cfg.optimizers:
                rows, cols = bench_rows(res, model, opt)
                print_table(rows, cols, title=f"{model} / {opt}: final test loss mean±std over {cfg.seeds} seeds, "
                                              f"accuracy (* best loss, + best acc)")
        print_table([[s["schedule"], s["mean_rank"], s["mean_rank_low_budget"], s["loss_wins"], s["acc_wins"]]
                     for s in summ], ["schedule", "mean rank (loss)", "mean rank, budgets <= 25%", "loss wins",
                                      "acc wins"], title=f"summary over {total} settings ({res.wall_s:.0f} s)")
        if plot:
            typer.echo(f"wrote {plot}")
