"""Discrete-event simulator against hand-computed timelines."""
import pytest

from adasched.planner.simulator import Task, simulate


def _times(sim):
    return {t.name: (t.start_ms, t.end_ms) for t in sim.tasks}


def test_stream_serialises_in_order_and_streams_overlap():
    sim = simulate([
        Task("a", 0, "compute", 3.0),
        Task("b", 0, "compute", 2.0),
        Task("c", 0, "comm", 4.0),  # another stream of the same rank: runs alongside
        Task("d", 1, "compute", 1.5),
    ])
    assert _times(sim) == {"a": (0.0, 3.0), "b": (3.0, 5.0), "c": (0.0, 4.0), "d": (0.0, 1.5)}
    assert sim.makespan_ms == 5.0
    assert sim.busy_ms(rank=0) == 9.0 and sim.busy_ms(stream="compute") == 6.5


def test_dependencies_across_streams_and_ranks():
    # compute a (2) -> comm send s (3, waits for a) ; rank 1 compute x (1) then y depends on s (2)
    sim = simulate([
        Task("a", 0, "compute", 2.0),
        Task("s", 0, "comm", 3.0, deps=("a",)),
        Task("b", 0, "compute", 4.0),  # not blocked by s: starts right after a
        Task("x", 1, "compute", 1.0),
        Task("y", 1, "compute", 2.0, deps=("s",)),
    ])
    assert _times(sim) == {"a": (0, 2), "s": (2, 5), "b": (2, 6), "x": (0, 1), "y": (5, 7)}
    assert sim.makespan_ms == 7.0


def test_sync_collective_starts_together_when_all_parts_ready():
    # rank 0 is ready for the all-to-all at 1, rank 1 at 4: both parts run 4..6 (rank 0 waits)
    sim = simulate([
        Task("c0", 0, "compute", 1.0),
        Task("c1", 1, "compute", 4.0),
        Task("a2a0", 0, "comm", 2.0, deps=("c0",), sync="a2a"),
        Task("a2a1", 1, "comm", 2.0, deps=("c1",), sync="a2a"),
        Task("after0", 0, "compute", 1.0, deps=("a2a0",)),
    ])
    t = _times(sim)
    assert t["a2a0"] == (4.0, 6.0) and t["a2a1"] == (4.0, 6.0) and t["after0"] == (6.0, 7.0)
    assert sim.by_name()["a2a0"].lane == "rank 0 / comm"


def test_sync_parts_with_different_durations_and_queued_behind_other_work():
    sim = simulate([
        Task("p", 1, "comm", 5.0),  # rank 1's comm stream is busy until 5
        Task("ar0", 0, "comm", 1.0, sync="ar"),
        Task("ar1", 1, "comm", 2.0, sync="ar"),
    ])
    t = _times(sim)
    assert t["ar0"] == (5.0, 6.0) and t["ar1"] == (5.0, 7.0) and sim.makespan_ms == 7.0


def test_deadlock_is_an_error():
    # a waits on b, but b sits behind a on the same stream
    with pytest.raises(ValueError, match="deadlocked"):
        simulate([Task("a", 0, "s", 1.0, deps=("b",)), Task("b", 0, "s", 1.0)])
    # two collectives issued in opposite orders on two ranks
    with pytest.raises(ValueError, match="deadlocked"):
        simulate([Task("x0", 0, "comm", 1, sync="X"), Task("y0", 0, "comm", 1, sync="Y"),
                  Task("y1", 1, "comm", 1, sync="Y"), Task("x1", 1, "comm", 1, sync="X")])


def test_bad_tasks():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        simulate([Task("a", 0, "s", 1.0, deps=("nope",))])
    with pytest.raises(ValueError, match="duplicate task name"):
        simulate([Task("a", 0, "s", 1.0), Task("a", 1, "s", 1.0)])
    for bad in (-1.0, float("nan"), float("inf")):  # (inf gave "makespan inf" and exit 0)
        with pytest.raises(ValueError, match="duration_ms must be finite and >= 0"):
            Task("a", 0, "s", bad)
    with pytest.raises(ValueError, match="add up past the float range"):       # finite parts, infinite sum
        simulate([Task("a", 0, "s", 1e308), Task("b", 0, "s", 1e308)])
    assert simulate([]).makespan_ms == 0.0


def test_task_graph_with_an_unknown_top_level_field_is_refused(tmp_path, capsys):
    """{"tasks": [...], "unit": "cycles"} ran with the extra field ignored."""
    import json

    from adasched.planner.cli import main

    f = tmp_path / "g.json"
    f.write_text(json.dumps({"tasks": [{"name": "a", "rank": 0, "stream": "c", "duration_ms": 1.5}],
                             "unit": "cycles"}))
    assert main(["simulate", str(f)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {f}: unit: not a task-graph field (a task graph is {{\"tasks\": [...]}})\n", err


def test_gantt_renders(tmp_path):
    from adasched.planner.gantt import render_gantt

    sim = simulate([Task("a", 0, "compute", 2.0, category="attn"), Task("b", 0, "comm", 1.0, deps=("a",), category="a2a"),
                    Task("c", 1, "compute", 3.0, category="gemm")])
    out = tmp_path / "g.png"
    render_gantt(sim.tasks, out, title="t")
    assert out.read_bytes()[:4] == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["g.png"]
