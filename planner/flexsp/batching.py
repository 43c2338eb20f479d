"""Sequence lengths in, micro-batches and buckets out.

- :func:`read_seqlens`: a length file (one positive integer per line; blank lines and ``#`` comments skipped).
- :func:`draw_batches`: K global batches drawn deterministically from a seeded permutation of the file.
- :func:`split_microbatches`: FlexSP's "sequence blaster": sorted lengths split into M consecutive runs by a
  min-max token-balancing DP (exact; vectorised with a monotone search instead of the O(M n^2) loop).
- :func:`bucketize`: Q consecutive buckets over sorted lengths minimising padding (sum over buckets of
  count * max - sum), an exact DP over the distinct lengths.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from adasched.profiler.io import InputError

from .plan import MAX_PLAN_CONTEXT

__all__ = ["read_seqlens", "draw_batches", "split_microbatches", "bucketize", "Bucket", "make_buckets",
           "MAX_GLOBAL_BATCH", "MAX_STEPS", "MAX_DRAWN", "MAX_CONTEXT", "check_batch_options",
           "check_max_context"]

#: most sequences per global batch (--global-batch): Megatron-scale runs plan a few thousand; 10**9 allocated
#: the whole draw up front and the process was OOM-killed (larger values overflowed numpy's sizes)
MAX_GLOBAL_BATCH = 1_000_000
#: most global batches per plan (--steps): each is planned for up to --time-limit seconds
MAX_STEPS = 100_000
#: most sequences drawn over all steps (steps x global batch): the plan lists every one of them
MAX_DRAWN = 10_000_000
#: longest --max-context (tokens): the longest context a plan records (one constant for both)
MAX_CONTEXT = MAX_PLAN_CONTEXT
#: a length as a length file may write it: ASCII decimal digits, an optional sign (what int() also took:
#: 1_000, full-width digits, was planned as 1000)
_PLAIN_INT = re.compile(r"[+-]?[0-9]+")


def check_batch_options(global_batch: int, steps: int) -> None:
    """--global-batch and --steps within [1, MAX_GLOBAL_BATCH] and [1, MAX_STEPS], their product (the sequences
    drawn) <= MAX_DRAWN; else an InputError naming the option."""
    for option, value, most, unit in (("--global-batch", global_batch, MAX_GLOBAL_BATCH, " sequences"),
                                      ("--steps", steps, MAX_STEPS, "")):
        if value < 1:
            raise InputError(option, f"must be >= 1, got {value}")
        if value > most:
            raise InputError(option, f"must be <= {most:,}{unit}, got {value}")
    if steps * global_batch > MAX_DRAWN:
        raise InputError("--steps", f"{steps} global batches of {global_batch} sequences draw {steps * global_batch:,} "
                                    f"sequences, more than {MAX_DRAWN:,} per plan (the plan lists each)")


def check_max_context(max_context: int) -> None:
    """--max-context within [1, MAX_CONTEXT] tokens (beyond int64 was an OverflowError traceback from numpy)."""
    if not 1 <= max_context <= MAX_CONTEXT:
        raise InputError("--max-context", f"must be in [1, 2**40] tokens, got {max_context}")


def read_seqlens(path: str | os.PathLike) -> np.ndarray:
    """Lengths (tokens, int64) from a text file; a bad line is an InputError naming the file and line."""
    try:
        with open(path, encoding="utf-8-sig") as fh:  # a BOM (Windows tools) is not data
            text = fh.read()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, expected a file of sequence lengths") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read: {err}") from None
    lines = text.splitlines()
    vals: list[str] = []
    linenos: list[int] = []
    for i, line in enumerate(lines, 1):
        t = line.split("#", 1)[0].strip()
        if t:
            vals.append(t)
            linenos.append(i)
    if not vals:
        raise InputError(path, "no sequence lengths (the file is empty or holds only comments and blank lines)")
    # plain decimal digits only ("one positive integer per line"): numpy's int() read 1_000 and full-width digits
    for v, n in zip(vals, linenos):
        if not _PLAIN_INT.fullmatch(v):
            raise InputError(path, f"line {n}: {v[:40]!r} is not an integer sequence length (plain decimal digits)")
    try:
        arr = np.array(vals, dtype=np.int64)
    except (ValueError, OverflowError):
        for v, n in zip(vals, linenos):
            try:
                int(v)
            except ValueError:
                raise InputError(path, f"line {n}: {v[:40]!r} is not an integer sequence length") from None
        raise InputError(path, "lengths do not fit in 64 bits") from None
    bad = np.flatnonzero(arr <= 0)
    if bad.size:
        n = linenos[int(bad[0])]
        raise InputError(path, f"line {n}: length {int(arr[bad[0]])} is not positive")
    return arr


def draw_indices(n: int, global_batch: int, steps: int, seed: int) -> list[np.ndarray]:
    """The file positions of :func:`draw_batches`' batches."""
    check_batch_options(global_batch, steps)
    perm = np.random.default_rng(seed).permutation(n)
    idx = np.arange(steps * global_batch) % n
    return [perm[idx[k * global_batch:(k + 1) * global_batch]] for k in range(steps)]


def draw_batches(lengths: np.ndarray, global_batch: int, steps: int, seed: int) -> list[np.ndarray]:
    """``steps`` global batches of ``global_batch`` lengths: consecutive slices of one seeded permutation
    of the file (wrapping around when the file is shorter than steps * global_batch)."""
    return [lengths[i].copy() for i in draw_indices(len(lengths), global_batch, steps, seed)]


def split_microbatches(sorted_lens: np.ndarray, m: int) -> list[tuple[int, int]]:
    """Split ``sorted_lens`` (any order works; FlexSP sorts) into ``m`` non-empty consecutive runs
    minimising the largest run's token sum. Returns [(start, end), ...] half-open.

    DP: best[k][j] = min_i max(best[k-1][i], P[j] - P[i]). best[k-1] is non-decreasing in i and P[j]-P[i]
    decreasing, so the optimum sits where best[k-1][i] + P[i] first reaches P[j] (or one before)."""
    s = np.asarray(sorted_lens, dtype=np.int64)
    n = s.size
    if not 1 <= m <= n:
        raise ValueError(f"cannot split {n} sequences into {m} micro-batches")
    P = np.concatenate([[0], np.cumsum(s)])
    INF = np.iinfo(np.int64).max // 4
    best = np.full(n + 1, INF, dtype=np.int64)
    best[1:] = P[1:]  # one run
    best[0] = INF
    # the choices are kept for every k (m x n of them): int32 halves that (n <= MAX_DRAWN < 2**31 sequences)
    idx_t = np.int32 if n < 2 ** 31 else np.int64
    arg = [np.zeros(n + 1, dtype=idx_t)]
    for k in range(2, m + 1):
        new = np.full(n + 1, INF, dtype=np.int64)
        choice = np.zeros(n + 1, dtype=idx_t)
        lo = k - 1  # previous k-1 runs cover at least k-1 items
        js = np.arange(k, n + 1)
        f = best[lo:n] + P[lo:n]  # i in [lo, n-1], non-decreasing
        pos = np.searchsorted(f, P[js], side="left") + lo  # first i with best[i] + P[i] >= P[j]
        cands = np.stack([np.clip(pos, lo, js - 1), np.clip(pos - 1, lo, js - 1)])
        vals = np.maximum(best[cands], P[js][None, :] - P[cands])
        pick = np.argmin(vals, axis=0)
        new[js] = vals[pick, np.arange(js.size)]
        choice[js] = cands[pick, np.arange(js.size)]
        best = new
        arg.append(choice)
    cuts = [n]
    j = n
    for k in range(m, 1, -1):
        j = int(arg[k - 1][j])
        cuts.append(j)
    cuts.append(0)
    cuts.reverse()
    return [(cuts[i], cuts[i + 1]) for i in range(m)]


def bucketize(sorted_lens: np.ndarray, q: int) -> list[tuple[int, int]]:
    """Split sorted (ascending) lengths into at most ``q`` consecutive buckets minimising padding
    sum_b (count_b * max_b - sum_b); equal lengths never straddle two buckets. Returns [(start, end), ...]."""
    s = np.asarray(sorted_lens, dtype=np.int64)
    if s.size == 0:
        return []
    if np.any(np.diff(s) < 0):
        raise ValueError("bucketize needs ascending lengths")
    if q < 1:
        raise ValueError(f"need at least one bucket, got {q}")
    u, starts, counts = np.unique(s, return_index=True, return_counts=True)
    nu = u.size
    if nu <= q:
        return [(int(starts[i]), int(starts[i] + counts[i])) for i in range(nu)]
    W = np.concatenate([[0], np.cumsum(counts)]).astype(np.float64)
    S = np.concatenate([[0], np.cumsum(u * counts)]).astype(np.float64)
    uf = u.astype(np.float64)
    # cost[i, j] for a bucket of distinct values i..j-1 (i < j): (W[j]-W[i]) * u[j-1] - (S[j]-S[i])
    i_idx = np.arange(nu + 1)[:, None]
    j_idx = np.arange(nu + 1)[None, :]
    valid = i_idx < j_idx
    umax = np.concatenate([[0.0], uf])[None, :]  # u[j-1] for j >= 1
    cost = np.where(valid, (W[None, :] - W[:, None]) * umax - (S[None, :] - S[:, None]), np.inf)
    best = np.where(np.arange(nu + 1) == 0, 0.0, np.inf)
    args = []
    for _ in range(q):
        tot = best[:, None] + cost
        a = np.argmin(tot, axis=0)
        new = tot[a, np.arange(nu + 1)]
        new[0] = 0.0  # zero buckets for zero items (allows fewer than q buckets)
        args.append(a)
        best = new
    # reconstruct from the last layer
    cuts = [nu]
    j = nu
    for a in reversed(args):
        if j == 0:
            break
        i = int(a[j])
        cuts.append(i)
        j = i
    cuts = sorted(set(cuts) | {0})
    out = []
    for i in range(len(cuts) - 1):
        lo, hi = cuts[i], cuts[i + 1]
        out.append((int(starts[lo]), int(starts[hi - 1] + counts[hi - 1])))
    return out


@dataclass(frozen=True)
class Bucket:
    """Sequences start..end-1 of a micro-batch's sorted list, summarised for the MILP."""

    start: int
    end: int
    count: int
    mean: float
    """mean length (tokens): counts * mean is the bucket's exact token sum."""
    mean_sq: float
    """mean squared length: counts * mean_sq is the exact sum of s^2."""
    max: int
    """longest length (memory is bounded with it, so a MILP solution always fits on the real lengths)."""


def make_buckets(sorted_lens: np.ndarray, q: int) -> list[Bucket]:
    s = np.asarray(sorted_lens, dtype=np.float64)
    out = []
    for a, b in bucketize(np.asarray(sorted_lens, dtype=np.int64), q):
        seg = s[a:b]
        out.append(Bucket(a, b, b - a, float(seg.mean()), float(np.dot(seg, seg) / seg.size), int(seg.max())))
    return out
