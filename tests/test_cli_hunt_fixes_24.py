"""Bad-input fixes from the 2026-11-30 CLI hunt (each failed before):
- `show P --plot P` / `simulate P --plot P` with a suffix-less P drew a PNG over the plan, exit 0;
- an output under another (`--out n/p.json --plot n/p.json/c.png`) wrote the plan, then failed on the figure;
- `train_moe --router-stats-out P --plan P` replaced the plan with the statistics, exit 0;
- `bench checkpoint --folder ""` wrote its saves into the current folder; `--repeats 10**11` ran until killed;
- the launch scripts' NPROC (abc, 0) and train_moe's WORLD_SIZE got errors naming int(), --ep-size or --vocab;
- a diverged train_moe run printed NaN into --json's output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adasched.launch import train_moe
from adasched.planner.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _one_error(capsys, starts: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(starts) and err.count("\n") == 1, err
    return err


def _task_graph(path):
    path.write_text(json.dumps({"tasks": [{"name": "a", "rank": 0, "stream": "s", "duration_ms": 1.5},
                                          {"name": "b", "rank": 1, "stream": "s", "duration_ms": 2.0, "deps": ["a"]}]}))
    return path


@pytest.mark.parametrize("cmd", ["show", "simulate"])
def test_plot_onto_the_input_is_refused(tmp_path, capsys, cmd):
    if cmd == "show":
        path = tmp_path / "splan"
        assert main(["plan", "twill", "--graph", "toy-attention", "--out", str(path)]) == 0
        capsys.readouterr()
    else:
        path = _task_graph(tmp_path / "graph")
    before = path.read_bytes()
    assert main([cmd, str(path), "--plot", str(path)]) == 2
    err = _one_error(capsys, "error: --plot: ")
    assert "is the PATH input" in err
    assert path.read_bytes() == before
    # a built-in profile name is no file: nothing to protect, the figure is drawn
    if cmd == "show":
        assert main(["show", "h100-sxm", "--plot", str(tmp_path / "h.png")]) == 0
        assert (tmp_path / "h.png").stat().st_size > 1000


def test_an_output_under_another_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "nest" / "p.json"
    assert main(["plan", "twill", "--graph", "toy-attention", "--out", str(out), "--plot",
                 str(out / "c.png")]) == 2
    err = _one_error(capsys, "error: --plot: ")
    assert f"{out / 'c.png'} is under the --out output" in err
    assert not out.exists()
    # the other way round (a suffix-less figure is a PNG)
    fig = tmp_path / "nest" / "fig"
    assert main(["plan", "twill", "--graph", "toy-attention", "--plot", str(fig), "--out", str(fig / "p.json")]) == 2
    assert "is under the --plot output" in _one_error(capsys, "error: --out: ")
    assert not fig.exists()


def test_bench_checkpoint_empty_folder_and_unbounded_counts(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "checkpoint", "--folder", "", "--params-m", "0.01", "--repeats", "2",
                 "--train-steps", "1"]) == 2
    assert "--folder: is empty" in _one_error(capsys, "error: --folder: ")
    assert list(tmp_path.iterdir()) == []
    for opt, value in (("--repeats", "99999999999"), ("--train-steps", str(10 ** 7))):
        assert main(["bench", "checkpoint", opt, value]) == 2
        _one_error(capsys, f"error: {opt}: ")


def test_router_stats_out_onto_the_plan_is_refused(tmp_path, capsys, monkeypatch):
    plan = tmp_path / "pm2.json"
    assert main(["plan", "moe", "--config", "mixtral-8x7b", "--gpus", "2", "--ep-size", "2", "--stages",
                 "published", "--time-limit", "0.5", "--out", str(plan), "--json"]) == 0
    capsys.readouterr()
    before = plan.read_bytes()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_moe.main(["--plan", str(plan), "--router-stats-out", str(plan), "--validate-only"]) == 2
    assert "is the --plan input" in _one_error(capsys, "error: --router-stats-out: ")
    assert plan.read_bytes() == before


@pytest.mark.parametrize("world", ["abc", "0", "-2", ""])
def test_world_size_garbage_names_world_size(capsys, monkeypatch, world):
    monkeypatch.setenv("WORLD_SIZE", world)
    assert train_moe.main(["--validate-only"]) == 2
    assert f"WORLD_SIZE: {world!r} is not a whole number >= 1" in _one_error(capsys, "error: WORLD_SIZE: ")


@pytest.mark.parametrize("script", ["train_moe.sh", "train_sp.sh", "train_lora.sh"])
@pytest.mark.parametrize("nproc,needle", [("abc", "'abc' is not a whole number"), ("0", "0 local ranks"),
                                          ("99999", "99999 local ranks"),
                                          # (bash's -lt failed on it inside the if, and set -e let it through)
                                          ("9" * 20, f"{'9' * 20} local ranks")])
def test_launch_scripts_name_a_bad_nproc(tmp_path, script, nproc, needle):
    env = dict(os.environ, NPROC=nproc, PYTHON=sys.executable)
    args = [str(tmp_path / "out")] if script == "train_lora.sh" else []
    proc = subprocess.run(["bash", str(ROOT / "launch" / script), *args], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: NPROC: ") and needle in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""


def test_strict_json_and_the_divergence_note():
    assert json.loads(train_moe._strict_json({"losses": [2.5, float("nan"), float("inf")], "x": (1, 2)})) == {
        "losses": [2.5, None, None], "x": [1, 2]}
    from adasched.profiler.io import has_non_finite

    assert has_non_finite({"a": [1.0, (2.0, float("-inf"))]}) and not has_non_finite({"a": [1.0, (2, "nan")]})


def test_a_diverged_train_moe_prints_strict_json_and_says_from_which_step(tmp_path):
    """--json printed NaN losses (not JSON to strict parsers) and the run said nothing; the note names the step,
    counted from the run's start for a resumed run (review: it counted from the resume)."""
    def refuse(name):
        raise ValueError(f"{name} in the output")

    env = dict(os.environ, WORLD_SIZE="1", OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "adasched.launch.train_moe", "--layers", "1", "--experts", "2", "--lr", "1e9",
            "--json", "--checkpoint-dir", str(tmp_path / "ck")]
    first = subprocess.run([*base, "--steps", "3"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    run = json.loads(first.stdout, parse_constant=refuse)["runs"][0]
    bad = next(i for i, v in enumerate(run["losses"]) if v is None)
    assert all(v is None for v in run["losses"][bad:]) and run["final_loss"] is None
    assert f"the loss is not finite from step {bad} on (it diverged: lower --lr); --json writes it as null" in \
        first.stderr, first.stderr
    again = subprocess.run([*base, "--steps", "5"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    run = json.loads(again.stdout, parse_constant=refuse)["runs"][0]
    assert run["start_step"] == 3 and run["losses"] == [None, None]
    assert "the loss is not finite from step 3 on" in again.stderr, again.stderr
