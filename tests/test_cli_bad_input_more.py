"""Bad input, continued (see test_cli_bad_input.py): one line `error: <where>: <what>`, exit status 2, no
traceback, nothing written. Regression tests for the second sweep's defects in `plan sp` / `bench sp`, SP plan
files, train_moe --validate-only and the schedules' norms / refined files; each failed before its fix (a
traceback, an OOM kill, a hang, warnings before the error, or an error naming no option or file)."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from adasched.planner.cli import main

GiB = 2 ** 30


@pytest.fixture
def host_16gib(monkeypatch):
    """The memory checks see a 16 GiB host on any machine."""
    from adasched.profiler import inventory

    monkeypatch.setattr(inventory, "host_memory_bytes", lambda: 16 * GiB)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """Eight random lengths and a small SP plan made from them by the CLI."""
    d = tmp_path_factory.mktemp("sp")
    rng = random.Random(11)
    (d / "lens.txt").write_text("\n".join(str(rng.randint(50, 4000)) for _ in range(8)) + "\n")
    assert main(["plan", "sp", "--seqlens", str(d / "lens.txt"), "--gpus", "4", "--global-batch", "8",
                 "--no-milp", "--out", str(d / "sp.json")]) == 0
    return d


# ---- plan sp / bench sp options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd, extra, where, needle", [
    # OverflowError traceback from numpy (np.minimum with a Python int beyond int64)
    ("plan", ["--max-context", "99999999999999999999999"], "--max-context", "must be in [1, 2**40] tokens"),
    ("plan", ["--max-context", str(2 ** 40 + 1)], "--max-context", "must be in [1, 2**40] tokens"),
    # a note line, then "error: Maximum allowed size exceeded" naming no option
    ("plan", ["--global-batch", "99999999999999999999999"], "--global-batch", "must be <= 1,000,000 sequences"),
    ("plan", ["--steps", "99999999999999999999999"], "--steps", "must be <= 100,000"),
    ("plan", ["--global-batch", "1000001"], "--global-batch", "must be <= 1,000,000 sequences"),
    ("plan", ["--steps", "11", "--global-batch", "1000000"], "--steps", "more than 10,000,000 per plan"),
    # at the bound: the split DP's m x n choices (about 90,000 micro-batches x 10**6 sequences) were OOM-killed
    ("plan", ["--global-batch", "1000000"], "--global-batch", "more than half this host's 16.0 GiB"),
    ("bench", ["--global-batch", "1000000"], "--global-batch", "more than half this host's 16.0 GiB"),
    # two RuntimeWarning lines, then "error: seqlens must be positive" naming no option
    ("plan", ["--seqlens", "lognormal:inf,1"], "--seqlens", "need 1 <= MEDIAN <= 1099511627776"),
    ("plan", ["--seqlens", "lognormal:1000,nan"], "--seqlens", "0 < SIGMA <= 10"),
    ("plan", ["--seqlens", "lognormal:1000,60"], "--seqlens", "0 < SIGMA <= 10"),
    # accepted with --no-milp (the plan recorded an infinite budget); with MILPs 'time_limit must ...', no option
    ("plan", ["--time-limit", "inf", "--no-milp"], "--time-limit", "finite number of seconds <= 3600"),
    ("bench", ["--time-limit", "inf", "--no-milp"], "--time-limit", "finite number of seconds <= 3600"),
    ("plan", ["--time-limit", "inf"], "--time-limit", "finite number of seconds <= 3600"),
    ("plan", ["--time-limit", "3601"], "--time-limit", "finite number of seconds <= 3600"),
    ("bench", ["--time-limit", "nan"], "--time-limit", "must be > 0 seconds, got nan"),
])
def test_sp_options(cmd, extra, where, needle, sp_dir, tmp_path, one_error, host_16gib):
    argv = [cmd, "sp", "--seqlens", str(sp_dir / "lens.txt"), "--gpus", "4", "--global-batch", "8", "--steps", "1"]
    if cmd == "plan":
        argv += ["--out", str(tmp_path / "o.json")]
    t0 = time.perf_counter()
    rc = main(argv + extra)  # later options win: extra overrides the defaults above
    assert needle in one_error(rc, where)
    assert time.perf_counter() - t0 < 15 and list(tmp_path.iterdir()) == []


def test_sp_limits_are_documented_constants(sp_dir):
    """The bounds the messages quote, and the bounds themselves pass the option check."""
    import numpy as np

    from adasched.planner.flexsp import batching, cli
    from adasched.planner.flexsp.api import check_planner_memory
    from adasched.planner.flexsp.costmodel import model_preset, sp_cost_model
    from adasched.planner.flexsp.planner import PlannerConfig
    from adasched.profiler.io import InputError
    from adasched.profiler.profile import load_profile

    assert (batching.MAX_GLOBAL_BATCH, batching.MAX_STEPS, batching.MAX_DRAWN, batching.MAX_CONTEXT) == (
        10 ** 6, 10 ** 5, 10 ** 7, 2 ** 40)
    assert cli.MAX_TIME_LIMIT_S == 3600.0
    cli.check_options(10 ** 6, 10, 3600.0, 2 ** 40)
    for bad in [(0, 1, 1.0, None), (1, 0, 1.0, None), (1, 1, 0.0, None), (1, 1, 1.0, 0)]:
        with pytest.raises(InputError):
            cli.check_options(*bad)
    # an ordinary batch (512 sequences on 64 GPUs) needs a few MB to plan: far below any host
    cm = sp_cost_model(load_profile("a100-64-flexsp-paper"), model_preset("gpt-7b"), 64)
    lens = np.random.default_rng(5).integers(64, 32768, size=512)
    check_planner_memory([lens], cm, PlannerConfig())


def test_lognormal_lengths_clipped_before_the_cast(capsys):
    """sigma 10 (the bound) draws lengths beyond int64: they are clipped to --max-context as floats (no cast
    warning), every length in [1, max_context]."""
    import numpy as np

    from adasched.planner.flexsp.cli import _lengths

    lens = _lengths("lognormal:1000,10", 65536)
    assert lens.dtype == np.int64 and lens.size == 100_000
    assert lens.min() >= 1 and lens.max() == 65536 and (lens == 65536).sum() > 100
    ref = np.maximum(1, np.rint(np.minimum(np.random.default_rng(0).lognormal(np.log(1000), 10, 100_000), 65536)))
    np.testing.assert_array_equal(lens, ref.astype(np.int64))
    assert capsys.readouterr().err == ""


# ---- SP plan files ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, needle", [
    ("world_size", 1e12, "world_size: Input should be less than or equal to 65536"),  # MemoryError after 40 s
    ("world_size", 6, "world_size: 6 is not a power of two"),
    ("max_context", -5, "max_context: Input should be greater than or equal to 1"),     # accepted
    ("max_context", 2 ** 41, "max_context: Input should be less than or equal to 1099511627776"),
    ("model", "", "model: String should have at least 1 character"),
    ("model", "../x y", "model: String should match pattern"),
    ("steps.0.seqlens.0", 0, "seqlens: length 0 is not positive"),
])
@pytest.mark.parametrize("cmd", ["show", "simulate"])
def test_sp_plan_contents(cmd, key, value, needle, sp_dir, tmp_path, one_error):
    d = json.loads((sp_dir / "sp.json").read_text())
    *path, last = key.split(".")
    cur = d
    for p in path:
        cur = cur[int(p)] if p.isdigit() else cur[p]
    cur[int(last) if last.isdigit() else last] = value
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    t0 = time.perf_counter()
    assert needle in one_error(main([cmd, str(p)]), str(p))
    assert time.perf_counter() - t0 < 10


def test_sp_plan_valid_loads(sp_dir, capsys):
    assert main(["simulate", str(sp_dir / "sp.json")]) in (0, None)
    assert capsys.readouterr().err == ""


# ---- train_moe --validate-only ----------------------------------------------------------------------------------

_MOE_SIZES = "--vocab/--hidden/--layers/--ffn/--experts/--cap-hi/--shared-experts/--seq"


@pytest.mark.parametrize("extra, where, needle", [
    (["--layers", "99999999999999999999"], "--layers", "must be <= 1024"),   # hung (> 60 s) building the schedule
    (["--experts", "1000000000"], _MOE_SIZES, "more than this host's 16.0 GiB"),  # passed validation
    (["--vocab", "1000000000"], _MOE_SIZES, "more than this host's 16.0 GiB"),
    (["--router", "switch", "--cap-hi", "99999999999"], _MOE_SIZES, "more than this host's 16.0 GiB"),
    # passed validation; training failed in the allocator
    (["--batch", "99999999999999999999"], "--batch/--seq", "of activations on 1 rank(s), more than this host's 16.0"),
    (["--cap-lo", "-1"], "--cap-lo", "must be >= 1"),                         # "error: bounds: ..." named no option
    (["--cap-lo", "0", "--cap-hi", "0", "--budget", "0"], "--cap-lo", "must be >= 1"),  # "top_k: 0 must be ..."
    (["--cap-lo", "3", "--cap-hi", "2"], "--cap-hi", "is below --cap-lo 3"),
    (["--budget", "99999999999999999999"], "--budget", "feasible totals are 4..16"),  # "budget: ..."
    (["--router", "switch", "--budget", "8"], "--budget", "feasible totals are 16..64"),
    # passed validation; every worker then failed on 1000 * seed ("Overflow when unpacking long long")
    (["--seed", "99999999999999999999"], "--seed", "must be in 0..1099511627776"),
    (["--seed", "-1"], "--seed", "must be in 0..1099511627776"),
])
def test_train_moe_validate_only(extra, where, needle, one_error, monkeypatch, host_16gib):
    from adasched.launch import train_moe

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    t0 = time.perf_counter()
    rc = train_moe.main(["--validate-only", *extra])
    assert needle in one_error(rc, where)
    assert time.perf_counter() - t0 < 10


def test_train_moe_valid_sizes_pass(capsys, monkeypatch, host_16gib):
    from adasched.launch import train_moe

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for extra in ([], ["--layers", "1024"], ["--router", "all", "--schedule", "all"], ["--cap-lo", "2"]):
        assert train_moe.main(["--validate-only", *extra]) == 0, capsys.readouterr().err
    assert capsys.readouterr().err == ""


# ---- schedules: norms and refined files -------------------------------------------------------------------------

def _norms(path: Path, n: int = 30, seed: int = 3) -> Path:
    rng = random.Random(seed)
    path.write_text("step,l2,l1\n" + "".join(f"{i},{rng.uniform(0.5, 3):.6f},{rng.uniform(5, 20):.6f}\n"
                                             for i in range(n)))
    return path


@pytest.mark.parametrize("text", ["   \n\n  \t\n", "\n"])
def test_refine_blank_norms_file(text, tmp_path, one_error):
    """A whitespace-only file was "no column 'l2' in header" (its blank first line read as a header)."""
    p = tmp_path / "n.csv"
    p.write_text(text)
    rc = main(["schedules", "refine", str(p), "--out", str(tmp_path / "o.json")])
    assert "file is empty" in one_error(rc, str(p))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["n.csv"]


@pytest.fixture
def refined(tmp_path, capsys) -> Path:
    out = tmp_path / "r.json"
    assert main(["schedules", "refine", str(_norms(tmp_path / "n.csv")), "--out", str(out), "--json"]) in (0, None)
    capsys.readouterr()
    return out


def _edit(d: dict, key: str) -> None:
    if key == "multipliers":
        d["multipliers"][5] *= 1.01
    elif key == "multipliers_len":
        d["multipliers"].append(0.0)
    elif key == "steps":
        d["steps"] += 1
    elif key == "smoothed_norms":
        d["smoothed_norms"][0] *= 2
    else:
        raise AssertionError(key)


@pytest.mark.parametrize("key, needle", [
    # the stored values were never read: training recomputed them from grad_norms, the file showed others
    ("multipliers", "multipliers.5: "),
    ("multipliers_len", "multipliers: 32 values, expected 31 for 30 grad_norms"),
    ("steps", "steps: 31 but the file has 30 grad_norms"),
    ("smoothed_norms", "smoothed_norms.0: "),
])
def test_refined_file_derived_values_checked(key, needle, refined, tmp_path, one_error):
    import torch

    from adasched.profiler.io import InputError
    from adasched.schedules.lr import Refined

    d = json.loads(refined.read_text())
    _edit(d, key)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    png = tmp_path / "p.png"
    assert needle in one_error(main(["schedules", "plot", str(bad), "--out", str(png)]), str(bad))
    assert not png.exists()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(InputError, match="^" + str(bad).replace(".", r"\.") + ": " + needle.split(":")[0]):
        Refined.from_file(opt, bad)


def test_refined_file_unedited_loads(refined, tmp_path, capsys):
    """The file refine wrote passes the check, and its stored multipliers are the schedule trained."""
    import numpy as np
    import torch

    from adasched.schedules.lr import Refined

    d = json.loads(refined.read_text())
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.5)
    sched = Refined.from_file(opt, refined)
    np.testing.assert_allclose([sched.lr_at(t)[0] / 0.5 for t in range(d["steps"] + 1)], d["multipliers"],
                               rtol=1e-12, atol=1e-15)
    assert main(["schedules", "plot", str(refined), "--out", str(tmp_path / "p.png")]) in (0, None)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("cmd", [["plan", "lora", "--jobs"], ["plan", "moe", "--gpus", "8", "--config"]])
def test_deeply_nested_yaml_is_one_line(cmd, tmp_path, one_error):
    """Hunt finding: ~1000 nested brackets in a YAML jobs/config file raised a RecursionError traceback (exit 1);
    the JSON reader already refused such nesting with one line."""
    depth = random.randint(1000, 3000)
    path = tmp_path / "deep.yaml"
    path.write_text("jobs: " + "[" * depth + "]" * depth + "\n")
    line = one_error(main([*cmd, str(path), "--out", str(tmp_path / "p.json")]), str(path))
    assert "malformed YAML: nesting too deep" in line and not (tmp_path / "p.json").exists()
