"""Ctrl-C while DCP writes or reads a save: the caller gets the KeyboardInterrupt, not an error line.

torch's file writer, interrupted mid-write, raised ``RuntimeError: ... unexpected pos`` with the KeyboardInterrupt
as its ``__context__``; DCP wrapped that in a CheckpointException and Checkpointer.save reported "cannot write the
checkpoint of step N (RuntimeError ...)" with exit status 2 - an interrupted run read as a disk failure."""
from __future__ import annotations

import pytest
import torch

from adasched.profiler.io import InputError
from adasched.runtime.checkpoint import (CheckpointConfig, Checkpointer, ModelState, Values, committed_steps,
                                         interrupt_in, step_folder)


def _state(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(5, 7)
    return model, {"model": ModelState(model), "progress": Values(step=seed)}


def _interrupted_io(*_args, **_kwargs):
    """What torch's serializer raises when a Ctrl-C lands inside its write: a RuntimeError in the interrupt's
    handling (its ``__context__``)."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def test_interrupt_in_finds_the_interrupt_behind_dcp_failures():
    from torch.distributed.checkpoint.api import CheckpointException

    stop = KeyboardInterrupt()
    wrapped = RuntimeError("unexpected pos")
    wrapped.__context__ = stop
    assert interrupt_in(CheckpointException("save", {0: (wrapped, None)})) is stop
    exit_ = SystemExit(3)
    caused = OSError(5, "Input/output error")
    caused.__cause__ = exit_
    assert interrupt_in(CheckpointException("save", {1: caused})) is exit_
    assert interrupt_in(stop) is stop
    # a real failure has no interrupt in it (and a cycle in the chain ends)
    disk = OSError(28, "No space left on device")
    other = RuntimeError("bad")
    disk.__context__, other.__context__ = other, disk
    assert interrupt_in(CheckpointException("save", {0: (disk, None)})) is None
    assert interrupt_in(ValueError("x")) is None


def test_ctrl_c_during_a_synchronous_save_is_the_interrupt(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import filesystem

    model, state = _state(3)
    ck = Checkpointer(CheckpointConfig(folder=tmp_path), run={})
    with monkeypatch.context() as m:
        m.setattr(filesystem._FileSystemWriter, "write_data", _interrupted_io)
        with pytest.raises(KeyboardInterrupt):
            ck.save(2, state)
    assert committed_steps(tmp_path) == [] and ck.last_saved is None
    # the half-written .partial folder is cleared by the next save of the step, which commits
    assert ck.save(2, state) == step_folder(tmp_path, 2) and committed_steps(tmp_path) == [2]


def test_a_real_write_failure_is_still_one_line(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import filesystem

    def broken(*_args, **_kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    _, state = _state(4)
    ck = Checkpointer(CheckpointConfig(folder=tmp_path), run={})
    monkeypatch.setattr(filesystem._FileSystemWriter, "write_data", broken)
    with pytest.raises(InputError, match=r"cannot write the checkpoint of step 1 \(RuntimeError: .*unexpected pos"):
        ck.save(1, state)


def test_ctrl_c_during_resume_is_the_interrupt(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import filesystem

    model, state = _state(5)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    Checkpointer(CheckpointConfig(folder=tmp_path), run={}).save(1, state)
    fresh, fresh_state = _state(6)
    ck = Checkpointer(CheckpointConfig(folder=tmp_path), run={})
    with monkeypatch.context() as m:
        m.setattr(filesystem.FileSystemReader, "read_data", _interrupted_io)
        with pytest.raises(KeyboardInterrupt):
            ck.resume(fresh_state)
    ck.release()
    # the save is intact: a resume without the interrupt loads it
    ck = Checkpointer(CheckpointConfig(folder=tmp_path), run={})
    assert ck.resume(fresh_state) == 1
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
