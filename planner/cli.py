"""The `adasched` command line: profile, plan, show, simulate, bench (+ schedules).

Each technique registers its own sub-commands from its ``cli.py`` (see PLUGINS), so this file only wires
groups together and turns bad input into one line `error: <where>: <what>` with exit status 2.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from adasched.profiler.io import InputError, check_output_path

__all__ = ["app", "main", "CliGroups", "PLUGINS"]

app = typer.Typer(
    name="adasched",
    help="Plan and run uneven LLM training: profile a cluster, solve LP/MILP/CP plans (FlexSP sequence "
    "parallelism, FSMoE MoE scheduling, LoRAFusion multi-job packing, Twill software pipelining), show and "
    "simulate them, and benchmark plans, kernels and schedules. Plans are JSON; add --json for machine output.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
plan_app = typer.Typer(help="Solve a plan for one technique and write it as JSON (see `adasched plan KIND --help`).",
                       no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: ratios against baselines measured in the same run; --json for machines.",
                        no_args_is_help=True)
app.add_typer(plan_app, name="plan")
app.add_typer(bench_app, name="bench")


@dataclass(frozen=True)
class CliGroups:
    root: typer.Typer
    plan: typer.Typer
    bench: typer.Typer


#: Modules with a ``register(groups: CliGroups)`` function; imported at start-up, so keep their top level light.
PLUGINS = (
    "adasched.profiler.cli",
    "adasched.planner.flexsp.cli",
    "adasched.planner.fsmoe.cli",
    "adasched.planner.lorafusion.cli",
    "adasched.planner.twill.cli",
    "adasched.schedules.cli",
    "adasched.runtime.cli",
    "adasched.kernels.cli",
)


@app.command("show")
def show_cmd(
    path: str = typer.Argument(..., help="A plan or profile JSON file written by adasched, or a built-in profile "
                                         "name (h100-sxm, a100-64-flexsp-paper)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw it to this PNG: a plan's Gantt chart, or a "
                                                             "profile's fitted cost models with measured points."),
    as_json: bool = typer.Option(False, "--json", help="Print the validated file as JSON instead of a table."),
) -> None:
    """Validate a plan or profile and say what it is and why it was chosen (baselines compared)."""
    from adasched.profiler.builtins import BUILTIN_PROFILES
    from adasched.profiler.io import check_distinct_outputs, check_output_path, read_json

    check_output_path(plot, "--plot")  # before anything is printed
    check_distinct_outputs(("--plot", plot), inputs=(("PATH", path),))  # (`show splan --plot splan` drew over it)

    from .plan import load_plan
    from .ui import emit_json, print_table

    if path in BUILTIN_PROFILES:
        from adasched.profiler.builtins import builtin_profile
        from adasched.profiler.profile import check_builtin_unshadowed

        check_builtin_unshadowed(path, "PATH")
        prof, data = builtin_profile(path), None
    else:
        data = read_json(path)
        prof = None
        _refuse_input_file(path, data)
        # a profile's kind is optional (load_profile, and so every --profile, takes one without it)
        profile_keys = {"name", "device"}  # (what a profile must have and no plan has; num_nodes etc. default)
        plan_keys = {"inputs_digest", "solver", "predicted_ms"}  # (what every plan has and no profile)
        if isinstance(data, dict) and (data.get("kind") == "cluster_profile"
                                       or ("kind" not in data and profile_keys & data.keys()
                                           and not plan_keys & data.keys())):
            # (one of name/device without the other is a profile missing a field: its loader names it - was
            # "kind: missing or not a string", the plan loader's)
            from adasched.profiler.io import load_model
            from adasched.profiler.profile import ClusterProfile

            prof = load_model(path, ClusterProfile, data=data)
    if prof is not None:
        from adasched.profiler.report import plot_profile, profile_rows

        if as_json:
            emit_json(prof)
        else:
            print_table(profile_rows(prof), ["field", "value"], title=f"profile {prof.name}")
        if plot:
            plot_profile(prof, plot)
            if not as_json:
                typer.echo(f"wrote {plot}")
        return
    plan = load_plan(path)
    if as_json:
        emit_json(plan)
    else:
        print_table(plan.summary_rows(), ["field", "value"], title=f"{path}")
    if plot:
        plan.plot(plot)
        if not as_json:
            typer.echo(f"wrote {plot}")


#: kind-less input files of the planners that `show` was given (read as a profile or a plan: "source: Field
#: required (and 5 more)" for a Twill graph): (keys that identify it, what it is, the command that takes it)
_INPUT_FILES = (
    ({"ops", "edges"}, "a Twill graph", "adasched plan twill --graph"),
    ({"regs_total", "units", "cycle_ns"}, "a Twill machine model", "adasched plan twill --machine"),
    ({"jobs", "capacity"}, "a LoRA jobs file", "adasched plan lora --jobs"),
    ({"tasks"}, "a task graph", "adasched simulate"),
)


def _refuse_input_file(path, data, not_what: str = "a plan or profile") -> None:
    """One line saying which planner input ``data`` is, when it is one (it is no plan or profile to show, no plan
    to re-simulate)."""
    from adasched.profiler.io import InputError

    if not isinstance(data, dict) or "kind" in data:
        return
    for keys, what, cmd in _INPUT_FILES:
        if keys <= data.keys():
            verb = "simulate it" if cmd == "adasched simulate" else "plan it"
            raise InputError(str(path), f"is {what}, not {not_what}: {verb} with `{cmd} {path}`")


#: Longest task of a task-graph file (ms, about 32 years): two tasks of 1e308 ms added up to an infinite makespan
MAX_TASK_MS = 1e12


@functools.cache
def _task_spec():
    """The pydantic model of one task of a task-graph file, built on first use (the CLI's import stays light);
    strict: a bool is not a rank, a string is not a duration."""
    from pydantic import BaseModel, ConfigDict, Field

    class TaskSpec(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        name: str = Field(min_length=1)
        rank: int = Field(ge=0)
        stream: str = Field(min_length=1)
        duration_ms: float = Field(ge=0, le=MAX_TASK_MS, allow_inf_nan=False)
        deps: list[str] = Field(default_factory=list)
        # (an empty key was a sync group of its own: every task given "" for "none" started together)
        sync: str | None = Field(default=None, min_length=1)
        category: str = ""

    return TaskSpec


@app.command("simulate")
def simulate_cmd(
    path: Path = typer.Argument(..., help="A task-graph JSON ({'tasks': [{name, rank, stream, duration_ms, deps, "
                                          "sync, category}, ...]}) or a plan whose kind can re-simulate itself."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw the simulated timeline (PNG)."),
    as_json: bool = typer.Option(False, "--json", help="Print makespan, busy time per lane and every task as JSON."),
    step: Optional[int] = typer.Option(None, "--step", help="For a plan with several steps (an SP plan): the step "
                                                              "to simulate (default: the first)."),
    config: Optional[str] = typer.Option(None, "--config", help="For a MoE plan of several configurations: the one "
                                                                 "to simulate, by name or position (default: the "
                                                                 "first)."),
) -> None:
    """Run the discrete-event simulator (per-rank compute/communication streams with dependencies)."""
    from adasched.profiler.io import check_distinct_outputs, check_output_path, read_json

    check_output_path(plot, "--plot")  # before anything is printed
    check_distinct_outputs(("--plot", plot), inputs=(("PATH", path),))  # (`simulate g --plot g` drew over it)

    from .gantt import render_gantt
    from .plan import load_plan
    from .simulator import Task, simulate
    from .ui import emit_json, print_table

    data = read_json(path)
    what = ""  # "step k of n: " for a plan with steps
    if isinstance(data, dict) and "tasks" in data and "kind" not in data:
        extra = sorted(set(data) - {"tasks"})
        if extra:  # ("unit", "ranks", ... were accepted and ignored)
            raise InputError(path, f"{extra[0]}: not a task-graph field (a task graph is {{\"tasks\": [...]}})")
        if step is not None:  # it was ignored (an explicit --step 0 too)
            raise InputError("--step", f"{step}: a task graph has no steps (--step is for plans with steps)")
        if config is not None:
            raise InputError("--config", "a task graph has no configurations (--config is for MoE plans)")
        if not isinstance(data["tasks"], list) or not data["tasks"]:
            raise InputError(path, "tasks: must be a non-empty list")
        from pydantic import ValidationError

        from adasched.profiler.io import describe_validation_error

        tasks = []
        for i, t in enumerate(data["tasks"]):
            try:
                spec = _task_spec().model_validate(t)
            except ValidationError as err:
                raise InputError(path, f"tasks.{i}: {describe_validation_error(err)}") from None
            tasks.append(Task(**{**spec.model_dump(), "deps": tuple(spec.deps)}))
        try:
            sim = simulate(tasks)
        except ValueError as err:
            raise InputError(path, str(err)) from None
    else:
        _refuse_input_file(path, data, "a task graph or plan")  # (a Twill graph: "schema_version: missing")
        plan = load_plan(path)
        if not hasattr(plan, "simulate"):
            raise InputError(path, f"plan kind {plan.kind!r} cannot be re-simulated")
        n_steps = len(getattr(plan, "steps", ()) or ())
        if config is not None and plan.kind != "moe":
            raise InputError("--config", f"plan kind {plan.kind!r} has no configurations (--config is for MoE plans)")
        try:
            if config is not None:  # (only the first configuration could be simulated)
                if step is not None:
                    raise InputError("--step", f"plan kind {plan.kind!r} has no steps")
                names = [c.name for c in plan.configs]
                pos = names.index(config) if config in names else (
                    int(config) if config.isascii() and config.isdigit() and int(config) < len(names) else None)
                if pos is None:
                    raise InputError("--config", f"{config!r} is not a configuration of this plan (names: "
                                                 f"{', '.join(names)}; or a position 0..{len(names) - 1})")
                sim = plan.simulate(pos)
                what = f"{names[pos]}: "
            elif n_steps:
                step = 0 if step is None else step
                if not 0 <= step < n_steps:
                    raise InputError("--step", f"{step} is not a step of this plan (0..{n_steps - 1})")
                sim = plan.simulate(plan.steps[step].step)  # --step is the position; the plan numbers its steps
                number = plan.steps[step].step
                what = f"step {step} of {n_steps}" + (f" (the plan's step {number})" if number != step else "") + ": "
            else:
                if step is not None:
                    raise InputError("--step", f"plan kind {plan.kind!r} has no steps")
                sim = plan.simulate()
                what = ""
                if plan.kind == "moe":  # the first configuration, named (the plan's predicted_ms sums them all)
                    # (said "configuration 1 of 2" while --config 1 picked the second: positions count from 0)
                    n = len(plan.configs)
                    what = (f"{plan.configs[0].name}" + (f" (the first of {n} configurations; --config NAME or a "
                                                         f"position 0..{n - 1} picks another)" if n > 1 else "") + ": ")
                elif hasattr(plan, "drawn_iterations") and plan.drawn_iterations() < plan.stages + 1:
                    # a Twill plan of very many stages: its bars are capped (the makespan is theirs)
                    what = f"the first {plan.drawn_iterations():,} of {plan.stages + 1:,} overlapped iterations: "
                elif hasattr(plan, "drawn_iterations"):  # a makespan of 8 cycles beside a plan of I = 2 said nothing
                    what = f"{plan.drawn_iterations():,} overlapped iterations of I = {plan.ii}: "
        except InputError:
            raise
        except ValueError as err:  # the simulator's refusals (an overflowing sum of times) name the plan's file
            raise InputError(path, str(err)) from None
    per_lane = sim.busy_by_lane()
    unit = getattr(sim, "unit", "ms")  # a Twill loop schedule counts normalised cycles
    if as_json:
        if unit == "ms":
            emit_json({"makespan_ms": sim.makespan_ms, "busy_ms": per_lane,
                       "tasks": [t.__dict__ for t in sim.tasks]})
        else:
            emit_json({f"makespan_{unit}": sim.makespan_ms, f"busy_{unit}": per_lane, "unit": unit,
                       "tasks": [{**{k: v for k, v in t.__dict__.items() if k not in ("start_ms", "end_ms")},
                                  "start": t.start_ms, "end": t.end_ms} for t in sim.tasks]})
    else:
        rows = [(lane, busy, busy / sim.makespan_ms if sim.makespan_ms else 0.0) for lane, busy in per_lane.items()]
        print_table(rows, ["lane", f"busy {unit}", "utilisation"],
                    title=f"{what}makespan {sim.makespan_ms:.3f} {unit}")
    if plot:
        # (zero-length barriers drew as hairlines with a legend entry; `show --plot` leaves them out too)
        drawn = [t for t in sim.tasks if not (t.category == "barrier" and t.end_ms <= t.start_ms)]
        render_gantt(drawn, plot, title=f"{path.name}: {what}makespan {sim.makespan_ms:.2f} {unit}",
                     **({} if unit == "ms" else {"xlabel": unit}))
        if not as_json:
            typer.echo(f"wrote {plot}")


_registered = False


def _register_plugins() -> None:
    global _registered
    if _registered:
        return
    groups = CliGroups(app, plan_app, bench_app)
    for mod in PLUGINS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name == mod:  # plugin not written yet
                continue
            raise
        m.register(groups)
    _registered = True


def _click_exceptions():
    """(Exit, UsageError, NoArgsIsHelpError, Abort) classes of click and of the click copy vendored by newer typer.
    Either may be absent: typer >= 0.24 ships its own click and does not install click (`pip install adasched`
    gave an `adasched` whose every command, --help included, ended in "No module named 'click'")."""
    mods = []
    try:
        import click.exceptions  # typer < 0.24 (or click installed by another package)

        mods.append(click.exceptions)
    except ImportError:
        pass
    try:
        import typer._click.exceptions as vendored  # typer >= 0.24

        mods.append(vendored)
    except ImportError:
        pass
    import typer

    def pick(name):
        return tuple(getattr(m, name) for m in mods if hasattr(m, name))

    return (pick("Exit") + (typer.Exit,), pick("UsageError"), pick("NoArgsIsHelpError"), pick("Abort"))


#: the options of adasched's commands that name a file to write
FILE_OUTPUT_OPTIONS = ("--out", "-o", "--plot")


def _check_folder_spelled_outputs(args: list[str]) -> None:
    """Refuse an output file option whose value ends with '/' (or is empty) before click parses it: typer hands the
    commands a Path, which drops the slash, so `--plot figs/` wrote a file named figs (and `--out runs/` a plan file
    runs)."""
    for i, tok in enumerate(args):
        if tok == "--":
            return
        name, eq, value = tok.partition("=")
        if name not in FILE_OUTPUT_OPTIONS:
            if tok.startswith("-o") and not tok.startswith("--") and len(tok) > 2:
                name, value, eq = "-o", tok[2:], "-"  # click's -oFILE
            else:
                continue
        if not eq:
            if i + 1 >= len(args):
                continue  # (no value: click says the option requires an argument)
            value = args[i + 1]
        # (an empty value too: Path("") is ".", and the error said '. is a directory')
        if value.endswith(("/", os.sep)) or not value.strip():
            check_output_path(value, "--out" if name == "-o" else name, figure=False)


#: whether a Ctrl-C prints ``aborted`` (the demo runs CLI commands in-process and prints its own one line, naming
#: the step: both lines were printed; see :func:`abort_said_by_caller`)
_SAY_ABORTED = [True]


@contextlib.contextmanager
def abort_said_by_caller():
    """Inside, a Ctrl-C still returns 130 but prints nothing: the caller reports it (``make demo``'s
    ``aborted (demo step NAME)``)."""
    _SAY_ABORTED.append(False)
    try:
        yield
    finally:
        _SAY_ABORTED.pop()


def _aborted() -> int:
    if _SAY_ABORTED[-1]:
        sys.stderr.write("aborted\n")
    return 130


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI; bad input -> `error: ...` on stderr and exit 2, never a traceback; a Ctrl-C ->
    `aborted`, exit 130 (also while the plugins load, before click has set up its own handling)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return _aborted()


def _main(argv: list[str] | None) -> int:
    exit_exc, usage_exc, no_args_exc, abort_exc = _click_exceptions()
    _register_plugins()
    try:
        _check_folder_spelled_outputs(sys.argv[1:] if argv is None else argv)
        rv = app(args=argv, standalone_mode=False, prog_name="adasched")
        if rv == 130:  # typer turns a Ctrl-C into Exit(130), which click returns here: say so, as for an Abort
            return _aborted()
        return int(rv or 0) if isinstance(rv, int) else 0
    except exit_exc as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except no_args_exc as e:  # `adasched` or `adasched plan` alone: the help is the answer
        ctx = getattr(e, "ctx", None)
        sys.stdout.write((ctx.get_help() if ctx is not None else e.format_message()) + "\n")
        return 0
    except usage_exc as e:
        msg = " ".join(e.format_message().split())
        ctx = e.ctx.command_path if getattr(e, "ctx", None) else "adasched"
        sys.stderr.write(f"error: {ctx}: {msg}\n")
        return 2
    except (InputError, ValueError) as e:
        from adasched.profiler.io import error_line

        sys.stderr.write(error_line(e))
        return 2
    except OSError as e:  # a file the user named that cannot be read or written (permissions, a directory...)
        where = e.filename if e.filename is not None else "adasched"
        sys.stderr.write(f"error: {where}: {' '.join((e.strerror or str(e)).split())}\n")
        return 2
    except abort_exc:
        return _aborted()


if __name__ == "__main__":
    sys.exit(main())
