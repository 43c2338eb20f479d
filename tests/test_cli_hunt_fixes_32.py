"""Findings of the 32nd session, each failing before its fix."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from adasched.planner.cli import main


@pytest.mark.parametrize("spell", ["split", "equals"])
@pytest.mark.parametrize("option", ["--out", "--plot"])
def test_an_output_spelled_as_a_folder_is_refused(tmp_path, capsys, monkeypatch, option, spell):
    """`--plot figs/` wrote a file named figs: typer's Path drops the trailing slash."""
    monkeypatch.chdir(tmp_path)
    target = "figs/"
    given = [option, target] if spell == "split" else [f"{option}={target}"]
    other = ["--out", "p.json"] if option == "--plot" else []
    assert main(["plan", "twill", "--graph", "toy-attention", "--machine", "h100", *other, *given]) == 2
    assert capsys.readouterr().err == f"error: {option}: figs/ ends with '/', a folder: give a file name\n"
    assert sorted(os.listdir(tmp_path)) == []


def test_profile_short_option_spelled_as_a_folder_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "-oruns/"]) == 2
    assert capsys.readouterr().err == "error: --out: runs/ ends with '/', a folder: give a file name\n"
    assert os.listdir(tmp_path) == []


def test_an_existing_folder_with_a_slash_keeps_its_message(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    assert main(["plan", "twill", "--graph", "toy-attention", "--machine", "h100", "--out", f"{tmp_path}/d/"]) == 2
    assert "ends with '/'" in capsys.readouterr().err
    assert os.listdir(tmp_path / "d") == []


def test_an_argparse_launcher_refuses_a_folder_spelled_output(tmp_path):
    """kernel_report takes --json as a plain string; the check sees its slash."""
    proc = subprocess.run([sys.executable, "-m", "adasched.launch.kernel_report", "--json", f"{tmp_path}/rows/"],
                          capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: --json: {tmp_path}/rows/ ends with '/', a folder: give a file name"
    assert os.listdir(tmp_path) == []
