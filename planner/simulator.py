"""A small discrete-event simulator: tasks on per-rank streams (compute, communication, ...) with dependencies.

Each stream runs its tasks one at a time in the order they were added (like a CUDA stream); a task starts
when its stream is free and all its dependencies have finished. Collectives spanning several ranks are
modelled as one task per rank that share a ``sync`` key: all parts start together, when every part is ready.
Times are in ms. Planners use it to score plans and baselines; `adasched show --plot` draws its output.
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

__all__ = ["Task", "ScheduledTask", "Simulation", "simulate"]


@dataclass
class Task:
    name: str
    rank: int
    stream: str
    duration_ms: float
    deps: tuple[str, ...] = ()
    sync: str | None = None
    """Tasks with the same sync key (one per rank) start together: a collective."""
    category: str = ""
    """Free-form label used for colouring (e.g. 'attn', 'a2a', 'gemm')."""

    def __post_init__(self):
        if not 0 <= self.duration_ms < float("inf"):  # (NaN fails too; an infinite one made "makespan inf", exit 0)
            raise ValueError(f"task {self.name!r}: duration_ms must be finite and >= 0, got {self.duration_ms}")


@dataclass(frozen=True)
class ScheduledTask:
    name: str
    rank: int
    stream: str
    start_ms: float
    end_ms: float
    category: str = ""

    @property
    def lane(self) -> str:
        return f"rank {self.rank} / {self.stream}"


@dataclass
class Simulation:
    tasks: list[ScheduledTask] = field(default_factory=list)
    unit: str = "ms"
    """What the tasks' ``start_ms``/``end_ms`` count: milliseconds, or "cycles" for a Twill loop schedule."""

    @property
    def makespan_ms(self) -> float:
        return max((t.end_ms for t in self.tasks), default=0.0)

    def busy_ms(self, rank: int | None = None, stream: str | None = None) -> float:
        """Busy time of the matching lanes, summed (each lane counted once where its tasks overlap)."""
        return sum(busy for (r, s), busy in self._busy().items()
                   if (rank is None or r == rank) and (stream is None or s == stream))

    def busy_by_lane(self) -> dict[str, float]:
        """Time each lane (``ScheduledTask.lane``) is busy: the length of the union of its tasks' intervals. A
        stream of :func:`simulate` runs one task at a time; a Twill warp group's ops overlap (their plain sum read 9
        busy cycles of an 8-cycle makespan)."""
        lanes = {(t.rank, t.stream): t.lane for t in self.tasks}
        return {lanes[k]: busy for k, busy in self._busy().items()}

    def _busy(self) -> dict[tuple[int, str], float]:
        spans: dict[tuple[int, str], list[tuple[float, float]]] = {}
        for t in self.tasks:
            spans.setdefault((t.rank, t.stream), []).append((t.start_ms, t.end_ms))
        out: dict[tuple[int, str], float] = {}
        for key, ivs in spans.items():
            total, start, end = 0.0, None, None
            for a, b in sorted(ivs):
                if end is None or a > end:
                    if end is not None:
                        total += end - start
                    start, end = a, b
                else:
                    end = max(end, b)
            out[key] = total + (end - start if end is not None else 0.0)
        return out

    def by_name(self) -> dict[str, ScheduledTask]:
        return {t.name: t for t in self.tasks}


def simulate(tasks: list[Task]) -> Simulation:
    """Schedule ``tasks`` (see module docstring). Raises ValueError on unknown dependencies, a sync key held twice
    on one stream, or deadlock.

    Event-driven: a stream is looked at again only when something its head waits on happened (its previous task or
    one of the head's dependencies finished); a collective's parts are counted as they arrive and the last one starts
    the group. Linear in tasks + dependencies (a sweep of every stream until nothing moved was quadratic for a chain
    listed in reverse order; re-checking every part of a collective on each wake, in its size).
    Start times do not depend on the order streams are looked at: a task starts at the latest of its stream's
    previous end, its dependencies' ends and (sync) its group members' ready times."""
    names = set()
    for t in tasks:
        if t.name in names:
            raise ValueError(f"duplicate task name {t.name!r}")
        names.add(t.name)
    for t in tasks:
        for d in t.deps:
            if d == t.name:  # (was "simulation deadlocked: waiting tasks ['a']")
                raise ValueError(f"task {t.name!r} depends on itself")
            if d not in names:
                raise ValueError(f"task {t.name!r} depends on unknown task {d!r}")

    queues: dict[tuple[int, str], list[Task]] = defaultdict(list)
    for t in tasks:
        queues[(t.rank, t.stream)].append(t)
    sync_groups: dict[str, list[Task]] = defaultdict(list)
    for t in tasks:
        if t.sync is not None:
            sync_groups[t.sync].append(t)
    for key, group in sync_groups.items():  # (said only "deadlocked" before: one stream cannot run both at once)
        seen: dict[tuple[int, str], str] = {}
        for g in group:
            lane = (g.rank, g.stream)
            if lane in seen:
                raise ValueError(f"sync key {key!r}: tasks {seen[lane]!r} and {g.name!r} are both on rank {g.rank} "
                                 f"stream {g.stream!r} (the parts of a collective start together: one per stream)")
            seen[lane] = g.name
    waiters: dict[str, list[tuple[int, str]]] = defaultdict(list)  # task -> streams whose tasks depend on it
    for t in tasks:
        for d in set(t.deps):
            waiters[d].append((t.rank, t.stream))

    head = {k: 0 for k in queues}
    stream_free = {k: 0.0 for k in queues}
    end: dict[str, float] = {}
    out: list[ScheduledTask] = []
    remaining = len(tasks)

    def ready_time(t: Task) -> float | None:
        """Earliest start of t if it is at the head of its stream and its deps are done, else None."""
        key = (t.rank, t.stream)
        if head[key] >= len(queues[key]) or queues[key][head[key]] is not t:
            return None
        if any(d not in end for d in t.deps):
            return None
        return max([stream_free[key]] + [end[d] for d in t.deps])

    # a collective's parts arrive one by one (at the head of their stream, dependencies done: their ready time
    # is fixed from then on); the last arrival starts the group at the latest ready time. (Each wake used to re-check
    # every part and re-queue every part's stream: quadratic in a collective's size: seconds at 1,024 ranks.)
    arrived: dict[str, dict[str, float]] = defaultdict(dict)
    todo = deque(queues)
    queued = set(queues)
    while todo:
        key = todo.popleft()
        queued.discard(key)
        while head[key] < len(queues[key]):
            t = queues[key][head[key]]
            rt = ready_time(t)
            if rt is None:
                break  # looked at again when what it waits on finishes
            if t.sync is not None:
                parts = arrived[t.sync]
                parts[t.name] = rt
                group = sync_groups[t.sync]
                if len(parts) < len(group):
                    break  # the last part to arrive starts the group
                start = max(parts.values())
                del arrived[t.sync]
            else:
                group, start = [t], rt
            for g in group:
                gk = (g.rank, g.stream)
                e = start + g.duration_ms
                end[g.name] = e
                stream_free[gk] = e
                head[gk] += 1
                out.append(ScheduledTask(g.name, g.rank, g.stream, start, e, g.category))
                remaining -= 1
                # wake: the member's own stream (its next task) and the streams of its dependents
                for lane in [gk] + waiters.get(g.name, []):
                    if lane not in queued:
                        queued.add(lane)
                        todo.append(lane)
    if remaining:
        raise ValueError(_deadlock_message(tasks, queues, head, end, arrived, sync_groups, remaining))
    if out and not max(s.end_ms for s in out) < float("inf"):  # finite durations whose sum overflowed
        raise ValueError("simulation: the task durations add up past the float range (makespan inf)")
    out.sort(key=lambda s: (s.rank, s.stream, s.start_ms))
    return Simulation(out)


def _deadlock_message(tasks, queues, head, end, arrived, sync_groups, remaining: int) -> str:
    """Name a cycle of waiting stream heads: the first stuck heads in stream order were often bystanders that
    depend on the cycle ("waiting tasks ['t0', ..., 't4']" for a cycle x <-> y elsewhere). Every stuck head waits
    on another: the head of each unfinished dependency's stream (the dependency itself, or a task ahead of it), and,
    for a collective's part that has arrived, the heads of its missing parts' streams; so the walk repeats."""
    by_name = {t.name: t for t in tasks}

    def head_of(t) -> str:
        q = queues[(t.rank, t.stream)]
        return q[head[(t.rank, t.stream)]].name

    def waits_on(name: str) -> tuple[str, str]:
        """(the stuck head ``name`` waits on, the task it needs there: that head itself or one behind it)."""
        t = by_name[name]
        for d in t.deps:
            if d not in end:
                return head_of(by_name[d]), d
        parts = arrived.get(t.sync, {}) if t.sync is not None else {}
        for g in sync_groups.get(t.sync, []):
            if g.name not in parts:
                return head_of(g), g.name
        return name, name  # (cannot happen: a head waiting on nothing would have run)

    start = next(q[head[k]].name for k, q in queues.items() if head[k] < len(q))
    order: dict[str, int] = {}
    need: dict[str, str] = {}
    cur = start
    while cur not in order:
        order[cur] = len(order)
        nxt, need[cur] = waits_on(cur)
        cur = nxt
    cycle = list(order)[order[cur]:]
    tail = f"{remaining} tasks never ran"
    if len(cycle) == 1:  # a task needs one behind it on its own stream ("t -> t" said nothing of u)
        t = by_name[cycle[0]]  # (a collective's parts are on distinct streams: only a dependency does this)
        return (f"simulation deadlocked: task {t.name!r} depends on {need[t.name]!r}, which comes after it on rank "
                f"{t.rank} stream {t.stream!r} ({tail})")

    def step(i: int) -> str:  # "a", or "a (needs u)" when a waits on a task behind the next head
        a, nxt = cycle[i], cycle[(i + 1) % len(cycle)]
        return a if need[a] == nxt else f"{a} (needs {need[a]}, behind {nxt})"

    # (only the steps shown are built: cycle.index per step made a 100k-task ring's message take 162 s; h53)
    if len(cycle) > 8:
        shown = [step(i) for i in range(4)] + [f"... {len(cycle) - 6} more ..."] + \
            [step(i) for i in range(len(cycle) - 2, len(cycle))]
    else:
        shown = [step(i) for i in range(len(cycle))]
    return (f"simulation deadlocked: {' -> '.join(shown + [cycle[0]])} wait on each other (a -> b: a waits on b, a "
            f"dependency of it, a task ahead of it on its stream or a missing part of its collective; {tail})")
