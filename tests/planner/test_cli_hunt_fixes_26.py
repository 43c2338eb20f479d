"""Small findings of the 26th session's show/simulate hunt, each failing before its fix."""
from __future__ import annotations

import json
import random

from adasched.planner.cli import main


def test_a_task_that_depends_on_itself_is_named(tmp_path, capsys):
    """Said "simulation deadlocked: waiting tasks ['a']"."""
    n = random.randint(1, 5)
    tasks = [{"name": f"t{i}", "rank": 0, "stream": "s", "duration_ms": random.uniform(0.1, 2)} for i in range(n)]
    k = random.randrange(n)
    tasks[k]["deps"] = [f"t{k}"]
    f = tmp_path / "g.json"
    f.write_text(json.dumps({"tasks": tasks}))
    assert main(["simulate", str(f), "--plot", str(tmp_path / "g.png")]) == 2
    assert capsys.readouterr().err == f"error: {f}: task 't{k}' depends on itself\n"
    assert not (tmp_path / "g.png").exists()


def test_show_on_a_task_graph_points_to_simulate(tmp_path, capsys):
    """Said "schema_version: missing (not an adasched plan?)"."""
    f = tmp_path / "g.json"
    f.write_text(json.dumps({"tasks": [{"name": "a", "rank": 0, "stream": "s", "duration_ms": 1.0}]}))
    assert main(["show", str(f)]) == 2
    assert capsys.readouterr().err == (f"error: {f}: is a task graph, not a plan or profile: simulate it with "
                                       f"`adasched simulate {f}`\n")
