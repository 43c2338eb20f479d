"""31st session's show/simulate hunt: a deadlock's message listed the first five stuck stream heads in stream order,
often bystanders that depend on the cycle ("waiting tasks ['t0', 't1', 't2', 't3', 't4']" for a cycle x <-> y on
other ranks), and said nothing of how many tasks never ran. It names a cycle of waiting tasks now."""
from __future__ import annotations

import json
import random
import re

import pytest

from adasched.planner.cli import main
from adasched.planner.simulator import Task, simulate


def _cycle(err: str) -> tuple[list[str], int]:
    m = re.fullmatch(r"simulation deadlocked: (.+) wait on each other \(a -> b: a waits on b, a dependency of it, a "
                     r"task ahead of it on its stream or a missing part of its collective; (\d+) tasks never ran\)",
                     err)
    assert m, err
    names = [re.sub(r" \(needs \S+, behind \S+\)$", "", n) for n in m.group(1).split(" -> ")]
    assert names[0] == names[-1]
    return names[:-1], int(m.group(2))


def _rotations(c):
    return {tuple(c[i:] + c[:i]) for i in range(len(c))}


def test_a_cycle_behind_bystanders_is_named(tmp_path, capsys):
    n = random.randint(5, 9)
    tasks = [{"name": f"t{i}", "rank": i, "stream": "s", "duration_ms": random.uniform(0.1, 2), "deps": ["x"]}
             for i in range(n)]
    tasks += [{"name": "x", "rank": n, "stream": "s", "duration_ms": 1, "deps": ["y"]},
              {"name": "y", "rank": n + 1, "stream": "s", "duration_ms": 1, "deps": ["x"]},
              {"name": "ok", "rank": n + 2, "stream": "s", "duration_ms": 1}]
    random.shuffle(tasks)
    f = tmp_path / "g.json"
    f.write_text(json.dumps({"tasks": tasks}))
    assert main(["simulate", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {f}: "), err
    cycle, never = _cycle(err[0][len(f"error: {f}: "):])
    assert tuple(cycle) in _rotations(["x", "y"]) and never == n + 2


@pytest.mark.parametrize("case", ["stream-order", "collective", "collectives-crossed"])
def test_cycles_through_streams_and_collectives(case):
    if case == "stream-order":  # p waits on s, behind r on rank 1; r waits on q, behind p on rank 0
        tasks = [Task("p", 0, "s", 1, deps=("s",)), Task("q", 0, "s", 1), Task("r", 1, "s", 1, deps=("q",)),
                 Task("s", 1, "s", 1)]
        want, never = ["p", "r"], 4
    elif case == "collective":  # a's other part b waits on c, which sits behind a on rank 0
        tasks = [Task("a", 0, "s", 1, sync="k"), Task("c", 0, "s", 1), Task("b", 1, "s", 1, deps=("c",), sync="k")]
        want, never = ["a", "b"], 3
    else:  # two collectives issued in opposite orders on two ranks
        tasks = [Task("x0", 0, "c", 1, sync="X"), Task("y0", 0, "c", 1, sync="Y"), Task("y1", 1, "c", 1, sync="Y"),
                 Task("x1", 1, "c", 1, sync="X")]
        want, never = ["x0", "y1"], 4
    before = [Task(f"pre{i}", random.randint(0, 1), "s2", random.uniform(0.1, 1)) for i in range(random.randint(0, 3))]
    with pytest.raises(ValueError) as info:
        simulate(before + tasks)
    cycle, n = _cycle(str(info.value))
    assert tuple(cycle) in _rotations(want) and n == never
    if case == "collective":  # b needs c, which sits behind a
        assert "b (needs c, behind a) -> a" in str(info.value)


def test_a_dependency_later_on_the_same_stream_is_named():
    """The session's review: a task depending on one behind it on its own stream read "t -> t wait on each other"."""
    k = random.randint(0, 3)
    tasks = [Task(f"x{i}", 0, "s", 1) for i in range(k)] + [Task("t", 0, "s", 1, deps=("u",))] + \
        [Task(f"y{i}", 0, "s", 1) for i in range(random.randint(0, 3))] + [Task("u", 0, "s", 1), Task("o", 1, "s", 1)]
    with pytest.raises(ValueError) as info:
        simulate(tasks)
    assert str(info.value) == (f"simulation deadlocked: task 't' depends on 'u', which comes after it on rank 0 "
                               f"stream 's' ({len(tasks) - k - 1} tasks never ran)")


def test_a_long_stream_order_cycle_is_shortened():
    """A chain listed in reverse over R ranks: each rank's head waits on the next rank's, a cycle through all R
    heads; the message shows 6 of them and stays one short line."""
    n, ranks = 4000, random.randint(9, 40)
    tasks = [Task(f"c{i}", i % ranks, "s", 1.0, deps=(f"c{i - 1}",) if i else ()) for i in range(n)][::-1]
    with pytest.raises(ValueError) as info:
        simulate(tasks)
    msg = str(info.value)
    assert f" -> ... {ranks - 6} more ... -> " in msg and len(msg) < 600 and msg.endswith(f"; {n} tasks never ran)")
    heads = msg.split(": ", 1)[1].split(" wait on")[0].split(" -> ")
    assert all(int(h.split()[0][1:]) >= n - ranks for h in heads if h.startswith("c"))  # each a rank's head


@pytest.mark.parametrize("name,what,cmd", [
    ("toy-attention.json", "a Twill graph", "plan it with `adasched plan twill --graph"),
    ("jobs.json", "a LoRA jobs file", "plan it with `adasched plan lora --jobs")])
def test_simulate_on_a_planner_input_says_what_it_is(tmp_path, capsys, name, what, cmd):
    """The same hunt: `simulate` on a Twill graph said "schema_version: missing (not an adasched plan?)" where
    `show` says what the file is."""
    from importlib import resources

    f = tmp_path / name
    if name == "jobs.json":
        f.write_text(json.dumps({"capacity": 4096, "jobs": []}))
    else:
        f.write_text(resources.files("adasched.planner.twill").joinpath("graphs", name).read_text())
    assert main(["simulate", str(f)]) == 2
    assert capsys.readouterr().err == f"error: {f}: is {what}, not a task graph or plan: {cmd} {f}`\n"
