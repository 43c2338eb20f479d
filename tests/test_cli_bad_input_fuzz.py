"""Bad input, third sweep (see test_cli_bad_input.py and test_cli_bad_input_more.py): one line `error: <where>:
<what>`, exit status 2, no traceback, nothing written. Regression tests for the defects a fuzzing pass over every
`adasched` command found; each failed before its fix (an OverflowError traceback, a hang whatever --time-limit
said, an error naming neither the file nor the option, or a file or option accepted and silently ignored)."""
from __future__ import annotations

import copy
import json
import time
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


def test_moe_router_stats_too_many_layers(tmp_path, one_error):
    """100,000 per-layer statistics planned 100,000 layers (minutes); 1025 were accepted."""
    cfg = _write(tmp_path / "cfg.json", _MOE)
    stats = _write(tmp_path / "stats.json", {"mean_k_per_layer": [1.5] * 1025})
    t0 = time.perf_counter()
    rc = main(["plan", "moe", "--config", str(cfg), "--gpus", "8", "--router-stats", str(stats),
               "--out", str(tmp_path / "o.json"), "--time-limit", "0.5"])
    assert "mean_k_per_layer: 1,025 layers, at most 1024" in one_error(rc, str(stats))
    assert time.perf_counter() - t0 < 10
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
    ("jobs.0.lengths.max", 10 ** 400, "job 'a': lengths: max: Input should be less than or equal to 1099511627776"),
    ("capacity", 2 ** 40 + 1, "capacity: Input should be less than or equal to 1099511627776"),
], ids=["layers-1e400", "layers-1025", "max-1e400", "capacity-2**40+1"])
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
    ("capacity", 10 ** 400, "capacity: Input should be less than or equal to 1099511627776"),
], ids=["layers-1e400", "capacity-1e400"])
def test_lora_plan_sizes(key, value, needle, lora_plan, tmp_path, one_error):
    d = json.loads(lora_plan.read_text())
    d[key] = value
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


def test_lora_defaults_unchanged(tmp_path, capsys):
    out = tmp_path / "o.json"
    assert main(["plan", "lora", "--jobs", "tiny", "--no-milp", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["solver"]["time_limit"] == 0.4
    assert main(["plan", "lora", "--jobs", "tiny", "--time-limit", "0.2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["solver"]["time_limit"] == 0.2
    assert capsys.readouterr().err == ""


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


def test_sp_buckets_default_unchanged(lens, tmp_path, capsys):
    out = tmp_path / "o.json"
    assert main(["bench", "sp", "--seqlens", str(lens), "--gpus", "4", "--global-batch", "8", "--steps", "1",
                 "--no-milp", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["buckets"] == 16
    assert main(["plan", "sp", "--seqlens", str(lens), "--gpus", "4", "--global-batch", "8", "--buckets", "4",
                 "--time-limit", "0.5", "--out", str(out)]) == 0
    assert "Q=4" in json.loads(out.read_text())["solver"]["note"]


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


@pytest.mark.parametrize("edit, needle", [
    (_edit_delay, "edges.0.delay: Input should be less than or equal to 1024"),
    (_edit_reserve, "ops.0.reserve: reserve['TC'] has 1,025 cycles, at most 1024"),
    (_edit_ops, "ops: List should have at most 256 items"),
], ids=["delay", "reserve", "ops"])
def test_twill_graph_sizes(edit, needle, tmp_path, one_error):
    g = _toy()
    edit(g)
    graph = _write(tmp_path / "g.json", g)
    t0 = time.perf_counter()
    rc = main(["plan", "twill", "--graph", str(graph), "--out", str(tmp_path / "o.json"), "--time-limit", "5"])
    assert needle in one_error(rc, str(graph))
    assert time.perf_counter() - t0 < 10
    _only(tmp_path, "g.json")


def test_twill_graph_bounds_are_documented():
    from adasched.planner.twill.graph import MAX_CYCLES, MAX_OPS

    assert (MAX_OPS, MAX_CYCLES) == (256, 1024)


# ---- simulate: task-graph durations ---------------------------------------------------------------------------------

def test_simulate_task_durations_overflow(tmp_path, one_error):
    """Two tasks of 1e308 ms: 'makespan inf ms', utilisation nan, exit 0."""
    t = {"name": "a", "rank": 0, "stream": "compute", "duration_ms": 1e308}
    tg = _write(tmp_path / "tg.json", {"tasks": [t, {**t, "name": "b", "deps": ["a"]}]})
    rc = main(["simulate", str(tg), "--plot", str(tmp_path / "t.png")])
    assert "tasks.0: duration_ms: Input should be less than or equal to 1000000000000" in one_error(rc, str(tg))
    _only(tmp_path, "tg.json")


# ---- schedules refine / plot: norms files -------------------------------------------------------------------------

def test_refine_degenerate_norms_names_the_file(tmp_path, one_error):
    """'error: grad_norms: refinement is degenerate ...' named no file (schedules plot named it)."""
    norms = _write(tmp_path / "n.csv", "step,l2,l1\n0,1e308,1\n1,1e-308,1\n2,1,1\n")
    rc = main(["schedules", "refine", str(norms), "--out", str(tmp_path / "o.json")])
    assert "refinement is degenerate" in one_error(rc, str(norms))
    _only(tmp_path, "n.csv")


@pytest.mark.parametrize("cmd", ["refine", "plot"])
def test_norms_row_cut_short(cmd, tmp_path, one_error):
    """A row with fewer fields than the header (a run killed mid-write) was read as far as it went."""
    norms = _write(tmp_path / "n.csv", "step,l2,l1\n0,1.5,9.0\n1,1.25,8.5\n2,1.2\n")
    out = tmp_path / ("o.json" if cmd == "refine" else "o.png")
    rc = main(["schedules", cmd, str(norms), "--out", str(out)])
    assert "line 4: 2 fields, the header has 3" in one_error(rc, str(norms))
    _only(tmp_path, "n.csv")
