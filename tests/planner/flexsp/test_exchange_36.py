"""exchange_across: single moves, swaps and (small pairs) re-splits of sequences between two micro-batches, each
pair re-packed. Before it a step whose best split is neither sorted runs nor packed bins stayed above the optimum
(7 sequences, 2 micro-batches: 5.7 % above the brute force, which puts 6 on all GPUs and the 7th alone)."""
from collections import Counter

import numpy as np
import pytest

from flexsp_oracle import brute_force, step_optimum as step_brute

from adasched.planner.flexsp.assign import MBSolution, evaluate
from adasched.planner.flexsp.planner import PlannerConfig, plan_step
from adasched.planner.flexsp.search import exchange_across


def _sound(mbs, lens, cm):
    ids = sorted(i for mb in mbs for i in mb.seq_ids())
    assert ids == list(range(len(lens)))  # every sequence exactly once
    for mb in mbs:
        assert mb.fits and sum(d for d, _ in mb.groups) <= cm.world
        assert mb.time_ms == pytest.approx(max(cm.group_time(d, lens[g]) for d, g in mb.groups), rel=1e-12)
        assert all(cm.fits(d, lens[g]) for d, g in mb.groups)


def _mbs(lens, cm, *groups):
    pos = {}
    for i, x in enumerate(lens.tolist()):
        pos.setdefault(x, []).append(i)
    return [evaluate(MBSolution([(d, [pos[x].pop() for x in xs]) for d, xs in mb]), lens, cm) for mb in groups]


@pytest.mark.parametrize("lens,start", [
    # a swap: the slower micro-batch's 1325 for the other's 1097 (was 5.1 % above the optimum)
    ([1325, 893, 973, 1261, 830, 1097, 1175],
     [[(2, [1097]), (1, [893]), (1, [830])], [(2, [1325, 973]), (1, [1261]), (1, [1175])]]),
    # a re-split: the two longest together, the five others on the other micro-batch (was 1.4 % above)
    ([1259, 1217, 1156, 1204, 143, 1144, 1321],
     [[(1, [1321]), (1, [1259]), (1, [1217]), (1, [1204, 143])], [(2, [1156]), (2, [1144])]]),
])
def test_reaches_the_brute_force_optimum_from_a_plan_that_missed_it(make_cm, lens, start):
    cm = make_cm()
    lens = np.array(lens)
    mbs = _mbs(lens, cm, *start)
    out = exchange_across(mbs, lens, cm, max_evals=1000)
    _sound(out, lens, cm)
    assert sum(mb.time_ms for mb in out) == pytest.approx(step_brute(lens, cm), rel=1e-12)
    assert sum(mb.time_ms for mb in mbs) > step_brute(lens, cm) * 1.01  # (the start was not optimal)


def test_random_steps_never_worse_and_sound(make_cm):
    cm = make_cm()
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    for _ in range(25):
        n = int(rng.integers(4, 14))
        lens = rng.integers(50, 1400, size=n)
        # a random split into micro-batches, each packed on all GPUs (always fits: <= 6000 tokens each)
        mbs, cur, tok = [], [], 0
        for i in rng.permutation(n):
            if tok + lens[i] > 6000 or (cur and rng.random() < 0.3):
                mbs.append(evaluate(MBSolution([(4, cur)]), lens, cm))
                cur, tok = [], 0
            cur.append(int(i))
            tok += int(lens[i])
        mbs.append(evaluate(MBSolution([(4, cur)]), lens, cm))
        before = [(mb.time_ms, [(d, list(g)) for d, g in mb.groups]) for mb in mbs]
        out = exchange_across(mbs, lens, cm, max_evals=int(rng.integers(0, 60)))
        assert [(mb.time_ms, [(d, list(g)) for d, g in mb.groups]) for mb in mbs] == before  # input untouched
        _sound(out, lens, cm)
        assert out is mbs or sum(mb.time_ms for mb in out) < sum(t for t, _ in before) - 1e-9
    assert exchange_across(mbs, lens, cm, max_evals=0) is mbs


def test_plan_step_with_exchange_is_closer_to_brute_force(make_cm):
    cm = make_cm()
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    gaps = {True: [], False: []}
    for _ in range(12):
        lens = rng.integers(50, 1425, size=6)
        best = step_brute(lens, cm)
        times = {}
        for ex in (False, True):
            r = plan_step(lens, cm, PlannerConfig(use_milp=False, max_evals=100, exchange=ex))
            _sound(r.micro_batches, lens, cm)
            assert r.time_ms >= best * (1 - 1e-12)  # (the brute force is the optimum)
            times[ex] = r.time_ms
            gaps[ex].append(r.time_ms / best - 1)
    # (per step it is usually <=, but not a theorem: the best single degree per chosen micro-batch is tried after
    # the exchange, and it may improve the split the exchange did not pick)
    print({k: f"mean {100 * np.mean(v):.2f} % max {100 * np.max(v):.2f} %" for k, v in gaps.items()})
    assert np.mean(gaps[True]) <= np.mean(gaps[False]) + 1e-12


def test_exact_pack_is_the_brute_force_on_each_structure(make_cm):
    from flexsp_oracle import STRUCTURES

    from adasched.planner.flexsp.search import exact_pack

    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    for _ in range(30):
        cm = make_cm(cap_tokens=float(rng.choice([900.0, 1500.0, 3000.0])))
        n = int(rng.integers(1, 7))
        lens = rng.integers(20, int(cm.token_capacity(1)), size=n)
        ids = np.arange(n)
        for st in STRUCTURES:
            want = brute_force(lens, cm, structures=(st,))
            got = exact_pack(ids, lens, st, cm, "t")
            if want == np.inf:
                assert got is None
                continue
            assert got is not None and got.fits and got.time_ms == pytest.approx(want, rel=1e-12)
            assert sorted(got.seq_ids()) == list(range(n))
            assert not Counter(d for d, _ in got.groups) - Counter(st)  # (empty groups dropped)
            assert exact_pack(ids, lens, st, cm, "t", below=want) is None  # only strictly faster than `below`


def test_a_tight_memory_packing_lpt_misses(make_cm):
    """6 sequences on groups of 2, 1, 1 GPUs fit one way only; LPT and worst-fit find none, so the exchange's
    re-split put them on all 4 GPUs (0.75 % above the optimum)."""
    from adasched.planner.flexsp.search import exact_pack, pack_fast

    cm = make_cm()
    lens = np.array([1098, 1340, 330, 1119, 1168, 744])
    ids = np.arange(6)
    assert pack_fast(ids, lens, (2, 1, 1), cm, "t") is None
    got = exact_pack(ids, lens, (2, 1, 1), cm, "t")
    assert got is not None and got.time_ms == pytest.approx(brute_force(lens, cm), rel=1e-12)
