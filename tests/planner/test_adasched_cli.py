"""The `adasched` command line: every help page works; bad input is one `error:` line, exit 2, no traceback,
nothing half-written. (Named test_adasched_cli.py: tests/planner/lorafusion/test_cli.py exists.)"""
import json
import subprocess
import sys

import pytest
import typer

from adasched.planner.cli import _register_plugins, app, main


def _command_paths():
    _register_plugins()

    def walk(c, path):
        yield path
        for name, sub in sorted(getattr(c, "commands", {}).items()):
            yield from walk(sub, path + [name])

    return list(walk(typer.main.get_command(app), []))


def test_every_help_page(capsys):
    paths = _command_paths()
    assert {"show", "simulate", "profile", "plan", "bench"} <= {p[0] for p in paths if p}
    for p in paths:
        assert main(p + ["--help"]) == 0, p
        out = capsys.readouterr().out
        assert "Usage: adasched" in out and len(out) > 200, p
    assert main([]) == 0 and "Commands" in capsys.readouterr().out  # bare `adasched` prints its help


def _err_line(capsys) -> str:
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    lines = cap.err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    return lines[0]


def test_show_bad_inputs(tmp_path, capsys):
    plot = tmp_path / "out.png"
    cases = {
        "missing.json": (None, "missing.json: no such file"),
        "bad.json": ("{not json", "malformed JSON at line 1"),
        "v9.json": (json.dumps({"schema_version": 9, "kind": "sp"}), "schema_version 9 is not supported"),
        "kind.json": (json.dumps({"schema_version": 1, "kind": "nope"}), "unknown plan kind 'nope'"),
        "prof.json": ("PROF", "device.memory_bytes: Input should be greater than 0"),
    }
    from adasched.profiler.profile import load_profile

    for name, (content, expect) in cases.items():
        path = tmp_path / name
        if content == "PROF":
            d = load_profile("a100-64-flexsp-paper").model_dump(mode="json")
            d["device"]["memory_bytes"] = -1
            content = json.dumps(d)
        if content is not None:
            path.write_text(content)
        assert main(["show", str(path), "--plot", str(plot)]) == 2, name
        line = _err_line(capsys)
        assert str(path) in line and expect in line, line
        assert not plot.exists()


def test_show_profile_and_json(tmp_path, capsys):
    plot = tmp_path / "a.png"
    assert main(["show", "a100-64-flexsp-paper", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "all_to_all x64 (inter)" in out and "4.87 GB/s" in out and plot.stat().st_size > 1000
    assert main(["show", "h100-sxm", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["device"]["name"] == "NVIDIA H100 80GB HBM3"


def test_simulate(tmp_path, capsys):
    g = {"tasks": [
        {"name": "a", "rank": 0, "stream": "compute", "duration_ms": 2.0},
        {"name": "x0", "rank": 0, "stream": "comm", "duration_ms": 1.0, "deps": ["a"], "sync": "x"},
        {"name": "x1", "rank": 1, "stream": "comm", "duration_ms": 1.0, "sync": "x"},
    ]}
    path = tmp_path / "g.json"
    path.write_text(json.dumps(g))
    plot = tmp_path / "g.png"
    assert main(["simulate", str(path), "--json", "--plot", str(plot)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["makespan_ms"] == 3.0 and res["busy_ms"] == {"rank 0 / compute": 2.0, "rank 0 / comm": 1.0,
                                                           "rank 1 / comm": 1.0}
    assert plot.exists()
    plot.unlink()
    assert main(["simulate", str(path), "--plot", str(plot)]) == 0      # a table, then the file it drew
    assert capsys.readouterr().out.rstrip().endswith(f"wrote {plot}") and plot.exists()
    for tasks, expect in [
        ([{"name": "a", "rank": 0, "stream": "s", "duration_ms": -1}],
         "tasks.0: duration_ms: Input should be greater than or equal to 0"),
        ([{"name": "a", "rank": True, "stream": "s", "duration_ms": 1}], "tasks.0: rank: Input should be a valid integer"),
        ([{"name": "a", "rank": "0", "stream": "s", "duration_ms": 1}], "tasks.0: rank: Input should be a valid integer"),
        ([{"name": "a", "rank": 0, "stream": None, "duration_ms": 1}], "tasks.0: stream: Input should be a valid string"),
        ([{"name": "a", "rank": 0, "stream": "s", "duration_ms": "2"}], "tasks.0: duration_ms: Input should be a valid"),
        ([{"name": "a", "rank": 0, "stream": "s", "duration_ms": 1e999}], "tasks.0: duration_ms: Input should be a finite"),
        ([{"name": "a", "rank": 0, "stream": "s", "duration_ms": 1, "deps": "b"}], "tasks.0: deps: Input should be a valid list"),
        ([{"name": "a", "rank": 0, "stream": "s", "duration_ms": 1, "deps": ["z"]}], "unknown task 'z'"),
        ([{"name": "a", "rank": 0, "stream": "s", "duration_ms": 1, "deps": ["b"]},
          {"name": "b", "rank": 0, "stream": "s", "duration_ms": 1}], "deadlocked"),
        ([{"name": "a", "rank": 0}], "tasks.0:"),
        ([], "tasks: must be a non-empty list"),
    ]:
        path.write_text(json.dumps({"tasks": tasks}))
        bad_plot = tmp_path / "bad.png"
        assert main(["simulate", str(path), "--plot", str(bad_plot)]) == 2
        line = _err_line(capsys)
        assert line.startswith(f"error: {path}") and expect in line, line
        assert not bad_plot.exists()


def test_show_checks_plot_before_printing(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert main(["show", "h100-sxm", "--json", "--plot", str(tmp_path / "f" / "x.png")]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.startswith("error: --plot: ") and "is not a directory" in cap.err


def test_usage_errors(capsys):
    assert main(["show"]) == 2
    assert "Missing argument" in _err_line(capsys)
    assert main(["show", "x.json", "--bogus"]) == 2
    assert "No such option" in _err_line(capsys)
    assert main(["nosuch"]) == 2
    assert "No such command" in _err_line(capsys)


def test_console_entry_point_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "adasched.planner", "show", str(tmp_path / "nope.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"error: {tmp_path / 'nope.json'}: no such file\n"


def test_plan_error_after_progress_is_one_line(tmp_path):
    """A bad option found once planning has started still leaves exactly one stderr line (no progress bar when
    stderr is not a terminal) and no plan file."""
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, "-m", "adasched.planner", "plan", "sp", "--seqlens", "builtin",
                        "--global-batch", "0", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == "error: --global-batch: must be >= 1, got 0\n", r.stderr
    assert not out.exists()


def test_os_error_is_one_line(tmp_path, capsys, monkeypatch):
    """An OSError on a user's file (permissions, I/O) is `error: FILE: reason`, exit 2, no traceback."""
    import adasched.profiler.io as io

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(io, "read_json", denied)
    assert main(["show", str(tmp_path / "p.json")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'p.json'}: Permission denied\n"


@pytest.mark.parametrize("argv", [
    ["plan", "sp", "--seqlens", "builtin", "--global-batch", "8", "--no-milp"],
    ["plan", "lora", "--jobs", "tiny", "--no-milp"],
])
def test_bad_plot_path_fails_before_the_plan_is_written(tmp_path, capsys, argv):
    """--plot onto a directory or under a file is caught up front: exit 2, one line, no plan file."""
    out = tmp_path / "plan.json"
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("")
    for plot, expect in ((tmp_path / "d", "is a directory"), (tmp_path / "f" / "x.png", "is not a directory"),
                         (tmp_path / "x.xyz", "cannot draw a 'xyz' file")):
        assert main(argv + ["--out", str(out), "--plot", str(plot)]) == 2
        line = _err_line(capsys)
        assert line.startswith("error: --plot: ") and expect in line, line
        assert not out.exists()


@pytest.mark.parametrize("rank, printed", [(None, True), ("0", True), ("3", False)])
def test_one_line_arg_parser(rank, printed, monkeypatch, capsys):
    """The launchers' and planner tools' parser: a bad option is one `error:` line on rank 0 only (torchrun's
    other ranks exit 2 silently), never argparse's usage text."""
    from adasched.planner.ui import OneLineArgParser

    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    ap = OneLineArgParser(prog="tool")
    ap.add_argument("--steps", type=int, required=True)
    with pytest.raises(SystemExit) as exc:
        ap.parse_args(["--steps", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == ("error: argument --steps: invalid int value: 'x' (see tool --help)\n" if printed else "")


def test_simulate_refuses_step_for_a_task_graph(tmp_path, one_error):
    # --step was silently ignored for a task graph (it has no steps)
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"tasks": [{"name": "a", "rank": 0, "stream": "compute", "duration_ms": 2.0}]}))
    assert "a task graph has no steps" in one_error(main(["simulate", str(path), "--step", "1"]), "--step: 1")
    # README audit: an explicit --step 0 was the default's value, ignored as silently
    assert "a task graph has no steps" in one_error(main(["simulate", str(path), "--step", "0"]), "--step: 0")
    assert main(["simulate", str(path)]) == 0
    plan = tmp_path / "twill.json"  # a plan kind without steps: the same
    assert main(["plan", "twill", "--graph", "toy-attention", "--out", str(plan)]) == 0
    assert "plan kind 'twill' has no steps" in one_error(main(["simulate", str(plan), "--step", "0"]), "--step: ")
    assert main(["simulate", str(plan)]) == 0
