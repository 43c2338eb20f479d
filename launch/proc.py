"""Run a torchrun command (or any process tree) with a time limit that stops the whole tree.

``subprocess.run(cmd, timeout=...)`` kills only the process it started: torchrun died and its ranks lived on,
still training, writing checkpoints and printing into the caller's output (or, killed during start-up, blocking
on the dead agent's store until their own timeout). Here the command runs in a session of its own, and on a time
limit or a Ctrl-C the whole process group gets SIGTERM, then SIGKILL after a grace period. torchrun starts each
rank in a session of its own (``start_new_session``), out of that group's reach: its own SIGTERM handler stops
them, but when torchrun itself dies (SIGKILL, the OOM killer) they are orphans. So the tree's processes are
recorded while it runs (from /proc, where there is one: Linux) and those still alive when the leader has ended
are killed - also what ends a capture whose pipes the orphans held open until the time limit."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Mapping, Sequence

__all__ = ["run_tree", "torchrun_tree"]

#: seconds between SIGTERM and SIGKILL to the process group
GRACE_S = 10.0


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone already
            return
        if wait is None:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader once it exits: its zombie counts as a member and held the full grace
            try:
                os.killpg(proc.pid, 0)  # any member left?
            except ProcessLookupError:
                return
            time.sleep(0.05)


#: seconds between two looks at the tree's processes while it runs
SCAN_S = 0.5


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time (clock ticks since boot) of every descendant of ``root`` now; {} without /proc."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {}
    children: dict[int, list[tuple[int, int]]] = {}
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
            rest = stat[stat.rindex(")") + 2:].split()  # (the command name may hold spaces and parentheses)
            children.setdefault(int(rest[1]), []).append((int(e), int(rest[19])))
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid, start in children.get(todo.pop(), ()):
            if pid not in found:
                found[pid] = start
                todo.append(pid)
    return found


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _kill_recorded(seen: dict[int, int]) -> None:
    """SIGKILL every recorded process still alive (the same process: its start time matches, not a reused pid)."""
    for pid, start in seen.items():
        if _start_time(pid) == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _pump(stream, muted) -> None:
    """Copy ``stream`` (a child's stderr pipe, binary) to this process's stderr line by line until it closes,
    dropping lines once ``muted`` is set. It keeps reading whatever happens to the writes (a stderr whose reader
    quit, one without a byte buffer, a pytest capture): a reader that stopped left the child blocked on a full pipe
    until the time limit (a non-UTF-8 byte killed a text-mode copier)."""
    for line in stream:
        if muted.is_set():
            continue
        try:
            buf = getattr(sys.stderr, "buffer", None)
            if buf is not None:
                sys.stderr.flush()  # (text written before stays before)
                buf.write(line)
                buf.flush()
            else:
                sys.stderr.write(line.decode(errors="replace"))
                sys.stderr.flush()
        except (OSError, ValueError):  # a closed or broken stderr: drop the rest, keep draining the pipe
            muted.set()


def run_tree(cmd: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None = None,
             capture_output: bool = False, text: bool = True, grace_s: float = GRACE_S,
             quiet_interrupt: bool = False) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, timeout=timeout_s, ...)`` whose time-out (``subprocess.TimeoutExpired``, with what
    was captured) and Ctrl-C stop every process the command started, not only the first. ``quiet_interrupt``
    (without ``capture_output``): the command's stderr is passed on line by line until a Ctrl-C, then dropped -
    torchrun answers the SIGTERM that stops it with ~35 lines (its shutdown notes and a SignalException
    traceback), which buried the caller's one "aborted" line."""
    import threading

    pipe = subprocess.PIPE if capture_output else None
    forward = quiet_interrupt and not capture_output  # (stderr in bytes, read by the copier; stdout inherited)
    proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, stdout=pipe,
                            stderr=subprocess.PIPE if forward else pipe, text=text and not forward,
                            start_new_session=True)
    muted = threading.Event()
    pump = None
    if forward:
        pump = threading.Thread(target=_pump, args=(proc.stderr, muted), daemon=True)
        pump.start()
    deadline = time.monotonic() + timeout_s
    seen: dict[int, int] = {}
    try:
        while True:
            try:  # (communicate may be called again after its time-out: nothing captured is lost)
                if forward:  # (the pump reads stderr; nothing is captured)
                    proc.wait(timeout=max(0.0, min(SCAN_S, deadline - time.monotonic())))
                    out = err = None
                else:
                    out, err = proc.communicate(timeout=max(0.0, min(SCAN_S, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    raise
                if proc.poll() is not None:  # the leader ended, something of its tree holds the pipes: orphans
                    _kill_recorded(seen)
                else:
                    seen.update(_descendants(proc.pid))
    except subprocess.TimeoutExpired:
        _stop_group(proc, grace_s)
        _kill_recorded(seen)
        out = err = None
        if forward:  # (the copier owns the stderr pipe: communicate() would read it too)
            proc.wait()
            pump.join(timeout=grace_s)
        else:
            try:
                out, err = proc.communicate(timeout=grace_s)
            except subprocess.TimeoutExpired:  # a process the scans never saw holds the pipes: give up reading
                pass
        raise subprocess.TimeoutExpired(list(cmd), timeout_s, output=out, stderr=err) from None
    except BaseException:  # KeyboardInterrupt: the group is in its own session, the terminal's Ctrl-C missed it
        muted.set()
        _stop_group(proc, grace_s)
        _kill_recorded(seen)
        proc.wait()
        raise
    # the leader ended: stop any process it left behind (torchrun's own crash: its ranks, in sessions of their own)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _kill_recorded(seen)
    if pump is not None:  # the rest of what it wrote (the pipe closes with the last writer)
        pump.join(timeout=grace_s)
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def torchrun_tree(nproc: int, module: str, args: Sequence[str], *, timeout_s: float,
                  env: Mapping[str, str] | None = None, capture_output: bool = False,
                  quiet_interrupt: bool = False) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=NPROC -m MODULE ARGS`` under :func:`run_tree`, with torchrun's
    log folder a temporary one removed afterwards: without ``--log-dir`` torchrun leaves an empty
    ``/tmp/torchelastic_*`` tree behind on every launch."""
    with tempfile.TemporaryDirectory(prefix="adasched-torchrun-") as logs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--log-dir", logs, "-m", module, *args]
        return run_tree(cmd, timeout_s=timeout_s, env=env, capture_output=capture_output,
                        quiet_interrupt=quiet_interrupt)
