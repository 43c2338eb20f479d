"""The launch scripts' one-process pre-checks (train_sp --check-plan-only, train_moe --validate-only, train_lora
--check) refuse a --checkpoint-dir whose lock another run holds, in the ranks' own words, exit 2 (hunt, 35th
session: the ranks found it inside torchrun, whose failure report - SIGTERM warnings, ChildFailedError, the Root
Cause block - followed the one line, exit 1)."""
from __future__ import annotations

import random

import pytest

from adasched.profiler.io import InputError
from adasched.runtime.checkpoint import LOCK_NAME, CheckpointConfig, Checkpointer, check_folder_free


def _locked(folder, pid):
    return (f"{folder}: another run is using this checkpoint folder ({LOCK_NAME} is locked by pid {pid}); wait for "
            f"it to end or give a new --checkpoint-dir")


def test_check_folder_free(tmp_path, checkpoint_lock_holder):
    new = tmp_path / "new"
    check_folder_free(new)  # a folder that does not exist: free, and nothing is created
    assert not new.exists()
    free = tmp_path / "free"
    free.mkdir()
    check_folder_free(free)
    assert list(free.iterdir()) == []  # (no lock file made)
    held = tmp_path / "held"
    holder = checkpoint_lock_holder(held)
    with pytest.raises(InputError) as err:
        check_folder_free(held)
    assert str(err.value) == _locked(held, holder.pid)
    check_folder_free(held / ".." / "free")
    checkpoint_lock_holder.release()
    check_folder_free(held)  # the holder gone
    # this process's own lock is not "another run"
    ck = Checkpointer(CheckpointConfig(folder=held), run={})
    ck.resume({})
    check_folder_free(held)
    ck.release()


def test_the_pre_checks_refuse_a_held_folder(tmp_path, monkeypatch, capsys, checkpoint_lock_holder,
                                             two_rank_sp_plan):
    from adasched.launch import train_lora, train_moe, train_sp
    from adasched.planner.plan import save_plan

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    ck = tmp_path / f"ck{random.randrange(1000)}"
    holder = checkpoint_lock_holder(ck)
    plan = tmp_path / "sp.json"
    save_plan(two_rank_sp_plan, plan)
    jobs = tmp_path / "jobs.json"
    jobs.write_text('{"capacity": 256, "stages": 1, "global_batches": 1, "seed": 5, "layers": 2, "jobs": [{"name": '
                    '"a", "adapter": {"r": 2, "alpha": 4, "target_modules": ["q_proj"]}, "lengths": {"dist": '
                    '"lognormal", "median": 20, "sigma": 0.5, "min": 3, "max": 60}, "global_batch_size": 3, "lr": '
                    '0.01}]}')
    runs = {
        "train_sp": lambda: train_sp.main(["--plan", str(plan), "--check-plan-only", "--world", "2",
                                           "--checkpoint-dir", str(ck)]),
        "train_moe": lambda: train_moe.main(["--validate-only", "--checkpoint-dir", str(ck)]),
        "train_lora": lambda: train_lora.main(["--jobs", str(jobs), "--out", str(tmp_path / "adapters"),
                                               "--checkpoint-dir", str(ck), "--check", "--hidden", "16",
                                               "--layers", "2"]),
    }
    for name, run in runs.items():
        capsys.readouterr()
        assert run() == 2, name
        err = capsys.readouterr().err
        assert err == f"error: {_locked(ck, holder.pid)}\n", (name, err)
    checkpoint_lock_holder.release()
    for name, run in runs.items():  # the holder gone, each pre-check passes
        assert run() == 0, (name, capsys.readouterr().err)


def test_a_pre_checks_instant_does_not_refuse_the_run(tmp_path):
    """(review) a second launch's pre-check holds the lock shared for an instant; the first run's rank 0, locking
    at that moment, was refused ('locked by pid <the pre-check's>'). It retries for LOCK_RETRY_S now; a holder that
    stays is still refused after it."""
    import fcntl
    import os
    import threading
    import time

    from adasched.runtime import checkpoint as ckpt

    folder = tmp_path / "ck"
    folder.mkdir()
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # as check_folder_free holds it
    threading.Timer(0.15, os.close, (fd,)).start()
    t0 = time.monotonic()
    ck = Checkpointer(CheckpointConfig(folder=folder), run={})
    assert ck.resume({}) == 0  # it waited past the instant
    assert 0.1 <= time.monotonic() - t0 < ckpt.LOCK_RETRY_S + 5
    ck.release()
    fd = os.open(folder / LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    try:  # held past the retry: refused, naming this process
        t0 = time.monotonic()
        with pytest.raises(InputError, match=f"another run is using this checkpoint folder .*pid {os.getpid()}"):
            Checkpointer(CheckpointConfig(folder=folder), run={}).resume({})
        assert time.monotonic() - t0 >= ckpt.LOCK_RETRY_S
    finally:
        os.close(fd)
