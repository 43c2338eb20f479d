"""`python -m adasched.launch.demo [STEP ...]`: unknown steps are an error, not a silent no-op."""
import pytest

from adasched.launch.demo import STEPS, main


def test_unknown_step_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["lorra"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: step 'lorra': unknown (steps: ") and err.count("\n") == 1
    assert all(name in err for name, _ in STEPS)
    assert not (tmp_path / "demo-out").exists()


def test_help_lists_the_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--help"]) == 0
    assert "steps: " + " ".join(name for name, _ in STEPS) in capsys.readouterr().out
    assert not (tmp_path / "demo-out").exists()


def test_twill_demo_fails_when_its_schedule_fails_the_validator(tmp_path, monkeypatch, capsys):
    """Hunt finding: demo_twill printed the validator's errors and passed."""
    import adasched.planner.twill.plan as twill_plan
    import adasched.planner.twill.validator as validator
    from adasched.launch import demo_twill
    from adasched.planner.solver import SolveParams

    plan = twill_plan.plan_twill("fa3-hopper", "h100", SolveParams(time_limit=10.0, seed=0, threads=1))
    monkeypatch.setattr(twill_plan, "plan_twill", lambda *a, **k: plan)  # (it validates its own schedule)
    monkeypatch.setattr(validator, "validate", lambda *a, **k: ["op S0: issued before its input LK is ready"])
    with pytest.raises(RuntimeError, match="fails its validator: op S0: issued before its input LK is ready"):
        demo_twill.run(tmp_path)
    assert not (tmp_path / "twill-fa3.json").exists()


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    """Demo check: Ctrl-C was a 26-62 line traceback, or - when the step's command had caught it and returned 130
    ("aborted") - "failed with exit status 130" and exit 1. Both are "aborted (demo step NAME)" and 130 now."""
    import adasched.launch.demo_profile as demo_profile
    import adasched.planner.cli as cli

    monkeypatch.chdir(tmp_path)

    def interrupted(argv):  # the CLI caught the Ctrl-C: "aborted" and 130
        return 130
    monkeypatch.setattr(cli, "main", interrupted)
    assert main(["profile"]) == 130
    err = capsys.readouterr().err
    assert err == "aborted (demo step profile)\n", err

    def raises(out):
        raise KeyboardInterrupt
    monkeypatch.setattr(demo_profile, "run", raises)
    assert main(["profile", "twill"]) == 130
    out = capsys.readouterr()
    assert out.err == "aborted (demo step profile)\n" and "demo step: twill" not in out.out


def test_ctrl_c_in_a_steps_cli_command_is_one_line(tmp_path, monkeypatch, capsys):
    """35th session's hunt: a Ctrl-C inside a step's in-process CLI command printed the CLI's `aborted`, then the
    demo's `aborted (demo step profile)`. The demo's line alone now; the CLI outside the demo still says `aborted`."""
    import adasched.planner.cli as cli

    monkeypatch.chdir(tmp_path)

    def interrupted(argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_main", interrupted)
    assert main(["profile"]) == 130
    assert capsys.readouterr().err == "aborted (demo step profile)\n"
    assert cli.main(["show", "h100-sxm"]) == 130
    assert capsys.readouterr().err == "aborted\n"


def test_check_step():
    from adasched.launch.demo import check_step

    check_step(0, "unused")
    with pytest.raises(KeyboardInterrupt):
        check_step(130, "unused")
    with pytest.raises(SystemExit, match="^demo x: failed with exit status 2$"):
        check_step(2, "demo x: failed with exit status 2")


@pytest.mark.parametrize("module", [m.rsplit(".", 1)[1] for _, m in STEPS])
def test_a_step_module_run_alone_is_the_demo_with_that_step(tmp_path, module):
    """31st session's packaging hunt: `python -m adasched.launch.demo_profile --help` profiled the machine into a
    folder named --help (the first argument was the output folder); demo_sp --help planned, then failed. (35th:
    demo_twill, demo_moe and demo_lora had no entry: run alone they did nothing, exit 0, whatever the argument.)"""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", f"adasched.launch.{module}", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m adasched.launch.demo [STEP ...]"), r.stderr
    r = subprocess.run([sys.executable, "-m", f"adasched.launch.{module}", "elsewhere"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: step 'elsewhere': unknown"), r.stderr
    assert list(tmp_path.iterdir()) == []
