"""32nd session's launch-layer hunt: a RANK (or WORLD_SIZE) left in the caller's shell made the train_*.sh and
profile_collectives.sh pre-checks a non-zero rank, which prints no error line (exit 2, nothing said) - and
train_sp.sh refused a good plan ('RANK=1 WORLD_SIZE=1: rank must lie in [0, world size)'); a non-integer
LOCAL_WORLD_SIZE / WORLD_SIZE said "invalid literal for int()"; NPROC=' 2' was told collectives need >= 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adasched.planner.plan import save_plan

REPO = Path(__file__).resolve().parents[2]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    # (PET_LOG_DIR: the tests' own torchrun log folder would hide a launcher that forgot --log-dir)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PET_LOG_DIR"):
        env.pop(k, None)
    env.update(extra)
    return env


def _sh(script, *args, cwd, **env):
    return subprocess.run(["bash", str(REPO / "launch" / script), *args], env=_env(**env), capture_output=True,
                          text=True, timeout=240, cwd=cwd)


@pytest.mark.parametrize("script, args, line", [
    ("train_moe.sh", ["--steps", "0"], "error: --steps: 0 must be >= 1"),
    ("train_lora.sh", ["out", "--jobs", "/nonexistent-32.yaml"],
     "error: /nonexistent-32.yaml: no such file (and not a preset: mix, het, tiny)"),
    ("train_sp.sh", ["--plan", "/nonexistent-32.json"], "error: /nonexistent-32.json: no such file"),
])
def test_a_rank_in_the_callers_shell_still_reports(tmp_path, script, args, line):
    for extra in ({"RANK": "1"}, {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}):
        r = _sh(script, *args, cwd=tmp_path, NPROC="2", **extra)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [line], (extra, r.stderr)


def test_profile_collectives_check_reports_under_a_stray_rank(tmp_path):
    r = _sh("profile_collectives.sh", "--quick", cwd=tmp_path, NPROC=" 2", OUT=str(tmp_path / "p.json"), RANK="1")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: NPROC: ' 2' is not a whole number"]
    r = _sh("profile_collectives.sh", "--quick", cwd=tmp_path, NPROC="1", OUT=str(tmp_path / "p.json"))
    assert r.returncode == 2 and "collectives need >= 2 processes" in r.stderr
    assert not (tmp_path / "p.json").exists()


@pytest.mark.slow
def test_train_sp_sh_runs_a_good_plan_under_a_stray_rank(tmp_path, two_rank_sp_plan):
    plan = tmp_path / "plan.json"
    save_plan(two_rank_sp_plan, plan)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = _sh("train_sp.sh", "--plan", str(plan), "--steps", "1", "--max-len", "32", "--timeout", "60",
            cwd=tmp_path, NPROC="2", RANK="1", TMPDIR=str(tmp))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rank must lie in" not in r.stderr
    # torchrun's log folder is the script's own and goes with it (an empty torchelastic_* folder was left per launch;
    # the script's watcher removes it within a second of torchrun's end)
    import time

    for _ in range(50):
        left = sorted(p.name for p in tmp.iterdir() if p.name.startswith(("torchelastic_", "adasched-torchrun")))
        if not left:
            break
        time.sleep(0.2)
    assert left == [], left


@pytest.mark.parametrize("var", ["LOCAL_WORLD_SIZE", "WORLD_SIZE"])
def test_a_non_integer_torchrun_variable_is_named(tmp_path, var):
    env = _env(**{var: "abc"})
    if var == "LOCAL_WORLD_SIZE":
        env["WORLD_SIZE"] = "2"
        cmd = [sys.executable, "-m", "adasched.launch.train_moe", "--validate-only", "--steps", "1"]
    else:
        cmd = [sys.executable, "-m", "adasched.launch.train_lora", "--out", str(tmp_path / "x")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {var}: 'abc' is not an integer"], \
        r.stderr


def test_an_interrupted_train_lora_leaves_out_as_it_was(tmp_path, monkeypatch, capsys):
    """OUT/plan.json was written before training: a run interrupted there left the new plan beside the previous
    run's adapters and losses.json. It is written with them at the end now."""
    import adasched.runtime.lora_trainer as trainer
    from adasched.launch.train_lora import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text("the previous run's plan\n")
    (out / "losses.json").write_text("{}\n")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_plan", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["--jobs", "tiny", "--out", str(out)])
    assert (out / "plan.json").read_text() == "the previous run's plan\n"
    assert sorted(p.name for p in out.iterdir()) == ["losses.json", "plan.json"]

