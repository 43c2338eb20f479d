"""launch/precheck_env.sh's exec_torchrun (33rd session): torchrun gets a log folder of its own, removed once torchrun
(the script's pid, kept by exec) is gone - also when the launch's process group is killed as it ends (launch/proc.py's
run_tree does, as batch systems do: the watcher has a session of its own) - and a TMPDIR that is no folder falls back
to /tmp (a raw mktemp failure stopped the launch after its pre-check had passed). A stand-in for $PY records the
arguments torchrun would get and exits."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from adasched.launch.proc import run_tree

REPO = Path(__file__).resolve().parents[2]


def _launcher(tmp_path: Path, rc: int = 0) -> Path:
    fake = tmp_path / "fakepy"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/args"\nexit {rc}\n')
    fake.chmod(0o755)
    script = tmp_path / "launch.sh"
    script.write_text(f'#!/usr/bin/env bash\nset -euo pipefail\nPY="{fake}"\n. "{REPO}/launch/precheck_env.sh"\n'
                      f'exec_torchrun --standalone --nproc_per_node=2 -m adasched.launch.train_sp --plan "a b"\n')
    script.chmod(0o755)
    return script


def _gone(folder: Path, within_s: float = 10.0) -> bool:
    end = time.monotonic() + within_s
    while folder.exists() and time.monotonic() < end:
        time.sleep(0.1)
    return not folder.exists()


@pytest.mark.parametrize("how", ["subprocess", "run_tree"])
@pytest.mark.parametrize("rc", [0, 3])
def test_the_log_folder_goes_with_torchrun(tmp_path, how, rc):
    tmp = tmp_path / "tmp dir"  # (a space in TMPDIR)
    tmp.mkdir()
    script = _launcher(tmp_path, rc)
    env = dict(os.environ, TMPDIR=str(tmp))
    run = run_tree if how == "run_tree" else (lambda cmd, **kw: subprocess.run(cmd, timeout=kw.pop("timeout_s"), **kw))
    done = run([str(script)], timeout_s=60, env=env, capture_output=True)
    assert done.returncode == rc, done.stderr  # torchrun's exit status is the launch's
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:3] == ["-m", "torch.distributed.run", "--log-dir"]
    logs = Path(args[3])
    assert logs.parent == tmp and logs.name.startswith("adasched-torchrun.")
    assert args[4:] == ["--standalone", "--nproc_per_node=2", "-m", "adasched.launch.train_sp", "--plan", "a b"]
    assert _gone(logs), sorted(tmp.iterdir())  # (run_tree kills the launch's process group as it ends)


def test_a_tmpdir_that_is_no_folder_falls_back_to_tmp(tmp_path):
    script = _launcher(tmp_path)
    done = subprocess.run([str(script)], env=dict(os.environ, TMPDIR=str(tmp_path / "missing")), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    logs = Path((tmp_path / "args").read_text().splitlines()[3])
    assert logs.parent == Path("/tmp") and _gone(logs)
