"""Adapters: transformers-style LambdaLR factories, megatron-core OptimizerParamScheduler (compared with the real
one), and deepspeed.initialize(lr_scheduler=...) in a real 2-rank CPU run with checkpoint save/load."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sched_helpers import make_opt, run

from adasched.runtime.dist import free_port
from adasched.schedules import REX, UBA, LinearDecay, Refined
from adasched.schedules.adapters import (MegatronParamScheduler, get_lambda_schedule,
                                         get_refined_schedule_with_warmup, get_rex_schedule_with_warmup,
                                         get_uba_schedule_with_warmup)



REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ transformers
def test_lambda_factories_match_classes_and_transformers():
    from transformers.optimization import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    T, W = 31, 6
    norms = np.random.default_rng(3).lognormal(0, 0.5, T)
    pairs = [
        (lambda o: get_rex_schedule_with_warmup(o, W, T, min_lr_ratio=0.15),
         lambda o: REX(o, T, warmup_steps=W, min_lr_ratio=0.15)),
        (lambda o: get_uba_schedule_with_warmup(o, W, T, phi=0.7),
         lambda o: UBA(o, T, phi=0.7, warmup_steps=W)),
        (lambda o: get_refined_schedule_with_warmup(o, W, norms, norm="l1", min_lr_ratio=0.05),
         lambda o: Refined(o, norms, warmup_steps=W, norm="l1", min_lr_ratio=0.05)),
        (lambda o: get_lambda_schedule("linear", o, W, T), get_linear_schedule_with_warmup_factory(W, T)),
        (lambda o: get_uba_schedule_with_warmup(o, W, T, phi=2.0),
         lambda o: get_cosine_schedule_with_warmup(o, W, T)),
        (lambda o: get_lambda_schedule("linear", o, W, T), lambda o: get_linear_schedule_with_warmup(o, W, T)),
    ]
    for ours, ref in pairs:
        o1, _ = make_opt(20)
        o2, _ = make_opt(20)
        a, b = run(ours(o1), o1, T + 2), run(ref(o2), o2, T + 2)
        # up to the end of training (transformers' cosine rises again after num_training_steps; ours stays)
        np.testing.assert_allclose(a[:T + 1], b[:T + 1], rtol=1e-12, atol=1e-15)
    # LambdaLR saves the callable object's state: resume mid-way
    o1, _ = make_opt(21)
    s1 = get_rex_schedule_with_warmup(o1, W, T)
    head = run(s1, o1, 9)
    buf = io.BytesIO()
    torch.save(s1.state_dict(), buf)
    buf.seek(0)
    o2, _ = make_opt(21)
    s2 = get_rex_schedule_with_warmup(o2, 1, 50)  # different settings: restored from the state dict
    s2.load_state_dict(torch.load(buf, weights_only=False))
    tail = run(s2, o2, T - 9 + 1)
    o3, _ = make_opt(21)
    np.testing.assert_allclose(np.concatenate([head, tail[1:]]), run(get_rex_schedule_with_warmup(o3, W, T), o3,
                                                                     T + 1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="^num_warmup_steps:"):
        get_rex_schedule_with_warmup(o3, 32, 31)   # more warmup than steps (equal is all warmup, allowed)


def get_linear_schedule_with_warmup_factory(W, T):
    return lambda o: LinearDecay(o, T, warmup_steps=W)


# ------------------------------------------------------------------------------------------------ megatron-core
def _megatron(opt, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    return OptimizerParamScheduler(opt, **kw)


def _lrs(opt):
    return [g["lr"] for g in opt.param_groups] + [g["weight_decay"] for g in opt.param_groups]


@pytest.mark.parametrize("style", ["linear", "cosine", "constant"])
def test_megatron_wrapper_matches_real_scheduler_in_samples(style):
    gbs = 48
    kw = dict(init_lr=1e-5, max_lr=3e-3, min_lr=3e-4, lr_warmup_steps=5 * gbs, lr_decay_steps=40 * gbs,
              lr_decay_style=style, start_wd=0.01, end_wd=0.1, wd_incr_steps=30 * gbs, wd_incr_style="cosine")
    o_ref, _ = make_opt(30, "adamw")
    o_ours, _ = make_opt(30, "adamw")
    for o in (o_ref, o_ours):  # a group that overrides max/min lr and scales weight decay, as megatron allows
        o.param_groups[1].update(max_lr=1e-3, min_lr=0.0, wd_mult=0.0)
    ref, ours = _megatron(o_ref, **kw), MegatronParamScheduler(o_ours, **kw)
    assert _lrs(o_ref) == _lrs(o_ours)
    incs = [gbs] * 30 + [7, 1, gbs * 3, 5] + [gbs] * 12
    for inc in incs:
        ref.step(increment=inc)
        ours.step(increment=inc)
        assert _lrs(o_ours) == _lrs(o_ref), (ours.num_steps, _lrs(o_ours), _lrs(o_ref))
    assert ours.state_dict() == ref.state_dict()
    # checkpoints are interchangeable: a real megatron state dict resumes ours, and back
    o3, _ = make_opt(30, "adamw")
    o3.param_groups[1].update(max_lr=1e-3, min_lr=0.0, wd_mult=0.0)
    fresh = MegatronParamScheduler(o3, **kw)
    fresh.load_state_dict(ref.state_dict())
    assert _lrs(o3) == _lrs(o_ref) and fresh.num_steps == ref.num_steps
    strict = MegatronParamScheduler(o3, **{**kw, "max_lr": 1e-2}, use_checkpoint_opt_param_scheduler=False)
    with pytest.raises(ValueError, match="^max_lr:"):
        strict.load_state_dict(ref.state_dict())


def test_linear_decay_matches_megatron_linear_step_for_step():
    """Our LinearDecay LRScheduler (init_lr = 0, steps = optimizer steps) against megatron-core 'linear'."""
    T, W = 37, 6
    o_ref, lrs = make_opt(31)
    o_ours, _ = make_opt(31)
    rng = np.random.default_rng(0)
    min_lr = float(rng.uniform(0.001, 0.02))
    for g, lr in zip(o_ref.param_groups, lrs):
        g["max_lr"] = lr  # megatron's per-group peak = our per-group base lr
    ref = _megatron(o_ref, init_lr=0.0, max_lr=max(lrs), min_lr=min_lr, lr_warmup_steps=W, lr_decay_steps=T,
                    lr_decay_style="linear", start_wd=0.0, end_wd=0.0, wd_incr_steps=1, wd_incr_style="constant")
    ours = LinearDecay(o_ours, T, warmup_steps=W, min_lr=min_lr)
    got = run(ours, o_ours, T + 4)
    want = [[g["lr"] for g in o_ref.param_groups]]
    for _ in range(T + 4):
        ref.step(1)
        want.append([g["lr"] for g in o_ref.param_groups])
    np.testing.assert_allclose(got, np.array(want), rtol=1e-14, atol=1e-17)


@pytest.mark.parametrize("style", ["rex", "uba", "refined"])
def test_megatron_wrapper_new_styles_equal_our_schedulers(style):
    gbs, T, W = 16, 25, 4
    norms = np.random.default_rng(4).lognormal(0, 0.4, T - W)
    # refined: the previous run's norms, warmup included (large there: refining from them would warm up twice)
    full = np.concatenate([np.full(W, 10.0), norms])
    extra = {"rex": {}, "uba": {"phi": 0.5}, "refined": {"grad_norms": full, "norm": "l1"}}[style]
    o1, lrs = make_opt(32)
    for g, lr in zip(o1.param_groups, lrs):
        g["max_lr"] = lr
    meg = MegatronParamScheduler(o1, 0.0, max(lrs), 1e-4, W * gbs, T * gbs, style, **extra)
    got = [[g["lr"] for g in o1.param_groups]]
    for _ in range(T + 3):
        meg.step(gbs)
        got.append([g["lr"] for g in o1.param_groups])
    o2, _ = make_opt(32)
    if style == "refined":
        sched = Refined(o2, full, warmup_steps=W, min_lr=1e-4, norm="l1")
    else:
        sched = {"rex": REX, "uba": UBA}[style](o2, T, warmup_steps=W, min_lr=1e-4, **extra)
    np.testing.assert_allclose(np.array(got), run(sched, o2, T + 3), rtol=1e-12, atol=1e-16)
    with pytest.raises(ValueError, match="^lr_decay_style:"):
        MegatronParamScheduler(o1, 0.0, 1.0, 0.0, 0, 10, "WSD-x")
    with pytest.raises(ValueError, match="^lr_warmup_steps:"):
        MegatronParamScheduler(o1, 0.0, 1.0, 0.0, 10, 10, "rex")


# ------------------------------------------------------------------------------------------------ DeepSpeed

@pytest.mark.slow
def test_deepspeed_two_rank_cpu_with_checkpoint(tmp_path):
    """deepspeed.initialize(lr_scheduler=DeepSpeedSchedule('rex', ...)) on 2 gloo ranks; the engine steps our
    scheduler, saves it in a checkpoint and a fresh engine resumes it exactly. The first run JIT-compiles
    DeepSpeed's CPU comm op into TORCH_EXTENSIONS_DIR (default ~/.cache/adasched/torch_extensions)."""
    env = dict(os.environ, DS_BUILD_OPS="0", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "adasched" / "torch_extensions"))
    out, ck = tmp_path / "out", tmp_path / "ck"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(Path(__file__).with_name("test_adapters_dsworker.py")), str(out), str(ck)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    o, _ = make_opt(0)
    for g, lr in zip(o.param_groups, (0.03, 0.007)):
        g["lr"] = lr
    ref = REX(o, 12, warmup_steps=2, min_lr_ratio=0.1)
    want = [ref.lr_at(s) for s in range(1, 13)]
    for r in results:
        assert r["type"] == "REX" and r["last_epoch"] == 12 and r["resumed_at"] == 5 and r["same_weights"]
        assert r["rest_a"] == r["rest_b"]  # exact resume from the DeepSpeed checkpoint
        np.testing.assert_allclose(np.array(r["first"] + r["rest_a"]), np.array(want), rtol=1e-14)
    assert results[0]["rest_b"] == results[1]["rest_b"]


def test_megatron_refined_resume_with_the_checkpoints_warmup_rebuilds_the_table():
    """The refined table skips the warmup's share of the norms, round(len * W / D): a scheduler built with another
    W that loads a checkpoint (use_checkpoint_opt_param_scheduler: the checkpoint's W and D win) rebuilds it, so
    it gives the saved run's LR (it was 47x off: the table of the constructor's W kept)."""
    norms = np.random.default_rng(int(np.random.SeedSequence().entropy % 2 ** 31)).lognormal(0, 0.5, 20)
    o1, _ = make_opt(2)
    saved = MegatronParamScheduler(o1, 0.0, 0.05, 0.0, 10, 20, "refined", grad_norms=norms)
    saved.step(12)
    o2, _ = make_opt(2)
    fresh = MegatronParamScheduler(o2, 0.0, 0.05, 0.0, 2, 20, "refined", grad_norms=norms)
    fresh.load_state_dict(saved.state_dict())
    assert fresh.lr_warmup_steps == 10
    assert [g["lr"] for g in o2.param_groups] == pytest.approx([g["lr"] for g in o1.param_groups], rel=1e-12)
    for _ in range(8):
        saved.step(1)
        fresh.step(1)
        assert [g["lr"] for g in o2.param_groups] == pytest.approx([g["lr"] for g in o1.param_groups], rel=1e-12)
