"""Bad input to the user-facing commands: one line `error: <where>: <what>`, exit status 2, no traceback, nothing
written. Regression tests for the defects a sweep of every command and option found (each failed before its fix:
a note line before the error, a traceback, a hang, thousands of processes, or an output written before a later
output failed)."""
from __future__ import annotations

import importlib
import json
import os
import stat
import time
from pathlib import Path

import pytest

from adasched.planner.cli import main


def _exit_code(fn, argv) -> int:
    """A launcher's main: its return value, or argparse's exit status (its own one-line error)."""
    try:
        return fn(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder nothing can be created in: a read-only folder for a normal user; root ignores permissions, so
    /proc (a pseudo file system) there."""
    if os.geteuid() == 0:
        assert Path("/proc").is_dir()
        return Path("/proc")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return d


@pytest.fixture
def no_gpu(monkeypatch):
    """The CPU path of `adasched profile` on any machine (its checks differ with GPUs)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """A small SP plan and a LoRA plan written by the CLI, and a profile JSON."""
    d = tmp_path_factory.mktemp("plans")
    (d / "lens.txt").write_text("\n".join(str(n) for n in (812, 97, 2048, 333, 1500, 64, 700, 4000)) + "\n")
    assert main(["plan", "sp", "--seqlens", str(d / "lens.txt"), "--gpus", "4", "--global-batch", "8",
                 "--no-milp", "--out", str(d / "sp.json")]) == 0
    assert main(["plan", "lora", "--jobs", "tiny", "--no-milp", "--out", str(d / "lora.json")]) == 0
    from adasched.profiler.profile import load_profile

    (d / "profile.json").write_text(load_profile("h100-sxm").model_dump_json())
    return d


# ---- adasched profile ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, where, needle", [
    # the "no NVIDIA GPU ... describing the CPU host" note came first (two lines)
    (["--nproc", "1"], "--nproc", "collectives need >= 2 processes"),
    # 1024 worker processes were spawned on a 2-core machine
    (["--nproc", "1024"], "--nproc", "too many for this host"),
    (["--nproc", str(2 ** 40)], "--nproc", "too many for this host"),
    # accepted and ignored (and --nproc 99999999999999999999 ran the whole microbenchmark)
    (["--nproc", "4", "--no-collectives"], "--nproc", "no effect with --no-collectives"),
    (["--name", " ", "--no-collectives"], "--name", "is empty"),
])
def test_profile_refuses_before_measuring(args, where, needle, tmp_path, one_error, no_gpu):
    out = tmp_path / "p.json"
    t0 = time.perf_counter()
    rc = main(["profile", "--quick", "--out", str(out), *args])
    assert needle in one_error(rc, where)
    assert time.perf_counter() - t0 < 20 and not out.exists()


def test_profile_nproc_under_torchrun_is_refused(tmp_path, one_error, monkeypatch, no_gpu):
    """Under torchrun the world is torchrun's: --nproc was silently ignored."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    rc = main(["profile", "--quick", "--nproc", "4", "--out", str(tmp_path / "p.json")])
    assert "no effect under torchrun" in one_error(rc, "--nproc")
    assert list(tmp_path.iterdir()) == []


def test_profile_unwritable_out_fails_before_measuring(unwritable, tmp_path, one_error, no_gpu):
    """--out in /proc measured for minutes, then failed on the write."""
    t0 = time.perf_counter()
    rc = main(["profile", "--quick", "--no-collectives", "--out", str(unwritable / "nope" / "p.json")])
    assert "cannot write in" in one_error(rc, "--out")
    assert time.perf_counter() - t0 < 20


def test_gpu_inventory_note_says_only_what_nvml_found(monkeypatch, capsys):
    """gpu_inventory (NVML only) said 'describing the CPU host instead', which it does not do (inventory() may
    describe GPUs from torch.cuda)."""
    import sys

    from adasched.profiler import inventory as inv

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    assert inv.gpu_inventory() is None
    err = capsys.readouterr().err
    assert err == "NVML describes no NVIDIA GPU (nvidia-ml-py is not installed)\n"
    assert inv.gpu_inventory(verbose=False) is None and capsys.readouterr().err == ""


# ---- outputs are checked before any is written ------------------------------------------------------------------

def test_check_output_path_probes_the_folder(unwritable, tmp_path):
    from adasched.profiler.io import InputError, check_output_path, check_output_folder

    with pytest.raises(InputError, match=r"^--out: .*cannot write in"):
        check_output_path(unwritable / "a" / "b.json", "--out")
    with pytest.raises(InputError, match=r"^--dir: .*cannot write in"):
        check_output_folder(unwritable / "runs", "--dir")
    with pytest.raises(InputError, match=r"^--dir: is empty"):
        check_output_folder("", "--dir")
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match=r"exists and is not a folder"):
        check_output_folder(tmp_path / "f", "--dir")
    with pytest.raises(InputError, match=r"is not a directory"):
        check_output_folder(tmp_path / "f" / "sub", "--dir")
    check_output_path(tmp_path / "new" / "x.json", "--out")  # a missing folder is fine: the writer makes it
    check_output_folder(tmp_path / "new" / "runs", "--dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the probes left nothing behind


@pytest.mark.parametrize("cmd, where, written", [
    # the plan (or schedule) was written, then the --plot in /proc failed: exit 2 with an output on disk
    (["plan", "lora", "--jobs", "tiny", "--no-milp", "--out", "{tmp}/o.json", "--plot", "{ro}/x/o.png"], "--plot",
     "o.json"),
    (["schedules", "refine", "{tmp}/norms.csv", "--out", "{tmp}/o.json", "--plot", "{ro}/x/o.png"], "--plot",
     "o.json"),
    (["schedules", "plot", "linear", "--out", "{ro}/x/o.png"], "--out", None),
])
def test_no_output_when_a_later_output_cannot_be_written(cmd, where, written, unwritable, tmp_path, one_error):
    rng = __import__("random").Random(7)
    (tmp_path / "norms.csv").write_text("step,l2,l1\n" + "".join(
        f"{i},{rng.uniform(0.5, 3):.6f},{rng.uniform(5, 20):.6f}\n" for i in range(40)))
    argv = [a.format(tmp=tmp_path, ro=unwritable) for a in cmd]
    rc = main(argv)
    assert "cannot write in" in one_error(rc, where)
    if written:
        assert not (tmp_path / written).exists()


# ---- planner and schedule options -------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, where, needle", [
    # inf was accepted and the plan recorded no time limit (null)
    (["plan", "lora", "--jobs", "tiny", "--time-limit", "inf"], "--time-limit", "finite number of seconds <= 3600"),
    (["plan", "lora", "--jobs", "tiny", "--time-limit", "1e308"], "--time-limit", "finite number of seconds <= 3600"),
    (["bench", "lora", "--jobs", "tiny", "--time-limit", "nan"], "--time-limit", "must be > 0 seconds, got nan"),
    # '' became Path('.'): "error: .: is a directory"
    (["plan", "lora", "--jobs", ""], "--jobs", "is empty"),
    # a LoRA plan given as the jobs file: "job 'tiny-a': lengths: Field required"
    (["plan", "lora", "--jobs", "{plans}/lora.json"], "{plans}/lora.json", "not a jobs file"),
    # OverflowError traceback
    (["bench", "schedules", "--quick", "--seeds", "99999999999999999999"], "--seeds", "[1, 1000]"),
    # allocated a 10**9-step curve per schedule (minutes, GBs)
    (["schedules", "plot", "linear", "--steps", "1000000000"], "--steps", "[1, 10,000,000]"),
    # 'phi: must be ...' named no argument
    (["schedules", "plot", "cosine", "uba:-1"], "schedule 'uba:-1'", "phi"),
    (["schedules", "plot", "uba:abc"], "schedule 'uba:abc'", "bad phi"),
    # a cluster profile "is an unknown plan kind 'cluster_profile'"
    (["simulate", "{plans}/profile.json"], "{plans}/profile.json", "is a cluster profile"),
])
def test_planner_and_schedule_options(argv, where, needle, plans, tmp_path, one_error):
    argv = [a.format(plans=plans) for a in argv]
    if argv[0] in ("plan", "schedules") and argv[1] in ("lora", "plot"):
        argv += ["--out", str(tmp_path / ("o.png" if argv[1] == "plot" else "o.json"))]
    importlib.import_module("adasched.schedules")  # torch's first import (13 s cold under load) off the clock
    t0 = time.perf_counter()
    rc = main(argv)
    assert needle in one_error(rc, where.format(plans=plans))
    assert time.perf_counter() - t0 < 20 and list(tmp_path.iterdir()) == []


# ---- launchers --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, where, needle", [
    # NaN passed `timeout <= 0`; inf overflowed torch's timedelta at init
    (["--timeout", "nan"], "--timeout", "must be > 0 seconds, got nan"),
    (["--timeout", "inf"], "--timeout", "finite number of seconds"),
    # --layers 10**23 was accepted by --check-plan-only (a hang building it); large sizes were allocator tracebacks
    (["--layers", "99999999999999999999999"], "--layers", "<= 1024"),
    (["--heads", "1048576"], "--layers/--heads/--head-dim/--max-len", "more than this host"),
    (["--head-dim", "99999999999999999999999"], "--layers/--heads/--head-dim/--max-len", "more than this host"),
    (["--max-len", "99999999999999999999999"], "--layers/--heads/--head-dim/--max-len", "more than this host"),
    # a cluster profile as --plan: "is a 'cluster_profile' plan"
    (["--plan", "{plans}/profile.json"], "{plans}/profile.json",
     "is a cluster profile (adasched profile; `adasched show` reads it), not a plan of kind 'sp'"),
])
def test_train_sp_options(extra, where, needle, plans, one_error):
    from adasched.launch import train_sp

    argv = ["--plan", str(plans / "sp.json"), "--check-plan-only", "--world", "4", "--backend", "gloo"]
    rc = _exit_code(train_sp.main, argv + [a.format(plans=plans) for a in extra])
    assert needle in one_error(rc, where.format(plans=plans))


def test_train_sp_valid_model_passes(plans, capsys):
    from adasched.launch import train_sp

    rc = train_sp.main(["--plan", str(plans / "sp.json"), "--check-plan-only", "--world", "4", "--backend",
                        "gloo", "--heads", "8", "--head-dim", "16", "--layers", "4"])
    cap = capsys.readouterr()
    assert rc == 0 and cap.err == "" and "fit world size 4" in cap.out


@pytest.mark.parametrize("extra, where, needle", [
    (["--out", "{ro}/x/runs"], "--out", "cannot write in"),      # --check said ok; the run failed on the write
    (["--out", ""], "argument --out", "empty folder name"),       # '' was the current folder
    (["--timeout", "nan"], "--timeout", "must be > 0 seconds, got nan"),
    (["--timeout", "inf"], "--timeout", "finite number of seconds"),     # accepted; overflows torch's timedelta
    (["--time-limit", "inf"], "--time-limit", "finite number of seconds"),
    # tracebacks from the allocator / torch (Overflow when unpacking long long) and a hang for --layers
    (["--vocab", "1000000000"], "--vocab/--hidden/--layers/--ffn/--max-positions", "more than this host"),
    (["--ffn", "99999999999999999999999"], "--vocab/--hidden/--layers/--ffn/--max-positions", "more than this host"),
    (["--max-positions", "99999999999999999999999"], "--vocab/--hidden/--layers/--ffn/--max-positions",
     "more than this host"),
    (["--layers", "99999999999999999999999"], "--layers", "<= 1024"),
    (["--plan", "{plans}/profile.json"], "{plans}/profile.json", "not a plan of kind 'lora'"),
])
def test_train_lora_check(extra, where, needle, plans, unwritable, tmp_path, one_error):
    from adasched.launch import train_lora

    argv = ["--check", "--world", "1", "--out", str(tmp_path / "runs")]
    t0 = time.perf_counter()
    rc = _exit_code(train_lora.main, argv + [a.format(plans=plans, ro=unwritable) for a in extra])
    assert needle in one_error(rc, where.format(plans=plans))
    assert time.perf_counter() - t0 < 20 and list(tmp_path.iterdir()) == []


def test_train_lora_check_valid(plans, tmp_path, capsys):
    from adasched.launch import train_lora

    rc = train_lora.main(["--check", "--world", "2", "--out", str(tmp_path / "runs"), "--plan",
                          str(plans / "lora.json")])
    cap = capsys.readouterr()
    assert rc == 0 and cap.err == "" and "nothing written" in cap.out and list(tmp_path.iterdir()) == []


def test_profile_collectives_check_unwritable(unwritable, one_error):
    """launch/profile_collectives.sh runs --check first: it passed /proc/... and torchrun then measured."""
    from adasched.launch import profile_collectives

    rc = profile_collectives.main(["--check", "--out", str(unwritable / "x" / "p.json")])
    assert "cannot write in" in one_error(rc, "--out")
    rc = _exit_code(profile_collectives.main, ["--check", "--out", "/tmp/p.json", "--name", ""])
    assert "empty profile name" in one_error(rc, "argument --name")


def test_launcher_limits_are_documented_constants():
    from adasched.launch.cli_args import MAX_LAYERS
    from adasched.profiler.io import MAX_TIMEOUT_S, check_seconds
    from adasched.profiler.io import InputError

    assert MAX_LAYERS == 1024 and MAX_TIMEOUT_S == 7 * 24 * 3600
    check_seconds("--timeout", MAX_TIMEOUT_S)  # the bound itself is accepted
    for bad in (0.0, -1.0, float("nan"), float("inf"), MAX_TIMEOUT_S * 1.0001):
        with pytest.raises(InputError, match="^--timeout: "):
            check_seconds("--timeout", bad)


# ---- jobs files, LoRA plans and profiles: contents -------------------------------------------------------------

def _jobs(**edit) -> dict:
    job = {"name": "a", "adapter": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj"]},
           "lengths": {"dist": "lognormal", "median": 64, "sigma": 0.5, "min": 4, "max": 512},
           "global_batch_size": 4, "lr": 1e-3}
    d = {"capacity": 1024, "stages": 2, "global_batches": 2, "seed": 0, "layers": 2, "jobs": [job]}
    for k, v in edit.items():
        *path, last = k.split("__")
        cur = d
        for p in path:
            cur = cur[int(p)] if p.isdigit() else cur[p]
        cur[last] = v
    return d


@pytest.mark.parametrize("edit, needle", [
    ({"stages": 10 ** 9}, "stages: Input should be less than or equal to 64"),       # hung the simulator
    ({"global_batches": 10 ** 9}, "more than 1,000,000 per plan"),                    # MemoryError traceback
    ({"jobs__0__global_batch_size": 10 ** 9}, "more than 1,000,000 per plan"),
    ({"seed": -1}, "seed: Input should be greater than or equal to 0"),               # "error: expected non-negative
    ({"jobs__0__lr": float("inf")}, "lr: Input should be a finite number"),            # integer" (numpy, no file)
    ({"jobs__0__adapter__alpha": float("inf")}, "alpha: Input should be a finite number"),
    ({"jobs__0__lengths__median": float("inf")}, "median: Input should be a finite number"),
    ({"jobs__0__name": ".."}, "names a folder"),                                      # adapters saved to OUT/../
    ({"jobs__0__lengths": "lens_dir"}, "is a directory or not a regular file"),       # "[Errno 21] Is a directory"
])
def test_jobs_file_contents(edit, needle, tmp_path, one_error):
    (tmp_path / "lens_dir").mkdir()
    p = tmp_path / "jobs.json"
    p.write_text(json.dumps(_jobs(**edit)))  # json writes inf as Infinity, which Python's reader takes
    t0 = time.perf_counter()
    rc = main(["plan", "lora", "--jobs", str(p), "--no-milp", "--out", str(tmp_path / "o.json")])
    assert needle in one_error(rc, str(p))
    assert time.perf_counter() - t0 < 20 and not (tmp_path / "o.json").exists()


def _edit_lora(d, key, value):
    *path, last = key.split("__")
    cur = d
    for p in path:
        cur = cur[int(p)] if p.isdigit() else cur[p]
    cur[last] = value


@pytest.mark.parametrize("key, value, needle", [
    ("stage_cost", {}, "stage_cost: keys [] are not StageCost's terms"),  # show --plot: TypeError traceback
    ("stage_cost__attn_b_ms", -2.5, "stage_cost.attn_b_ms: -2.5 is not a finite number >= 0"),
    ("stage_cost__attn_b_ms", float("nan"), "stage_cost.attn_b_ms: nan is not a finite number >= 0"),
    ("groups", [[0], [5]], "groups: [[0], [5]] must hold every job index"),       # IndexError traceback in show
    ("groups", [[0, 0]], "must hold every job index"),
    ("jobs__1__name", "tiny-a", "name 'tiny-a' used twice"),                      # one adapter folder for two jobs
    ("jobs__0__name", "../x", "String should match pattern"),                    # adapter written outside OUT
    ("jobs__0__lr", float("nan"), "lr: Input should be a finite number"),  # train_lora: 'jobs.0.lr' without file
    ("stages", 0, "stages: Input should be greater than or equal to 1"),
    ("layers", 0, "layers: Input should be greater than or equal to 1"),
])
def test_lora_plan_contents(key, value, needle, plans, tmp_path, one_error):
    from adasched.launch import train_lora

    d = json.loads((plans / "lora.json").read_text())
    _edit_lora(d, key, value)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    png = tmp_path / "g.png"
    assert needle in one_error(main(["show", str(p), "--plot", str(png)]), str(p))
    rc = _exit_code(train_lora.main, ["--check", "--world", "2", "--out", str(tmp_path / "runs"), "--plan", str(p)])
    assert needle in one_error(rc, str(p))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.json"]


@pytest.mark.parametrize("key, value, where, needle", [
    ("created", "yesterday", "created", "'yesterday' is not an ISO 8601 time"),
    ("name", "", "name", "at least 1 character"),
    # a model-level check read "<root>: Value error, collectives: ..."
    ("gpus_per_node", 3, "collectives", "fitted on group size"),
])
def test_profile_contents(key, value, where, needle, plans, tmp_path, one_error):
    d = json.loads((plans / "profile.json").read_text())
    d[key] = value
    p = tmp_path / "p.json"
    p.write_text(json.dumps(d))
    err = one_error(main(["show", str(p)]), f"{p}: {where}")
    assert needle in err and "<root>" not in err and "Value error" not in err


# ---- conflicting options (one was silently ignored) -----------------------------------------------------------

def test_conflicting_options(plans, tmp_path, one_error):
    from adasched.launch import train_lora, train_sp

    rc = _exit_code(train_lora.main, ["--check", "--world", "2", "--out", str(tmp_path / "r"),
                                      "--plan", str(plans / "lora.json"), "--jobs", "mix"])
    assert "not with --plan" in one_error(rc, "argument --jobs")
    rc = _exit_code(train_sp.main, ["--plan", str(plans / "sp.json"), "--world", "4"])
    assert "only with --check-plan-only" in one_error(rc, "--world")
    for opt, value in (("--norm", "l1"), ("--smoothing", "0.2")):
        rc = main(["schedules", "plot", "linear", "cosine", opt, value, "--out", str(tmp_path / "p.png")])
        assert "none is given" in one_error(rc, opt)
    assert list(tmp_path.iterdir()) == []


def test_bench_kernels_only_runs_each_group_once(monkeypatch, capsys):
    """`--only lora,lora` ran (and printed) every LoRA case twice."""
    from adasched.kernels import bench

    seen = []
    monkeypatch.setattr(bench, "prepare_device", lambda dev: None)
    monkeypatch.setattr(bench, "environment", lambda dev: {"device_name": "cpu", "torch": "-", "triton": "-"})
    monkeypatch.setattr(bench, "run_benchmarks", lambda groups, quick, device: seen.append(groups) or
                        {"results": [], "skipped": []})
    assert main(["bench", "kernels", "--only", "lora, lora,moe,lora", "--device", "cpu", "--json"]) == 0
    assert seen == [["lora", "moe"]] and capsys.readouterr().err == ""
