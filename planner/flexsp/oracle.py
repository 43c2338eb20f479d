"""Brute-force optima of tiny FlexSP steps, and `adasched bench sp-oracle`: the planner against them.

The planner's searches are heuristics plus bounded MILPs; on a step of a few sequences on 4 GPUs the true
optimum can be enumerated, which makes an exact yardstick:

* :func:`micro_batch_optimum`: one micro-batch's best time over every maximal group structure of the cost
  model's GPUs (:func:`buddy_structures`: power-of-two degrees summing to the world) and every assignment of its
  sequences to the groups (memory-checked);
* :func:`step_optimum`: the step's best total over every set partition of its sequences into micro-batches
  (subset dynamic programming over the micro-batch optima);
* :func:`tiny_cost_model`: a 4-GPU cost model whose numbers make memory and communication both matter (the
  tests' cost model);
* :func:`oracle_bench`: random steps planned by ``plan_step`` (heuristics only, deterministic), once with the
  exchange between micro-batches (:func:`~.search.exchange_across`) and once without, each compared with
  :func:`step_optimum`.

The enumeration is exponential: on 4 GPUs 4 structures x up to 4**n assignments per micro-batch of n
sequences, over all 2**n subsets; steps of at most :data:`MAX_ORACLE_SEQS` sequences (8 on 4 GPUs: ~5 s a step).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from .costmodel import ModelShape, SPCostModel

__all__ = ["MAX_ORACLE_SEQS", "STRUCTURES", "buddy_structures", "micro_batch_optimum", "oracle_bench",
           "step_optimum", "tiny_cost_model"]


def buddy_structures(world: int) -> tuple[tuple[int, ...], ...]:
    """Every multiset of power-of-two degrees summing to ``world`` (a power of two), largest degree first: the
    maximal group structures (groups may stay empty, so the smaller ones are covered too); each is buddy-placeable
    (sorted, every group starts at a multiple of its degree)."""
    if world < 1 or world & (world - 1):
        raise ValueError(f"world must be a power of two (got {world})")
    out: list[tuple[int, ...]] = []

    def rec(left: int, top: int, cur: tuple[int, ...]) -> None:
        if left == 0:
            out.append(cur)
            return
        d = top
        while d >= 1:
            if d <= left:
                rec(left - d, d, cur + (d,))
            d //= 2

    rec(world, world, ())
    return tuple(out)


#: the structures of 4 GPUs: (4,), (2, 2), (2, 1, 1), (1, 1, 1, 1)
STRUCTURES: tuple[tuple[int, ...], ...] = buddy_structures(4)

#: the largest step the enumeration takes (8 sequences on 4 GPUs: ~5 s a step in Python)
MAX_ORACLE_SEQS = 8


def tiny_cost_model(world: int = 4, gpus_per_node: int = 2, cap_tokens: float = 1500.0) -> SPCostModel:
    """A small cluster whose numbers make memory and communication both matter: ``cap_tokens`` tokens of
    activations fit on one GPU (1000 bytes a token), all-to-all latency 2 us x degree, bandwidth falling with the
    degree."""
    shape = ModelShape(name="tiny", hidden=64, layers=2, heads=4, act_bytes_per_token=1000.0)
    betas = {2: 1.0e-6, 4: 4.0e-6, 8: 9.0e-6, 16: 2.0e-5}
    return SPCostModel(
        model=shape, world=world, gpus_per_node=gpus_per_node, memory_bytes=cap_tokens * 1000.0 + 1e5,
        a1=1.0e-5, a2=0.01, b1=1.0, act_bytes_per_token=1000.0, model_state_bytes=1e5,
        a2a_alpha_ms={d: 0.002 * d for d in betas if d <= world},
        a2a_beta_ms_per_byte={d: b for d, b in betas.items() if d <= world},
    )


def micro_batch_optimum(lens, cm: SPCostModel, structures: Sequence[Sequence[int]] | None = None) -> float:
    """The best time of one micro-batch holding ``lens`` (inf when no assignment fits; 0 for none): every
    structure (default: all of ``cm.world`` GPUs, :func:`buddy_structures`), every assignment of the sequences to its
    groups, each group memory-checked; the time is the slowest non-empty group's."""
    lens = np.asarray(lens, dtype=np.int64)
    n = lens.size
    if n == 0:
        return 0.0
    if structures is None:
        structures = buddy_structures(cm.world)
    best = np.inf
    for degs in structures:
        for assign in itertools.product(range(len(degs)), repeat=n):
            groups = [[i for i in range(n) if assign[i] == g] for g in range(len(degs))]
            if not all(cm.fits(d, lens[ids]) for d, ids in zip(degs, groups)):
                continue
            best = min(best, max(cm.group_time(d, lens[ids]) for d, ids in zip(degs, groups) if ids))
    return float(best)


def step_optimum(lens, cm: SPCostModel) -> float:
    """The best total time of a step over every set partition of its sequences into micro-batches (each
    micro-batch at :func:`micro_batch_optimum`)."""
    lens = np.asarray(lens, dtype=np.int64)
    n = lens.size
    if n > MAX_ORACLE_SEQS:
        raise ValueError(f"step_optimum enumerates every split: at most {MAX_ORACLE_SEQS} sequences (got {n})")
    memo: dict[int, float] = {}

    def mb(mask: int) -> float:
        if mask not in memo:
            memo[mask] = micro_batch_optimum(lens[[i for i in range(n) if mask >> i & 1]], cm)
        return memo[mask]

    best = {0: 0.0}
    for mask in range(1, 1 << n):  # increasing: every proper subset of ``mask`` is done before it
        low = mask & -mask  # the micro-batch holding the lowest sequence of ``mask``: ``low`` plus any of the rest
        rest = sub = mask ^ low
        val = np.inf
        while True:
            val = min(val, mb(sub | low) + best[mask ^ (sub | low)])
            if sub == 0:
                break
            sub = (sub - 1) & rest
        best[mask] = val
    return float(best[(1 << n) - 1])


def oracle_bench(steps: int, seqs: int, cap_tokens: float, seed: int, evals: int = 100,
                 advance: Callable[..., None] = lambda n=1: None) -> dict:
    """``steps`` random steps of ``seqs`` sequences (lengths uniform in [50, 0.95 x cap_tokens]) on
    :func:`tiny_cost_model` with ``cap_tokens``: ``plan_step`` with and without the exchange (heuristics only,
    deterministic at ``evals``), each against :func:`step_optimum`. One row per step and a summary per variant:
    steps above the optimum (by more than 1e-9 relative), the largest gap, and the mean gap over all the steps (those at
    the optimum count as 0)."""
    from .planner import PlannerConfig, plan_step

    if not 2 <= seqs <= MAX_ORACLE_SEQS:
        raise ValueError(f"seqs must be 2..{MAX_ORACLE_SEQS} (got {seqs})")
    cm = tiny_cost_model(cap_tokens=cap_tokens)
    rng = np.random.default_rng(seed)
    hi = int(0.95 * cap_tokens)
    variants = {"with exchange": True, "without exchange": False}
    rows = []
    for step in range(steps):
        lens = rng.integers(50, hi + 1, size=seqs)
        best = step_optimum(lens, cm)
        row = {"step": step, "lengths": [int(x) for x in lens], "optimum_ms": best}
        for name, on in variants.items():
            cfg = PlannerConfig(use_milp=False, max_evals=evals, seed=seed, exchange=on)
            r = plan_step(lens, cm, cfg, step=step)
            if r.time_ms < best * (1 - 1e-9):  # the enumeration is the optimum: a faster plan is a bug in one of them
                raise AssertionError(f"step {step}: plan {r.time_ms} ms below the brute-force optimum {best} ms")
            row[name] = {"time_ms": r.time_ms, "gap": r.time_ms / best - 1, "micro_batches": len(r.micro_batches)}
        rows.append(row)
        advance(1)
    summary = {}
    for name in variants:
        gaps = [r[name]["gap"] for r in rows]
        above = [g for g in gaps if g > 1e-9]
        summary[name] = {"steps": len(rows), "above_optimum": len(above), "max_gap": max(gaps, default=0.0),
                         "mean_gap": float(np.mean(gaps)) if gaps else 0.0}
    return {"config": {"steps": steps, "seqs": seqs, "cap_tokens": cap_tokens, "seed": seed, "evals": evals,
                       "gpus": cm.world},
            "rows": rows, "summary": summary}
