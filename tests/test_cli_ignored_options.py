"""CLI options that were accepted and then did nothing (now one ``error:`` line naming the option, exit 2), output
paths checked before any work (kernel_report / gemm_check --json: a traceback after minutes of compiling), and
the small consistency fixes (plan lora --seed, randgraph's messages, train_lora.sh's interpreter). Every case
here fails before any planning, compiling or training: the whole file runs in a few seconds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def under_a_file(tmp_path) -> Path:
    """A path whose parent is a regular file: no writer can create it."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder\n")
    return blocker / "out.json"


# ---- A: --json checked before the work, written atomically ---------------------------------------------------------

def test_kernel_report_bad_json_path_before_any_compile(under_a_file, one_error, monkeypatch):
    from adasched.kernels import aot
    from adasched.launch import kernel_report

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    compiled = []
    monkeypatch.setattr(aot, "kernel_cases", lambda only, arch: compiled.append(only) or [])
    rc = kernel_report.main(["--only", "gemm", "--json", str(under_a_file)])
    one_error(rc, "--json")
    assert compiled == [] and not under_a_file.parent.is_dir()


def test_kernel_report_writes_its_rows_atomically(tmp_path, capsys, monkeypatch):
    from adasched.kernels import aot
    from adasched.launch import kernel_report

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = ("gemm", "GEMM fake s3 w4", object(), {}, {}, {"num_warps": 4}, ())
    rep = {"arch": 90, "regs": 123, "spill_bytes": 0, "shared_bytes": 4096, "stages": 3, "mma": "wgmma",
           "warnings": ["C7515"], "wgmma_serialized": False}
    monkeypatch.setattr(aot, "kernel_cases", lambda only, arch: [case] if only == ["gemm"] else [])
    monkeypatch.setattr(aot, "compile_report", lambda *a, **k: dict(rep))
    out = tmp_path / "new" / "report.json"
    assert kernel_report.main(["--only", "gemm", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == [{"group": "gemm", "kernel": "GEMM fake s3 w4", **rep, "error": ""}]
    assert [p.name for p in out.parent.iterdir()] == ["report.json"]  # no temp file left beside it
    assert "GEMM fake s3 w4" in capsys.readouterr().out


def test_kernel_report_bad_option_is_one_line_with_its_module_name(capsys):
    from adasched.launch import kernel_report

    with pytest.raises(SystemExit) as exc:
        kernel_report.main(["--arch", "75"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("error: argument --arch"), err
    assert "(see python -m adasched.launch.kernel_report --help)" in err


def test_gemm_check_bad_json_path_before_the_sweep(under_a_file, one_error, monkeypatch):
    from adasched.launch import gemm_check

    ran = []
    monkeypatch.setattr(gemm_check, "plan_vs_sweep", lambda *a, **k: ran.append(1) or [])
    rc = gemm_check.main(["--quick", "--device", "cpu", "--json", str(under_a_file)])
    one_error(rc, "--json")
    assert ran == []  # refused before the sweep (a wall-clock bound would only measure this host's load)


def test_gemm_check_writes_its_rows_atomically(tmp_path, capsys, monkeypatch):
    from adasched.launch import gemm_check

    row = {"shape": "64x48x80", "tile": "64x32x32", "plan_config": "s3 w4", "plan_tflops": 0.012,
           "best_config": "s2 w4", "best_tflops": 0.013, "plan_over_best": 0.923, "plan_over_best_confirmed": 0.95,
           "within_tolerance": False, "time_to_config_plan_s": 0.5, "time_to_config_sweep_s": 4.25, "n_sweep": 8,
           "machine": "h100"}
    monkeypatch.setattr(gemm_check, "plan_vs_sweep", lambda dev, quick, log: [dict(row)] if quick else [])
    out = tmp_path / "rows.json"
    out.write_text("old contents\n")
    assert gemm_check.main(["--quick", "--device", "cpu", "--json", str(out)]) == 0  # CPU: never a failure
    assert json.loads(out.read_text()) == [row]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]
    assert "twill plan vs sweep" in capsys.readouterr().out


def test_gemm_check_bad_device_is_one_line(one_error):
    from adasched.launch import gemm_check

    one_error(gemm_check.main(["--device", "tpu"]), "--device")


# ---- B: options that did nothing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, where", [
    (["bench", "kernels", "--host-calls", "--only", "moe"], "--only"),
    (["bench", "kernels", "--host-calls", "--only", "lora,gemm"], "--only"),
    (["bench", "kernels", "--host-calls", "--checks"], "--checks"),
    (["bench", "kernels", "--host-calls", "--quick", "--only", "lora"], "--quick"),
    (["bench", "moe", "--quick"], "--quick"),
    (["bench", "moe", "--quick", "--json"], "--quick"),
    (["plan", "lora", "--jobs", "tiny", "--out", "{tmp}/p.json", "--seed", "-1"], "--seed"),
])
def test_adasched_refuses_an_option_that_does_nothing(argv, where, one_error, tmp_path):
    from adasched.planner.cli import main

    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    line = one_error(main(argv), where)  # exit 2 and one line naming the option, before any work
    if where == "--seed":
        assert "must be >= 0, got -1" in line and not (tmp_path / "p.json").exists()
    else:
        assert "--host-calls" in line or "--measure or --schedules" in line


@pytest.fixture
def one_rank(monkeypatch):
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("extra, where, needs", [
    (["--plan-config", "mixtral-8x7b-L1024"], "--plan-config", "without --plan"),
    (["--quick"], "--quick", "without --compare-schedules"),
    (["--gpus-per-node", "4"], "--gpus-per-node", "without --hierarchical"),
    (["--gpus-per-node", "2"], "--gpus-per-node", "without --hierarchical"),   # the old default, said explicitly
    (["--compare-schedules", "--plan-config", "x"], "--plan-config", "without --plan"),
])
def test_train_moe_refuses_unused_options(extra, where, needs, one_error, one_rank):
    from adasched.launch import train_moe

    assert needs in one_error(train_moe.main(["--validate-only", *extra]), where)


@pytest.mark.parametrize("extra, where, needs", [
    # a --plan sets them per layer: an explicit value was dropped without a word
    (["--plan", "p.json", "--r-fwd", "3"], "--r-fwd", "not with --plan"),
    (["--plan", "p.json", "--r-bwd", "2"], "--r-bwd", "not with --plan"),      # even the old default, said explicitly
    (["--plan", "p.json", "--wgrad", "deferred"], "--wgrad", "not with --plan"),
    # --compare-schedules trains its own models: every training option was accepted and ignored
    (["--compare-schedules", "--quick", "--steps", "5"], "--steps", "not used by --compare-schedules"),
    (["--compare-schedules", "--layers", "2"], "--layers", "not used by --compare-schedules"),
    (["--compare-schedules", "--seed", "3"], "--seed", "not used by --compare-schedules"),
    (["--compare-schedules", "--router", "switch"], "--router", "not used by --compare-schedules"),
    (["--compare-schedules", "--hidden", "16"], "--hidden", "not used by --compare-schedules"),
    (["--compare-schedules", "--cap-lo", "2"], "--cap-lo", "not used by --compare-schedules"),
])
def test_train_moe_refuses_options_a_plan_or_the_comparison_ignores(extra, where, needs, one_error, one_rank,
                                                                      tmp_path, monkeypatch):
    from adasched.launch import train_moe

    monkeypatch.chdir(tmp_path)  # refused before the plan is read: it need not exist
    assert needs in one_error(train_moe.main(["--validate-only", *extra]), where)


def test_train_moe_compare_schedules_validate_only_trains_nothing(one_rank, capsys, monkeypatch):
    """--validate-only --compare-schedules ran the whole comparison (minutes of training)."""
    from adasched.launch import train_moe

    monkeypatch.setattr(train_moe, "compare_schedules", lambda **kw: pytest.fail("trained"))
    assert train_moe.main(["--validate-only", "--compare-schedules", "--quick", "--json"]) == 0
    assert capsys.readouterr().out == ""
    args = train_moe.parse_args([])
    assert (args.r_fwd, args.r_bwd, args.wgrad) == (2, 2, "fused")        # the defaults without --plan


def test_train_moe_gpus_per_node_default_unchanged(capsys, one_rank):
    from adasched.launch import train_moe

    assert train_moe.parse_args([]).gpus_per_node == 2
    assert train_moe.parse_args(["--hierarchical"]).gpus_per_node == 2
    assert train_moe.parse_args(["--hierarchical", "--gpus-per-node", "4"]).gpus_per_node == 4
    assert train_moe.main(["--validate-only"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().err == ""
    # on one rank the EP group is 1 rank: --hierarchical would exchange nothing and is refused (26th session)
    for extra in (["--hierarchical"], ["--hierarchical", "--gpus-per-node", "1"]):
        assert train_moe.main(["--validate-only", *extra]) == 2
        assert capsys.readouterr().err.startswith("error: --hierarchical: has no effect with an expert-parallel "
                                                  "group of 1 rank")


def test_train_lora_refuses_planning_options_with_a_plan(tmp_path, one_error, one_rank):
    from adasched.launch import train_lora

    plan = tmp_path / "plan.json"  # refused before the plan is read: it need not exist
    for opt, value in (("--profile", "h100-sxm"), ("--time-limit", "0.2")):
        rc = train_lora.main(["--plan", str(plan), opt, value, "--out", str(tmp_path / "o"), "--check"])
        assert "has no effect with --plan" in one_error(rc, opt)
    assert not (tmp_path / "o").exists()


def test_train_lora_planning_defaults_unchanged(tmp_path, capsys, one_rank):
    from adasched.launch import train_lora

    args = train_lora.parse_args(["--out", str(tmp_path / "o")])
    assert (args.profile, args.time_limit) == ("h100-sxm", 0.2)
    args = train_lora.parse_args(["--out", str(tmp_path / "o"), "--profile", "a100-64-flexsp-paper",
                                  "--time-limit", "0.1"])
    assert (args.profile, args.time_limit) == ("a100-64-flexsp-paper", 0.1)
    # planning --jobs with them stays allowed (--check plans the tiny preset and writes nothing)
    assert train_lora.main(["--out", str(tmp_path / "o"), "--check", "--time-limit", "0.1",
                            "--profile", "h100-sxm"]) == 0, capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---- C/D: messages and launch scripts -------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, line", [
    (["--ops", "0"], "error: --ops: must be >= 2, got 0\n"),
    (["--ops", "1", "--scale", "0"], "error: --ops: must be >= 2, got 1\n"),
    (["--scale", "0"], "error: --scale: must be >= 1, got 0\n"),
])
def test_randgraph_names_the_option(argv, line, capsys):
    from adasched.planner.twill.randgraph import main

    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.err == line and cap.out == ""


def test_random_graph_one_condition_per_message():
    from adasched.planner.twill.randgraph import random_graph

    with pytest.raises(ValueError, match=r"^n_ops must be >= 2 \(got 1\)$"):
        random_graph(1, 0)
    with pytest.raises(ValueError, match=r"^scale must be >= 1 \(got 0\)$"):
        random_graph(10, 0, scale=0)


def test_launch_scripts_default_to_python3():
    scripts = sorted((ROOT / "launch").glob("*.sh"))
    uses = {s.name: s.read_text() for s in scripts if "${PYTHON:-" in s.read_text()}
    assert "train_lora.sh" in uses and len(uses) >= 3
    for name, text in uses.items():
        assert "${PYTHON:-python}" not in text and "${PYTHON:-python3}" in text, name
