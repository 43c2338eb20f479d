"""launch.proc.run_tree: a time-out stops every process the command started (subprocess.run's killed only the
first: torchrun died and its ranks trained on), and a normal exit leaves none behind."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from adasched.launch.proc import run_tree

# a parent that starts a child which would outlive it, prints the child's pid, then waits
TREE = ("import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "print(c.pid, flush=True); time.sleep(120)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, within_s: float = 15.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_timeout_stops_the_whole_tree():
    with pytest.raises(subprocess.TimeoutExpired) as err:
        run_tree([sys.executable, "-c", TREE], timeout_s=3.0, capture_output=True, grace_s=2.0)
    child = int(err.value.output.split()[0])
    assert _wait_gone(child), f"grandchild {child} outlived the time-out"


def test_normal_exit_leaves_no_orphans():
    code = ("import subprocess, sys; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(c.pid)")
    r = run_tree([sys.executable, "-c", code], timeout_s=60.0, capture_output=True)
    assert r.returncode == 0
    assert _wait_gone(int(r.stdout.split()[0]))


def test_plain_run_returns_output_and_status():
    r = run_tree([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                 timeout_s=60.0, capture_output=True)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")


def test_timeout_returns_once_the_tree_is_gone_not_after_the_grace_period():
    """Hunt finding: the grace loop asked `killpg(pgid, 0)` without reaping the leader, whose zombie kept the
    group 'alive': every time-out or Ctrl-C waited the full grace period (10 s in `make demo`) although the tree
    died on SIGTERM at once."""
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_tree([sys.executable, "-c", TREE], timeout_s=2.0, capture_output=True, grace_s=30.0)
    took = time.monotonic() - t0
    assert took < 12.0, f"{took:.1f} s: waited for the 30 s grace period"


@pytest.mark.parametrize("script", ["train_lora", "train_sp", "train_moe", "profile_collectives"])
def test_launch_scripts_print_help_once_without_torchrun(script, tmp_path):
    """train_lora.sh --help: its pre-check printed the help to /dev/null and exited 0, then the script started
    torchrun and every rank printed it again (126 lines, 'usage:' twice at NPROC=2; train_moe.sh's pre-check
    printed it once more). The scripts hand --help to the module once now and start nothing."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHON=sys.executable, NPROC="2", OMP_NUM_THREADS="1", OUT=str(tmp_path / "p.json"))
    for flag in ("--help", "-h"):
        r = subprocess.run(["bash", str(repo / "launch" / f"{script}.sh"), "--quick" if script ==
                            "profile_collectives" else "--seed", *([] if script == "profile_collectives" else ["1"]),
                            flag], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert r.stdout.count("usage:") == 1 and f"adasched.launch.{script}" in r.stdout.splitlines()[0], r.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written


def _pids_running(marker: str) -> list[int]:
    found = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(e))
            except OSError:
                pass
    return [p for p in found if _alive(p)]


@pytest.mark.parametrize("capture", [False, True])
def test_ranks_of_a_torchrun_that_dies_are_stopped(capture):
    """Demo check: torchrun starts each rank in a session of its own, so killpg of torchrun's group missed them:
    with torchrun SIGKILLed (an OOM kill) its ranks lived on as orphans, and with capture_output run_tree waited
    for the time limit (their pipes stayed open). The ranks are recorded while they run and killed now."""
    import threading

    marker = f"{os.getpid()}.{int(capture)}7"  # a sleep argument only this test uses
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
           "sleep", marker]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    killed = []

    def kill_the_agent():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ranks = [p for p in _pids_running(marker) if b"distributed.run" not in open(f"/proc/{p}/cmdline", "rb").read()]
            agents = [p for p in _pids_running(marker) if p not in ranks]
            if len(ranks) == 2 and agents:
                time.sleep(1.0)  # (a scan of run_tree's has seen them)
                os.kill(agents[0], 9)
                killed.append(agents[0])
                return
            time.sleep(0.2)
    t = threading.Thread(target=kill_the_agent, daemon=True)
    t.start()
    start = time.monotonic()
    res = run_tree(cmd, timeout_s=120, env=env, capture_output=capture, grace_s=2.0)
    took = time.monotonic() - start
    t.join(5)
    assert killed and res.returncode == -9, (killed, res.returncode)
    assert took < 90, f"{took:.0f} s: waited for the time limit"
    deadline = time.monotonic() + 10
    while _pids_running(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pids_running(marker), "ranks of the dead torchrun are still running"


def test_torchrun_tree_leaves_no_log_folders(tmp_path):
    """torchrun without --log-dir made an empty /tmp/torchelastic_* tree per launch (3 per `make demo`): the
    launchers' log folder is a temporary one, gone afterwards, and nothing lands in the ranks' temp dir."""
    import tempfile

    from adasched.launch.proc import torchrun_tree

    (tmp_path / "mod").mkdir()
    # one write per line: torchrun runs the ranks with python -u, where print() writes "rank", " ", "0", "\n" apart
    # and two ranks printing at once mixed them ('rankrank  10', 7 of 24 runs)
    (tmp_path / "mod" / "probe_rank.py").write_text(
        "import os\nos.write(1, ('rank %s\\n' % os.environ['RANK']).encode())\n")
    child_tmp = tmp_path / "tmp"
    child_tmp.mkdir()
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "mod"), TMPDIR=str(child_tmp), OMP_NUM_THREADS="1")
    env.pop("PET_LOG_DIR", None)  # (the tests' own torchrun log folder would hide a launcher without --log-dir)
    before = {p.name for p in os.scandir(tempfile.gettempdir()) if p.name.startswith("adasched-torchrun-")}
    proc = torchrun_tree(2, "probe_rank", [], timeout_s=120, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("rank")) == ["rank 0", "rank 1"]
    assert list(child_tmp.iterdir()) == []  # (torchrun's default: torchelastic_<random>/<run id>/attempt_0/...)
    after = {p.name for p in os.scandir(tempfile.gettempdir()) if p.name.startswith("adasched-torchrun-")}
    assert after == before


# prints a line and touches a marker file, then answers SIGTERM with many lines (as torchrun does: its shutdown
# notes and a traceback)
NOISY = ("import pathlib, signal, sys, time\n"
         "def stop(*_):\n"
         "    for i in range(35): print(f'shutdown line {i}', file=sys.stderr, flush=True)\n"
         "    sys.exit(1)\n"
         "signal.signal(signal.SIGTERM, stop)\n"
         "print('working', file=sys.stderr, flush=True)\n"
         "pathlib.Path(sys.argv[1]).touch()\n"
         "time.sleep(120)\n")


@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_interrupt_passes_stderr_on_until_a_ctrl_c(capfd, tmp_path, quiet):
    """Demo hunt: a Ctrl-C during `make demo`'s flexsp step printed ~35 lines of torchrun's shutdown (notes and a
    SignalException traceback) before the one 'aborted' line. With quiet_interrupt the command's stderr is passed
    on until the Ctrl-C and dropped after it; without, everything reaches the terminal as before."""
    import signal
    import threading

    main_thread = threading.main_thread().ident
    marker = tmp_path / "working"

    def interrupt_when_working():  # a Ctrl-C once the child runs (and has written its first line)
        deadline = time.monotonic() + 50
        while time.monotonic() < deadline and not marker.exists():
            time.sleep(0.05)
        time.sleep(0.3)
        signal.pthread_kill(main_thread, signal.SIGINT)

    threading.Thread(target=interrupt_when_working, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_tree([sys.executable, "-c", NOISY, str(marker)], timeout_s=120.0, quiet_interrupt=quiet, grace_s=5.0)
    assert time.monotonic() - t0 < 60  # stopped by the Ctrl-C, not by a time limit
    err = capfd.readouterr().err
    assert "working" in err
    assert ("shutdown line" not in err) if quiet else (err.count("shutdown line") == 35), err


def test_quiet_interrupt_copier_survives_bad_bytes_and_a_broken_stderr(capfd, monkeypatch):
    """Review finding: the copier read the pipe as text and wrote it to sys.stderr; a non-UTF-8 byte (or a stderr
    whose reader quit) killed it, nobody read the pipe any more, and the child blocked on the full pipe until the
    time limit. Now the bytes pass as they are, and a failing stderr drops the rest while the pipe is drained."""
    lines = 20000  # ~400 KiB: more than a pipe holds
    code = ("import sys; sys.stderr.buffer.write(b'bad byte \\xff here\\n'); "
            f"[sys.stderr.write(f'line {{i}}\\n') for i in range({lines})]")
    t0 = time.monotonic()
    r = run_tree([sys.executable, "-c", code], timeout_s=60.0, quiet_interrupt=True)
    assert r.returncode == 0 and time.monotonic() - t0 < 30
    err = capfd.readouterr().err
    assert "bad byte" in err and f"line {lines - 1}\n" in err and err.count("\n") == lines + 1

    class Broken:
        class buffer:
            @staticmethod
            def write(b):
                raise BrokenPipeError(32, "Broken pipe")

            flush = write

        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Broken())
    t0 = time.monotonic()
    r = run_tree([sys.executable, "-c", code], timeout_s=60.0, quiet_interrupt=True)
    assert r.returncode == 0 and time.monotonic() - t0 < 30
