"""Shared test set-up: CPU only, Triton under the interpreter, matplotlib headless, fixed thread counts."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _torchrun_logs_in_the_session_tmp(tmp_path_factory):
    """torchrun without ``--log-dir`` leaves an empty ``torchelastic_*`` tree in the temp dir per launch; the tests
    that start it directly send those trees to this session's pytest temp folder (``PET_LOG_DIR`` is torchrun's
    environment spelling of ``--log-dir``; an explicit ``--log-dir`` still wins)."""
    if "PET_LOG_DIR" in os.environ:
        yield
        return
    os.environ["PET_LOG_DIR"] = str(tmp_path_factory.mktemp("torchelastic"))
    try:
        yield
    finally:
        os.environ.pop("PET_LOG_DIR", None)


@pytest.fixture
def assert_show_refuses(tmp_path, capsys):
    """``check(good_plan_dict, [(edit, needle), ...])``: each edited copy of a valid plan makes ``adasched show
    FILE --plot PNG`` exit 2 with one ``error: FILE: fails verification: ...`` line containing ``needle``, and
    draws nothing."""
    from adasched.planner.cli import main

    def check(good: dict, cases) -> None:
        for i, (edit, needle) in enumerate(cases):
            d = json.loads(json.dumps(good))
            edit(d)
            p, png = tmp_path / f"tampered{i}.json", tmp_path / f"tampered{i}.png"
            p.write_text(json.dumps(d))
            capsys.readouterr()
            assert main(["show", str(p), "--plot", str(png)]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: {p}: fails verification: ") and needle in err and err.count("\n") == 1, err
            assert not png.exists()

    return check


@pytest.fixture
def one_error(capsys):
    """``check(rc, where)``: rc is 2 and stderr is exactly one ``error: <where>...`` line (no traceback, no
    warning); returns that line."""
    def check(rc: int, where: str) -> str:
        err = capsys.readouterr().err
        assert rc == 2, err
        assert err.count("\n") == 1 and err.startswith(f"error: {where}"), err
        assert "Traceback" not in err and "Warning" not in err
        return err

    return check


@pytest.fixture
def two_rank_sp_plan():
    """A hand-made 2-GPU FlexSP plan of one step (sequences of 60, 20 and 9 tokens: one SP-2 group, then two SP-1
    groups) for tests that launch train_sp on 2 ranks."""
    from adasched.planner.flexsp.plan import SPGroup, SPMicroBatch, SPPlan, SPStep
    from adasched.planner.plan import SolverRecord

    step = SPStep(step=0, seqlens=[60, 20, 9], predicted_ms=2.0, micro_batches=[
        SPMicroBatch(groups=[SPGroup(degree=2, ranks=[0, 1], seq_ids=[0], seqlens=[60], predicted_ms=1.0)],
                     predicted_ms=1.0),
        SPMicroBatch(groups=[SPGroup(degree=1, ranks=[0], seq_ids=[1], seqlens=[20], predicted_ms=1.0),
                             SPGroup(degree=1, ranks=[1], seq_ids=[2], seqlens=[9], predicted_ms=1.0)],
                     predicted_ms=1.0)])
    return SPPlan(world_size=2, model="tiny-gpt", inputs_digest="test",
                  solver=SolverRecord(backend="hand", status="heuristic", solve_seconds=0.0), predicted_ms=2.0,
                  steps=[step])


_LOCK_HOLDER = """
import sys
from adasched.runtime.checkpoint import CheckpointConfig, Checkpointer
ck = Checkpointer(CheckpointConfig(folder=sys.argv[1]), run={})
ck._take_lock()
print("held", flush=True)
sys.stdin.read()   # holds the folder until the test closes its stdin
"""


@pytest.fixture
def checkpoint_lock_holder():
    """Start another process that holds a checkpoint folder's lock (a first run still training): ``hold(folder)``
    returns its Popen once the lock is taken; ``hold.release()`` (or the test's end) closes its stdin, and it must
    then exit 0, its lock going with it."""
    import subprocess
    import sys

    procs = []

    def hold(folder):
        proc = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(folder)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline() == "held\n"
        return proc

    def release():
        while procs:
            proc = procs.pop()
            proc.stdin.close()
            assert proc.wait(timeout=60) == 0

    hold.release = release
    try:
        yield hold
    finally:
        for proc in procs:  # a test that failed before release(): do not leave the holder running
            proc.kill()
            proc.wait(timeout=60)
