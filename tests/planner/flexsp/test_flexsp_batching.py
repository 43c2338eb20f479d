"""Length files, batch drawing and the two DPs (micro-batch split, bucketing) against brute force."""
import itertools

import numpy as np
import pytest

from adasched.planner.flexsp.batching import bucketize, draw_batches, make_buckets, read_seqlens, split_microbatches
from adasched.profiler.io import InputError


def _brute_split(s, m):
    n = len(s)
    best = None
    for cuts in itertools.combinations(range(1, n), m - 1):
        b = (0,) + cuts + (n,)
        v = max(sum(s[b[i]:b[i + 1]]) for i in range(m))
        best = v if best is None else min(best, v)
    return best


def _brute_bucket(s, q):
    n = len(s)
    best = None
    for k in range(1, min(q, n) + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            b = (0,) + cuts + (n,)
            pad = sum((b[i + 1] - b[i]) * s[b[i + 1] - 1] - sum(s[b[i]:b[i + 1]]) for i in range(k))
            best = pad if best is None else min(best, pad)
    return best


@pytest.mark.parametrize("trial", range(25))
def test_split_matches_brute_force(trial):
    rng = np.random.default_rng(100 + trial)
    n = int(rng.integers(2, 10))
    s = np.sort(rng.integers(1, 5000, n))
    for m in range(1, n + 1):
        runs = split_microbatches(s, m)
        assert len(runs) == m and runs[0][0] == 0 and runs[-1][1] == n
        assert all(a < b for a, b in runs) and all(runs[i][1] == runs[i + 1][0] for i in range(m - 1))
        assert max(int(s[a:b].sum()) for a, b in runs) == _brute_split(s.tolist(), m)


@pytest.mark.parametrize("trial", range(25))
def test_bucketize_matches_brute_force(trial):
    rng = np.random.default_rng(200 + trial)
    n = int(rng.integers(1, 10))
    s = np.sort(rng.integers(1, 60, n))  # small range: ties happen
    for q in (1, 2, 3, 5):
        bk = bucketize(s, q)
        assert bk[0][0] == 0 and bk[-1][1] == n and len(bk) <= q
        assert all(bk[i][1] == bk[i + 1][0] for i in range(len(bk) - 1))
        for a, b in bk[1:]:
            assert s[a] != s[a - 1], "equal lengths split over two buckets"
        pad = sum((b - a) * int(s[b - 1]) - int(s[a:b].sum()) for a, b in bk)
        # brute force over cuts that never split equal lengths is the same optimum (splitting ties never helps)
        assert pad == _brute_bucket(s.tolist(), q)


def test_make_buckets_statistics_are_exact():
    rng = np.random.default_rng(7)
    s = np.sort(rng.integers(1, 40000, 300))
    bks = make_buckets(s, 16)
    assert sum(b.count for b in bks) == 300
    assert np.isclose(sum(b.count * b.mean for b in bks), s.sum())
    assert np.isclose(sum(b.count * b.mean_sq for b in bks), np.dot(s.astype(float), s))
    assert all(b.max == s[b.end - 1] for b in bks)


def test_read_seqlens_and_errors(tmp_path):
    p = tmp_path / "ok.txt"
    p.write_text("# lengths\n12\n\n7  # short\n99\n")
    assert read_seqlens(p).tolist() == [12, 7, 99]
    e = tmp_path / "empty.txt"
    e.write_text("\n# nothing\n")
    with pytest.raises(InputError, match="empty"):
        read_seqlens(e)
    bad = tmp_path / "bad.txt"
    bad.write_text("5\n6\nseven\n8\n")
    with pytest.raises(InputError, match="line 3.*seven"):
        read_seqlens(bad)
    neg = tmp_path / "neg.txt"
    neg.write_text("5\n0\n")
    with pytest.raises(InputError, match="line 2.*not positive"):
        read_seqlens(neg)
    with pytest.raises(InputError, match="no such file"):
        read_seqlens(tmp_path / "missing.txt")


def test_draw_batches_is_seeded_and_covers_the_file():
    lens = np.arange(1, 101)
    a = draw_batches(lens, 30, 3, seed=5)
    b = draw_batches(lens, 30, 3, seed=5)
    c = draw_batches(lens, 30, 3, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert len(set(np.concatenate(a).tolist())) == 90  # consecutive slices of one permutation: no repeats
    wrap = draw_batches(lens, 60, 2, seed=1)
    assert set(np.concatenate(wrap).tolist()) == set(lens.tolist())  # 120 draws wrap over all 100
