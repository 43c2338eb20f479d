"""Schedules fixes from a bug hunt (each failed before):
- a scheduler built on an optimizer that already trained kept the lr an earlier schedule left as "another
  scheduler's factor" for the whole run (0 after a decay to 0; 0.6x after a resume that steps a fresh scheduler to
  catch up); on an optimizer that has not stepped, a chain's factor is still kept;
- `schedules plot PATH` with a path not ending in .csv/.json was a file to the plot but a name to the CLI's checks;
- `schedules plot --json` kept one curve of two files with the same name;
- capacity_schedule let waves NaN/inf and a string strength through to confusing errors;
- ScheduleLambda ignored phi on a schedule without one and took min_lr_ratio=True as 1.0."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import ChainedScheduler, LinearLR

from adasched.planner.cli import main
from adasched.schedules import REX, get_schedule, write_norms_csv
from adasched.schedules.adapters import ScheduleLambda
from adasched.schedules.capacity import capacity_schedule
from sched_helpers import group0_lrs  # (tests/schedules is on sys.path)


def _linear(base, total, n):
    return [base * max(0.0, 1 - t / total) for t in range(n)]


def test_second_stage_starts_from_the_base_lr():
    base = float(np.random.default_rng().uniform(0.05, 0.5))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(4))], lr=base)
    group0_lrs(get_schedule("linear", opt, 2, 6), opt, 7)            # the first stage decays to 0
    assert opt.param_groups[0]["lr"] == 0.0
    got = group0_lrs(get_schedule("linear", opt, 0, 4), opt, 5)
    np.testing.assert_allclose(got, _linear(base, 4, 5), rtol=1e-12, atol=1e-15)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the catch-up loop
def test_resume_stepping_a_fresh_scheduler_catches_up_to_the_closed_form():
    base = float(np.random.default_rng().uniform(0.05, 0.5))
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.Adam([p], lr=base)
    sched = get_schedule("linear", opt, 0, 10)
    for _ in range(4):
        p.grad = torch.randn(4)
        opt.step()
        sched.step()
    ck = opt.state_dict()
    p2 = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.Adam([p2], lr=base)
    opt2.load_state_dict(ck)
    fresh = get_schedule("linear", opt2, 0, 10)
    for _ in range(4):
        fresh.step()
    got = []
    for _ in range(6):
        got.append(opt2.param_groups[0]["lr"])
        p2.grad = torch.randn(4)
        opt2.step()
        fresh.step()
    np.testing.assert_allclose(got, _linear(base, 10, 10)[4:], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=1.0),
    lambda ps: torch.optim.Adagrad(ps, lr=1.0),   # fills its state (step 0) when made: not "trained"
    lambda ps: torch.optim.AdamW(ps, lr=1.0),
], ids=["sgd", "adagrad", "adamw"])
def test_a_chain_built_before_training_keeps_the_other_factor(make):
    """ChainedScheduler([LinearLR(0.5 -> 1 over 4), REX]) on a fresh optimizer: the product at every step."""
    p = torch.nn.Parameter(torch.randn(4))
    opt = make([p])
    sched = ChainedScheduler([LinearLR(opt, start_factor=0.5, total_iters=4), REX(opt, 8)])
    got = []
    for _ in range(9):
        got.append(opt.param_groups[0]["lr"])
        p.grad = torch.randn(4) * 1e-3
        opt.step()
        sched.step()
    rex = REX(torch.optim.SGD([torch.nn.Parameter(torch.randn(1))], lr=1.0), 8)
    want = [rex.multiplier(t) * min(1.0, 0.5 + 0.5 * t / 4) for t in range(9)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def _norms(path, n=30):
    l2 = np.random.default_rng().lognormal(0, 0.4, n) * np.linspace(4, 1, n)
    return write_norms_csv(path, l2.tolist(), (l2 * 5).tolist())


def test_plot_takes_a_norms_path_without_the_csv_suffix(tmp_path, capsys):
    csv = _norms(tmp_path / "n.csv")
    txt = tmp_path / "n.txt"
    shutil.copy(csv, txt)
    assert main(["schedules", "plot", str(txt), "--out", str(tmp_path / "a.png"), "--json", "--norm", "l1"]) == 0
    curves = json.loads(capsys.readouterr().out)["curves"]
    (values,) = curves.values()
    assert len(values) == 31  # the file's 30 steps set the length (was: --steps 100 assumed, then refused)


def test_plot_json_keeps_two_files_of_one_name(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = _norms(tmp_path / "a" / "n.csv"), _norms(tmp_path / "b" / "n.csv")
    assert main(["schedules", "plot", str(a), str(b), "--out", str(tmp_path / "p.png"), "--json"]) == 0
    curves = json.loads(capsys.readouterr().out)["curves"]
    assert sorted(curves) == ["refined (n.csv)", "refined (n.csv) #2"]
    assert curves["refined (n.csv)"] != curves["refined (n.csv) #2"]


@pytest.mark.parametrize("kw, needle", [
    (dict(waves=math.nan), "waves: nan"), (dict(waves=math.inf), "waves: inf"), (dict(waves=-1.0), "waves: -1.0"),
    (dict(strength="1"), "strength: '1'"), (dict(strength=math.nan), "strength: nan"),
    # (an infinite budget or bound was a bare OverflowError from int(), NaN an unlabelled ValueError)
    (dict(budget=math.inf), "budget: inf must be an integer"), (dict(budget=math.nan), "budget: nan must be"),
    (dict(hi=math.inf), "hi: inf must be an integer"), (dict(lo=-math.inf), "lo: -inf must be an integer"),
    (dict(budget=10**400), "budget: 1000"),  # an int too large for a float: refused by the bounds, no overflow
])
def test_capacity_schedule_bad_waves_or_strength(kw, needle):
    args = dict(budget=20, lo=1, hi=4)
    args.update(kw)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        capacity_schedule("wave", 8, **args)


def test_schedule_lambda_refuses_what_the_classes_refuse():
    with pytest.raises(ValueError, match="phi: only the uba schedule"):
        ScheduleLambda("cosine", 0, 10, phi=4.0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        ScheduleLambda("linear", 0, 10, min_lr_ratio=True)
    assert ScheduleLambda("uba", 0, 10, phi=4.0)(5) == pytest.approx(1 / 3)  # uba phi=4 at z=0.5: 1/3


def test_has_stepped_reads_step_counters():
    from adasched.schedules.lr import _has_stepped

    p = torch.nn.Parameter(torch.randn(3))
    makers = (lambda: torch.optim.Adagrad([p], lr=0.1), lambda: torch.optim.Adam([p], lr=0.1),
              lambda: torch.optim.SGD([p], lr=0.1), lambda: torch.optim.SGD([p], lr=0.1, momentum=0.9),
              lambda: torch.optim.LBFGS([p], lr=0.1))
    for make in makers:
        opt = make()
        assert not _has_stepped(opt)
        p.grad = torch.randn(3)
        opt.step((lambda: float(p.detach().square().sum())) if isinstance(opt, torch.optim.LBFGS) else None)
        fresh = make()
        fresh.load_state_dict(opt.state_dict())  # a resumed optimizer (no scheduler has wrapped its step)
        # plain SGD keeps no state: documented as undetectable; SGD with momentum keeps a momentum buffer and
        # LBFGS its counters, without a "step" key (both read as fresh before: hunt finding)
        plain_sgd = isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0
        assert _has_stepped(fresh) == (not plain_sgd), type(opt).__name__


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the catch-up steps
def test_resumed_sgd_momentum_catches_up_to_the_closed_form():
    """Hunt finding: a restored SGD-with-momentum optimizer read as fresh, so a fresh REX scheduler stepped to
    catch up kept the restored (decayed) lr as another scheduler's factor: 0.75x the schedule to the end."""
    base = float(np.random.default_rng().uniform(0.05, 0.5))
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.SGD([p], lr=base, momentum=0.9)
    sched = REX(opt, 10)
    for _ in range(4):
        p.grad = torch.randn(4)
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(p.detach().clone())], lr=base, momentum=0.9)
    opt2.load_state_dict(opt.state_dict())
    fresh = REX(opt2, 10)
    for _ in range(4):
        fresh.step()
    got = []
    for _ in range(6):
        got.append(opt2.param_groups[0]["lr"])
        opt2.step()
        fresh.step()
    want = [base * (1 - z) / (0.5 + 0.5 * (1 - z)) for z in (t / 10 for t in range(4, 10))]  # REX, no warmup
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_megatron_scheduler_keeps_weight_decay_when_not_given():
    """The README's MegatronParamScheduler call (no wd arguments) set AdamW's weight decay to 0.0 (defaults
    start_wd = end_wd = 0.0); megatron-core takes them always. Left out, the groups keep theirs now; given, they
    are megatron's (constant needs start_wd == end_wd, as megatron asserts)."""
    from adasched.schedules import MegatronParamScheduler

    wd = float(np.random.default_rng().uniform(0.01, 0.2))
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([{"params": [p], "weight_decay": wd}, {"params": [q], "weight_decay": 0.0}], lr=3e-4)
    kw = dict(init_lr=0.0, max_lr=3e-4, min_lr=3e-5, lr_warmup_steps=10, lr_decay_steps=100, lr_decay_style="rex")
    s = MegatronParamScheduler(opt, **kw)
    for _ in range(5):
        s.step(1)
    assert [g["weight_decay"] for g in opt.param_groups] == [wd, 0.0]
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-4 * 5 / 10)
    MegatronParamScheduler(opt, **kw, start_wd=0.05, end_wd=0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.05]
    with pytest.raises(ValueError, match="end_wd: give start_wd and end_wd together"):
        MegatronParamScheduler(opt, **kw, start_wd=0.01)
    with pytest.raises(ValueError, match="wd_incr_style: 'constant' needs start_wd == end_wd"):
        MegatronParamScheduler(opt, **kw, start_wd=0.01, end_wd=0.1, wd_incr_steps=50)


def test_schedule_options_a_schedule_does_not_take_are_refused_up_front():
    from adasched.schedules import DeepSpeedSchedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(2))], lr=0.1)
    with pytest.raises(ValueError, match="phi: not an option of schedule 'rex'"):
        get_schedule("rex", opt, 10, 100, phi=1.0)
    with pytest.raises(ValueError, match="phi: not an option of schedule 'rex'"):
        DeepSpeedSchedule("rex", 10, 100, phi=1.0)  # (raised only inside deepspeed.initialize)
    norms = np.random.default_rng().uniform(0.5, 2.0, 100)
    for bad in ("phi", "min_lr_ratios"):  # refined: was a TypeError from inside Refined
        with pytest.raises(ValueError, match=f"{bad}: not an option of schedule 'refined'"):
            get_schedule("refined", opt, 10, grad_norms=norms, **{bad: 0.5})
        with pytest.raises(ValueError, match=f"{bad}: not an option of schedule 'refined'"):
            DeepSpeedSchedule("refined", 10, grad_norms=norms, **{bad: 0.5})
    with pytest.raises(ValueError, match="give grad_norms=... or path=..., not both"):
        get_schedule("refined", opt, 10, grad_norms=norms, path="norms.csv")
    assert get_schedule("uba", opt, 10, 100, phi=1.0).phi == 1.0
    DeepSpeedSchedule("rex", 10, 100, last_epoch=5)  # a resume's last_epoch is not probed on the throwaway


def test_deepspeed_schedule_takes_a_per_group_min_lr_and_a_large_absolute_one():
    """Hunt finding: the up-front check built the schedule on a one-group SGD at lr 1.0, so DeepSpeed's usual two
    groups' min_lr list, and an absolute min_lr above 1.0, were refused before deepspeed.initialize."""
    from adasched.schedules import DeepSpeedSchedule

    rng = np.random.default_rng()
    lrs = [float(x) for x in rng.uniform(2.0, 5.0, 2)]
    floors = [lr * float(rng.uniform(0.05, 0.2)) for lr in lrs]
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.randn(2))], "lr": lr} for lr in lrs])
    sched = DeepSpeedSchedule("rex", 2, 10, min_lr=floors)(opt)
    for _ in range(10):
        opt.step()
        sched.step()
    np.testing.assert_allclose([g["lr"] for g in opt.param_groups], floors, rtol=1e-12)  # the end: each floor
    opt1 = torch.optim.AdamW([torch.nn.Parameter(torch.randn(2))], lr=lrs[0])
    high = lrs[0] * float(rng.uniform(0.5, 0.9))  # an absolute floor above 1.0 (lrs[0] >= 2)
    DeepSpeedSchedule("linear", 0, 10, min_lr=high)(opt1)
    DeepSpeedSchedule("linear", 0, 10, min_lr=np.float32(high))(opt1)  # a numpy scalar too (review finding)
    with pytest.raises(ValueError, match="min_lr"):  # still refused: more values than the real groups
        DeepSpeedSchedule("rex", 2, 10, min_lr=floors + floors[:1])(opt)


def _megatron(style, **kw):
    from adasched.schedules import MegatronParamScheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
    return MegatronParamScheduler(opt, init_lr=0.0, max_lr=1e-3, min_lr=1e-5, lr_warmup_steps=10,
                                  lr_decay_steps=100, lr_decay_style=style, **kw)


def test_megatron_scheduler_saves_phi_and_the_refined_norms():
    """Hunt finding: the state_dict held no phi, so a UBA run resumed with another (or the default) phi changed
    its schedule silently, even with use_checkpoint_opt_param_scheduler=False, which refuses any mismatch."""
    rng = np.random.default_rng()
    phi = float(rng.uniform(2.0, 6.0))
    run = _megatron("uba", phi=phi)
    run.step(50)
    sd = run.state_dict()
    assert sd["phi"] == phi
    resumed = _megatron("uba")  # the default phi: the checkpoint's wins (megatron's default semantics)
    resumed.load_state_dict(sd)
    assert resumed.phi == phi and resumed.get_lr({}) == run.get_lr({})
    strict = _megatron("uba", use_checkpoint_opt_param_scheduler=False)
    with pytest.raises(ValueError, match="phi: scheduler has 0.5 but the checkpoint has"):
        strict.load_state_dict(sd)
    norms = rng.uniform(0.5, 2.0, 60)
    ref = _megatron("refined", grad_norms=norms, smoothing=0.2)
    ref.step(40)
    sd = ref.state_dict()
    same = _megatron("refined", grad_norms=norms.copy())  # the checkpoint's smoothing (0.2) wins over 0.1
    same.load_state_dict(sd)
    assert same.get_lr({}) == ref.get_lr({}) and same._refine[2] == 0.2
    other = _megatron("refined", grad_norms=norms * 1.5 + rng.uniform(0, 0.1, 60))
    with pytest.raises(ValueError, match="grad_norms: this scheduler's norms differ"):
        other.load_state_dict(sd)


def test_plot_labels_constant_as_without_warmup():
    """Hunt finding: `schedules plot constant rex --warmup 5` drew constant at 1 from step 0 under a 'warmup 5'
    title (as --lr-schedule constant, it has no scheduler and no warmup): the label says so now."""
    from adasched.schedules.plots import schedule_curve

    n, w = int(np.random.default_rng().integers(10, 50)), 5
    label, m = schedule_curve("constant", n, w)
    assert label == "constant (no warmup)" and m.tolist() == [1.0] * (n + 1)
    assert schedule_curve("constant", n, 0)[0] == "constant"
    assert schedule_curve("rex", n, w)[1][0] == 0.0  # the others warm up from 0


def _one_param_opt(lr=1e-3):
    return torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=lr)


@pytest.mark.parametrize("first", ["rex-warmup", "hf-linear-warmup", "lambda-warmup"])
def test_a_schedule_built_over_an_lr_of_0_is_not_held_at_0(first):
    """A fresh scheduler reads the group's lr over its base lr as another scheduler's factor; an lr of 0 (a warmup's
    first value: a scheduler built a second time, a dry-run plot before training, a warmup LambdaLR made first)
    was a factor 0 and held the lr at 0 for the whole run. It counts as no factor now: the same lrs as one REX."""
    from transformers import get_linear_schedule_with_warmup

    W, T = int(np.random.default_rng().integers(2, 12)), 100
    ref_opt = _one_param_opt()
    ref = REX(ref_opt, T, warmup_steps=W)
    opt = _one_param_opt()
    {"rex-warmup": lambda: REX(opt, T, warmup_steps=W),
     "hf-linear-warmup": lambda: get_linear_schedule_with_warmup(opt, W, T),
     "lambda-warmup": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, t / W))}[first]()
    assert opt.param_groups[0]["lr"] == 0.0
    sched = REX(opt, T, warmup_steps=W)
    want, got = [], []
    for _ in range(T + 2):
        for o, s, out in ((ref_opt, ref, want), (opt, sched, got)):
            o.step()
            s.step()
            out.append(o.param_groups[0]["lr"])
    assert got == want and max(got) == pytest.approx(1e-3)


def test_megatron_refined_style_starts_its_decay_at_the_end_of_warmup():
    """Megatron's warmup includes its last step (max_lr there); for the refined style, whose table starts below 1,
    the adapter ran that step at max_lr where Refined and the LambdaLR factory give table[0] x max_lr (31x less on
    the hunt's norms). Every step now equals the plain schedule."""
    from adasched.schedules import Refined
    from adasched.schedules.adapters import MegatronParamScheduler

    rng = np.random.default_rng()
    N, W, gbs = 40, int(rng.integers(2, 8)), 8
    norms = np.exp(rng.normal(size=N)) * np.linspace(3, 1, N)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(1))], lr=1.0)
    meg = MegatronParamScheduler(opt, init_lr=0.0, max_lr=1.0, min_lr=0.0, lr_warmup_steps=W * gbs,
                                 lr_decay_steps=N * gbs, lr_decay_style="refined", grad_norms=norms)
    plain_opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(1))], lr=1.0)
    plain = Refined(plain_opt, norms, warmup_steps=W)
    got, want = [opt.param_groups[0]["lr"]], [plain_opt.param_groups[0]["lr"]]
    for _ in range(N + 2):
        meg.step(gbs)
        plain_opt.step()
        plain.step()
        got.append(opt.param_groups[0]["lr"])
        want.append(plain_opt.param_groups[0]["lr"])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("phi", [1e17, 1e300, 1.7e308])
def test_uba_with_a_huge_phi_is_a_value_not_a_zero_division(phi, tmp_path, capsys):
    """2u / (2 phi + (2 - phi) u) cancels for phi >= 2**53 (0 / 0 at z = 0: `schedules plot uba:1e17` was a
    ZeroDivisionError traceback; nan at 1e308). The same function in a form without cancellation: 1 at z = 0, 0 at
    z = 1, ~2 / phi at z = 1/2 - and equal to the published form for ordinary phi."""
    from adasched.schedules.lr import uba_multiplier

    assert uba_multiplier(0.0, phi) == 1.0 and uba_multiplier(1.0, phi) == 0.0
    assert uba_multiplier(0.5, phi) == pytest.approx(2.0 / phi, rel=1e-12)
    rng = np.random.default_rng()
    for z, p in zip(rng.random(200), np.exp(rng.uniform(-4, 8, 200))):
        u = 1.0 + math.cos(math.pi * z)
        assert uba_multiplier(float(z), float(p)) == pytest.approx(2 * u / (2 * p + (2 - p) * u), rel=1e-12, abs=1e-15)
    assert main(["schedules", "plot", f"uba:{phi!r}", "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0


def test_bench_schedules_ties_share_ranks_and_wins():
    """UBA phi=2 is cosine: their mean losses differ by float32 rounding (~1e-8) or not at all, and that noise (or
    list order) ranked them apart (BENCHMARKS: 7.81 against 7.94) and gave the win to one. Means within 1e-6
    relative are ties now: the average rank, both marked best."""
    from types import SimpleNamespace

    from adasched.schedules.bench import _mark_best, summary

    rng = np.random.default_rng()
    results = []
    for budget in (0.1, 0.5):
        base = float(rng.uniform(0.2, 2.0))
        for name, loss, acc in (("cosine", base, 0.9), ("uba2", base * (1 + 3e-9), 0.9 * (1 - 2e-9)),
                                ("linear", base * 1.01, 0.85)):
            results.append({"model": "mlp", "optimizer": "sgd", "budget": budget, "schedule": name,
                            "loss_mean": loss, "acc_mean": acc})
        _mark_best(results, "mlp", "sgd", budget)
    rows = {r["schedule"]: r for r in summary(SimpleNamespace(results=results))}
    assert rows["cosine"]["mean_rank"] == rows["uba2"]["mean_rank"] == 1.5 and rows["linear"]["mean_rank"] == 3.0
    assert rows["cosine"]["mean_rank_low_budget"] == rows["uba2"]["mean_rank_low_budget"] == 1.5
    assert (rows["cosine"]["loss_wins"], rows["uba2"]["loss_wins"], rows["linear"]["loss_wins"]) == (2, 2, 0)
    assert (rows["cosine"]["acc_wins"], rows["uba2"]["acc_wins"], rows["linear"]["acc_wins"]) == (2, 2, 0)


@pytest.mark.parametrize("first", ["linear-warmup", "rex-warmup"])
def test_a_chain_whose_first_schedule_starts_at_0_runs_the_product_from_step_0(first):
    """The other side of an lr of 0 at construction: in ChainedScheduler([chainable warmup from 0, ours]) the lr of
    step 0 is the product, 0 (the first fix of the held-at-0 bug read the 0 as no factor and ran step 0 at the full
    lr); from step 1 the product of the two schedules' own values."""
    from adasched.schedules import UBA, LinearDecay

    W, T = int(np.random.default_rng().integers(2, 8)), 30
    make_first = {"linear-warmup": lambda o: LinearDecay(o, T, warmup_steps=W),
                  "rex-warmup": lambda o: REX(o, T, warmup_steps=W)}[first]
    alone = []
    for make in (make_first, lambda o: UBA(o, T, phi=0.5)):
        o = torch.optim.SGD([torch.nn.Parameter(torch.randn(1))], lr=1.0)
        s = make(o)
        vals = []
        for _ in range(T):
            vals.append(o.param_groups[0]["lr"])
            o.step()
            s.step()
        alone.append(vals)
    o = torch.optim.SGD([torch.nn.Parameter(torch.randn(1))], lr=1.0)
    chain = ChainedScheduler([make_first(o), UBA(o, T, phi=0.5)])
    got = []
    for _ in range(T):
        got.append(o.param_groups[0]["lr"])
        o.step()
        chain.step()
    assert got[0] == 0.0
    np.testing.assert_allclose(got, [a * b for a, b in zip(*alone)], rtol=1e-12, atol=0)


@pytest.mark.parametrize("lr", [math.nan, math.inf])
def test_a_non_finite_base_lr_is_refused(lr):
    """SGD takes lr=nan (Adam refuses it): REX built on it and every lr of the schedule was nan."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=lr)
    with pytest.raises(ValueError, match=rf"^optimizer: param group 0 has lr {lr}; a schedule needs a finite lr"):
        REX(opt, 10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    sched = REX(opt, 10)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "lr": lr})  # adopted at the next step
    with pytest.raises(ValueError, match=rf"^optimizer: param group 1 \(added after the scheduler was made\) has "
                                         rf"lr {lr}"):
        sched.step()


def test_megatron_adapter_refuses_an_infinite_end_wd():
    from adasched.schedules.adapters import MegatronParamScheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
    kw = dict(init_lr=0.0, max_lr=1e-3, min_lr=0.0, lr_warmup_steps=2, lr_decay_steps=10, lr_decay_style="linear",
              start_wd=0.0, wd_incr_steps=10, wd_incr_style="linear")
    with pytest.raises(ValueError, match=r"^end_wd: must be finite, got inf$"):
        MegatronParamScheduler(opt, end_wd=math.inf, **kw)
    MegatronParamScheduler(opt, end_wd=0.1, **kw)


@pytest.mark.parametrize("args, match", [
    ((3, 10, 8), r"^warmup_steps: must be <= total_steps=8, got 10$"),
    ((-1, 0, 8), r"^step: must be an integer >= 0, got -1$"),
    ((2, 0, 0), r"^total_steps: must be an integer >= 1, got 0$"),
    ((2.5, 0, 8), r"^step: must be an integer >= 0, got 2.5$"),
])
def test_warmup_decay_multiplier_checks_its_arguments(args, match):
    """Warmup 10 of 8 steps ramped to 0.9 then fell to 0 without reaching the peak; step -1 without warmup raised
    ZeroDivisionError. A valid call still gives warmup then decay."""
    from adasched.schedules import linear_multiplier, warmup_decay_multiplier

    with pytest.raises(ValueError, match=match):
        warmup_decay_multiplier(*args, linear_multiplier)
    got = [warmup_decay_multiplier(t, 2, 6, linear_multiplier) for t in range(8)]
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0], rtol=0, atol=1e-15)


@pytest.mark.parametrize("layers,waves", [(1024, 2046), (1000, 1998), (800, 1598), (513, 1536)])
def test_a_wave_sampled_at_its_zeros_is_uniform(layers, waves):
    """Paper-fidelity hunt: every layer of these waves sits on a zero of the sine, so the shape is constant; the
    ~1e-12 rounding of sin(k pi) was stretched over the whole [lo, hi] range (capacities 1..7 for a mean of 4)."""
    from adasched.schedules import capacity_schedule, schedule_shape

    assert schedule_shape("wave", layers, waves) == [0.0] * layers
    assert capacity_schedule("wave", layers, 4 * layers, 1, 8, waves=waves) == [4] * layers
    # a wave that is not at its zeros keeps its shape and its full spread
    c = capacity_schedule("wave", layers, 4 * layers, 1, 8, waves=1.0)
    assert sum(c) == 4 * layers and min(c) == 1 and max(c) >= 7


def test_wave_phase_is_reduced_exactly_and_tiny_waves_keep_their_shape():
    """Review of the fix above: an absolute snap at 1e-9 missed the noise of sin(2 pi k) for waves ~1e7 and up
    (1.1e-9: [2, 1, 3] for a constant shape) and flattened a genuine wave of amplitude < 1e-9; the phase is reduced
    mod 1 before the sine now (exact for whole waves), the snap only takes sin's own rounding (1e-12)."""
    from adasched.schedules import capacity_schedule, schedule_shape

    assert capacity_schedule("wave", 3, 6, 1, 3, waves=1e7) == [2, 2, 2]
    assert capacity_schedule("wave", 2, 4, 1, 3, waves=1e8) == [2, 2]
    assert capacity_schedule("wave", 2, 4, 1, 3, waves=0.5) == [2, 2]     # sin(pi) = 1.2e-16
    assert schedule_shape("wave", 5, 1.0) == [0.0, 1.0, 0.0, -1.0, 0.0]
    # a tiny wave rises over 4 layers like ascending: its shape, not uniform, at any small amplitude
    for w in (1e-9, 1e-10, 1e-11):
        assert capacity_schedule("wave", 4, 8, 1, 3, waves=w) == [1, 2, 2, 3], w


def test_the_schedule_table_names_the_step_each_fraction_shows(tmp_path, capsys):
    """Paper-fidelity hunt: with --steps 3 the '50%' column showed step 2's multiplier (REX 0.5 at z = 2/3)
    under a header that reads as z = 0.5 (REX 0.667); columns between two steps now name the step they show."""
    from adasched.schedules.plots import curve_rows

    assert main(["schedules", "plot", "rex", "--steps", "3", "--out", str(tmp_path / "q.png")]) == 0
    out = capsys.readouterr().out
    assert "50% (step 2)" in out and "10% (step 0)" in out and "90% (step 3)" in out
    rows, cols = curve_rows([("a", np.linspace(1.0, 0.0, 101)), ("b", np.linspace(2.0, 0.0, 101))])
    assert cols == ["schedule", "0%", "10%", "25%", "50%", "75%", "90%", "100%"]
    assert rows[0][1:] == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.25, 0.1, 0.0])
    assert rows[1][1:] == pytest.approx([2.0, 1.8, 1.5, 1.0, 0.5, 0.2, 0.0])
    # halves go up (round() went to the even step: 75% of 6 steps showed step 4)
    _, cols6 = curve_rows([("c", np.arange(7.0))])
    assert cols6[3] == "25% (step 2)" and cols6[5] == "75% (step 5)"
