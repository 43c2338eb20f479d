"""`adasched bench sp-oracle` and its brute force (``adasched.planner.flexsp.oracle``): the package's step optimum
equals the step oracle of test_flexsp_step_oracle (written without the planner's cost code) on fresh random steps;
the command's rows are the planner's own plans with and without the exchange, never below the optimum; bad options
get one error line and exit status 2."""
import json

import numpy as np
import pytest

from test_flexsp_step_oracle import oracle_step

from adasched.planner.cli import main
from adasched.planner.flexsp.oracle import buddy_structures, micro_batch_optimum, step_optimum, tiny_cost_model
from adasched.planner.flexsp.planner import PlannerConfig, plan_step


def test_step_optimum_matches_the_independent_oracle():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    for _ in range(12):
        cm = tiny_cost_model(cap_tokens=float(rng.choice([900.0, 1500.0, 3000.0])))
        n = int(rng.integers(1, 6))
        lens = rng.integers(20, int(0.95 * cm.token_capacity(1)) + 1, size=n)
        want = oracle_step(lens, cm)
        assert step_optimum(lens, cm) == pytest.approx(want, rel=1e-12), (lens.tolist(), cm.memory_bytes)
        assert micro_batch_optimum(lens, cm) == pytest.approx(oracle_step(lens, cm, whole_batch_only=True),
                                                              rel=1e-12)


def test_other_worlds_enumerate_their_own_structures():
    """The structures come from the cost model's world (they were 4 GPUs' whatever the model: on 8 GPUs the optimum
    read 31.97 ms for a step the planner ran in 19.30 ms; on 2, KeyError)."""
    assert buddy_structures(2) == ((2,), (1, 1))
    eight = buddy_structures(8)
    assert len(eight) == 10 and len(set(eight)) == 10  # the partitions of 8 into powers of two
    assert all(sum(st) == 8 and list(st) == sorted(st, reverse=True) for st in eight)
    with pytest.raises(ValueError, match="power of two"):
        buddy_structures(6)
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    for world, n in ((2, 5), (8, 3), (8, 4)):
        cm = tiny_cost_model(world=world, gpus_per_node=2, cap_tokens=float(rng.choice([900.0, 1500.0])))
        lens = rng.integers(20, int(0.95 * cm.token_capacity(1)) + 1, size=n)
        assert step_optimum(lens, cm) == pytest.approx(oracle_step(lens, cm), rel=1e-12), (world, lens.tolist())
    cm = tiny_cost_model(world=8, gpus_per_node=2)
    lens = np.array([1400, 1300, 1200, 1100, 200])
    assert step_optimum(lens, cm) == pytest.approx(oracle_step(lens, cm), rel=1e-12)
    assert micro_batch_optimum([], cm) == 0.0


def test_step_optimum_refuses_more_than_eight_sequences():
    with pytest.raises(ValueError, match="at most 8 sequences"):
        step_optimum(np.arange(1, 10) * 50, tiny_cost_model())


def test_bench_sp_oracle_json_rows_are_the_planners_plans(capsys):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rc = main(["bench", "sp-oracle", "--steps", "4", "--seqs", "5", "--memory", "2", "--seed", str(seed), "--json"])
    cap = capsys.readouterr()
    print(f"seed {seed}")  # (after the capture: stdout is the JSON)
    assert rc == 0, cap.err
    rep = json.loads(cap.out)
    assert rep["config"] == {"steps": 4, "seqs": 5, "cap_tokens": 3000.0, "seed": seed, "evals": 100, "gpus": 4}
    cm = tiny_cost_model(cap_tokens=3000.0)
    assert [r["step"] for r in rep["rows"]] == [0, 1, 2, 3]
    for r in rep["rows"]:
        lens = np.array(r["lengths"])
        assert lens.size == 5 and lens.min() >= 50 and lens.max() <= int(0.95 * 3000)
        assert r["optimum_ms"] == pytest.approx(oracle_step(lens, cm), rel=1e-12)
        for name, on in (("with exchange", True), ("without exchange", False)):
            p = plan_step(lens, cm, PlannerConfig(use_milp=False, max_evals=100, seed=seed, exchange=on))
            assert r[name]["time_ms"] == pytest.approx(p.time_ms, rel=1e-12)  # deterministic mode: the same plan
            assert r[name]["micro_batches"] == len(p.micro_batches)
            assert r[name]["gap"] == pytest.approx(p.time_ms / r["optimum_ms"] - 1, abs=1e-12)
            assert r[name]["gap"] >= -1e-9
    for name in ("with exchange", "without exchange"):
        gaps = [r[name]["gap"] for r in rep["rows"]]
        s = rep["summary"][name]
        assert s["steps"] == 4 and s["above_optimum"] == sum(g > 1e-9 for g in gaps)
        assert s["max_gap"] == pytest.approx(max(gaps)) and s["mean_gap"] == pytest.approx(np.mean(gaps))


def test_the_exchange_off_is_what_it_says(make_cm):
    """A step the plan without the exchange misses (8.3 % above the optimum) and the exchange finds."""
    cm = make_cm()
    lens = np.array([742, 884, 1385, 1053, 920, 798])
    best = step_optimum(lens, cm)
    off = plan_step(lens, cm, PlannerConfig(use_milp=False, max_evals=100, exchange=False))
    on = plan_step(lens, cm, PlannerConfig(use_milp=False, max_evals=100))
    assert off.time_ms > best * 1.05 and on.time_ms == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("args,where", [
    (["--seqs", "9"], "--seqs"), (["--seqs", "1"], "--seqs"), (["--steps", "0"], "--steps"),
    (["--steps", "1001"], "--steps"), (["--memory", "nan"], "--memory"), (["--memory", "0.1"], "--memory"),
    (["--memory", "inf"], "--memory"), (["--seed", "-1"], "--seed"),
])
def test_bench_sp_oracle_bad_options(capsys, args, where):
    rc = main(["bench", "sp-oracle", *args])
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == ""
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {where}:"), cap.err
