"""34th session's CLI-contract hunt (each failed before):
- a legal 250-character --plot name failed after the plan was written (the temp file's name held the destination's
  name plus ~15 characters: "File name too long"), and a too-long --out name failed after the whole solve;
- a Ctrl-C (or any error) while the plot was drawn left --out written although the command said "aborted";
- --out over an existing file reset its permission bits (a private 0600 profile became 0644) and replaced a
  write-protected one;
- a Ctrl-C while the CLI was still importing printed a KeyboardInterrupt traceback;
- --out "" said ". is a directory"."""
from __future__ import annotations

import importlib.abc
import json
import os
import stat
import sys

import pytest

from adasched.planner.cli import main
from adasched.profiler.io import atomic_write_json

TWILL = ["plan", "twill", "--graph", "toy-attention", "--time-limit", "2"]


def test_a_long_legal_plot_name_is_written_with_the_plan(tmp_path, capsys):
    out, png = tmp_path / "plan.json", tmp_path / ("p" * 246 + ".png")  # 250 bytes: a legal name
    assert main([*TWILL, "--out", str(out), "--plot", str(png)]) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["kind"] == "twill" and png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, png.name])  # no temp file left


@pytest.mark.parametrize("option", ["--out", "--plot"])
def test_a_name_too_long_for_the_file_system_is_refused_before_the_solve(tmp_path, capsys, one_error, monkeypatch,
                                                                          option):
    import adasched.planner.twill.plan as twill_plan

    monkeypatch.setattr(twill_plan, "plan_twill", lambda *a, **k: pytest.fail("solved before the name was checked"))
    name = "p" * 252 + (".json" if option == "--out" else ".png")  # 256+ bytes
    args = {"--out": str(tmp_path / name), "--plot": str(tmp_path / "ok.png")}
    if option == "--plot":
        args = {"--out": str(tmp_path / "ok.json"), "--plot": str(tmp_path / name)}
    rc = main([*TWILL, "--out", args["--out"], "--plot", args["--plot"]])
    line = one_error(rc, f"{option}: ")
    assert f"the file name is {len(name)} bytes; this file system takes at most 255" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fail_with", [KeyboardInterrupt, RuntimeError])
def test_a_failure_while_the_plot_is_drawn_leaves_no_plan(tmp_path, capsys, monkeypatch, fail_with):
    from adasched.planner.twill.plan import TwillPlan

    def plot(self, path):
        from adasched.profiler.io import atomic_path

        with atomic_path(path) as tmp:  # half a figure in its temp file, then the interrupt
            tmp.write_bytes(b"\x89PNG partial")
            raise fail_with("stopped while drawing")

    monkeypatch.setattr(TwillPlan, "plot", plot)
    out, png = tmp_path / "plan.json", tmp_path / "s.png"
    if fail_with is KeyboardInterrupt:
        assert main([*TWILL, "--out", str(out), "--plot", str(png)]) == 130
        assert capsys.readouterr().err == "aborted\n"
    else:
        with pytest.raises(RuntimeError, match="stopped while drawing"):
            main([*TWILL, "--out", str(out), "--plot", str(png)])
    assert list(tmp_path.iterdir()) == []  # neither output, no temp file


def test_an_existing_file_keeps_its_mode_and_a_read_only_one_is_refused(tmp_path, capsys, one_error, monkeypatch):
    private = tmp_path / "private.json"
    private.write_text("{}")
    private.chmod(0o600)
    atomic_write_json(private, {"x": 1})
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and json.loads(private.read_text()) == {"x": 1}
    ro = tmp_path / "ro.json"
    ro.write_text("keep")
    ro.chmod(0o444)
    real = os.access  # (root may write anything: the test runs as the user the check is for)
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(ro) and mode == os.W_OK
                        else real(p, mode, **k))
    rc = main([*TWILL, "--out", str(ro)])
    assert one_error(rc, "--out: ") == (f"error: --out: {ro} is read-only (no write permission): make it writable or "
                                       f"write elsewhere\n")
    assert ro.read_text() == "keep" and stat.S_IMODE(ro.stat().st_mode) == 0o444


def test_an_empty_output_name_is_named_as_empty(tmp_path, one_error, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for opt in ("--out", "--plot"):
        assert one_error(main([*TWILL, opt, ""]), f"{opt}: ") == f"error: {opt}: is empty: give a file name\n"
    assert list(tmp_path.iterdir()) == []


class _InterruptImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "adasched.planner.cli":
            raise KeyboardInterrupt
        return None


def test_a_ctrl_c_while_the_cli_imports_is_aborted_not_a_traceback(capsys, monkeypatch):
    from adasched.planner import cli, entry

    monkeypatch.delitem(sys.modules, "adasched.planner.cli")
    monkeypatch.delattr(sys.modules["adasched.planner"], "cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptImport(), *sys.meta_path])
    assert entry.main(["--help"]) == 130
    assert capsys.readouterr().err == "aborted\n"
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, _InterruptImport)])
    # the plugins loading (before click handles Ctrl-C itself): the same line
    monkeypatch.setitem(sys.modules, "adasched.planner.cli", cli)

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_register_plugins", interrupted)
    assert cli.main(["--help"]) == 130
    assert capsys.readouterr().err == "aborted\n"
