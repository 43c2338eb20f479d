"""train_moe --plan checks the plan against (world, --ep-size): a plan made with `adasched plan moe --gpus D
--ep-size K` is the one for D ranks in EP groups of K. Before: only the EP size was compared, so a plan made
for K GPUs (its dense all-reduce slices costed on K) was accepted by a run on D > K ranks with --ep-size K."""
from __future__ import annotations

import pytest

from adasched.launch.train_moe import main
from adasched.planner.cli import main as cli
from adasched.planner.fsmoe.plan import MoEPlan
from adasched.planner.plan import load_plan


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe_plans")
    out = {}
    for name, extra in (("d4k2", ["--gpus", "4", "--ep-size", "2"]), ("d2", ["--gpus", "2"])):
        out[name] = d / f"{name}.json"
        assert cli(["plan", "moe", "--config", "mixtral-8x7b", "--out", str(out[name]), "--stages", "published",
                    "--time-limit", "0.5", "--json", *extra]) == 0
    return out


def test_plan_for_world_and_ep_size_validates(plans, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--plan", str(plans["d4k2"]), "--experts", "8", "--ep-size", "2", "--validate-only"]) == 0
    from adasched.runtime.moe.planned import load_pipeline

    c = load_plan(plans["d4k2"], expect=MoEPlan).configs[0]
    pp = load_pipeline(plans["d4k2"], ep_size=2, num_layers=2, world=4)
    assert pp.ep_size == 2 and pp.r_fwd == [c.layers[0].r_fwd, c.layers[1].r_fwd]
    assert pp.slice_fractions == pytest.approx([x / sum(c.grad_slices[:2]) for x in c.grad_slices[:2]], rel=1e-12)


@pytest.mark.parametrize("world,argv,needle", [
    # the EP size matches, the world does not: the dense all-reduce was costed for 4 GPUs
    ("8", ["--ep-size", "2"], "was planned for 4 GPUs with EP size 2, this run has 8 ranks with EP size 2"),
    # the world matches, the EP size does not (default: EP over every rank)
    ("4", [], "was planned for 4 GPUs with EP size 2, this run has 4 ranks with EP size 4"),
    # a plan made the old way for the EP group alone (--gpus 2) run on 4 ranks in EP groups of 2
    ("4", ["--ep-size", "2", "--plan-which", "d2"], "was planned for 2 GPUs with EP size 2, this run has 4 ranks"),
])
def test_plan_mismatch_is_one_line_exit_2(plans, monkeypatch, capsys, world, argv, needle):
    which = "d4k2"
    if "--plan-which" in argv:
        which = argv[argv.index("--plan-which") + 1]
        argv = argv[:argv.index("--plan-which")]
    monkeypatch.setenv("WORLD_SIZE", world)
    assert main(["--plan", str(plans[which]), "--experts", "8", *argv, "--validate-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {plans[which]}: ") and needle in err[0]
    assert "plan moe --gpus" in err[0]
