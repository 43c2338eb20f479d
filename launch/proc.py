"""Run a torchrun command (or any process tree) with a time limit that stops the whole tree.

``subprocess.run(cmd, timeout=...)`` kills only the process it started: torchrun died and its ranks lived on,
still training, writing checkpoints and printing into the caller's output (or, killed during start-up, blocking
on the dead agent's store until their own timeout). Here the command runs in a session of its own, and on a time
limit or a Ctrl-C the whole process group gets SIGTERM, then SIGKILL after a grace period."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Mapping, Sequence

__all__ = ["run_tree"]

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


def run_tree(cmd: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None = None,
             capture_output: bool = False, text: bool = True, grace_s: float = GRACE_S) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, timeout=timeout_s, ...)`` whose time-out (``subprocess.TimeoutExpired``, with what
    was captured) and Ctrl-C stop every process the command started, not only the first."""
    pipe = subprocess.PIPE if capture_output else None
    proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, stdout=pipe, stderr=pipe,
                            text=text, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop_group(proc, grace_s)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(list(cmd), timeout_s, output=out, stderr=err) from None
    except BaseException:  # KeyboardInterrupt: the group is in its own session, the terminal's Ctrl-C missed it
        _stop_group(proc, grace_s)
        proc.wait()
        raise
    if proc.returncode is not None:  # the leader ended: stop any rank it left behind (torchrun's own crash)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)
