"""With --json a command's stderr carries no progress bar even on a terminal (plan moe, plan lora, bench lora and
bench sp drew one; plan sp, bench twill and bench schedules did not); without --json the bar is asked for."""
from __future__ import annotations

import contextlib
import json

import pytest

import adasched.planner.ui as ui
from adasched.planner.cli import main


@pytest.mark.parametrize("argv", [
    ["plan", "moe", "--config", "mixtral-8x7b", "--gpus", "8"],
    ["plan", "lora", "--jobs", "tiny", "--no-milp"],
    ["bench", "lora", "--jobs", "tiny", "--no-milp"],
    ["bench", "sp", "--gpus", "8", "--global-batch", "16", "--steps", "1", "--max-context", "32768", "--no-milp",
     "--deterministic"],
])
def test_json_asks_for_no_progress_bar(argv, tmp_path, monkeypatch, capsys):
    asked = []

    @contextlib.contextmanager
    def recording(description, total=None, *, enabled=True):
        asked.append(enabled)
        yield lambda n=1, total=None: None

    monkeypatch.setattr(ui, "progress", recording)
    out = ["--out", str(tmp_path / "p.json")] if argv[0] == "plan" else []
    assert main([*argv, *out, "--json"]) == 0, capsys.readouterr().err
    json.loads(capsys.readouterr().out)
    assert asked and not any(asked), asked
    asked.clear()
    assert main([*argv, *out]) == 0
    assert asked and all(asked), asked
