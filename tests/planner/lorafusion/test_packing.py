"""Packing (FFD, MILP 1/2 against brute force), merge pass, dependency rule, verifier, 1F1B simulation."""
from __future__ import annotations

import random

import pytest

from adasched.planner.lorafusion.costmodel import padded
from adasched.planner.lorafusion.model import (
    AdapterStats,
    Microbatch,
    _milp,
    apply_dependency_rule,
    bin_lower_bound,
    bubble_check,
    dependency_violations,
    ffd_pack,
    group_adapters,
    merge_pass,
    pack_problem,
    padded_size,
    simulate_1f1b,
    update_dependencies,
    verify_schedule,
)
from adasched.planner.solver import SolveParams


def _partitions(items):
    """All set partitions of a list (Bell number many; fine for <= 7 items)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]
        yield [[first]] + part


def _brute(samples, adapter_of, lengths, cap):
    """(fewest bins, smallest possible padded size of the smallest bin at that bin count)."""
    best = None
    for part in _partitions(list(samples)):
        bins = []
        for grp in part:
            b = {}
            for s in grp:
                b.setdefault(adapter_of[s], []).append(s)
            bins.append(b)
        if any(padded_size(b, lengths) > cap for b in bins):
            continue
        key = (len(bins), min(padded_size(b, lengths) for b in bins))
        best = key if best is None or key < best else best
    return best


def _instance(rng, n, cap):
    lengths = [rng.randint(20, cap - 60) for _ in range(n)]
    adapter_of = [rng.randint(0, 1) for _ in range(n)]
    return lengths, adapter_of


@pytest.mark.parametrize("seed", range(6))
def test_milps_match_brute_force(seed):
    rng = random.Random(1000 + seed)
    cap = 512
    lengths, adapter_of = _instance(rng, 6, cap)
    samples = list(range(6))
    want_bins, want_small = _brute(samples, adapter_of, lengths, cap)
    lb = bin_lower_bound(samples, adapter_of, lengths, cap)
    assert lb <= want_bins
    ffd = ffd_pack(samples, adapter_of, lengths, cap)
    assert len(ffd) >= want_bins
    params = SolveParams(time_limit=20, seed=0)
    out1, sol1 = _milp(samples, adapter_of, lengths, cap, len(ffd), fix_bins=False, lower_bound=lb, warm=ffd, params=params)
    assert out1.status == "optimal"
    assert len(sol1) == want_bins
    out2, sol2 = _milp(samples, adapter_of, lengths, cap, want_bins, fix_bins=True, lower_bound=lb, warm=sol1, params=params)
    assert out2.status == "optimal"
    assert min(padded_size(b, lengths) for b in sol2) == want_small
    res = pack_problem(samples, adapter_of, lengths, cap, time_limit=20)
    assert len(res.bins) == want_bins and res.status == "optimal"
    assert padded_size(res.bins[-1], lengths) == want_small
    assert sorted(s for b in res.bins for ids in b.values() for s in ids) == samples


def test_ffd_respects_padded_capacity_and_uses_every_sample_once():
    rng = random.Random(7)
    lengths = [rng.randint(1, 3000) for _ in range(80)]
    adapter_of = [rng.randint(0, 2) for _ in range(80)]
    bins = ffd_pack(range(80), adapter_of, lengths, 4096)
    assert sorted(s for b in bins for ids in b.values() for s in ids) == list(range(80))
    for b in bins:
        assert padded_size(b, lengths) <= 4096
        for a, ids in b.items():
            assert all(adapter_of[s] == a for s in ids)
    assert len(bins) >= bin_lower_bound(range(80), adapter_of, lengths, 4096)


def _ffd_reference(samples, adapter_of, lengths, capacity):
    """The straightforward first-fit decreasing: every open bin in order, its padded size summed again."""
    bins = []
    for s in sorted(samples, key=lambda s: (-lengths[s], s)):
        a = adapter_of[s]
        for b in bins:
            trial = {k: list(v) for k, v in b.items()}
            trial.setdefault(a, []).append(s)
            if padded_size(trial, lengths) <= capacity:
                b.setdefault(a, []).append(s)
                break
        else:
            bins.append({a: [s]})
    return bins


def test_ffd_equals_the_straightforward_first_fit():
    """ffd_pack tests all open bins at once (numpy); same bins, same order, as the loop it replaced, on instances
    with many adapters, lengths at and around the 128-token padding and near the capacity."""
    rng = random.Random()
    for _ in range(300):
        n = rng.randint(1, 120)
        cap = rng.choice([128, 256, 1000, 4096])
        top = rng.choice([3, 129, 300, cap])
        lengths = [rng.randint(1, top) if rng.random() < 0.8 else rng.choice([127, 128, 129, 255, 256, 257])
                   for _ in range(n)]
        lengths = [min(ln, cap // 128 * 128) for ln in lengths]  # padded to 128, every sample fits
        adapter_of = [rng.randint(0, rng.choice([0, 1, 5])) for _ in range(n)]
        ids = rng.sample(range(n), rng.randint(1, n))
        assert ffd_pack(ids, adapter_of, lengths, cap) == _ffd_reference(ids, adapter_of, lengths, cap), \
            (ids, adapter_of, lengths, cap)


def test_ffd_rejects_oversized_sample():
    with pytest.raises(ValueError, match="does not fit"):
        ffd_pack([0], [0], [5000], 4096)


def test_lower_bound_counts_segment_padding():
    # two adapters with 129 tokens each need 2 blocks each = 512 padded tokens > capacity 384
    assert bin_lower_bound([0, 1], [0, 1], [129, 129], 384) == 2
    assert padded(129) == 256 and padded(128) == 128


def _seq_from(spec):
    """spec: list of lists of (adapter, gb) -> Microbatch sequence with unique fake sample ids."""
    seq, batches, sid = [], {}, 0
    for mb in spec:
        segs = []
        for a, g in mb:
            segs.append((a, g, [sid]))
            batches.setdefault((a, g), []).append(sid)
            sid += 1
        seq.append(Microbatch(segs))
    return seq, batches, [100] * sid


def test_dependency_rule_inserts_noops_until_s_apart():
    S = 4
    seq, batches, L = _seq_from([[(0, 0)], [(1, 0)], [(0, 1)], [(1, 1)]])
    assert dependency_violations(seq, S)
    out, noops = apply_dependency_rule(seq, S)
    assert not dependency_violations(out, S)
    pos = {next(iter(mb.segments))[:2]: i for i, mb in enumerate(out) if not mb.noop}
    assert pos[(0, 1)] - pos[(0, 0)] == S and pos[(1, 1)] - pos[(1, 0)] == S
    assert noops == 2
    assert verify_schedule(out, batches, L, 8192, S).ok
    # and the 1F1B simulation of the ruled sequence runs (no deadlock); the unruled one cannot
    simulate_1f1b([3.0 if not mb.noop else 0.0 for mb in out], S, update_dependencies(out))
    with pytest.raises(ValueError, match="deadlock"):
        simulate_1f1b([3.0] * len(seq), S, update_dependencies(seq))


def test_verifier_catches_missing_duplicate_and_misplaced():
    seq, batches, L = _seq_from([[(0, 0), (1, 0)], [(0, 0)]])
    assert verify_schedule(seq, batches, L, 8192, 1).ok
    dup = seq + [Microbatch([(0, 0, [0])])]
    v = verify_schedule(dup, batches, L, 8192, 1)
    assert v.duplicated == [0] and not v.missing
    miss = [Microbatch([s for s in seq[0].segments if s[0] == 0]), seq[1]]
    v = verify_schedule(miss, batches, L, 8192, 1)
    assert v.missing == [1] and not v.duplicated
    wrong = [Microbatch([(1, 0, [0]), (0, 0, [1])]), seq[1]]
    assert any("placed in segment" in e for e in verify_schedule(wrong, batches, L, 8192, 1).errors)
    over = verify_schedule(seq, batches, [5000, 5000, 5000], 8192, 1)
    assert any("capacity" in e for e in over.errors)


def test_merge_pass_folds_disjoint_small_tails():
    L = [4000, 300, 4000, 200, 100]
    p0 = [Microbatch([(0, 0, [0])]), Microbatch([(0, 0, [1])])]
    p1 = [Microbatch([(1, 0, [2])]), Microbatch([(1, 0, [3])])]
    p2 = [Microbatch([(1, 1, [4])])]
    out, merges = merge_pass([p0, p1, p2], L, 8192)
    assert merges == 1
    assert out[0][-1].adapters() == {0, 1} and len(out[1]) == 1
    # same adapter, next global batch: never merged
    out, merges = merge_pass([p1, [Microbatch([(1, 1, [4])]), Microbatch([(1, 1, [4])])]], L, 8192)
    assert merges == 0


def test_1f1b_makespan_of_uniform_microbatches():
    for S, M in ((1, 5), (2, 6), (4, 8)):
        sim = simulate_1f1b([3.0] * M, S)
        assert sim.makespan_ms == pytest.approx((M + S - 1) * 3.0)


def test_grouping_pairs_longest_with_shortest_under_bubble_check():
    stats = [AdapterStats(mu, 0.0, 32) for mu in (300, 2000, 800, 1200)]
    groups = group_adapters(stats, 8192, 2)
    assert sorted(map(sorted, groups)) == [[0, 1], [2, 3]]
    assert bubble_check(groups, stats, 8192, 2)
    # with many stages, pairing would leave too few microbatches between a group's global batches
    groups = group_adapters(stats, 8192, 9)
    assert all(len(g) == 1 for g in groups)
    assert sorted(a for g in groups for a in g) == [0, 1, 2, 3]
