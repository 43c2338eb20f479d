"""CLI fixes from a bug hunt (each failed before):
- `--plot x.pgf` passed the up-front check and died with a traceback (no TeX) after the work, after the plan was
  written; a figure writer failing is one line too;
- `--out p.png --plot p.png` wrote the plan, then the figure over it, exit 0;
- `simulate` of a Twill plan summed overlapping ops: a warp group busy 9 of 8 cycles (utilisation 1.125);
- Gantt bars that overlap in time were drawn over each other (now: sub-rows of the lane);
- `show --plot` of an SP plan numbered from 5 failed with "no step 0";
- `show` rounded a Twill iteration's 0.00056 ms and its 0.00084 ms baseline both to 0.001;
- `demo` with a file named demo-out died with FileExistsError."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from adasched.planner.cli import main
from adasched.planner.gantt import sub_rows
from adasched.profiler.io import InputError, save_figure


def _task_graph(path):
    path.write_text(json.dumps({"tasks": [{"name": "a", "rank": 0, "stream": "s", "duration_ms": 1.5},
                                          {"name": "b", "rank": 1, "stream": "s", "duration_ms": 2.0, "deps": ["a"]}]}))
    return path


def test_pgf_is_refused_before_any_work(tmp_path, capsys):
    assert main(["simulate", str(_task_graph(tmp_path / "tg.json")), "--plot", str(tmp_path / "p.pgf")]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("error: --plot: ") and "cannot draw a 'pgf' file" in out.err and out.out == ""
    assert not (tmp_path / "p.pgf").exists()


def test_a_failing_figure_writer_is_one_error(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.savefig = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("writer missing"))
    with pytest.raises(InputError, match="cannot draw: writer missing"):
        save_figure(fig, tmp_path / "f.png")
    plt.close(fig)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_out_and_plot_on_one_file_are_refused(tmp_path, capsys):
    same = tmp_path / "p.png"
    assert main(["plan", "twill", "--graph", "toy-attention", "--out", str(same), "--plot", str(same)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --plot: {same} is also --out") and err.count("\n") == 1, err
    assert not same.exists()


def test_twill_simulation_busy_time_is_the_union_of_overlapping_ops(tmp_path, capsys):
    plan = tmp_path / "t.json"
    assert main(["plan", "twill", "--graph", "toy-attention", "--out", str(plan)]) == 0
    capsys.readouterr()
    assert main(["simulate", str(plan), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    span = res["makespan_cycles"]
    assert all(0 < b <= span for b in res["busy_cycles"].values()), res["busy_cycles"]
    for lane, busy in res["busy_cycles"].items():  # against a brute-force count of busy cycle slices
        ts = [(t["start"], t["end"]) for t in res["tasks"] if f"rank {t['rank']} / {t['stream']}" == lane]
        grid = np.arange(0, span, 0.25) + 0.125
        covered = sum(any(a <= x < b for a, b in ts) for x in grid) * 0.25
        assert busy == pytest.approx(covered, abs=1e-9), lane


def test_sub_rows_never_overlap_and_pack_greedily():
    rng = np.random.default_rng()
    tasks = []
    for _ in range(60):
        a = float(rng.uniform(0, 50))
        tasks.append(SimpleNamespace(start_ms=a, end_ms=a + float(rng.uniform(0.5, 8))))
    rows = sub_rows(tasks)
    assert sorted(id(t) for r in rows for t in r) == sorted(id(t) for t in tasks)
    for r in rows:
        assert all(x.end_ms <= y.start_ms for x, y in zip(r, r[1:]))
    # as many rows as the most tasks in flight at one instant (interval graph colouring is exact in start order)
    events = sorted([(t.start_ms, 1) for t in tasks] + [(t.end_ms, -1) for t in tasks], key=lambda e: (e[0], e[1]))
    depth = best = 0
    for _, d in events:
        depth += d
        best = max(best, depth)
    assert len(rows) == best
    assert len(sub_rows([SimpleNamespace(start_ms=0.0, end_ms=1.0), SimpleNamespace(start_ms=1.0, end_ms=2.0)])) == 1


def test_show_plot_of_an_sp_plan_numbered_from_five(tmp_path, capsys):
    plan = tmp_path / "sp.json"
    assert main(["plan", "sp", "--profile", "a100-64-flexsp-paper", "--model", "gpt-7b", "--seqlens", "builtin",
                 "--gpus", "8", "--global-batch", "16", "--steps", "2", "--max-context", "32768", "--no-milp",
                 "--out", str(plan)]) == 0
    data = json.loads(plan.read_text())
    for i, st in enumerate(data["steps"]):
        st["step"] = 5 + i
    plan.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["show", str(plan), "--plot", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert main(["simulate", str(plan), "--step", "1"]) == 0
    assert "step 1 of 2 (the plan's step 6)" in capsys.readouterr().out


def test_show_prints_sub_millisecond_times_with_four_digits(tmp_path, capsys):
    plan = tmp_path / "t.json"
    assert main(["plan", "twill", "--graph", "toy-attention", "--out", str(plan)]) == 0
    data = json.loads(plan.read_text())
    capsys.readouterr()
    assert main(["show", str(plan)]) == 0
    out = capsys.readouterr().out
    assert f"{data['predicted_ms']:.4g} ms" in out and f"{data['baselines_ms']['no-pipelining']:.4g} ms" in out


def test_demo_with_a_file_named_demo_out(tmp_path):
    (tmp_path / "demo-out").write_text("not a folder")
    r = subprocess.run([sys.executable, "-m", "adasched.launch.demo", "twill"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: demo-out") and r.stderr.count("\n") == 1, r.stderr


def test_plan_twill_names_the_figure_it_wrote(tmp_path, capsys):
    """Hunt finding: `plan twill --plot` (and `plan sp --plot`) wrote the figure, but the closing line named only
    the plan (and nothing at all without --out)."""
    out, plot = tmp_path / "t.json", tmp_path / "t.png"
    assert main(["plan", "twill", "--graph", "toy-attention", "--plot", str(plot)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"wrote {plot}") and plot.exists()
    assert main(["plan", "twill", "--graph", "toy-attention", "--out", str(out), "--plot", str(plot)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"wrote {out} and {plot}") and out.exists()


def test_show_names_the_missing_field_of_a_profile_without_kind(tmp_path, one_error):
    """A profile file (its kind optional) lacking one of name/device was read as a plan: "kind: missing or not a
    string"; the profile loader names the missing field now. A plan lacking its kind still says kind."""
    for body, needle in (({"schema_version": 1, "name": "x", "source": "s", "gpus_per_node": 8},
                          "device: Field required"),
                         ({"schema_version": 1, "device": {}}, "name: Field required"),
                         ({"schema_version": 1, "inputs_digest": "x", "name": "a"}, "kind: missing or not a string")):
        path = tmp_path / "f.json"
        path.write_text(json.dumps(body))
        err = one_error(main(["show", str(path)]), str(path))
        assert needle in err, err


def test_show_names_a_planner_input_file(tmp_path, one_error):
    """`adasched show` on a Twill graph or machine file read it as a cluster profile ('source: Field required (and 5
    more)'); a LoRA jobs file in JSON likewise. One line naming what the file is and the command that takes it."""
    import json as _json
    from pathlib import Path as _Path

    from adasched.planner.cli import main

    root = _Path(__file__).resolve().parents[1]
    jobs = tmp_path / "jobs.json"
    jobs.write_text(_json.dumps({"capacity": 4096, "stages": 1, "jobs": [
        {"name": "a", "adapter": {"r": 8}, "lengths": "xsum", "global_batch_size": 4}]}))
    for path, what, cmd in ((root / "planner/twill/graphs/toy-attention.json", "a Twill graph", "plan twill --graph"),
                            (root / "planner/twill/machines/h100.json", "a Twill machine model",
                             "plan twill --machine"),
                            (jobs, "a LoRA jobs file", "plan lora --jobs")):
        err = one_error(main(["show", str(path)]), str(path))
        assert f"is {what}, not a plan or profile: plan it with `adasched {cmd} {path}`" in err, err
