"""Findings of the 28th session's LoRA trainer hunt, each a test that fails on the code before the fix."""
from __future__ import annotations

import os
import random
import stat
import types

import pytest
import torch
import yaml

from adasched.launch.train_lora import main
from adasched.runtime.lora_model import ADAPTER_FILES, save_peft_adapter
from adasched.runtime.lora_trainer import check_adapter_outputs


def test_the_adapter_weights_get_the_usual_permissions(tmp_path):
    """safetensors' save_file renamed a 0600 temp file of its own over atomic_path's: the weights were unreadable to
    other accounts beside a 0644 adapter_config.json."""
    old = os.umask(0o022)
    try:
        r, k = random.randint(1, 8), random.randint(4, 32)
        state = {"base_model.model.x.lora_A.weight": torch.randn(r, k), "base_model.model.x.lora_B.weight":
                 torch.randn(k, r)}
        out = save_peft_adapter(tmp_path / "job", {"r": r}, state)
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE((out / name).stat().st_mode) for name in ADAPTER_FILES}
    assert modes == {name: 0o644 for name in ADAPTER_FILES}, modes
    from safetensors.torch import load_file

    back = load_file(str(out / ADAPTER_FILES[0]))
    assert back.keys() == state.keys() and all(torch.equal(back[n], state[n]) for n in state)


def test_a_dangling_link_where_an_adapter_folder_goes_is_refused_before_training(tmp_path):
    """exists() is False for a link to nothing: --check said ok, and the run failed after training ('File exists')
    with other adapters written."""
    out = tmp_path / "out"
    out.mkdir()
    names = [f"job{i}" for i in range(random.randint(2, 4))]
    bad = random.choice(names)
    (out / bad).symlink_to(tmp_path / "nowhere")
    plan = types.SimpleNamespace(jobs=[types.SimpleNamespace(name=n) for n in names])
    with pytest.raises(ValueError, match=f"{out / bad} is a link to nothing: job '{bad}'"):
        check_adapter_outputs(out, plan)
    (out / bad).unlink()
    (tmp_path / "real").mkdir()
    (out / bad).symlink_to(tmp_path / "real")  # a link to a folder is a folder
    check_adapter_outputs(out, plan)


MODEL = ["--vocab", "32", "--hidden", "16", "--layers", "2", "--heads", "2", "--ffn", "24", "--max-positions", "64",
         "--reference"]


def _one_job_file(tmp_path, name: str):
    """A jobs file of one small job named ``name``."""
    jobs = {"capacity": 256, "stages": 2, "global_batches": 1, "seed": 5, "layers": 2,
            "jobs": [{"name": name, "adapter": {"r": 2, "alpha": 4, "target_modules": ["q_proj"]},
                      "lengths": {"dist": "lognormal", "median": 20, "sigma": 0.5, "min": 3, "max": 60},
                      "global_batch_size": 3, "lr": 0.01}]}
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(jobs))
    return path


def test_a_job_named_like_a_save_is_refused_when_out_is_the_checkpoint_folder(tmp_path, capsys):
    """--out equal to --checkpoint-dir and a job named step-00000006: its adapter was written into the last save
    (beside the .distcp file) and would be deleted with it. Refused before training."""
    name = f"step-{random.randint(1, 99):08d}"
    path = _one_job_file(tmp_path, name)
    d = tmp_path / "run"
    assert main(["--jobs", str(path), "--out", str(d), "--checkpoint-dir", str(d), "--check"] + MODEL) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out: {d} is the --checkpoint-dir, and job '{name}'"), err
    assert not (d / name).exists()
    # another --out is fine
    assert main(["--jobs", str(path), "--out", str(tmp_path / "adapters"), "--checkpoint-dir", str(d), "--check"]
                + MODEL) == 0


def test_only_save_names_clash_with_the_checkpoint_folder(tmp_path, capsys):
    """(review) any name starting with 'step-' was refused; only step_folder's form (8 zero-padded digits) is a
    save's name - step-up, step-4 and step-100 are never pruned."""
    from adasched.runtime.checkpoint import is_save_name

    assert is_save_name("step-00000006") and is_save_name("step-00000006.partial") and is_save_name("step-123456789")
    assert not any(is_save_name(n) for n in ("step-up", "step-4", "step-100", "step-0000006", "steps-00000006"))
    name = random.choice(["step-up", "step-4", "step-100"])
    path = _one_job_file(tmp_path, name)
    d = tmp_path / "run"
    assert main(["--jobs", str(path), "--out", str(d), "--checkpoint-dir", str(d), "--check"] + MODEL) == 0, \
        capsys.readouterr().err
