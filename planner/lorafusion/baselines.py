"""Baselines scored in the same run as every LoRA plan, on the same samples and the same cost model:

- ``mlora``: mLoRA-style. Each global batch of every job runs together: the same number m of microbatches
  for all jobs, job j contributing a fixed ceil(gbs_j / m) samples per microbatch in dataset order; the jobs'
  samples are concatenated as rows and padded to the longest sample of the microbatch (no packing), the batch's
  rows x width rounded up to the 128-row GEMM tile once (packed segments pay the same rounding each). m is the
  smallest count from the token budget ceil(sum_j tokens_j / capacity) up whose padded batches (rows x width,
  tile-rounded) all fit the capacity - what a user tunes mLoRA's mini-batch size for; where none does (one
  sample per job padded to the longest is already above it), the largest (one sample per job per microbatch).
  (m was the token budget alone: padded batches of up to 49152 tokens against a capacity of 8192, beyond the
  memory the plan respects and slower too - fewer, wider batches pad more and pipeline worse - which inflated
  the speedup vs this baseline by 30-45 % on the presets.) The next global batch waits for the optimizer step
  (dependency rule -> S-1 empty slots, i.e. a pipeline flush).
- ``mlora_sorted``: the same with each job's global batch sorted by length before it is cut into the fixed
  per-microbatch counts, so similar lengths share a padded batch (a stronger variant, for context).
- ``sequential``: one job after the other, each global batch packed on its own with first-fit decreasing
  (segments padded to 128, capacity respected); the dependency rule flushes the pipeline between global
  batches because no other job's microbatches can fill the gap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from .costmodel import StageCost, padded
from .jobs import Workload
from .model import (Microbatch, apply_dependency_rule, check_noops, ffd_pack, makespan_1f1b, sequence_stage_ms,
                    update_dependencies)

__all__ = ["BaselineResult", "mlora_baseline", "sequential_baseline"]


@dataclass
class BaselineResult:
    name: str
    makespan_ms: float
    microbatches: int
    noops: int
    tokens: int
    computed_tokens: int
    """rows x padded length the GEMMs process, rounded up to the M tile (padding included)"""
    max_microbatch_tokens: int
    sequence: list[Microbatch] = field(default_factory=list, repr=False)
    """The microbatch sequence that was simulated (no-ops included)."""

    @property
    def padding_waste(self) -> float:
        return 1.0 - self.tokens / self.computed_tokens if self.computed_tokens else 0.0


def mlora_baseline(w: Workload, cost: StageCost, *, sort_by_length: bool = False) -> BaselineResult:
    cfg, L = w.config, w.lengths
    seq: list[Microbatch] = []
    nb = max(len(j.batches) for j in w.jobs)
    for g in range(nb):
        active = [j for j in w.jobs if g < len(j.batches)]
        budget = sum(sum(L[s] for s in j.batches[g]) for j in active)
        order = {j.index: sorted(j.batches[g], key=lambda s: (L[s], s)) if sort_by_length else list(j.batches[g])
                 for j in active}
        most = max(len(j.batches[g]) for j in active)  # one sample per job and microbatch from here on
        tried = None
        for m in range(min(max(1, math.ceil(budget / cfg.capacity)), most), most + 1):
            per = tuple(math.ceil(len(ids) / m) for ids in order.values())
            if per == tried:  # the same runs as a smaller m: the same microbatches (the extra ones empty)
                continue
            tried = per
            if m == most or all(_padded_batch_tokens(mb, L) <= cfg.capacity for mb in _cut(order, per, g)):
                break
        seq.extend(_cut(order, per, g))
    seq, noops = apply_dependency_rule(seq, cfg.stages)
    check_noops(noops, cfg.stages, w.source)
    stage_ms, computed, biggest = [], 0, 0
    for mb in seq:
        ids = [s for _, _, xs in mb.segments for s in xs]
        if not ids:
            stage_ms.append(0.0)
            continue
        rows, width = len(ids), max(L[s] for s in ids)
        stage_ms.append(cost.padded_batch_ms(rows, width))
        computed += padded(rows * width)
        biggest = max(biggest, padded(rows * width))
    ms = makespan_1f1b(stage_ms, cfg.stages, update_dependencies(seq), cost.stage_scales(cfg.stages))
    return BaselineResult("mlora_sorted" if sort_by_length else "mlora", ms, len(seq), noops, sum(L),
                          computed, biggest, seq)


def _cut(order: dict[int, list[int]], per: tuple[int, ...], g: int):
    """The microbatches of global batch ``g``: job j's samples ``order[j]`` in runs of ``per`` (one run length per
    job, in ``order``'s order), until every job's samples are used. A generator: the count search stops at the
    first batch over capacity (building every cut of every count was quadratic in the samples; the distinct ``per``
    are O(sqrt n) of the counts tried)."""
    runs = list(zip(order.items(), per))
    i = 0
    while True:
        segs = [(j, g, ids[i * k:(i + 1) * k]) for (j, ids), k in runs]
        segs = [seg for seg in segs if seg[2]]
        if not segs:
            return
        yield Microbatch(segs)
        i += 1


def _padded_batch_tokens(mb: Microbatch, L) -> int:
    """Tokens of a padded batch after the 128-row tile rounding: its rows times its longest sample."""
    ids = [s for _, _, xs in mb.segments for s in xs]
    return padded(len(ids) * max(L[s] for s in ids))


def sequential_baseline(w: Workload, cost: StageCost) -> BaselineResult:
    cfg, L = w.config, w.lengths
    adapter_of = w.adapter_of
    seq: list[Microbatch] = []
    for j in w.jobs:
        for g, batch in enumerate(j.batches):
            for b in ffd_pack(batch, adapter_of, L, cfg.capacity):
                seq.append(Microbatch([(j.index, g, ids) for ids in b.values()]))
    seq, noops = apply_dependency_rule(seq, cfg.stages)
    check_noops(noops, cfg.stages, w.source)
    ms = makespan_1f1b(sequence_stage_ms(seq, L, cost), cfg.stages, update_dependencies(seq),
                       cost.stage_scales(cfg.stages))
    computed = sum(mb.padded_tokens(L) for mb in seq)
    return BaselineResult("sequential", ms, len(seq), noops, sum(L), computed,
                          max(mb.padded_tokens(L) for mb in seq), seq)

