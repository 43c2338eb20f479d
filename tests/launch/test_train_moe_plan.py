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
    from adasched.planner.fsmoe.costmodel import MoEConfig

    total = MoEConfig.model_validate(c.config).replicated_params * len(c.layers)  # the planned model's gradient
    assert pp.slice_fractions == pytest.approx([x / total for x in c.grad_slices[:2]], rel=1e-12)


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


# ---- the layout: FSMoE's expert-sharded "hierarchical" vs the runtime's two-step exchange of whole experts ----
@pytest.fixture(scope="module")
def sharded_plan(tmp_path_factory):
    """A plan in FSMoE's hierarchical layout: 2 experts on 4 GPUs of one node (EP size 1, each expert sharded over
    the node's 4 GPUs)."""
    import json

    d = tmp_path_factory.mktemp("moe_sharded")
    cfg = d / "two-experts.json"
    cfg.write_text(json.dumps({"name": "e2", "hidden": 64, "ffn_hidden": 128, "experts": 2, "top_k": 1,
                               "batch": 2, "seq_len": 32, "num_layers": 2}))
    assert cli(["plan", "moe", "--config", str(cfg), "--gpus", "4", "--out", str(d / "sharded.json"), "--stages",
                "published", "--time-limit", "0.5", "--json"]) == 0
    return d / "sharded.json"


@pytest.fixture(scope="module")
def two_step_plan(tmp_path_factory):
    """A plan for the runtime's two-step exchange: 4 ranks, EP 4, nodes of 2."""
    out = tmp_path_factory.mktemp("moe_two_step") / "two_step.json"
    assert cli(["plan", "moe", "--config", "mixtral-8x7b", "--gpus", "4", "--ep-size", "4", "--two-step-a2a",
                "--gpus-per-node", "2", "--out", str(out), "--stages", "published", "--time-limit", "0.5",
                "--json"]) == 0
    return out


@pytest.fixture(scope="module")
def layout_plans(sharded_plan, two_step_plan):
    return {"sharded": sharded_plan, "two_step": two_step_plan}


def test_plans_record_the_layout(layout_plans):
    sharded = load_plan(layout_plans["sharded"], expect=MoEPlan).configs[0]
    assert (sharded.ep_size, sharded.hierarchical, sharded.two_step_a2a, sharded.gpus_per_node) == (1, True, False, 4)
    ts = load_plan(layout_plans["two_step"], expect=MoEPlan)
    # --gpus-per-node 2 is the exchange's split (exchange_gpus_per_node); the node size the all-reduces are priced
    # with stays the profile's (h100-sxm: 8 per node, min 4 GPUs)
    assert ts.gpus == 4 and ts.gpus_per_node == 8
    for c in ts.configs:
        assert (c.ep_size, c.hierarchical, c.two_step_a2a, c.gpus_per_node, c.exchange_gpus_per_node,
                c.expert_copies) == (4, False, True, 4, 2, 1)
        assert all(lp.order_fwd == lp.order_bwd == "dispatch-first" for lp in c.layers)  # the runtime's only order


@pytest.mark.parametrize("which,argv,needle", [
    # before: EP size 1 and world 4 matched, so a run with whole experts accepted a plan costed with every expert
    # sharded over 4 GPUs (all-gather/reduce-scatter inside the node)
    ("sharded", ["--experts", "8", "--ep-size", "1"], "each expert sharded over a node's 4 GPUs (FSMoE's layout; "
                                                      "train_moe --expert-shards 4 --ep-size 1), this run holds "
                                                      "whole experts per rank"),
    # before: a flat plan accepted a --hierarchical (two-step) run of the same EP size and world
    ("d4k2", ["--experts", "8", "--ep-size", "2", "--hierarchical", "--gpus-per-node", "2"],
     "planned with a flat all-to-all, this run has a two-step one through nodes of 2"),
    ("two_step", ["--experts", "8"], "planned with a two-step all-to-all through nodes of 2 ranks, this run has a "
                                     "flat one (no --hierarchical)"),
    ("two_step", ["--experts", "8", "--hierarchical", "--gpus-per-node", "4"],
     "two-step all-to-all through nodes of 2 ranks, this run has a two-step one through nodes of 4"),
])
def test_a_run_with_another_layout_is_refused(plans, request, monkeypatch, capsys, which, argv, needle):
    path = plans[which] if which in plans else request.getfixturevalue(f"{which}_plan")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--plan", str(path), *argv, "--validate-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: ") and needle in err[0], err
    assert "plan it with adasched plan moe --gpus 4" in err[0]


def test_two_step_plan_runs_the_planned_layout(layout_plans, tmp_path):
    """A real 4-rank gloo launch (train_moe.sh) with --hierarchical and the two-step plan: it is accepted, the
    runtime builds the plan's layout (EP 4 through nodes of 2) and trains; the same launch without --hierarchical
    is refused before any worker starts (one line, exit 2)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHON=sys.executable, NPROC="4", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    base = ["bash", str(root / "launch" / "train_moe.sh"), "--plan", str(layout_plans["two_step"]), "--steps", "1",
            "--layers", "1", "--hidden", "16", "--ffn", "16", "--seq", "8", "--batch", "2", "--json"]
    proc = subprocess.run(base + ["--hierarchical", "--gpus-per-node", "2"], capture_output=True, text=True, env=env,
                          timeout=240, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])
    c = load_plan(layout_plans["two_step"], expect=MoEPlan).configs[0]
    assert (res["world"], res["ep_size"], res["two_step"], res["exchange_gpus_per_node"]) == \
        (4, c.ep_size, c.two_step_a2a, c.exchange_gpus_per_node)
    assert 1.0 < res["runs"][0]["final_loss"] < 4.0
    bad = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120, cwd=root)
    assert bad.returncode == 2 and bad.stderr.count("error:") == 1 and "a flat one (no --hierarchical)" in bad.stderr


@pytest.mark.parametrize("which,argv,needle", [
    ("sharded", ["--expert-shards", "2"], "train_moe --expert-shards 4 --ep-size 1), this run has 4 ranks, EP size 2 "
                                          "with experts sharded over 2 ranks"),
    ("d4k2", ["--ep-size", "2", "--expert-shards", "2"], "planned with whole experts per GPU (EP size 2), this run "
                                                         "shards each expert over 2 ranks (--expert-shards)"),
    (None, ["--expert-shards", "3"], "--expert-shards: 3 does not divide the world size 4"),
    (None, ["--expert-shards", "2", "--hierarchical"], "--expert-shards: the expert-sharded layout has its own "
                                                       "exchange"),
    (None, ["--expert-shards", "4", "--ffn", "6"], "--expert-shards: 4 does not divide --ffn 6"),
    (None, ["--expert-shards", "2", "--ep-size", "4"], "--ep-size: 4 x --expert-shards 2 does not divide the world "
                                                       "size 4"),
    (None, ["--expert-shards", "0"], "--expert-shards: 0 must be >= 1"),
])
def test_expert_shards_mismatch_is_one_line_exit_2(plans, request, monkeypatch, capsys, which, argv, needle):
    """--expert-shards S (FSMoE's expert-sharded layout) against the plan's layout and the world."""
    extra = []
    if which is not None:
        path = plans[which] if which in plans else request.getfixturevalue(f"{which}_plan")
        extra = ["--plan", str(path)]
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main([*extra, "--experts", "8", *argv, "--validate-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_sharded_plan_runs_the_planned_layout(sharded_plan, tmp_path):
    """A real 4-rank gloo launch (train_moe.sh) of FSMoE's layout: the sharded plan (one node of 4 GPUs sharding
    every expert) with --expert-shards 4 is accepted and trains; 2 nodes x 2 shards (flags) and whole experts (EP 4)
    train the same model: the same losses up to float rounding (the shards' partial sums add in another order)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHON=sys.executable, NPROC="4", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    base = ["bash", str(root / "launch" / "train_moe.sh"), "--steps", "3", "--layers", "2", "--hidden", "16",
            "--ffn", "16", "--seq", "8", "--batch", "2", "--experts", "4", "--json"]
    runs = {}
    for name, extra in (("plan", ["--plan", str(sharded_plan), "--expert-shards", "4"]),
                        ("2x2", ["--expert-shards", "2"]), ("whole", [])):
        proc = subprocess.run(base + extra, capture_output=True, text=True, env=env, timeout=240, cwd=root)
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        runs[name] = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])
    assert [(r["ep_size"], r["expert_shards"]) for r in runs.values()] == [(1, 4), (2, 2), (4, 1)]
    want = runs["whole"]["runs"][0]["losses"]
    assert len(want) == 3 and 1.0 < want[0] < 4.0
    for name in ("plan", "2x2"):
        got = runs[name]["runs"][0]
        assert got["losses"] == pytest.approx(want, rel=1e-5, abs=1e-6), name
        assert got["copies_max_diff"] == 0.0, name


def test_default_ep_size_with_shards_is_named(monkeypatch, capsys):
    """Experts that do not divide the default EP size (world / --expert-shards) name where that size came from."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert main(["--expert-shards", "2", "--experts", "2", "--validate-only"]) == 2
    assert capsys.readouterr().err == ("error: --experts: 2 is not divisible by the expert-parallel size 4 (the default "
                                       "--ep-size: world 8 / --expert-shards 2; give --ep-size K)\n")
    assert main(["--expert-shards", "2", "--experts", "2", "--ep-size", "2", "--validate-only"]) == 0


def test_a_run_on_a_non_power_of_two_world_gets_no_replan_command_the_planner_refuses(plans, monkeypatch, capsys):
    """Hunt finding: a 3-rank run with a 2-GPU plan was told "plan it with adasched plan moe --gpus 3 --ep-size 3",
    which the planner refuses (--gpus must be a power of two). No such suggestion now; a power-of-two world still
    gets one."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["--plan", str(plans["d2"]), "--experts", "6", "--validate-only", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {plans['d2']}: ") and "3 ranks" in err[0], err
    assert "plan it with" not in err[0] and "--gpus 3" not in err[0], err
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--plan", str(plans["d2"]), "--experts", "8", "--validate-only", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plan it with adasched plan moe --gpus 4" in err[0], err


def test_a_plan_of_another_model_shape_loads_with_a_note(plans, monkeypatch, capsys):
    # a Mixtral plan (32 MoE layers, 8 experts) on a 2-layer, 4-expert run: its settings apply, but were costed for
    # its own model; that used to pass in silence (its slices then hid 2/32 of the run's dense gradient). Said once,
    # by the run that trains (not by the launch script's pre-check, nor before an error)
    import os
    import subprocess
    import sys

    one = plans["d4k2"].parent / "d1.json"
    assert cli(["plan", "moe", "--config", "mixtral-8x7b", "--out", str(one), "--stages", "published",
                "--time-limit", "0.5", "--gpus", "1", "--json"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["--plan", str(one), "--experts", "4", "--layers", "2", "--validate-only"]) == 0
    assert capsys.readouterr().out == ""
    env = dict(os.environ, WORLD_SIZE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "adasched.launch.train_moe", "--plan", str(one), "--experts", "4",
                           "--layers", "2", "--steps", "1"], env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0 and out.count("note: ") == 1, out + proc.stderr
    assert (f"note: {one}: configuration 'mixtral-8x7b" in out and "was planned for 32 MoE layers (this "
            "run 2) and 8 experts (this run 4)" in out and "costed for the plan's model" in out), out
    from adasched.runtime.moe.planned import load_pipeline

    pp = load_pipeline(plans["d4k2"], ep_size=2, num_layers=32, world=4, experts=8)
    assert pp.shape_note is None  # the plan's own shape: no note
    c = load_plan(plans["d4k2"], expect=MoEPlan).configs[0]
    pp = load_pipeline(plans["d4k2"], ep_size=2, num_layers=40, world=4)
    assert "32 MoE layers (this run 40)" in pp.shape_note and "last layer repeated" in pp.shape_note
    assert pp.r_fwd[32:] == [c.layers[-1].r_fwd] * 8


def test_switch_default_cap_lo_is_whole_ep_units(monkeypatch, capsys):
    # 6 experts on 2 ranks: the default lower bound was 6 // 2 = 3, refused as "--cap-lo: 3 is not a multiple of
    # the expert-parallel size 2" - an option the user never gave
    from adasched.launch.train_moe import layer_routers

    for experts, ep in ((6, 2), (10, 2), (12, 4), (8, 8)):
        routers, caps = layer_routers("switch", "uniform", 4, experts, ep_size=ep)
        assert all(c % ep == 0 and c >= ep for c in caps) and sum(caps) == 4 * experts, (experts, ep, caps)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--router", "switch", "--experts", "6", "--validate-only"]) == 0, capsys.readouterr().err
