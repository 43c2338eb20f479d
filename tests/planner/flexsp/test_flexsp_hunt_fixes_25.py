"""Findings of the 25th session's FlexSP planner hunt, each a test that fails on the code before the fix."""
from __future__ import annotations

import random

import pytest

from adasched.planner.cli import main


@pytest.mark.parametrize("token", ["1_000", "\uff11\uff12\uff13", "1\u00a0000"])
def test_length_files_take_plain_decimal_integers_only(tmp_path, capsys, token):
    """`1_000` and full-width digits passed int() and were planned as 1000 and 123 (the help says one positive
    integer per line; `1e3` and `1.5` were already refused)."""
    f = tmp_path / "lens.txt"
    n = random.Random().randint(2, 9)
    f.write_text("".join(f"{random.Random().randint(10, 900)}\n" for _ in range(n)) + token + "\n", encoding="utf-8")
    out = tmp_path / "p.json"
    assert main(["plan", "sp", "--seqlens", str(f), "--gpus", "8", "--global-batch", "2", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: {f}: line {n + 1}: {token!r} is not an integer sequence length "
                                       f"(plain decimal digits)\n")
    assert not out.exists()


def test_a_file_named_builtin_is_not_silently_ignored(tmp_path, capsys, monkeypatch):
    """`--seqlens builtin` with a file named `builtin` in the folder planned the packaged sample; --profile refuses
    the same clash ("pass ./NAME")."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "builtin").write_text("5000\n5000\n")
    assert main(["plan", "sp", "--seqlens", "builtin", "--gpus", "8", "--global-batch", "2", "--max-context", "8000",
                 "--out", "p.json"]) == 2
    assert capsys.readouterr().err == ("error: --seqlens: 'builtin' is both a built-in source and a file here: pass "
                                       "./builtin for the file (or run elsewhere for the built-in)\n")
    assert main(["plan", "sp", "--seqlens", "./builtin", "--gpus", "8", "--global-batch", "2", "--max-context", "8000",
                 "--out", "p.json", "--json"]) == 0


def test_the_solver_note_says_the_recorded_limit_is_not_the_whole_budget(tmp_path):
    """`show` printed "solve time 7.624 s (limit 5 s)" with nothing saying the fill across micro-batches gets a
    budget of its own and the heuristics none."""
    from adasched.planner.plan import load_plan

    out = tmp_path / "p.json"
    assert main(["plan", "sp", "--seqlens", "builtin", "--gpus", "8", "--global-batch", "8", "--max-context", "16384",
                 "--time-limit", "0.2", "--out", str(out)]) == 0
    note = load_plan(out).solver.note
    assert "the time limit recorded: that budget x steps" in note and "solve_seconds can exceed it" in note, note
