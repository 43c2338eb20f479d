"""30th session: `adasched simulate` took a task's "sync": "" as a key like any other, so tasks given "" for "no
collective" all started together (a rank's task waited for another rank's slow predecessor). An empty key is
refused by name now; null (or no key) is none."""
from __future__ import annotations

import json
import random

from adasched.planner.cli import main


def _graph(tmp_path, sync):
    slow = random.uniform(2.0, 9.0)
    tasks = [{"name": "slow", "rank": 1, "stream": "c", "duration_ms": slow},
             {"name": "a", "rank": 0, "stream": "c", "duration_ms": 1.0, "sync": sync},
             {"name": "b", "rank": 1, "stream": "c", "duration_ms": 1.0, "deps": ["slow"], "sync": sync}]
    p = tmp_path / "g.json"
    p.write_text(json.dumps({"tasks": tasks}))
    return p, slow


def test_an_empty_sync_key_is_refused(tmp_path, capsys):
    p, _ = _graph(tmp_path, "")
    assert main(["simulate", str(p), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: {p}: tasks.1: sync: String should have at least 1 character\n", captured.err


def test_no_sync_key_starts_each_task_when_ready(tmp_path, capsys):
    p, slow = _graph(tmp_path, None)
    assert main(["simulate", str(p), "--json"]) == 0
    tasks = {t["name"]: t for t in json.loads(capsys.readouterr().out)["tasks"]}
    assert tasks["a"]["start_ms"] == 0.0 and tasks["b"]["start_ms"] == slow


def test_a_shared_key_still_starts_them_together(tmp_path, capsys):
    p, slow = _graph(tmp_path, "ar")
    assert main(["simulate", str(p), "--json"]) == 0
    tasks = {t["name"]: t for t in json.loads(capsys.readouterr().out)["tasks"]}
    assert tasks["a"]["start_ms"] == tasks["b"]["start_ms"] == slow
