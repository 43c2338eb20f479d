"""28th session's checkpoint hunt (each failed before): a save's metadata edited to a huge world_size was trusted
(train_lora's resharder listed a billion keys: 14 GB and a hang); keep-K pruning through a linked step folder
deleted the metadata of a save outside the checkpoint folder; a copy of a save under a name that is not
step_folder's (step-4) counted as a save (twice for step 4: keep-K deleted this run's own save; step-9 sent resume
to a folder that does not exist)."""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

from adasched.profiler.io import InputError
from adasched.runtime.checkpoint import (META_NAME, CheckpointConfig, Checkpointer, ModelState, committed_steps,
                                         find_checkpoint, step_folder)


def _state(seed: int):
    torch.manual_seed(seed)
    return {"model": ModelState(torch.nn.Linear(3, 2))}


def test_a_world_size_the_save_does_not_hold_is_refused(tmp_path):
    folder = tmp_path / "ck"
    Checkpointer(CheckpointConfig(folder=folder), run={}).save(3, _state(0))
    meta = step_folder(folder, 3) / META_NAME
    d = json.loads(meta.read_text())
    for world in (2, random.randint(3, 10**9)):
        d["world_size"] = world
        meta.write_text(json.dumps(d))
        with pytest.raises(InputError, match=f"world_size {world}, but the save holds the entries of 1 rank"):
            Checkpointer(CheckpointConfig(folder=folder), run={}).resume(_state(1))
    d["world_size"] = 1
    meta.write_text(json.dumps(d))
    target = _state(1)
    assert Checkpointer(CheckpointConfig(folder=folder), run={}).resume(target) == 3
    torch.testing.assert_close(target["model"].model.weight, _state(0)["model"].model.weight, rtol=0, atol=0)


def test_pruning_a_linked_save_removes_the_link_only(tmp_path):
    archive, run = tmp_path / "archive", tmp_path / "run"
    Checkpointer(CheckpointConfig(folder=archive, keep=0), run={}).save(4, _state(0))
    run.mkdir()
    os.symlink(step_folder(archive, 4), step_folder(run, 4))  # a run started from an archived save
    ck = Checkpointer(CheckpointConfig(folder=run, keep=1), run={})
    assert ck.resume(_state(1)) == 4
    ck.save(5, _state(2))
    assert committed_steps(archive) == [4] and (step_folder(archive, 4) / META_NAME).is_file()
    assert sorted(p.name for p in run.iterdir()) == [".adasched-lock", step_folder(run, 5).name]


def test_only_step_folder_names_count_as_saves(tmp_path):
    folder = tmp_path / "ck"
    ck = Checkpointer(CheckpointConfig(folder=folder, keep=2), run={})
    ck.save(2, _state(0))
    ck.save(4, _state(1))
    shutil.copytree(step_folder(folder, 4), folder / "step-4")  # a user's backup copy
    assert committed_steps(folder) == [2, 4]
    ck.save(6, _state(2))
    assert committed_steps(folder) == [4, 6] and (folder / "step-4").is_dir()
    m = json.loads((folder / "step-4" / META_NAME).read_text())
    m["step"] = 9
    shutil.copytree(folder / "step-4", folder / "step-9")
    (folder / "step-9" / META_NAME).write_text(json.dumps(m))
    info = find_checkpoint(folder)
    assert info is not None and info.step == 6 and info.path == step_folder(folder, 6)
