"""(h55) MegatronParamScheduler took our styles' options for any style and dropped them (a "rex" typed for "uba"
with phi=1.0 ran REX without a word); an invalid last_epoch failed inside torch as a KeyError about initial_lr,
which points at resuming. Both are one ValueError naming the argument now."""
import random

import pytest
import torch

from adasched.schedules import REX, UBA, DeepSpeedSchedule, MegatronParamScheduler, get_schedule


def _opt(lr=0.1):
    return torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=lr)


@pytest.mark.parametrize("name,value,owner", [("phi", 1.0, "uba"), ("grad_norms", [1.0, 2.0, 3.0], "refined"),
                                              ("norm", "l1", "refined"), ("smoothing", 0.2, "refined")])
def test_megatron_options_of_another_style_are_refused(name, value, owner):
    styles = ["constant", "linear", "cosine", "inverse-square-root", "rex", "uba", "refined"]
    for style in (s for s in styles if s != owner):
        with pytest.raises(ValueError, match=f"^{name}: not an option of lr_decay_style '{style}' \\(only of "
                                             f"'{owner}'\\)$"):
            MegatronParamScheduler(_opt(), 0.0, 0.1, 0.0, 2, 10, style, **{name: value})


def test_megatron_options_of_their_own_style_still_work():
    """uba with phi, refined with norms / norm / smoothing: the lr at every step as without the sentinel change
    (phi 1.0 differs from the default; the refined table from the given norms)."""
    g = [1.0 + random.random() for _ in range(10)]
    uba = MegatronParamScheduler(_opt(), 0.0, 0.1, 0.0, 2, 10, "uba", phi=1.0)
    dflt = MegatronParamScheduler(_opt(), 0.0, 0.1, 0.0, 2, 10, "uba")
    ref = MegatronParamScheduler(_opt(), 0.0, 0.1, 0.0, 2, 10, "refined", grad_norms=g, norm="l1", smoothing=0.0)
    lrs = {"uba": [], "dflt": [], "ref": []}
    for _ in range(10):
        for k, s in (("uba", uba), ("dflt", dflt), ("ref", ref)):
            s.step(1)
            lrs[k].append(s.optimizer.param_groups[0]["lr"])
    assert lrs["uba"][4] != pytest.approx(lrs["dflt"][4])  # phi took effect
    assert uba.state_dict()["phi"] == 1.0 and dflt.state_dict()["phi"] != 1.0
    assert ref.state_dict()["norm"] == "l1" and ref.state_dict()["smoothing"] == 0.0


@pytest.mark.parametrize("bad", [-2, 1.5, True, "3", None])
def test_a_bad_last_epoch_is_named(bad):
    for build in (lambda: REX(_opt(), 10, 2, last_epoch=bad), lambda: UBA(_opt(), 10, 2, last_epoch=bad),
                  lambda: get_schedule("rex", _opt(), 2, 10, last_epoch=bad),
                  lambda: get_schedule("linear", _opt(), 2, 10, last_epoch=bad),
                  lambda: DeepSpeedSchedule("rex", 2, 10, last_epoch=bad)):
        with pytest.raises(ValueError, match=f"^last_epoch: must be an integer >= -1, got {bad!r}$"):
            build()


def test_a_valid_last_epoch_still_resumes():
    """last_epoch k on an optimizer holding initial_lr: the lr of a run stepped k + 1 times (torch's convention:
    the constructor takes one step from last_epoch)."""
    o1, o2 = _opt(), _opt()
    run = REX(o1, 10, 2)
    for _ in range(5):
        o1.step()
        run.step()
    for g in o2.param_groups:
        g["initial_lr"] = 0.1
    resumed = REX(o2, 10, 2, last_epoch=4)
    assert resumed.get_last_lr() == pytest.approx(run.get_last_lr(), rel=1e-12)
