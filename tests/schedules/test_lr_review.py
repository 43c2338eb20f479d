"""Review findings on the LR schedules, each a test that failed before its fix: transformers' SchedulerType enum
and integral float step counts in the factory, factory errors naming the factory's arguments, param groups added
after the scheduler was made (live and at resume), the refinement's overflow on tiny/huge norms, megatron-core's
WSD / inverse-square-root styles and constructor keywords, max_lr errors naming max_lr."""
from __future__ import annotations

import math
import warnings
from enum import Enum

import numpy as np
import pytest
import torch

from sched_helpers import make_opt, run

from adasched.planner.cli import main
from adasched.schedules import REX, UBA, get_schedule, refined_multipliers, write_norms_csv
from adasched.schedules.adapters import MegatronParamScheduler


# ------------------------------------------------------------------------------------------------ factory names
def test_get_schedule_takes_transformers_scheduler_type_and_matches_its_linear_schedule():
    """transformers passes ``SchedulerType.LINEAR`` (a str Enum whose str() is 'SchedulerType.LINEAR'); it was
    refused as an unknown schedule."""
    from transformers import SchedulerType
    from transformers.optimization import get_linear_schedule_with_warmup

    o_ref, _ = make_opt(3)
    o_ours, _ = make_opt(3)
    ref = get_linear_schedule_with_warmup(o_ref, 4, 17)
    ours = get_schedule(SchedulerType.LINEAR, o_ours, num_warmup_steps=4, num_training_steps=17)
    np.testing.assert_allclose(run(ours, o_ours, 22), run(ref, o_ref, 22), rtol=1e-14, atol=1e-17)

    class Kind(str, Enum):  # any str Enum, e.g. a config's own
        REX = "rex"
    assert type(get_schedule(Kind.REX, make_opt(0)[0], 0, 5)) is REX


def test_integral_float_step_counts_are_taken_fractional_refused():
    """``num_training_steps = len(loader) * epochs / accum`` is a float (1000.0); transformers takes it, we
    refused it. A fractional count still fails, naming the argument."""
    o_f, _ = make_opt(5)
    o_i, _ = make_opt(5)
    a = get_schedule("rex", o_f, num_warmup_steps=3.0, num_training_steps=21.0, min_lr_ratio=0.1)
    b = get_schedule("rex", o_i, num_warmup_steps=3, num_training_steps=21, min_lr_ratio=0.1)
    assert a.total_steps == 21 and type(a.total_steps) is int
    np.testing.assert_array_equal(run(a, o_f, 24), run(b, o_i, 24))
    with pytest.raises(ValueError, match=r"^num_training_steps: .*20\.5"):
        get_schedule("rex", make_opt(0)[0], 0, 20.5)
    with pytest.raises(ValueError, match=r"^total_steps: "):
        UBA(make_opt(0)[0], 20.5)


@pytest.mark.parametrize("kw, arg", [
    (dict(num_warmup_steps=0, num_training_steps=-3), "num_training_steps"),
    (dict(num_warmup_steps=0, num_training_steps=float("nan")), "num_training_steps"),
    (dict(num_warmup_steps=-1, num_training_steps=10), "num_warmup_steps"),
    (dict(num_warmup_steps=11, num_training_steps=10), "num_warmup_steps"),   # 10 = all warmup, allowed
])
def test_factory_errors_name_the_factory_arguments(kw, arg):
    """They said 'total_steps: ...'/'warmup_steps: ...', names the caller of get_schedule never wrote."""
    for name in ("linear", "rex", "uba", "cosine"):
        with pytest.raises(ValueError, match=rf"^{arg}: "):
            get_schedule(name, make_opt(0)[0], **kw)
    with pytest.raises(ValueError, match=r"^num_warmup_steps: "):
        get_schedule("refined", make_opt(0)[0], -1, grad_norms=[1.0, 2.0, 3.0])


# ------------------------------------------------------------------------------------------------ added groups
def _with_third_group(opt, lr):
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "lr": lr})
    return opt


def test_param_group_added_after_construction_follows_the_schedule():
    """``optimizer.add_param_group`` after the scheduler (unfreezing a module mid-run): step() raised
    'zip() argument 2 is shorter than argument 1'. Now the group's lr at that time is its base lr, its floor follows
    min_lr_ratio, and from then on every group equals the closed form of a scheduler made on all three groups."""
    opt, lrs = make_opt(7)
    sched = REX(opt, 20, warmup_steps=4, min_lr_ratio=0.2)
    before = run(sched, opt, 6)
    _with_third_group(opt, 0.37)
    after = []  # steps 7..24 (get_last_lr before the first of them still has the two groups it set)
    for _ in range(18):
        opt.step()
        sched.step()
        after.append(list(sched.get_last_lr()))
    ref_opt = _with_third_group(make_opt(7)[0], 0.37)
    ref = REX(ref_opt, 20, warmup_steps=4, min_lr_ratio=0.2)
    expect = np.array([ref.lr_at(t) for t in range(25)])
    np.testing.assert_allclose(before, expect[:7, :2], rtol=1e-14, atol=0)
    np.testing.assert_allclose(after, expect[7:], rtol=1e-14, atol=0)
    assert expect[-1, 2] == pytest.approx(0.2 * 0.37, rel=1e-14)
    # a per-group min_lr list has no value for the new group: one clear error
    opt, lrs = make_opt(7)
    sched = REX(opt, 20, min_lr=[0.1 * lr for lr in lrs])
    _with_third_group(opt, 0.37)
    opt.step()
    with pytest.raises(ValueError, match=r"^min_lr: .*per param group"):
        sched.step()


def test_resume_into_an_optimizer_with_one_more_group():
    """A checkpoint of a 2-group run loaded into a fresh 3-group optimizer + scheduler (no optimizer state): every
    group continues on the schedule at the checkpoint's step (the new group started at the fresh warmup's 0 and
    the step after raised on the length mismatch). Loading a 3-group state into 2 groups is one clear error."""
    opt, _ = make_opt(11)
    sched = UBA(opt, 16, phi=1.0, warmup_steps=5, min_lr_ratio=0.1)
    run(sched, opt, 7)
    state = sched.state_dict()
    opt3 = _with_third_group(make_opt(11)[0], 0.29)
    sched3 = UBA(opt3, 16, phi=1.0, warmup_steps=5, min_lr_ratio=0.1)
    sched3.load_state_dict(state)
    got = run(sched3, opt3, 11)
    expect = np.array([sched3.lr_at(t) for t in range(7, 19)])
    assert expect.shape == got.shape == (12, 3)
    np.testing.assert_allclose(got, expect, rtol=1e-14, atol=0)
    np.testing.assert_allclose([g["lr"] for g in opt3.param_groups], expect[-1], rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match=r"^state_dict: has 3 param groups but the optimizer has 2"):
        UBA(make_opt(11)[0], 16, phi=1.0, warmup_steps=5).load_state_dict(sched3.state_dict())


# ------------------------------------------------------------------------------------------------ refinement
@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_refinement_is_invariant_to_the_norms_scale(norm):
    """The schedule is normalised to peak 1, so scaling every norm changes nothing; 1/g**2 overflowed for norms of
    1e-200 ('degenerate' error plus a RuntimeWarning) and underflowed to 0 for 1e+200."""
    rng = np.random.default_rng(4)
    g = rng.lognormal(0.0, 1.0, 40) * np.linspace(6.0, 1.0, 40)
    base = refined_multipliers(g, norm, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scale in (1e-200, 1e-160, 1e150, 1e200):
            np.testing.assert_allclose(refined_multipliers(g * scale, norm, 0.1), base, rtol=1e-9, atol=1e-15)
        lin = 1.0 - np.arange(31) / 30
        for value in (1e-250, 1e250):
            np.testing.assert_allclose(refined_multipliers(np.full(30, value), norm, 0.1), lin, rtol=1e-13,
                                       atol=1e-15)
        # 600 decades within one run: finite, peak 1, 0 at the end, never negative
        m = refined_multipliers(np.logspace(300, -300, 25), norm, 0.0)
    assert np.isfinite(m).all() and m.max() == 1.0 and m[-1] == 0.0 and (m >= 0).all()


def test_cli_refine_tiny_norms_is_linear(tmp_path, capsys):
    path = write_norms_csv(tmp_path / "tiny.csv", [3e-200] * 12, [5e-199] * 12)
    out = tmp_path / "s.json"
    assert main(["schedules", "refine", str(path), "--out", str(out), "--json"]) == 0
    import json
    doc = json.loads(out.read_text())
    np.testing.assert_allclose(doc["multipliers"], 1.0 - np.arange(13) / 12, rtol=1e-13, atol=1e-15)


# ------------------------------------------------------------------------------------------------ megatron-core
def _megatron(opt, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    return OptimizerParamScheduler(opt, **kw)


@pytest.mark.parametrize("style, wsd_style", [("inverse-square-root", None), ("WSD", "linear"), ("WSD", "cosine"),
                                              ("WSD", "exponential"), ("WSD", "minus_sqrt"), ("cosine", None)])
def test_megatron_wsd_and_inverse_sqrt_match_megatron_core(style, wsd_style):
    """megatron's get_optimizer_param_scheduler passes wsd_decay_steps= and lr_wsd_decay_style= to the
    constructor (TypeError before, for every style) and may choose 'WSD' or 'inverse-square-root'. lr and
    weight decay of every group equal megatron-core's at every sample count, and checkpoints load both ways."""
    kw = dict(init_lr=2e-5, max_lr=3e-4, min_lr=3e-5, lr_warmup_steps=96, lr_decay_steps=960,
              lr_decay_style=style, start_wd=0.01, end_wd=0.1, wd_incr_steps=700, wd_incr_style="linear",
              wsd_decay_steps=320 if style == "WSD" else None, lr_wsd_decay_style=wsd_style)
    opts = [make_opt(2, "adamw")[0] for _ in range(2)]
    for o in opts:
        o.param_groups[1].update(max_lr=5e-4, min_lr=1e-5, wd_mult=0.0)
    ref, ours = _megatron(opts[0], **kw), MegatronParamScheduler(opts[1], **kw)

    def state(o):
        return [(g["lr"], g["weight_decay"]) for g in o.param_groups]

    for i in range(70):  # 70 * 16 samples: warmup, decay, WSD anneal, past lr_decay_steps
        assert state(opts[1]) == state(opts[0]), i
        ref.step(16)
        ours.step(16)
    assert ours.state_dict() == ref.state_dict()
    fresh = [make_opt(2, "adamw")[0] for _ in range(2)]
    for o in fresh:
        o.param_groups[1].update(max_lr=5e-4, min_lr=1e-5, wd_mult=0.0)
    a, b = _megatron(fresh[0], **kw), MegatronParamScheduler(fresh[1], **kw)
    a.load_state_dict(ours.state_dict())
    b.load_state_dict(ref.state_dict())
    assert state(fresh[1]) == state(fresh[0]) == state(opts[0])


def test_megatron_argument_errors_name_the_argument():
    base = dict(init_lr=0.0, max_lr=3e-4, min_lr=3e-5, lr_warmup_steps=10, lr_decay_steps=100,
                lr_decay_style="linear")
    for bad in (float("nan"), -1.0, math.inf):  # said 'min_lr: must be in [0, max_lr=nan]'
        with pytest.raises(ValueError, match=r"^max_lr: "):
            MegatronParamScheduler(make_opt(0)[0], **dict(base, max_lr=bad))
    with pytest.raises(ValueError, match=r"^wsd_decay_steps: "):
        MegatronParamScheduler(make_opt(0)[0], **dict(base, lr_decay_style="WSD", lr_wsd_decay_style="linear"))
    with pytest.raises(ValueError, match=r"^lr_wsd_decay_style: "):
        MegatronParamScheduler(make_opt(0)[0], **dict(base, lr_decay_style="WSD", wsd_decay_steps=20))


def test_numpy_scalars_are_numbers():
    """phi / min_lr / min_lr_ratio / smoothing from a numpy sweep (np.float32) were refused as 'not a number'."""
    o_np, _ = make_opt(6)
    o_py, _ = make_opt(6)
    a = UBA(o_np, 15, phi=np.float32(0.75), warmup_steps=2, min_lr_ratio=np.float32(0.25))
    b = UBA(o_py, 15, phi=float(np.float32(0.75)), warmup_steps=2, min_lr_ratio=float(np.float32(0.25)))
    np.testing.assert_array_equal(run(a, o_np, 17), run(b, o_py, 17))
    o_np, lrs = make_opt(6)
    o_py, _ = make_opt(6)
    floor = np.float32(0.5 * min(lrs))
    a = REX(o_np, 9, min_lr=floor)
    b = REX(o_py, 9, min_lr=float(floor))
    np.testing.assert_array_equal(run(a, o_np, 10), run(b, o_py, 10))
    g = np.random.default_rng(8).lognormal(0, 0.5, 20)
    np.testing.assert_array_equal(refined_multipliers(g, "l1", np.float32(0.25)),
                                  refined_multipliers(g, "l1", float(np.float32(0.25))))


def test_megatron_checkpoint_with_a_style_this_scheduler_cannot_run():
    """A checkpoint saying 'refined' (or 'WSD') loaded into a scheduler built without grad_norms (without
    wsd_decay_steps) under use_checkpoint_opt_param_scheduler: load_state_dict took the style and step() failed
    with TypeError deep inside (len(None)). Now one ValueError at load naming lr_decay_style; an unknown style
    likewise; override_opt_param_scheduler keeps ours and runs."""
    kw = dict(init_lr=0.0, max_lr=3e-4, min_lr=3e-5, lr_warmup_steps=8, lr_decay_steps=64)
    g = np.random.default_rng(9).lognormal(0, 0.3, 16)
    src = MegatronParamScheduler(make_opt(0)[0], **kw, lr_decay_style="refined", grad_norms=g)
    src.step(24)
    wsd = MegatronParamScheduler(make_opt(0)[0], **kw, lr_decay_style="WSD", wsd_decay_steps=16,
                                 lr_wsd_decay_style="cosine")
    wsd.step(24)
    odd = dict(src.state_dict(), lr_decay_style="polynomial")
    for state, needle in ((src.state_dict(), "refined"), (wsd.state_dict(), "WSD"), (odd, "polynomial")):
        with pytest.raises(ValueError, match=rf"^lr_decay_style: .*{needle}"):
            MegatronParamScheduler(make_opt(0)[0], **kw, lr_decay_style="cosine").load_state_dict(state)
    opt = make_opt(0)[0]
    mine = MegatronParamScheduler(opt, **kw, lr_decay_style="cosine", use_checkpoint_opt_param_scheduler=False,
                                  override_opt_param_scheduler=True)
    mine.load_state_dict(src.state_dict())
    assert mine.num_steps == 24 and mine.lr_decay_style == "cosine"
    z = (24 - 8) / (64 - 8)
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-5 + 0.5 * (1 + math.cos(math.pi * z)) * 2.7e-4, rel=1e-14)
    # megatron passes wsd_decay_steps / lr_wsd_decay_style for every style: other styles ignore them, as megatron
    MegatronParamScheduler(make_opt(0)[0], **kw, lr_decay_style="linear", wsd_decay_steps=10**6,
                           lr_wsd_decay_style="exponential")


@pytest.mark.parametrize("target", ["same", "relative"])
def test_cli_refine_refuses_to_write_over_its_input(tmp_path, capsys, monkeypatch, target):
    """`adasched schedules refine norms.csv --out norms.csv` replaced the previous run's norms with the JSON
    (exit 0). Now one error line, exit 2, the CSV byte for byte as before."""
    rng = np.random.default_rng(12)
    l2 = rng.lognormal(0, 0.4, 9)
    path = write_norms_csv(tmp_path / "norms.csv", l2.tolist(), (3 * l2).tolist())
    before = path.read_bytes()
    monkeypatch.chdir(tmp_path)
    out = str(path) if target == "same" else "./norms.csv"
    assert main(["schedules", "refine", str(path), "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out: ") and "norms file" in err[0]
    assert path.read_bytes() == before
    assert main(["schedules", "refine", "norms.csv", "--out", "s.json", "--plot", "s.json"]) == 2
    assert capsys.readouterr().err.startswith("error: --plot: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["norms.csv"]


@pytest.mark.parametrize("opt, value", [("--norm", "l3"), ("--smoothing", "2"), ("--smoothing", "nan")])
def test_cli_plot_option_errors_name_the_option(tmp_path, capsys, opt, value):
    """`schedules plot norms.csv --smoothing 2` said 'error: norms.csv: smoothing: ...' (--norm l3: 'norm: ...'):
    the option is named now; one line, exit 2, no PNG."""
    rng = np.random.default_rng(13)
    l2 = rng.lognormal(0, 0.4, 9)
    path = write_norms_csv(tmp_path / "norms.csv", l2.tolist(), (3 * l2).tolist())
    png = tmp_path / "p.png"
    assert main(["schedules", "plot", str(path), opt, value, "--out", str(png)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {opt}: "), err
    assert not png.exists()
