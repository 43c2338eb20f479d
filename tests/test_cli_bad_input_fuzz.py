"""Bad input, third sweep (see test_cli_bad_input.py and test_cli_bad_input_more.py): one line `error: <where>:
<what>`, exit status 2, no traceback, nothing written. Regression tests for the defects a fuzzing pass over every
`adasched` command found; each failed before its fix (an OverflowError traceback, a hang whatever --time-limit
said, an error naming neither the file nor the option, or a file or option accepted and silently ignored)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from adasched.planner.cli import main

_MOE = {"name": "c", "hidden": 1024, "ffn_hidden": 2048, "experts": 8, "top_k": 2, "batch": 2, "seq_len": 512,
        "num_layers": 2}


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))  # inf/nan as Infinity/NaN, 10**400 exact
    return path


def _only(tmp_path: Path, *names: str) -> None:
    """Nothing but the inputs is left in tmp_path (no plan, no temp file)."""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def _never_called(monkeypatch, module: str, name: str) -> None:
    """The refusal comes before any solving: ``module.name`` (a solve entry point) fails the test if called."""
    import importlib

    def never(*args, **kwargs):
        raise AssertionError(f"{module}.{name} was called")

    monkeypatch.setattr(importlib.import_module(module), name, never)


# ---- plan moe: config files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, needle", [
    # OverflowError tracebacks from the cost model (float(10**400), (hidden / 4096) ** 2)
    ({"hidden": 10 ** 400}, "[0].hidden: Input should be less than or equal to 1048576"),
    ({"hidden": 10 ** 200}, "[0].hidden: Input should be less than or equal to 1048576"),
    ({"dense_params_per_layer": 10 ** 400}, "[0].dense_params_per_layer: Input should be less than or equal to"),
    # "error: task 'gemm0': duration_ms must be >= 0, got nan": no file, no field
    ({"capacity_factor": float("inf")}, "[0].capacity_factor: Input should be a finite number"),
    ({"capacity_factor": 1e300}, "[0].capacity_factor: Input should be less than or equal to 1024"),
    # 10**9 layers hung the gradient-slice planning; 1025 was planned (the launchers refuse --layers > 1024)
    ({"num_layers": 1025}, "[0].num_layers: Input should be less than or equal to 1024"),
], ids=["hidden-1e400", "hidden-1e200", "dense-1e400", "cf-inf", "cf-1e300", "layers-1025"])
def test_moe_config_sizes(edit, needle, tmp_path, one_error):
    cfg = _write(tmp_path / "cfg.json", {**_MOE, **edit})
    rc = main(["plan", "moe", "--config", str(cfg), "--gpus", "8", "--out", str(tmp_path / "o.json"),
               "--time-limit", "0.5"])
    assert needle in one_error(rc, str(cfg))
    _only(tmp_path, "cfg.json")


def test_moe_config_duplicate_names(tmp_path, one_error):
    """Two configs of one name: planned twice, and train_moe --plan-config NAME took the first silently."""
    cfg = _write(tmp_path / "cfg.json", [_MOE, {**_MOE, "hidden": 2048}])
    rc = main(["plan", "moe", "--config", str(cfg), "--gpus", "8", "--out", str(tmp_path / "o.json"),
               "--time-limit", "0.5"])
    assert "[1].name: 'c' is also the name of [0]" in one_error(rc, str(cfg))
    _only(tmp_path, "cfg.json")


def test_moe_router_stats_too_many_layers(tmp_path, one_error, monkeypatch):
    """100,000 per-layer statistics planned 100,000 layers (minutes); 1025 were accepted."""
    _never_called(monkeypatch, "adasched.planner.fsmoe.planning", "plan_moe")
    cfg = _write(tmp_path / "cfg.json", _MOE)
    stats = _write(tmp_path / "stats.json", {"mean_k_per_layer": [1.5] * 1025})
    rc = main(["plan", "moe", "--config", str(cfg), "--gpus", "8", "--router-stats", str(stats),
               "--out", str(tmp_path / "o.json"), "--time-limit", "0.5"])
    assert "mean_k_per_layer: 1,025 layers, at most 1024" in one_error(rc, str(stats))
    _only(tmp_path, "cfg.json", "stats.json")


def test_moe_config_bounds_pass(tmp_path, capsys):
    """Every size at its bound still plans (finite stage times, no overflow)."""
    big = {"name": "max", "hidden": 2 ** 20, "ffn_hidden": 2 ** 20, "experts": 2 ** 16, "top_k": 2 ** 16,
           "capacity_factor": 1024, "batch": 2 ** 20, "seq_len": 2 ** 24, "num_layers": 8, "shared_experts": 2 ** 16,
           "dense_params_per_layer": 2 ** 40, "activation": "swiglu"}
    cfg = _write(tmp_path / "cfg.json", big)
    out = tmp_path / "o.json"
    assert main(["plan", "moe", "--config", str(cfg), "--gpus", "8", "--out", str(out), "--time-limit", "0.5"]) == 0
    assert capsys.readouterr().err == "" and out.exists()


# ---- plan lora: jobs files, LoRA plans, options -----------------------------------------------------------------

_JOB = {"name": "a", "adapter": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj"]},
        "lengths": {"dist": "lognormal", "median": 64, "sigma": 0.5, "min": 4, "max": 512},
        "global_batch_size": 4, "lr": 1e-3}
_JOBS = {"capacity": 1024, "stages": 2, "global_batches": 2, "seed": 0, "layers": 2, "jobs": [_JOB]}


@pytest.mark.parametrize("key, value, needle", [
    # OverflowError tracebacks: layers / stages; numpy's clip of the drawn lengths to max
    ("layers", 10 ** 400, "layers: Input should be less than or equal to 1024"),
    ("layers", 1025, "layers: Input should be less than or equal to 1024"),
    ("jobs.0.lengths.max", 10 ** 400, "job 'a': lengths: max: Input should be less than or equal to 33554432"),
    # CBC's tolerances made the packing MILP claim 'optimal' wrongly at ~1e10-token capacities (2**40 was taken),
    # and its smallest-bin MILP near 2**29 (2**30 was taken until 2026-12-03)
    ("capacity", 2 ** 25 + 1, "capacity: Input should be less than or equal to 33554432"),
    # the simulation grows with S^2 (1024 ran for hours)
    ("stages", 65, "stages: Input should be less than or equal to 64"),
    # planned (exit 0); train_lora then failed building the adapters
    ("jobs.0.adapter.r", 10 ** 400, "job 'a': adapter.r: Input should be less than or equal to 65536"),
    ("jobs.0.adapter.r", 2 ** 16 + 1, "job 'a': adapter.r: Input should be less than or equal to 65536"),
], ids=["layers-1e400", "layers-1025", "max-1e400", "capacity-2**25+1", "stages-65", "r-1e400", "r-2**16+1"])
def test_jobs_file_sizes(key, value, needle, tmp_path, one_error):
    d = copy.deepcopy(_JOBS)
    *path, last = key.split(".")
    cur = d
    for p in path:
        cur = cur[int(p)] if p.isdigit() else cur[p]
    cur[last] = value
    jobs = _write(tmp_path / "jobs.json", d)
    rc = main(["plan", "lora", "--jobs", str(jobs), "--no-milp", "--out", str(tmp_path / "o.json")])
    assert needle in one_error(rc, str(jobs))
    _only(tmp_path, "jobs.json")


@pytest.fixture(scope="module")
def lora_plan(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lora")
    assert main(["plan", "lora", "--jobs", "tiny", "--no-milp", "--out", str(d / "lora.json")]) == 0
    return d / "lora.json"


@pytest.mark.parametrize("key, value, needle", [
    ("layers", 10 ** 400, "layers: Input should be less than or equal to 1024"),   # shown (and drawn) as valid
    ("capacity", 10 ** 400, "capacity: Input should be less than or equal to 1073741824"),
    ("jobs.0.adapter.r", 10 ** 400, "jobs.0.adapter.r: Input should be less than or equal to 65536"),
], ids=["layers-1e400", "capacity-1e400", "r-1e400"])
def test_lora_plan_sizes(key, value, needle, lora_plan, tmp_path, one_error):
    d = json.loads(lora_plan.read_text())
    *path, last = key.split(".")
    cur = d
    for p in path:
        cur = cur[int(p)] if p.isdigit() else cur[p]
    cur[last] = value
    bad = _write(tmp_path / "bad.json", d)
    assert needle in one_error(main(["show", str(bad), "--plot", str(tmp_path / "g.png")]), str(bad))
    _only(tmp_path, "bad.json")


@pytest.mark.parametrize("cmd", ["plan", "bench"])
def test_lora_time_limit_with_no_milp(cmd, tmp_path, one_error):
    """First-fit decreasing takes no time limit: --time-limit was accepted and ignored (and recorded)."""
    argv = [cmd, "lora", "--jobs", "tiny", "--no-milp", "--time-limit", "2"]
    if cmd == "plan":
        argv += ["--out", str(tmp_path / "o.json")]
    assert "has no effect with --no-milp" in one_error(main(argv), "--time-limit")
    _only(tmp_path)


def test_lora_time_limit_recorded(tmp_path, capsys):
    """The plan records the MILPs' budget: the default, the option, none with --no-milp (it recorded 0.4, and `show`
    printed '(limit 0.4 s each)' for a plan no MILP made)."""
    from adasched.planner.lorafusion.cli import _TIME_LIMIT_HELP
    from adasched.planner.lorafusion.model import DEFAULT_TIME_LIMIT_S

    assert f"(default {DEFAULT_TIME_LIMIT_S:g};" in _TIME_LIMIT_HELP
    out = tmp_path / "o.json"
    assert main(["plan", "lora", "--jobs", "tiny", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["solver"]["time_limit"] == DEFAULT_TIME_LIMIT_S
    assert main(["plan", "lora", "--jobs", "tiny", "--time-limit", "0.2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["solver"]["time_limit"] == 0.2
    assert main(["plan", "lora", "--jobs", "tiny", "--no-milp", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["solver"]["time_limit"] is None
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr()
    line = next(x for x in shown.out.splitlines() if "solve time" in x)
    assert "(global batch, group) problems" in line and "limit" not in line and shown.err == ""


# ---- plan sp / bench sp: --buckets with --no-milp -----------------------------------------------------------------

@pytest.fixture
def lens(tmp_path) -> Path:
    return _write(tmp_path / "lens.txt", "812\n97\n2048\n333\n1500\n64\n700\n4000\n")


@pytest.mark.parametrize("cmd", ["plan", "bench"])
def test_sp_buckets_with_no_milp(cmd, lens, tmp_path, one_error):
    """The buckets size the MILP's length classes: with --no-milp the option was accepted and ignored."""
    argv = [cmd, "sp", "--seqlens", str(lens), "--gpus", "4", "--global-batch", "8", "--steps", "1", "--no-milp",
            "--buckets", "4"]
    if cmd == "plan":
        argv += ["--out", str(tmp_path / "o.json")]
    assert "has no effect with --no-milp" in one_error(main(argv), "--buckets")
    _only(tmp_path, "lens.txt")


def test_sp_buckets_recorded(lens, tmp_path, capsys):
    """bench sp reports the MILP's buckets: the default, the option, none with --no-milp (it reported 16)."""
    from adasched.planner.flexsp.cli import _BUCKETS_HELP
    from adasched.planner.flexsp.planner import PlannerConfig

    assert f"(default {PlannerConfig.buckets};" in _BUCKETS_HELP
    argv = ["bench", "sp", "--seqlens", str(lens), "--gpus", "4", "--global-batch", "8", "--steps", "1",
            "--time-limit", "0.5", "--json"]
    for extra, buckets in (([], PlannerConfig.buckets), (["--buckets", "4"], 4), (["--no-milp"], None)):
        assert main(argv + extra) == 0
        assert json.loads(capsys.readouterr().out)["config"]["buckets"] == buckets, extra
    out = tmp_path / "o.json"
    assert main(["plan", "sp", "--seqlens", str(lens), "--gpus", "4", "--global-batch", "8", "--buckets", "4",
                 "--time-limit", "0.5", "--out", str(out)]) == 0
    assert "Q=4" in json.loads(out.read_text())["solver"]["note"]
    # --no-milp: the note names no MILPs, buckets or MILP budget (it said "0 MILPs (bucketed, Q=16)")
    assert main(["plan", "sp", "--seqlens", str(lens), "--gpus", "4", "--global-batch", "8", "--no-milp",
                 "--time-limit", "0.5", "--out", str(out)]) == 0
    note = json.loads(out.read_text())["solver"]["note"]
    assert "heuristics only" in note and "search budget 0.5 s per step" in note, note
    assert "MILP" not in note and "Q=" not in note, note


# ---- plan twill: graph sizes ----------------------------------------------------------------------------------------

def _toy() -> dict:
    from adasched.planner.twill.graph import GRAPHS_DIR

    return json.loads((GRAPHS_DIR / "toy-attention.json").read_text())


def _edit_delay(g):
    g["edges"][0]["delay"] = 1025  # 10**9 ran the schedule simulator for hours (a 5 s --time-limit)


def _edit_reserve(g):
    g["ops"][0]["reserve"] = {"TC": [1] * 1025}  # 100,000 cycles: the same


def _edit_ops(g):
    # 5000 ops: the same; op 0 reserves a unit h100 lacks, which was the first (and only) complaint
    g["ops"] = [{"name": "o0", "reserve": {"XYZ": [1]}}] + [{"name": f"o{i}", "reserve": {"TC": [1]}}
                                                           for i in range(1, 257)]
    g["edges"] = []


def _edit_distance(g):
    g["edges"][0]["distance"] = 10 ** 30  # a TypeError traceback from OR-Tools


def _edit_count(g):
    g["ops"][0]["reserve"] = {"TC": [10 ** 30]}  # with as many units: an OverflowError traceback (int64 arrays)
    g["units"] = {**g["units"], "TC": 10 ** 30}


def _edit_entry(g):
    g["ops"][0]["reserve"] = {"TC": [1, 10 ** 30]}


@pytest.mark.parametrize("edit, needle", [
    (_edit_delay, "edges.0.delay: Input should be less than or equal to 1024"),
    (_edit_reserve, "ops.0.reserve: reserve['TC'] has 1,025 cycles, at most 1024"),
    (_edit_ops, "ops: List should have at most 256 items"),
    (_edit_distance, "edges.0.distance: Input should be less than or equal to 1024"),
    (_edit_count, "units.TC: Input should be less than or equal to 1024"),
    (_edit_entry, "ops.0.reserve.TC.1: Input should be less than or equal to 1024"),
], ids=["delay", "reserve", "ops", "distance", "units", "reserve-entry"])
def test_twill_graph_sizes(edit, needle, tmp_path, one_error, monkeypatch):
    _never_called(monkeypatch, "adasched.planner.twill.model", "solve")
    g = _toy()
    edit(g)
    graph = _write(tmp_path / "g.json", g)
    rc = main(["plan", "twill", "--graph", str(graph), "--out", str(tmp_path / "o.json"), "--time-limit", "5"])
    assert needle in one_error(rc, str(graph))
    _only(tmp_path, "g.json")


def test_twill_machine_unit_count(tmp_path, one_error, monkeypatch):
    _never_called(monkeypatch, "adasched.planner.twill.model", "solve")
    from adasched.planner.twill.graph import MACHINES_DIR

    m = json.loads((MACHINES_DIR / "h100.json").read_text())
    m["units"]["TC"] = 10 ** 30
    machine = _write(tmp_path / "m.json", m)
    rc = main(["plan", "twill", "--graph", "toy-attention", "--machine", str(machine), "--time-limit", "5"])
    assert "units.TC: Input should be less than or equal to 1024" in one_error(rc, str(machine))
    _only(tmp_path, "m.json")


def test_twill_graph_bounds_in_readme():
    from adasched.planner.twill.graph import MAX_CYCLES, MAX_OPS

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"at most {MAX_OPS} ops" in readme and f"at most {MAX_CYCLES} cycles" in readme


@pytest.mark.parametrize("argv, needle", [
    (["--ops", "257"], "error: --ops: must be <= 256 (the most plan twill takes), got 257\n"),
    (["--scale", "257"], "error: --scale: must be <= 256 (the most plan twill takes), got 257\n"),
], ids=["ops", "scale"])
def test_randgraph_writes_only_graphs_plan_twill_takes(argv, needle, capsys):
    """--ops 257 or --scale 257 (delays up to 4 x scale cycles) wrote a graph plan twill refuses."""
    from adasched.planner.twill.randgraph import main as randgraph

    assert randgraph(argv) == 2
    out = capsys.readouterr()
    assert out.err == needle and out.out == ""


def test_randgraph_largest_graph_is_taken():
    from adasched.planner.twill.graph import MAX_CYCLES, MAX_OPS, Graph, check_graph, load_machine
    from adasched.planner.twill.randgraph import random_graph
    from adasched.profiler.io import InputError

    h100 = load_machine("h100")
    for seed in range(4):
        g = random_graph(MAX_OPS, seed, warp=bool(seed % 2), scale=MAX_CYCLES // 4)
        if seed % 2:  # the sizes are what is checked: 256 ops' registers and buffers exceed one SM (refused as such)
            with pytest.raises(InputError, match="no I fits"):
                check_graph(Graph.model_validate(g), h100)
            for op in g["ops"]:
                op.pop("regs", None)
                op.pop("smem", None)
        prob = check_graph(Graph.model_validate(g), h100)
        assert len(prob.graph.ops) == MAX_OPS and prob.warp == bool(seed % 2)


def test_layer_bound_defined_once():
    """One bound for layers: the launchers', the jobs files', the LoRA plans', the MoE configs'; one for LoRA
    pipeline stages (jobs files and plans: 64, the simulation grows with S^2)."""
    from adasched.launch import cli_args
    from adasched.planner.fsmoe.costmodel import MoEConfig
    from adasched.planner.lorafusion.jobs import MAX_STAGES, JobsFile
    from adasched.planner.lorafusion.plan import LoRAPlan
    from adasched.planner.plan import MAX_LAYERS

    assert cli_args.MAX_LAYERS is MAX_LAYERS
    for model, field, bound in ((MoEConfig, "num_layers", MAX_LAYERS), (JobsFile, "layers", MAX_LAYERS),
                                (JobsFile, "stages", MAX_STAGES), (LoRAPlan, "layers", MAX_LAYERS),
                                (LoRAPlan, "stages", MAX_STAGES)):
        assert [m.le for m in model.model_fields[field].metadata if hasattr(m, "le")] == [bound], (model, field)
    assert MAX_STAGES == 64 <= MAX_LAYERS


# ---- simulate: task-graph durations ---------------------------------------------------------------------------------

def test_simulate_task_durations_overflow(tmp_path, one_error):
    """Two tasks of 1e308 ms: 'makespan inf ms', utilisation nan, exit 0."""
    t = {"name": "a", "rank": 0, "stream": "compute", "duration_ms": 1e308}
    tg = _write(tmp_path / "tg.json", {"tasks": [t, {**t, "name": "b", "deps": ["a"]}]})
    rc = main(["simulate", str(tg), "--plot", str(tmp_path / "t.png")])
    assert "tasks.0: duration_ms: Input should be less than or equal to 1000000000000" in one_error(rc, str(tg))
    _only(tmp_path, "tg.json")


# ---- schedules refine / plot: norms files -------------------------------------------------------------------------

def test_refine_errors_name_the_file(tmp_path, one_error):
    """'error: grad_norms: refinement is degenerate ...' named no file (schedules plot named it). Norms spanning
    1e616 were that error; they refine since the log-domain fallback (35th session), so a norm that stays 0 after
    the median filter stands in for a refinement error here."""
    norms = _write(tmp_path / "n.csv", "step,l2,l1\n0,0,1\n1,0,1\n2,0,1\n")
    rc = main(["schedules", "refine", str(norms), "--out", str(tmp_path / "o.json")])
    assert "is 0 even after the median filter" in one_error(rc, str(norms))
    _only(tmp_path, "n.csv")
    wide = _write(tmp_path / "w.csv", "step,l2,l1\n0,1e308,1\n1,1e-308,1\n2,1,1\n")
    assert main(["schedules", "refine", str(wide), "--smoothing", "0", "--out", str(tmp_path / "o.json")]) == 0


@pytest.mark.parametrize("cmd", ["refine", "plot"])
def test_norms_row_cut_short(cmd, tmp_path, one_error):
    """A row with fewer fields than the header (a run killed mid-write) was read as far as it went."""
    norms = _write(tmp_path / "n.csv", "step,l2,l1\n0,1.5,9.0\n1,1.25,8.5\n2,1.2\n")
    out = tmp_path / ("o.json" if cmd == "refine" else "o.png")
    rc = main(["schedules", cmd, str(norms), "--out", str(out)])
    assert "line 4: 2 fields, the header has 3" in one_error(rc, str(norms))
    _only(tmp_path, "n.csv")


def test_randgraph_refuses_a_warp_graph_no_SM_holds(capsys):
    """Since plan twill refuses registers/shared memory that fit at no I, randgraph --warp --ops 256 (920 registers
    per thread with one buffer per value) is refused with that reason instead of written; 120 ops are written."""
    from adasched.planner.twill.randgraph import main as randgraph

    assert randgraph(["--ops", "256", "--warp", "--seed", "1"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: --ops: 256 ops with --warp (seed 1) do not fit an h100 SM: ")
    assert "no I fits" in out.err and out.err.count("\n") == 1
    assert randgraph(["--ops", "120", "--warp", "--seed", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "rand120-s1-warp"
