"""print_table into a pipe or a file (logs, CI, `| tee`): every cell on one line, numbers never split."""
from __future__ import annotations

import random

import pytest

from adasched.planner.ui import print_table


def test_wide_table_into_a_pipe_keeps_every_cell_whole(capsys):
    rng = random.Random(7)
    cols = [f"column {i} ms" for i in range(14)]
    rows = [[rng.randrange(10 ** 5, 10 ** 6) for _ in cols] for _ in range(3)]
    print_table(rows, cols, title="wide")
    out = capsys.readouterr().out
    lines = out.splitlines()
    # before: rich assumed 80 columns and folded 437364 into '437' / '364' on the next line
    for row in rows:
        line = next(ln for ln in lines if f"│ {row[0]} " in ln)
        for v in row:
            assert f" {v} " in line, (v, line)
    header = next(ln for ln in lines if "column 0 ms" in ln)
    assert all(c in header for c in cols)
    assert len(lines) == 8  # title, top border, header, rule, 3 rows, bottom border


def test_narrow_table_is_unchanged(capsys):
    print_table([[1, 2.5]], ["a", "b"])
    out = capsys.readouterr().out
    assert "│ 1 │ 2.5 │" in out


def test_emit_json_writes_strict_json(capsys):
    """bench kernels --json error rows carried NaN (json.dumps writes NaN / Infinity, which jq refuses): null now,
    nested anywhere; finite numbers unchanged."""
    import json

    import numpy as np

    from adasched.planner.ui import emit_json

    emit_json({"ok": 1.5, "rows": [{"median_ms": float("nan"), "ratio": np.float64("inf")}, (2.0, -float("inf"))],
               "n": 3, "s": "nan"})
    out = capsys.readouterr().out
    assert "NaN" not in out and "Infinity" not in out
    assert json.loads(out, parse_constant=lambda c: pytest.fail(c)) == {
        "ok": 1.5, "rows": [{"median_ms": None, "ratio": None}, [2.0, None]], "n": 3, "s": "nan"}


def test_atomic_write_json_writes_strict_json(tmp_path):
    """Hunt finding: gemm_check --json (atomic_write_json) wrote a failed sweep config's ms as a bare NaN token,
    which jq refuses (the recorded H200 sweep has one): null now, as emit_json writes it."""
    import json

    import numpy as np

    from adasched.profiler.io import atomic_write_json

    v = float(np.random.default_rng().uniform(0.5, 2.0))
    path = atomic_write_json(tmp_path / "rows.json", [{"config": "128x256x64 s5 w4", "ms": float("nan"),
                                                        "max_rel_err": np.float64("inf"), "tflops": v}])
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == [
        {"config": "128x256x64 s5 w4", "ms": None, "max_rel_err": None, "tflops": v}]


def test_print_table_prints_brackets_as_given(capsys):
    """Hunt finding: titles and cells went to rich as markup - an op named 'S[/x]' in a Twill graph made `plan
    twill` and `show` exit 1 with a MarkupError traceback (after the plan was written), a file 'tw[plan].json'
    was titled 'tw.json', a stream 'comm[bold]' printed as 'comm' in bold."""
    import random

    from adasched.planner.ui import print_table

    tag = f"x{random.randrange(10 ** 6)}"
    cells = [f"S[/{tag}]", "comm[bold]", "[red]r[/red]"]
    print_table([cells, [1.5, 2, "ok"]], ["op[/y]", "stream", "name"], title=f"tw[{tag}].json")
    out = capsys.readouterr().out
    for text in cells + ["op[/y]", f"tw[{tag}].json", "1.5"]:
        assert text in out, text
