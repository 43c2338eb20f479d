"""(h53) A deadlock cycle's message built every step of the cycle with a list.index each (a 100k-task ring took 162 s
to report); only the steps shown are built now. The message is the same: checked on rings of every length around
the truncation and on a long one."""
import random

import pytest

from adasched.planner.simulator import Task, simulate


def _ring(m, offset=0):
    """m tasks on their own ranks, each depending on the next (rotated by ``offset`` in the list)."""
    names = [f"k{i}" for i in range(m)]
    tasks = [Task(names[i], i, "s", 1.0 + random.random(), deps=(names[(i + 1) % m],)) for i in range(m)]
    return tasks[offset:] + tasks[:offset]


@pytest.mark.parametrize("m", [2, 3, 7, 8, 9, 10, 40_000])
def test_ring_messages(m):
    with pytest.raises(ValueError) as e:
        simulate(_ring(m))
    steps = [f"k{i}" for i in range(m)]
    shown = steps if m <= 8 else steps[:4] + [f"... {m - 6} more ..."] + steps[-2:]
    assert str(e.value) == (f"simulation deadlocked: {' -> '.join(shown + ['k0'])} wait on each other (a -> b: a "
                            f"waits on b, a dependency of it, a task ahead of it on its stream or a missing part of "
                            f"its collective; {m} tasks never ran)")


def test_a_step_that_needs_a_task_behind_the_next_head():
    """a waits on c, which sits behind b on b's stream: the step reads "a (needs c, behind b)"."""
    tasks = [Task("a", 0, "s", 1.0, deps=("c",)), Task("b", 1, "s", 1.0, deps=("a",)), Task("c", 1, "s", 1.0)]
    with pytest.raises(ValueError, match=r"simulation deadlocked: a \(needs c, behind b\) -> b -> a wait on each "
                                         r"other"):
        simulate(tasks)
