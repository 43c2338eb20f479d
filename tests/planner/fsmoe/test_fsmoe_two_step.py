"""The runtime's two-step exchange (train_moe --hierarchical: whole experts per rank, every all-to-all intra-node then
inter-node) as a planner layout (`plan moe --two-step-a2a`): workloads, profile fits and the pipeline's task order,
hand-computed. Before, the planner's only "hierarchical" was FSMoE's expert-sharded layout."""
import pytest

from adasched.planner.fsmoe.costmodel import MoEConfig, StageCosts, stage_costs, topology
from adasched.planner.fsmoe.model import evaluate_pipeline
from adasched.profiler.builtins import FSMOE_ALPHA_MS, FSMOE_BETA_MS
from adasched.profiler.io import InputError
from adasched.profiler.profile import load_profile

# f = 2 (top-2, capacity 1.0), T = 2*4 = 8 tokens, M = 4, H = 8, GELU (g = 2), E = 8
CFG = MoEConfig(name="t", hidden=4, ffn_hidden=8, experts=8, top_k=2, batch=2, seq_len=4, num_layers=1)


def test_two_step_topology_and_errors():
    topo = topology(CFG, 8, 8, 4, two_step=True)
    assert (topo.ep_size, topo.hierarchical, topo.two_step, topo.exchange_gpus_per_node, topo.expert_copies) == \
        (4, False, True, 4, 2)
    assert topology(CFG, 4, 2, two_step=True).ep_size == 4            # default EP: every GPU
    assert topology(CFG, 4, 2, two_step=True).exchange_gpus_per_node == 2
    with pytest.raises(InputError, match="--two-step-a2a: EP size 1"):
        topology(CFG, 4, 2, 1, two_step=True)
    with pytest.raises(InputError, match="--gpus-per-node: 3 does not divide the EP size 4"):
        topology(CFG, 4, 3, 4, two_step=True)


def test_two_step_published_workloads_hand_computed():
    # K = 4 ranks in nodes of G = 2 -> N = 2 nodes: n0 = f*T*M/N = 64/2, n1 = n3 = f*T*M/G = 32, n2 = g*f*T*M*H/K
    sc = stage_costs(CFG, topology(CFG, 4, 2, 4, two_step=True), source="published")
    n = (32.0, 32.0, 2 * 2 * 8 * 4 * 8 / 4, 32.0, 4.0 * 4 * 4)
    assert sc.two_step and sc.backward().two_step
    assert sc.alpha == pytest.approx(FSMOE_ALPHA_MS)
    assert sc.work == pytest.approx(tuple(b * x for b, x in zip(FSMOE_BETA_MS, n)), rel=1e-12)
    flat = stage_costs(CFG, topology(CFG, 4, 2, 4), source="published")  # the flat exchange of the same EP group
    assert not flat.two_step and flat.work[1] == flat.work[3] == 0.0 and flat.work[0] == pytest.approx(
        FSMOE_BETA_MS[0] * 16.0)


def test_two_step_profile_fits_hand_computed():
    prof = load_profile("h100-sxm")
    sc = stage_costs(CFG, topology(CFG, 4, 2, 4, two_step=True), source="profile", profile=prof)
    rank_bytes = 2 * 8 * 4 * 2                                # f*T*M bf16 elements: each step moves a rank's rows
    inter, intra = prof.collective("all_to_all", 4), prof.collective("all_to_all", 2)
    assert sc.alpha[0] == inter.alpha_ms and sc.work[0] == pytest.approx(inter.beta_ms_per_byte * rank_bytes)
    for i in (1, 3):
        assert sc.alpha[i] == intra.alpha_ms and sc.work[i] == pytest.approx(intra.beta_ms_per_byte * rank_bytes)


def test_two_step_pipeline_hand_computed():
    c = StageCosts((0.0,) * 5, (4.0, 2.0, 2.0, 2.0, 0.0), "test", two_step=True)
    assert evaluate_pipeline(c, 1).time_ms == pytest.approx(2 + 4 + 2 + 4 + 2)
    # r = 2: intra chunk 1, inter chunk 2, gemm chunk 1. intra: DI0 [0,1] DI1 [1,2]; inter: D0 [1,3] D1 [3,5];
    # compute: G0 [3,4] G1 [5,6]; inter: C0 [5,7] C1 [7,9]; intra: CI0 [7,8] CI1 [9,10]
    t = evaluate_pipeline(c, 2).sim.by_name()
    spans = {k: (t[k].start_ms, t[k].end_ms) for k in ("dispatch_intra0", "dispatch_intra1", "dispatch0", "dispatch1",
                                                       "gemm0", "gemm1", "combine0", "combine1", "combine_intra0",
                                                       "combine_intra1")}
    assert spans == {"dispatch_intra0": (0, 1), "dispatch_intra1": (1, 2), "dispatch0": (1, 3), "dispatch1": (3, 5),
                     "gemm0": (3, 4), "gemm1": (5, 6), "combine0": (5, 7), "combine1": (7, 9),
                     "combine_intra0": (7, 8), "combine_intra1": (9, 10)}
    assert {s.stream for s in evaluate_pipeline(c, 2).sim.tasks if s.name.startswith("dispatch_intra")} == {"intra"}


@pytest.mark.parametrize("argv,needle", [
    (["--gpus-per-node", "2"], "error: --gpus-per-node: only with --two-step-a2a"),
    (["--two-step-a2a", "--ep-size", "1"], "error: --two-step-a2a: EP size 1 exchanges nothing"),
    (["--two-step-a2a", "--gpus-per-node", "3"], "error: --gpus-per-node: 3 does not divide the EP size 4"),
    (["--two-step-a2a", "--gpus", "16"], "error: --gpus: mixtral-8x7b-L1024: 8 experts do not divide evenly over 16 "
                                         "GPUs (the EP size of --two-step-a2a without --ep-size)"),  # not --ep-size
])
def test_plan_cli_two_step_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    from adasched.planner.cli import main

    out = tmp_path / "p.json"
    assert main(["plan", "moe", "--config", "mixtral-8x7b", "--gpus", "4", "--stages", "published", "--time-limit",
                 "0.5", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith(needle), err
    assert not out.exists()


def test_two_step_plan_shows_and_simulates_its_layout(tmp_path, capsys):
    from adasched.planner.cli import main
    from adasched.planner.fsmoe.plan import MoEPlan
    from adasched.planner.plan import load_plan

    out = tmp_path / "p.json"
    assert main(["plan", "moe", "--config", "mixtral-8x7b", "--gpus", "4", "--two-step-a2a", "--gpus-per-node", "2",
                 "--stages", "published", "--time-limit", "0.5", "--out", str(out)]) == 0
    plan = load_plan(out, expect=MoEPlan)
    assert plan.verify() == [] and plan.ep_size_option is None and plan.configs[0].ep_size == 4
    names = {t.name for t in plan.gantt_tasks()}
    assert "F:dispatch_intra0" in names and "B:combine_intra0" in names    # the drawn pipeline is the two-step one
    assert main(["show", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_two_step_is_costed_in_the_runtime_issue_order_only():
    # the runtime issues two-step exchanges dispatch-first; before, the interleaved order was costed too (by the
    # fixed-r2 baseline) and evaluate_pipeline accepted it
    from adasched.planner.fsmoe.baselines import baseline_fwd_bwd_ms
    from adasched.planner.fsmoe.model import choose_r, orders

    c = StageCosts((0.05,) * 5, (4.0, 2.0, 2.0, 2.0, 0.0), "test", two_step=True)
    assert orders(2, two_step=True) == ("dispatch-first",) and orders(2) == ("dispatch-first", "interleaved")
    with pytest.raises(ValueError, match="'interleaved': a two-step exchange is costed dispatch-first only"):
        evaluate_pipeline(c, 2, "interleaved")
    best, per_r = choose_r(c, issue_orders=("dispatch-first", "interleaved"))
    assert best.order == "dispatch-first" and set(per_r) >= {1, 2}
    f, b = baseline_fwd_bwd_ms(c, c.backward(), 2)
    assert f == evaluate_pipeline(c, 2, shared_overlap=False).time_ms
    assert b == evaluate_pipeline(c.backward(), 2, shared_overlap=False).time_ms


def test_a_plan_made_with_another_profile_of_the_same_name_re_simulates_its_own_costs(tmp_path, capsys):
    """Re-simulating looked the profile up by name, so a plan made with a slower profile file named 'h100-sxm' was
    drawn with the built-in one (166 ms for a 3,772 ms plan); then it was refused. The plan stores layer 0's stage
    costs now: each plan re-simulates to its own fwd_bwd_ms; an older plan without them is still refused; a plan
    whose stored costs were edited fails verify (and so does not load)."""
    import json

    from adasched.planner.cli import main
    from adasched.profiler.profile import load_profile

    prof = json.loads(load_profile("h100-sxm").model_dump_json())
    prof["gemm_tflops"] /= 1000
    slow = tmp_path / "slow-profile.json"  # (the plan was written over it: refused now, outputs are not inputs)
    slow.write_text(json.dumps(prof))
    made = {}
    for name, profile in (("slow", str(slow)), ("builtin", "h100-sxm")):
        out = tmp_path / f"{name}.json"
        assert main(["plan", "moe", "--config", "fine-grained", "--gpus", "8", "--profile", profile, "--time-limit",
                     "0.5", "--out", str(out), "--json"]) in (0, None)
        capsys.readouterr()
        made[name] = json.loads(out.read_text())["configs"][0]["fwd_bwd_ms"]
    assert made["slow"] > 50 * made["builtin"]
    for name in made:
        assert main(["simulate", str(tmp_path / f"{name}.json"), "--json"]) in (0, None)
        got = json.loads(capsys.readouterr().out)["makespan_ms"]
        assert got == pytest.approx(made[name], rel=1e-12), name
    data = json.loads((tmp_path / "slow.json").read_text())
    data["configs"][0]["layer0_stage_costs"]["work"][2] *= 0.5        # edited by hand: another pipeline
    (tmp_path / "edited.json").write_text(json.dumps(data))
    assert main(["simulate", str(tmp_path / "edited.json")]) == 2
    err = capsys.readouterr().err
    assert "layer 0: forward" in err and "its stored stage costs give" in err, err
    del data["configs"][0]["layer0_stage_costs"]                       # a plan from before they were stored
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert main(["simulate", str(tmp_path / "old.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: h100-sxm: this plan was made with a profile named 'h100-sxm'") and \
        err.count("\n") == 1, err
