"""A device too small for the model states alone: the error blames what can change (h45).

It said "--gpus: ... add GPUs" when --gpus was not given and the profile already described every GPU it could;
now the profile is named, with how many of its GPUs would hold the states and how to describe them."""

import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest

from adasched.planner.cli import main
from adasched.planner.flexsp.api import plan_sp
from adasched.planner.flexsp.costmodel import check_model_states, model_preset, sp_cost_model
from adasched.profiler.io import InputError
from adasched.profiler.profile import load_profile, save_profile


def _small_device(gib: float):
    p = load_profile("h100-sxm")
    return p.model_copy(update={"device": p.device.model_copy(update={"memory_bytes": int(gib * 2**30)})})


def test_all_gpus_blames_the_profile_and_the_hint_fits(tmp_path, capsys):
    """gpt-30b (ZeRO-3) on 64 GPUs of 2 GiB: 7.5 GiB of states per GPU. The hint's GPU count is the smallest
    power of two whose shards fit, and the command it prints makes a profile that plans."""
    prof = _small_device(2.0)
    path = tmp_path / "tiny.json"
    save_profile(prof, path)
    out = tmp_path / "plan.json"
    rc = main(["plan", "sp", "--profile", str(path), "--model", "gpt-30b", "--seqlens", "lognormal:200,0.5",
               "--global-batch", "8", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {path}: device memory 2.0 GiB holds not even the gpt-30b model states "
                          "(7.5 GiB per GPU on all its 64 GPUs, ZeRO-3)"), err
    assert "--gpus" not in err
    mdl = model_preset("gpt-30b")
    w = int(re.search(r"they fit on (\d+) such GPUs", err).group(1))
    assert mdl.model_state_bytes(w) < prof.memory_bytes <= mdl.model_state_bytes(w // 2)
    # the printed command, run as printed, gives a profile the same plan accepts
    code = re.search(r"python -c '([^']*)'", err).group(1)
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    bigger = tmp_path / re.search(r"--profile (\S+)$", err.strip()).group(1)
    assert load_profile(bigger).world_size == w
    rc = main(["plan", "sp", "--profile", str(bigger), "--model", "gpt-30b", "--seqlens", "lognormal:200,0.5",
               "--global-batch", "8", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert out.exists()


def test_fewer_gpus_than_the_profile_blames_gpus():
    prof = _small_device(20.0)
    lens = np.random.default_rng(3).integers(100, 2000, 16)
    with pytest.raises(InputError) as e:
        plan_sp(prof, "gpt-30b", lens, gpus=8, global_batch=8, steps=1)
    assert e.value.where == "--gpus"
    assert "60.2 GiB per GPU on 8 GPUs (ZeRO-3), more than the device's 20.0 GiB" in str(e.value)
    assert str(e.value).endswith("add GPUs (the profile describes 64)")
    # the same device, all 64 GPUs: 7.5 GiB each fits in 20 GiB, and it plans
    plan, _ = plan_sp(prof, "gpt-30b", lens, global_batch=8, steps=1)
    assert plan.world_size == 64


def test_no_number_of_devices_holds_the_replicated_states():
    """ZeRO-0 keeps whole states on every GPU: more GPUs never help; the error says a bigger device is needed."""
    prof = _small_device(2.0)
    mdl = dataclasses.replace(model_preset("gpt-7b"), zero_stage=0)
    cm = sp_cost_model(prof, mdl)
    with pytest.raises(InputError) as e:
        check_model_states(cm, prof)
    assert e.value.where == prof.where
    assert "no number of these devices holds them" in str(e.value)


def test_states_that_fit_pass():
    prof = load_profile("h100-sxm")
    for name in ("gpt-7b", "gpt-13b", "gpt-30b"):
        check_model_states(sp_cost_model(prof, name), prof)  # raises on failure
        cm = sp_cost_model(prof, name, 8)
        assert cm.token_capacity(8) >= 1
        check_model_states(cm, prof)
