"""LoRA plan (kind "lora"): the jobs, every sample's length, the adapter groups, the microbatch sequence a
trainer executes (segments of (job, global batch, sample ids); empty = no-op), per-problem solver records and
the comparison with the mLoRA-style and sequential baselines simulated in the same run.

:func:`build_plan` does the whole pipeline: grouping -> per (global batch, group) packing -> merge pass ->
dependency rule -> verification -> 1F1B simulation of the plan and the baselines.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..plan import MAX_LAYERS, Plan, SolverRecord, inputs_digest, profile_ref, relative_gap
from .baselines import mlora_baseline, sequential_baseline
from .costmodel import SEGMENT_ALIGN, StageCost, padded, stage_cost_from_profile
# the adapter schema is part of the plan
from .jobs import KNOWN_TARGET_MODULES, MAX_SAMPLES, MAX_STAGES, AdapterSpec, JobName, Workload
from .model import (
    DEFAULT_TIME_LIMIT_S,
    AdapterStats,
    MILP_BINARIES_PER_SECOND,
    Microbatch,
    apply_dependency_rule,
    check_noops,
    dependency_violations,
    group_adapters,
    merge_pass,
    pack_problem,
    sequence_makespan_ms,
    sequence_ms,
    verify_schedule,
)

__all__ = ["AdapterSpec", "KNOWN_TARGET_MODULES", "LoRAJob", "LoRASegment", "LoRAMicrobatch", "LoRAProblem",
           "LoRASummary", "LoRAPlan", "build_plan"]


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoRAJob(_M):
    name: JobName  # the trainer saves each adapter under OUT/<name>/: a name like "../x" wrote outside OUT
    adapter: AdapterSpec
    lr: float = Field(gt=0, allow_inf_nan=False)
    # bounded like a jobs file's workload (a plan of global_batch_size 10**12 was a MemoryError in verify)
    global_batch_size: int = Field(ge=1, le=MAX_SAMPLES)
    global_batches: int = Field(ge=1, le=MAX_SAMPLES)
    mean_tokens: float
    std_tokens: float


class LoRASegment(_M):
    job: int = Field(ge=0, description="index into jobs")
    global_batch: int = Field(ge=0)
    samples: list[int] = Field(description="sample ids (index into lengths)")
    tokens: int
    padded_tokens: int = Field(description="tokens rounded up to a multiple of 128")


class LoRAMicrobatch(_M):
    segments: list[LoRASegment] = Field(default_factory=list, description="empty = no-op microbatch")
    padded_tokens: int = 0

    @property
    def noop(self) -> bool:
        return not self.segments


class LoRAProblem(_M):
    global_batch: int
    jobs: list[int]
    samples: int
    bins: int
    ffd_bins: int
    lower_bound: int
    status: Literal["optimal", "feasible", "heuristic"]
    milp1: str | None = None
    milp2: str | None = None
    smallest_bin_tokens: int
    solve_seconds: float


class LoRASummary(_M):
    speedup_vs_mlora: float
    speedup_vs_sequential: float
    speedup_vs_mlora_sorted: float = Field(description="vs the mLoRA-style baseline with length-sorted global batches")
    padding_waste: float = Field(description="(padded - real tokens) / padded tokens over the plan's microbatches")
    solve_seconds_p95: float = Field(description="p95 over (global batch, group) problems of FFD + MILP 1 + MILP 2 wall time")
    solve_seconds_total: float
    samples_missing: int
    samples_duplicated: int
    tokens: int
    microbatches: int
    noop_microbatches: int
    merges: int
    makespan_ms: float
    mlora_makespan_ms: float
    mlora_sorted_makespan_ms: float
    sequential_makespan_ms: float
    mlora_padding_waste: float
    mlora_sorted_padding_waste: float
    sequential_padding_waste: float
    mlora_max_microbatch_tokens: int
    mlora_microbatches: int
    mlora_sorted_microbatches: int | None = Field(
        default=None, ge=0, description="the length-sorted variant's (each variant picks its own count; plans before "
                                        "2026-11-30: none recorded, equal to mlora_microbatches then)")
    sequential_microbatches: int
    throughput_tokens_per_s: float
    problems_optimal: int
    problems_feasible: int
    problems_heuristic: int


def _stage_cost_errors(terms: dict) -> list[str]:
    """The plan's stage_cost must be StageCost's terms (finite, >= 0 ms; ``profile`` a name): `simulate` and
    `show --plot` build a StageCost from it (a missing term was a TypeError traceback)."""
    from dataclasses import fields

    want = {f.name for f in fields(StageCost)}
    if set(terms) - want or (want - {"profile"}) - set(terms):
        return [f"stage_cost: keys {sorted(terms)} are not StageCost's terms {sorted(want)}"]
    for k, v in terms.items():
        if k == "profile":
            if not isinstance(v, str):
                return [f"stage_cost.profile: {v!r} is not a name"]
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
            return [f"stage_cost.{k}: {v!r} is not a finite number >= 0"]
    return []


#: most tokens a plan's capacity may be: the jobs files' bound until 2026-12-03 (jobs.MAX_TOKENS, 2**25 since):
#: plans written before still load
MAX_PLAN_TOKENS = 2 ** 30


class LoRAPlan(Plan):
    kind: Literal["lora"] = "lora"
    source: str = Field(description="jobs file or preset the plan was made from")
    capacity: int = Field(ge=1, le=MAX_PLAN_TOKENS)
    packing_capacity: int | None = Field(default=None, ge=1, le=MAX_PLAN_TOKENS,
                                         description="the smaller capacity the sequence was taken at (its "
                                                     "problems packed, or the sequential / mLoRA-style cut made), "
                                                     "where it simulated faster (None: the capacity)")
    stages: int = Field(ge=1, le=MAX_STAGES)
    layers: int = Field(ge=1, le=MAX_LAYERS)
    jobs: list[LoRAJob] = Field(min_length=1)
    lengths: list[int] = Field(description="tokens per sample id")
    groups: list[list[int]]
    microbatches: list[LoRAMicrobatch]
    sequence_source: Literal["packed", "sequential", "mlora-cut"] = Field(
        default="packed", description="'packed': the grouped, packed problems below (merge pass, dependency rule); "
                                      "'sequential': the per-job sequential schedule, kept because it simulated "
                                      "faster; 'mlora-cut': the mLoRA-style baseline's microbatches (every job's "
                                      "global batch cut into the same number of runs) as packed segments, kept "
                                      "because they fit the capacity and simulated faster; each taken at "
                                      "packing_capacity where that is set")
    problems: list[LoRAProblem]
    stage_cost: dict = Field(description="StageCost terms used by the simulation (ms)")
    summary: LoRASummary

    # ---- views ----------------------------------------------------------------------------------
    def sequence(self) -> list[Microbatch]:
        return [Microbatch([(s.job, s.global_batch, list(s.samples)) for s in mb.segments]) for mb in self.microbatches]

    def dependency_violations(self, stages: int | None = None) -> list[tuple[int, int, int, int]]:
        """(job, global batch g+1, its first microbatch, last microbatch of g) wherever a job's next global
        batch would start before its optimizer step under a 1F1B pipeline of ``stages`` (default: the plan's)."""
        return dependency_violations(self.sequence(), self.stages if stages is None else stages)

    def batches(self) -> dict[tuple[int, int], list[int]]:
        """(job, global batch) -> sample ids, rebuilt from the segments."""
        out: dict[tuple[int, int], list[int]] = {}
        for mb in self.microbatches:
            for s in mb.segments:
                out.setdefault((s.job, s.global_batch), []).extend(s.samples)
        return out

    def expected_batches(self) -> dict[tuple[int, int], list[int]]:
        """(job, global batch) -> sample ids as the workload numbers them: each job's samples contiguous, in
        global batches of ``global_batch_size`` (``jobs.build_workload``)."""
        out, start = {}, 0
        for j, job in enumerate(self.jobs):
            for g in range(job.global_batches):
                out[(j, g)] = list(range(start, start + job.global_batch_size))
                start += job.global_batch_size
        return out

    def verify(self) -> list[str]:
        """Every sample of every (job, global batch) in exactly one segment of its job and global batch, segment
        and microbatch token counts that match ``lengths``, each microbatch within ``capacity``, one segment per
        job per microbatch, the dependency rule for ``stages``, and a summary that says so."""
        errors = super().verify()
        if self.stages > self.layers:  # (the jobs file's rule: every stage holds at least one layer)
            errors.append(f"stages: {self.stages} pipeline stages but layers {self.layers}")
        names = [j.name for j in self.jobs]
        dup = next((x for x in names if names.count(x) > 1), None)
        if dup is not None:  # two adapters would be saved to one OUT/<name>/ folder
            errors.append(f"jobs: name {dup!r} used twice")
        in_groups = sorted(j for g in self.groups for j in g)
        if in_groups != list(range(len(self.jobs))):
            errors.append(f"groups: {self.groups} must hold every job index 0..{len(self.jobs) - 1} exactly once")
        if self.packing_capacity is not None and self.packing_capacity >= self.capacity:
            errors.append(f"packing_capacity: {self.packing_capacity}, recorded only below the plan's capacity "
                          f"{self.capacity}")
        errors += _stage_cost_errors(self.stage_cost)
        errors += self._solver_record_errors()
        if errors:
            return errors
        # the terms are per stage of this model: layers / stages of them (a plan edited to 64 layers kept its 2-layer
        # prediction; one with 5 layers per stage of a 2-layer, 2-stage model resimulated and verified)
        lps = self.stage_cost.get("layers_per_stage")
        if not (isinstance(lps, (int, float)) and math.isclose(lps, self.layers / self.stages, rel_tol=1e-9)):
            errors.append(f"stage_cost.layers_per_stage: {lps}, but layers / stages = {self.layers} / {self.stages}")
        base = {"mlora": self.summary.mlora_makespan_ms, "mlora_sorted": self.summary.mlora_sorted_makespan_ms,
                "sequential": self.summary.sequential_makespan_ms}
        if self.baselines_ms != base:  # (show printed both: "baseline mlora 1.000 ms" and the summary's speedup)
            errors.append(f"baselines_ms: {self.baselines_ms}, the summary's baseline makespans are {base}")
        if errors:
            return errors
        n = len(self.lengths)
        short = next((i for i, x in enumerate(self.lengths) if x < 1), None)
        if short is not None:  # a sample of no tokens: nothing to train on, and the trainer cannot pack it
            return [f"lengths: sample {short} has {self.lengths[short]} tokens (at least 1)"]
        held = sum(j.global_batch_size * j.global_batches for j in self.jobs)
        if held != n:  # counted before the ids are listed (10**6 x 10**6 of them hung `show`)
            return [f"lengths: {n} samples, but the jobs' global batches hold {held}"]
        expected = self.expected_batches()
        for i, mb in enumerate(self.microbatches):
            for s in mb.segments:
                if s.job >= len(self.jobs) or s.global_batch >= self.jobs[s.job].global_batches:
                    errors.append(f"microbatch {i}: segment of job {s.job} global batch {s.global_batch}, which "
                                  "the plan does not have")
                bad = [x for x in s.samples if not 0 <= x < n]
                if not s.samples:  # the trainer packs a segment's samples: an empty one is not a segment
                    errors.append(f"microbatch {i}: segment of job {s.job} global batch {s.global_batch} holds no "
                                  "samples")
                if bad:
                    errors.append(f"microbatch {i}: sample id {bad[0]} not in [0, {n})")
        if errors:
            return errors
        ver = verify_schedule(self.sequence(), expected, self.lengths, self.packing_capacity or self.capacity,
                              self.stages, capacity_text=None if self.packing_capacity is None else
                              f"packing_capacity {self.packing_capacity} (the capacity the sequence was taken at; "
                              f"the plan's capacity is {self.capacity})")
        if ver.duplicated:
            errors.append(f"{len(ver.duplicated)} samples in more than one place (first: sample {ver.duplicated[0]})")
        if ver.missing:
            errors.append(f"{len(ver.missing)} samples in no microbatch (first: sample {ver.missing[0]})")
        errors += ver.errors
        for i, mb in enumerate(self.microbatches):
            for s in mb.segments:
                tokens = sum(self.lengths[x] for x in s.samples)
                if (s.tokens, s.padded_tokens) != (tokens, padded(tokens)):
                    errors.append(f"microbatch {i}: job {s.job} segment says {s.tokens} tokens ({s.padded_tokens} "
                                  f"padded), its samples hold {tokens} ({padded(tokens)})")
            if mb.padded_tokens != sum(s.padded_tokens for s in mb.segments):
                errors.append(f"microbatch {i}: padded_tokens {mb.padded_tokens} != the sum over its segments")
        if (self.summary.samples_missing, self.summary.samples_duplicated) != (len(ver.missing), len(ver.duplicated)):
            errors.append(f"summary: samples missing/duplicated {self.summary.samples_missing}/"
                          f"{self.summary.samples_duplicated}, found {len(ver.missing)}/{len(ver.duplicated)}")
        uniform = False  # the legacy stage split below
        if not errors:  # the predicted time is the simulated 1F1B makespan of this sequence (rounded to 1e-4 ms)
            try:
                ms = self._makespan_ms()
            except ValueError as err:  # (terms that are finite but overflow a task: the task's message named neither
                # the file nor the field)
                return [f"stage_cost: the microbatches do not simulate with these terms ({err})"]
            close = lambda v, m: math.isclose(v, m, rel_tol=1e-9, abs_tol=1e-3)  # noqa: E731
            if not close(self.predicted_ms, ms) and StageCost(**self.stage_cost).stage_scales(self.stages):
                # written before 2026-11-29, when every stage was simulated at layers / stages even where they do
                # not divide: such a plan (a resumed run's saved plan.json) still loads, its own numbers consistent
                legacy = self._makespan_ms(uniform=True)
                if close(self.predicted_ms, legacy) and close(self.summary.makespan_ms, legacy):
                    ms, uniform = legacy, True
            for name, value in (("predicted_ms", self.predicted_ms), ("summary.makespan_ms", self.summary.makespan_ms)):
                if not close(value, ms):
                    errors.append(f"{name}: {value} ms, the microbatches simulate to {round_ms(ms)} ms with the "
                                  f"plan's stage_cost and {self.stages} stages")
            if not errors:  # and what the summary derives from the sequence says so (show printed stale ratios)
                want = self._derived_summary(ms)
                for key, value in want.items():
                    have = getattr(self.summary, key)
                    tol = _DERIVED_TOL.get(key, 0)
                    if key.startswith("speedup_") and ms > 0:
                        # plans written before 2026-11-29 took the ratios from unrounded baseline makespans: up
                        # to 5e-5 ms of rounding per baseline, over ms, plus the two roundings to 4 decimals
                        tol = 1e-4 + 5e-5 / ms + 1e-9
                    if not math.isclose(have, value, rel_tol=1e-12, abs_tol=tol):
                        errors.append(f"summary.{key}: {have}, the microbatches give {value}")
        if not errors:
            errors += self._bookkeeping_errors()
        if not errors and not uniform:  # (a plan of the uniform stage split simulated its baselines so too)
            errors += self._baseline_errors()
        return errors

    def _baselines(self):
        """The mLoRA-style, length-sorted mLoRA-style and per-job sequential baselines recomputed from the plan's
        jobs, lengths, capacity, stages and stage_cost, as :func:`build_plan` computes them."""
        from types import SimpleNamespace

        from .jobs import JobSamples

        batches = self.expected_batches()
        jobs = tuple(JobSamples(j, None, tuple(tuple(batches[(j, g)]) for g in range(job.global_batches)))
                     for j, job in enumerate(self.jobs))
        w = Workload(config=SimpleNamespace(capacity=self.capacity, stages=self.stages), jobs=jobs,
                     lengths=tuple(self.lengths), source=self.source)
        cost = StageCost(**self.stage_cost)
        return mlora_baseline(w, cost), mlora_baseline(w, cost, sort_by_length=True), sequential_baseline(w, cost)

    def _baseline_fields(self) -> dict:
        """The summary's baseline fields as the recomputed baselines give them."""
        return baseline_fields(*self._baselines())

    def _baseline_errors(self) -> list[str]:
        """The summary's baseline figures are the baselines of this workload: a plan whose mLoRA-style makespan was
        edited was shown (and benchmarked) with the edited speedup, every other check passing. Plans written before
        2026-11-30 (no ``mlora_sorted_microbatches``) cut the mLoRA-style batches by an older rule and keep theirs."""
        s = self.summary
        if s.mlora_sorted_microbatches is None:
            return []
        try:
            want = self._baseline_fields()
        except ValueError as err:  # (no-ops past the simulation's limit: the plan could not have been written so)
            return [f"summary: the baselines of this plan's jobs and lengths do not simulate ({err})"]
        errors = []
        for key, value in want.items():
            have = getattr(s, key)
            ok = (math.isclose(have, value, rel_tol=1e-9, abs_tol=1e-4 + 1e-9) if key.endswith("_ms")
                  else have == value)
            if not ok:
                errors.append(f"summary.{key}: {have}, the plan's jobs and lengths give {value}")
        return errors

    def _bookkeeping_errors(self) -> list[str]:
        """The problems', jobs' and summary's remaining fields, as :func:`build_plan` writes them: each problem a
        global batch its jobs have, within one group, a MILP outcome of the solver's vocabulary; the solve times
        from the problems; the jobs' length statistics from ``lengths``; baseline figures in range. (Edited ones
        were shown as planned: "solve p95 1000000000.000 s", "mLoRA-style -300.00%", "12 (0 no-op, 7 merged)".)"""
        errors = []
        outcomes = (None, "skipped", "optimal", "feasible", "heuristic", "infeasible", "timeout")
        for i, p in enumerate(self.problems):
            have = min(self.jobs[j].global_batches for j in p.jobs)
            if not 0 <= p.global_batch < have:
                errors.append(f"problems.{i}.global_batch: {p.global_batch}, its jobs {p.jobs} have {have}")
            # (a plan whose sequence is the per-job sequential one lists single-job groups, an mLoRA-style cut one
            # group of all; its problems are the packed schedule's, which it did not keep)
            if self.sequence_source == "packed" and not any(set(p.jobs) <= set(g) for g in self.groups):
                errors.append(f"problems.{i}.jobs: {p.jobs} are not within one of the groups {self.groups}")
            if p.smallest_bin_tokens < 0 or p.milp1 not in outcomes or p.milp2 not in outcomes:
                errors.append(f"problems.{i}: smallest_bin_tokens {p.smallest_bin_tokens} < 0, or MILP outcomes "
                              f"{p.milp1!r} / {p.milp2!r} not among {outcomes[1:]}")
        times = [p.solve_seconds for p in self.problems]
        s = self.summary
        for key, want in (("solve_seconds_total", round(sum(times), 4)), ("solve_seconds_p95", round(_p95(times), 4))):
            if not math.isclose(getattr(s, key), want, rel_tol=1e-9, abs_tol=1e-4 + 1e-9):
                errors.append(f"summary.{key}: {getattr(s, key)}, the problems' solve times give {want}")
        for key in ("mlora_padding_waste", "mlora_sorted_padding_waste", "sequential_padding_waste"):
            if not 0.0 <= getattr(s, key) < 1.0:
                errors.append(f"summary.{key}: {getattr(s, key)} is not a fraction in [0, 1)")
        for key in ("mlora_microbatches", "sequential_microbatches", "mlora_max_microbatch_tokens"):
            if getattr(s, key) < 0:
                errors.append(f"summary.{key}: {getattr(s, key)} < 0")
        if not 0 <= s.merges <= s.microbatches:
            errors.append(f"summary.merges: {s.merges}, not in [0, microbatches {s.microbatches}]")
        errors += self._problem_record_errors()
        for j, (job, ids) in enumerate(zip(self.jobs, self._job_samples())):
            mu, sd = _length_stats(self.lengths, ids, 3)
            # (both rounded to 3 decimals: a last-bit difference of the sums may round 0.001 apart)
            if not (math.isclose(job.mean_tokens, mu, rel_tol=1e-9, abs_tol=1e-3 + 1e-9)
                    and math.isclose(job.std_tokens, sd, rel_tol=1e-9, abs_tol=1e-3 + 1e-9)):
                errors.append(f"jobs.{j}: mean_tokens {job.mean_tokens} / std_tokens {job.std_tokens}, its samples "
                              f"give {mu} / {sd}")
        return errors

    def _problem_record_errors(self) -> list[str]:
        """Each problem record is its (global batch, group)'s, as :func:`_pack_grouping` writes it: its samples are
        its jobs' global batches, FFD used at most one bin per sample, its smallest bin fits the packing capacity;
        a packed plan has one record per (global batch, group) that has samples, holding the group's jobs with that
        global batch, and ``summary.merges`` is the number of its microbatches that hold two problems' segments (the
        merge pass folds one problem's last bin into the previous one's). An edited record - another job, a
        duplicated global batch, 999,999 tokens in a bin of 256, 50 FFD bins for 4 samples - and "12 (0 no-op, 5
        merged)" where nothing was merged were shown as planned."""
        errors = []
        cap = self.packing_capacity or self.capacity
        for i, p in enumerate(self.problems):
            samples = sum(self.jobs[j].global_batch_size for j in p.jobs)
            if p.samples != samples:
                errors.append(f"problems.{i}.samples: {p.samples}, its jobs {p.jobs} hold {samples} per global batch")
            if p.ffd_bins > max(p.samples, 1) or p.smallest_bin_tokens > cap:
                errors.append(f"problems.{i}: ffd_bins {p.ffd_bins} for {p.samples} samples, or a smallest bin of "
                              f"{p.smallest_bin_tokens} tokens above the packing capacity {cap}")
        if errors:
            return errors
        if self.sequence_source != "packed":
            if self.summary.merges != 0:  # (the baselines' sequences are not merged)
                errors.append(f"summary.merges: {self.summary.merges}, but the plan runs the {self.sequence_source} "
                              f"sequence, which merges nothing")
            return errors
        group_of = self._group_of()
        want = {}
        for gi, grp in enumerate(self.groups):
            for g in range(max(self.jobs[j].global_batches for j in grp)):
                want[(g, gi)] = sorted(j for j in grp if g < self.jobs[j].global_batches)
        seen: dict[tuple[int, int], int] = {}
        for i, p in enumerate(self.problems):
            key = (p.global_batch, group_of[p.jobs[0]])
            if key in seen:
                errors.append(f"problems.{i}: global batch {p.global_batch} of group {self.groups[key[1]]} is also "
                              f"problems.{seen[key]}")
            elif sorted(p.jobs) != want.get(key):
                errors.append(f"problems.{i}.jobs: {p.jobs}, but global batch {p.global_batch} of its group "
                              f"{self.groups[key[1]]} is jobs {want.get(key)}")
            seen.setdefault(key, i)
        missing = sorted(set(want) - set(seen))
        if missing:
            g, gi = missing[0]
            errors.append(f"problems: no record of global batch {g} of group {self.groups[gi]} ({len(missing)} "
                          f"missing)")
        merged = self._merged_microbatches()
        if self.summary.merges != merged:
            errors.append(f"summary.merges: {self.summary.merges}, but {merged} microbatches hold two problems' "
                          f"segments")
        return errors

    def _group_of(self) -> dict[int, int]:
        """Job index -> the index of its adapter group."""
        return {j: gi for gi, g in enumerate(self.groups) for j in g}

    def _merged_microbatches(self) -> int:
        """Microbatches holding segments of two (global batch, group) problems (the merge pass's folds): a packed
        plan's ``summary.merges``; 0 for the baselines' sequences."""
        if self.sequence_source != "packed":
            return 0
        group_of = self._group_of()
        return sum(len({(seg.global_batch, group_of.get(seg.job)) for seg in mb.segments}) > 1
                   for mb in self.microbatches)

    def _job_samples(self) -> list[list[int]]:
        """Each job's sample ids over its global batches (as :meth:`expected_batches` lays them out)."""
        out: list[list[int]] = [[] for _ in self.jobs]
        for (j, _), ids in self.expected_batches().items():
            out[j].extend(ids)
        return out

    def _solver_record_errors(self) -> list[str]:
        """The solver record and the summary's problem counts follow from ``problems`` (as :func:`build_plan` writes
        them): a plan edited to read "optimal" over problems that were not proved, or problems that do not cover
        the samples, was shown and trained as planned."""
        errors = []
        n_jobs = len(self.jobs)
        for i, p in enumerate(self.problems):
            if not p.jobs or any(not 0 <= j < n_jobs for j in p.jobs):
                errors.append(f"problems.{i}.jobs: {p.jobs} are not job indices 0..{n_jobs - 1}")
            if not (0 <= p.lower_bound <= p.bins <= p.ffd_bins) or p.samples < 0 or p.solve_seconds < 0:
                errors.append(f"problems.{i}: lower_bound {p.lower_bound} <= bins {p.bins} <= ffd_bins {p.ffd_bins} "
                              f"(and samples, solve_seconds >= 0) does not hold")
        if errors:
            return errors
        samples = sum(p.samples for p in self.problems)
        if samples != len(self.lengths):
            errors.append(f"problems: {samples} samples over the (global batch, group) problems, lengths {len(self.lengths)}")
        counts = {k: sum(p.status == k for p in self.problems) for k in ("optimal", "feasible", "heuristic")}
        have = {k: getattr(self.summary, f"problems_{k}") for k in counts}
        if have != counts:
            errors.append(f"summary.problems_*: {have}, the problems' statuses count {counts}")
        worst = "optimal" if counts["feasible"] == counts["heuristic"] == 0 else (
            "feasible" if counts["heuristic"] == 0 else "heuristic")
        if self.problems and self.solver.status != worst:
            errors.append(f"solver.status: {self.solver.status!r}, the problems' worst status is {worst!r}")
        bins = float(sum(p.bins for p in self.problems))
        bound = float(sum(p.bins if p.status == "optimal" else p.lower_bound for p in self.problems))
        if self.solver.objective is not None and self.solver.objective != bins:
            errors.append(f"solver.objective: {self.solver.objective}, the problems hold {bins:g} bins")
        if self.solver.bound is not None and self.solver.bound != bound:
            errors.append(f"solver.bound: {self.solver.bound}, the problems' bounds add up to {bound:g}")
        want = relative_gap(bins, bound)
        if self.solver.gap is not None and not math.isclose(self.solver.gap, want, rel_tol=1e-9, abs_tol=1e-12):
            # (plans before 2026-12-02 recorded none: None is accepted)
            errors.append(f"solver.gap: {self.solver.gap}, the problems' bins {bins:g} and bounds {bound:g} give "
                          f"{want:.6g}")
        if self.sequence_source == "sequential" and self.groups != [[j] for j in range(n_jobs)]:
            errors.append(f"groups: {self.groups}, but a sequential sequence runs every job on its own")
        if self.sequence_source == "mlora-cut" and self.groups != [list(range(n_jobs))]:
            errors.append(f"groups: {self.groups}, but an mLoRA-style cut runs every job in one group")
        return errors

    def _derived_summary(self, ms: float) -> dict:
        """The summary fields that follow from the microbatches, their simulated makespan ``ms`` and the
        baselines' makespans, computed as :func:`build_plan` does."""
        real = sum(s.tokens for mb in self.microbatches for s in mb.segments)
        padded_total = sum(mb.padded_tokens for mb in self.microbatches)
        s = self.summary
        return {"tokens": real, "microbatches": len(self.microbatches),
                "noop_microbatches": sum(mb.noop for mb in self.microbatches),
                **derived_ratios(real, padded_total, ms, s.mlora_makespan_ms, s.mlora_sorted_makespan_ms,
                                 s.sequential_makespan_ms)}

    def simulate(self):
        _, sim = sequence_ms(self.sequence(), self.lengths, StageCost(**self.stage_cost), self.stages)
        return sim

    def _makespan_ms(self, uniform: bool = False) -> float:
        return sequence_makespan_ms(self.sequence(), self.lengths, StageCost(**self.stage_cost), self.stages,
                                    uniform=uniform)

    def resimulated(self) -> "LoRAPlan":
        """A copy whose predicted time (``predicted_ms``, ``summary.makespan_ms``) is its sequence's simulated
        makespan again, with the summary fields that follow from the sequence (tokens, microbatch counts, padding
        waste, throughput, the baselines and the speedups over them, the merged microbatches): for a plan whose
        microbatches or lengths were changed by hand (``verify`` refuses a prediction or summary that does not
        follow from them)."""
        raw = self._makespan_ms()
        ms = round_ms(raw)
        jobs = [job.model_copy(update=dict(zip(("mean_tokens", "std_tokens"), _length_stats(self.lengths, ids, 3))))
                for job, ids in zip(self.jobs, self._job_samples())]  # (they follow from lengths too)
        # so do the baselines (lengths changed by hand left the old mLoRA-style makespan, and its speedup, standing)
        base = self._baseline_fields()
        summary = self.summary.model_copy(update={"makespan_ms": ms, "merges": self._merged_microbatches(), **base})
        summary = summary.model_copy(update=self.model_copy(update={"summary": summary})._derived_summary(raw))
        return self.model_copy(update={"predicted_ms": ms, "jobs": jobs, "summary": summary,
                                       "baselines_ms": baselines_ms_of(base)})

    def gantt_tasks(self) -> list:
        return self.simulate().tasks

    def summary_rows(self) -> list[tuple[str, str]]:
        s = self.summary
        rows = super().summary_rows()
        # the limit is per problem, the time their sum: '4.9 s (limit 0.4 s)' read as an overrun; no limit: --no-milp
        limit = f" (limit {self.solver.time_limit:g} s each)" if self.solver.time_limit else ""
        rows = [(k, f"{self.solver.solve_seconds:.3f} s over {len(self.problems)} (global batch, group) problems"
                    + limit) if k == "solve time" else (k, v)
                for k, v in rows]
        if self.sequence_source != "packed":  # (the status and gap are the packed problems', which it does not run)
            rows = [(k, v + f"; of the packed problems - this plan runs the {self.sequence_source} schedule")
                    if k == "solver" else (k, v) for k, v in rows]
        rows += [
            ("jobs", ", ".join(f"{j.name}(r={j.adapter.r})" for j in self.jobs)),
            ("groups", " | ".join("+".join(self.jobs[a].name for a in g) for g in self.groups)),
            ("microbatches", f"{s.microbatches} ({s.noop_microbatches} no-op, {s.merges} merged)"
                             + ({"sequential": "; the per-job sequential schedule (simulated faster)",
                                 "mlora-cut": "; the mLoRA-style cut, packed (simulated faster)"}
                                .get(self.sequence_source, ""))
                             + (f"; taken at capacity {self.packing_capacity:,} of {self.capacity:,} tokens "
                                f"(simulated faster)" if self.packing_capacity else "")),
            ("speedup vs mLoRA-style", f"{s.speedup_vs_mlora:.3f}x"),
            ("speedup vs sequential", f"{s.speedup_vs_sequential:.3f}x"),
            ("speedup vs mLoRA-style, sorted", f"{s.speedup_vs_mlora_sorted:.3f}x"),
            ("padding waste", f"{s.padding_waste:.2%} (mLoRA-style {s.mlora_padding_waste:.2%})"),
            ("solve p95", f"{s.solve_seconds_p95:.3f} s per (global batch, group)"),
            ("samples missing/duplicated", f"{s.samples_missing}/{s.samples_duplicated}"),
        ]
        return rows


def baseline_fields(mlora, mlora_sorted, seqb) -> dict:
    """The summary's baseline fields of the three baselines (mLoRA-style, length-sorted, sequential), rounded as a
    plan stores them: what build_plan writes and verify / resimulated recompute."""
    return {"mlora_makespan_ms": round_ms(mlora.makespan_ms),
            "mlora_sorted_makespan_ms": round_ms(mlora_sorted.makespan_ms),
            "sequential_makespan_ms": round_ms(seqb.makespan_ms),
            "mlora_padding_waste": round(mlora.padding_waste, 5),
            "mlora_sorted_padding_waste": round(mlora_sorted.padding_waste, 5),
            "sequential_padding_waste": round(seqb.padding_waste, 5),
            "mlora_max_microbatch_tokens": mlora.max_microbatch_tokens,
            "mlora_microbatches": mlora.microbatches,
            "mlora_sorted_microbatches": mlora_sorted.microbatches,
            "sequential_microbatches": seqb.microbatches}


def baselines_ms_of(fields: dict) -> dict:
    """A plan's ``baselines_ms`` from its summary's baseline fields."""
    return {"mlora": fields["mlora_makespan_ms"], "mlora_sorted": fields["mlora_sorted_makespan_ms"],
            "sequential": fields["sequential_makespan_ms"]}


def _length_stats(lengths, ids, ndigits: int | None = None) -> tuple[float, float]:
    """(mean, population standard deviation) of the lengths of samples ``ids``; ``ndigits=3`` rounds them as a
    plan records a job's (``mean_tokens``, ``std_tokens``)."""
    xs = [lengths[x] for x in ids]
    mu = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs))
    return (mu, sd) if ndigits is None else (round(mu, ndigits), round(sd, ndigits))


#: absolute tolerances of the derived summary fields against their recomputation: build_plan computes them from
#: the same numbers (the baselines' stored makespans, the sequence's simulated one); the speedups get more for
#: older plans (see LoRAPlan.verify)
_DERIVED_TOL = {"padding_waste": 1e-9, "throughput_tokens_per_s": 1e-6}


def round_ms(x: float) -> float:
    """A makespan as a plan stores it: to 1e-4 ms and at least 8 significant digits (to 1e-4 ms alone, the makespans
    of a profile of tiny per-token costs were stored as 0 or a digit or two, and the speedups taken from them read 0.0
    or 1.6561 for 1.7275)."""
    if not math.isfinite(x) or x <= 0:
        return round(x, 4) if math.isfinite(x) else x
    return round(x, max(4, 7 - math.floor(math.log10(x))))


def derived_ratios(real: int, padded_total: int, ms: float, mlora_ms: float, mlora_sorted_ms: float,
                   sequential_ms: float) -> dict:
    """Padding waste, throughput and speedups of a sequence of ``real`` tokens (``padded_total`` padded) whose
    simulated makespan is ``ms``, as the summary rounds them (a makespan of 0: ratios 1 for a baseline of 0 too,
    else inf; throughput 0)."""
    def ratio(base: float) -> float:
        return round(base / ms, 4) if ms > 0 else (1.0 if base <= 0 else math.inf)

    return {"padding_waste": round(1 - real / padded_total, 5) if padded_total else 0.0,
            "throughput_tokens_per_s": round(real / ms * 1000.0, 2) if ms > 0 else 0.0,
            "speedup_vs_mlora": ratio(mlora_ms), "speedup_vs_sequential": ratio(sequential_ms),
            "speedup_vs_mlora_sorted": ratio(mlora_sorted_ms)}


def _p95(xs: list[float]) -> float:
    if not xs:
        return 0.0
    ys = sorted(xs)
    return ys[min(len(ys) - 1, math.ceil(0.95 * len(ys)) - 1)]


def _pack_grouping(w: Workload, work, cost, capacity: int, *, time_limit: float, seed: int, use_milp: bool,
                   progress=None):
    """Pack every (global batch, group) problem of ``work`` (in that, staggered, order), then the merge pass (kept
    only if it does not make the simulated schedule slower) and the dependency rule: (sequence, no-ops, simulated
    ms, merges, problem records)."""
    cfg, L, adapter_of = w.config, w.lengths, w.adapter_of
    problems_mb: list[list[Microbatch]] = []
    records: list[LoRAProblem] = []
    for g, grp in work:
        members = [a for a in grp if g < len(w.jobs[a].batches)]
        samples = [s for a in members for s in w.jobs[a].batches[g]]
        res = pack_problem(samples, adapter_of, L, capacity, time_limit=time_limit, seed=seed, use_milp=use_milp)
        problems_mb.append([Microbatch([(a, g, sorted(ids)) for a, ids in sorted(b.items())]) for b in res.bins])
        records.append(LoRAProblem(global_batch=g, jobs=members, samples=len(samples), bins=len(res.bins),
                                   ffd_bins=res.ffd_bins, lower_bound=res.lower_bound, status=res.status,
                                   milp1=res.milp1, milp2=res.milp2, smallest_bin_tokens=res.smallest_after,
                                   solve_seconds=round(res.solve_seconds, 6)))
        if progress is not None:
            progress()
    flat = [mb for p in problems_mb for mb in p]
    seq0, noops0 = apply_dependency_rule(flat, cfg.stages)
    check_noops(noops0, cfg.stages, w.source)
    ms0 = sequence_makespan_ms(seq0, L, cost, cfg.stages)
    merged, merges = merge_pass(problems_mb, L, capacity)
    seq1, noops1 = apply_dependency_rule([mb for p in merged for mb in p], cfg.stages)
    check_noops(noops1, cfg.stages, w.source)
    ms1 = sequence_makespan_ms(seq1, L, cost, cfg.stages)
    if merges and ms1 <= ms0:
        return seq1, noops1, ms1, merges, records
    return seq0, noops0, ms0, 0, records


def _tried_text(tried: list[tuple[int, float]], kept: int) -> str:
    """'8,192: 15.2 ms, 4,096: 14.9 ms' over the capacities tried; past six, the first three, the kept one and the
    count (a capacity of 2**30 with tiny samples listed 24)."""
    items = [f"{c:,}: {m:.4g} ms" for c, m in tried]
    if len(items) <= 6:
        return ", ".join(items)
    k = next(i for i, (c, _) in enumerate(tried) if c == kept)
    return ", ".join(items[:3]) + (f", ..., {items[k]}" if k >= 3 else ", ...") + f"; {len(items)} capacities"


@dataclass
class _Packed:
    groups: list
    seq: list
    noops: int
    ms: float
    merges: int
    records: list
    note: str
    milp: bool = False  # a MILP ran on one of its problems (else first-fit decreasing's packing throughout)


def _best_grouping(w: Workload, stats, cost, capacity: int, *, time_limit: float, seed: int, use_milp: bool,
                   progress=None) -> _Packed:
    """The adapter grouping's packed schedule at ``capacity``: the paper's groups, and where the bubble check is
    vacuous one group of every adapter too, the faster kept."""
    cfg = w.config
    # the bubble check guards a job's next global batch against the dependency rule: with one global batch per job
    # there is none, and the check refused pairs it could not matter for (S = 4, one batch each: 0.913x mLoRA-style
    # where a pair ran 1.02x)
    single = all(len(j.batches) <= 1 for j in w.jobs)
    groups = group_adapters(stats, capacity, 1 if single else cfg.stages)

    # the paper's groups hold 1-2 adapters so that a job's next global batch need not wait (the bubble check); where
    # that check is vacuous (one stage, or one global batch per job) one group of every adapter packs the most
    # samples per problem: it is a candidate too, kept where its simulated schedule is faster (S = 1, five jobs of
    # equal-length samples: the pairs took 9 microbatches where one group takes 6, 0.918x mLoRA-style)
    candidates = [groups]
    if (cfg.stages == 1 or single) and len(groups) > 1:
        candidates.append([sorted(a for g in groups for a in g)])
    nb = max(len(j.batches) for j in w.jobs)
    works = [[(g, grp) for g in range(nb) for grp in gs if any(g < len(w.jobs[a].batches) for a in grp)]
             for gs in candidates]
    if progress is not None:
        progress(0, total=sum(len(wk) for wk in works))
    best, tried = None, []
    for gs, work in zip(candidates, works):
        got = _pack_grouping(w, work, cost, capacity, time_limit=time_limit, seed=seed, use_milp=use_milp,
                             progress=progress)
        tried.append((got[2], sum(r.solve_seconds for r in got[4])))
        if best is None or got[2] < best[3] * (1 - 1e-9):
            best = (gs, *got)
    groups, seq, noops, ms, merges, records = best
    grouping_note = "" if len(tried) == 1 else (
        f"; one group of every adapter was packed too ({tried[1][1]:.3f} s) beside the paper's pairs "
        f"({tried[0][1]:.3f} s): simulated {tried[1][0]:.4g} vs {tried[0][0]:.4g} ms, the "
        + ("one group" if groups is candidates[1] else "pairs") + " kept (the problems and solve times are its)")

    # (whether a MILP ran, not whether one was asked for: a tie kept a MILP pass none of whose problems ran one,
    # and the note read 'MILP 2 proved optimal in 0 of 0 runs' with nothing more)
    ran = use_milp and any(r.milp1 not in (None, "skipped") or r.milp2 not in (None, "skipped") for r in records)
    return _Packed(groups, seq, noops, ms, merges, records, grouping_note, ran)


def build_plan(w: Workload, profile, *, time_limit: float = DEFAULT_TIME_LIMIT_S, seed: int = 0,
               use_milp: bool = True, progress=None) -> LoRAPlan:
    """Plan a multi-job LoRA workload on ``profile`` (see module docstring). ``time_limit`` (s) is the solver
    budget of each (global batch, group) problem (MILP 1 gets at most half, MILP 2 the rest); without
    ``use_milp`` it is unused and the plan records no time limit."""
    cfg, L = w.config, w.lengths
    cost = stage_cost_from_profile(profile, cfg.layers, cfg.stages)
    stats = []
    for j in w.jobs:
        mu, sd = _length_stats(L, [s for b in j.batches for s in b])
        stats.append(AdapterStats(mu, sd, j.spec.global_batch_size))
    totals = [0]

    def pass_progress():
        """A progress callable for one more packing pass: its problems are added to the bar's total."""
        if progress is None:
            return None
        base = totals[0]

        def advance(n: int = 1, total: int | None = None) -> None:
            if total is not None:
                totals[0] = base + total
                progress(0, total=totals[0])
            if n:
                progress(n)
        return advance

    # the capacity is a memory bound, not a size to fill: fewer, larger microbatches leave a deep pipeline's stages
    # idle longer (Mix at S = 8: capacity 16,384 simulated 11,221 ms where 8,192 gives 8,123 and 4,096 7,777; 47 of
    # 100 random workloads planned slower with their capacity doubled). So the candidates below are taken at the
    # capacity and at its halvings while every sample fits (its adapter's segment rounded up to 128 tokens), the
    # fastest kept, a larger capacity on ties. At a halving the packing is screened by first-fit decreasing
    # (milliseconds) and packed as asked only where it beats the best so far
    longest = max((padded(L[s]) for j in w.jobs for b in j.batches for s in b), default=0)
    best = None   # (ms, source, sequence, no-ops, merges, packing capacity, the packing there)
    tried = []    # (capacity, its fastest candidate's ms)
    passes = []   # every packing pass (its solve seconds count in the note when it is not the one kept)
    milp_slower = set()  # capacities whose MILP packing simulated slower than first-fit decreasing's
    milp_asked = {cfg.capacity}  # capacities packed with the MILPs asked for (the others were screened only)
    cap = cfg.capacity
    while cap == cfg.capacity or cap >= max(longest, SEGMENT_ALIGN):
        wc = w if cap == cfg.capacity else dataclasses.replace(w, config=cfg.model_copy(update={"capacity": cap}))
        if best is None:
            packed = _best_grouping(w, stats, cost, cap, time_limit=time_limit, seed=seed, use_milp=use_milp,
                                    progress=pass_progress())
            passes.append(packed)
        else:
            packed = _best_grouping(w, stats, cost, cap, time_limit=time_limit, seed=seed, use_milp=False,
                                    progress=pass_progress())
            passes.append(packed)
            if use_milp and packed.ms < best[0] * (1 - 1e-9):
                asked = _best_grouping(w, stats, cost, cap, time_limit=time_limit, seed=seed, use_milp=True,
                                       progress=pass_progress())
                passes.append(asked)
                milp_asked.add(cap)
                if asked.ms <= packed.ms:
                    packed = asked
                else:
                    milp_slower.add(cap)
        cands = [(packed.ms, "packed", packed.seq, packed.noops, packed.merges)]
        # the per-job sequential schedule (FFD per global batch, capacity respected) is a valid plan too: when its
        # 1F1B makespan is shorter (few, small jobs: a pipeline filled by a tiny first microbatch), it is the plan
        sq = sequential_baseline(wc, cost)
        cands.append((sq.makespan_ms, "sequential", sq.sequence, sq.noops, 0))
        # so is the mLoRA-style baseline's cut (every job's global batch in the same number of runs) run as packed
        # segments, where each of its microbatches fits the capacity: fewest-bins packing can leave the 1F1B stages
        # uneven (S = 4: bins of 6 + 1 samples beside the cut's 4 + 1 / 3 + 1, 0.92x of the padded baseline)
        ml = mlora_baseline(wc, cost)
        if all(mb.padded_tokens(L) <= cap for mb in ml.sequence):
            cands.append((sequence_makespan_ms(ml.sequence, L, cost, cfg.stages), "mlora-cut", ml.sequence, ml.noops,
                          0))
        tried.append((cap, min(c[0] for c in cands)))
        for c in cands:
            if best is None or c[0] < best[0] * (1 - 1e-9):
                best = (*c, cap, packed)
        cap //= 2
    ms, source, seq, noops, merges, packing_capacity, packed = best
    groups, records, grouping_note = packed.groups, packed.records, packed.note
    capacity_note = "" if packing_capacity == cfg.capacity else (
        f"; the sequence is taken at capacity {packing_capacity:,} tokens, within the given {cfg.capacity:,}: "
        f"smaller microbatches keep the {cfg.stages}-stage pipeline busier (fastest candidate simulated "
        + _tried_text(tried, packing_capacity) + "; its problems are listed)")
    if use_milp and not packed.milp and packing_capacity != cfg.capacity:
        # (the record read as the MILPs' work: 'MILP 2 proved optimal in 0 of 0 runs' and nothing more)
        capacity_note += (f"; the listed problems are first-fit decreasing's at {packing_capacity:,} tokens: "
                          + ("its MILP packing simulated slower" if packing_capacity in milp_slower else
                             "it met every problem's bound there, no MILP needed" if packing_capacity in milp_asked
                             else "a halving is screened by first-fit decreasing, and the MILPs run only where "
                                  "that beats the best so far"))
    # (said whenever there are such passes: a 0.5 ms threshold made the note depend on the machine's speed)
    if any(p is not packed for p in passes):
        other_s = sum(sum(r.solve_seconds for r in p.records) for p in passes if p is not packed)
        capacity_note += f"; packing passes not kept took {other_s:.3g} s more (not in the solve time)"
    seqb = sequential_baseline(w, cost)   # the baselines at the capacity given
    mlora = mlora_baseline(w, cost)

    batches = {(j.index, g): list(b) for j in w.jobs for g, b in enumerate(j.batches)}
    ver = verify_schedule(seq, batches, L, cfg.capacity, cfg.stages)
    problems = list(ver.errors)
    # a sample lost or packed twice is a packing bug too: the plan was written (exit 0) with the counts in its
    # summary, and `show` / `train_lora` then refused it
    if ver.duplicated:
        problems.append(f"{len(ver.duplicated)} samples in more than one place (first: sample {ver.duplicated[0]})")
    if ver.missing:
        problems.append(f"{len(ver.missing)} samples in no microbatch (first: sample {ver.missing[0]})")
    if problems:
        raise ValueError(f"LoRA plan failed verification: {'; '.join(problems)}")

    mlora_sorted = mlora_baseline(w, cost, sort_by_length=True)
    padded_total = sum(mb.padded_tokens(L) for mb in seq)
    real_total = sum(mb.tokens(L) for mb in seq)
    solve_times = [r.solve_seconds for r in records]
    n_status = {k: sum(r.status == k for r in records) for k in ("optimal", "feasible", "heuristic")}
    # from the baselines' makespans as stored (round_ms): verify recomputes the ratios from them (from the unrounded
    # ones, a plan of sub-millisecond makespans failed its own check)
    ratios = derived_ratios(real_total, padded_total, ms, round_ms(mlora.makespan_ms),
                            round_ms(mlora_sorted.makespan_ms), round_ms(seqb.makespan_ms))
    bad = next(((k, v) for k, v in ratios.items() if not math.isfinite(v)), None)
    if bad is not None:  # (a profile of denormal per-token costs: inf was written as null, and show refused the plan)
        from adasched.profiler.io import InputError

        raise InputError("--profile", f"{profile.where}: its per-token costs simulate the plan "
                                      f"to {ms!r} ms, and {bad[0]} would be {bad[1]}: costs this small are not a GPU's")
    base = baseline_fields(mlora, mlora_sorted, seqb)
    summary = LoRASummary(
        **ratios,
        solve_seconds_p95=round(_p95(solve_times), 4),
        solve_seconds_total=round(sum(solve_times), 4),
        samples_missing=len(ver.missing),
        samples_duplicated=len(ver.duplicated),
        tokens=real_total,
        microbatches=len(seq),
        noop_microbatches=noops,
        merges=merges,
        makespan_ms=round_ms(ms),
        **base,
        problems_optimal=n_status["optimal"],
        problems_feasible=n_status["feasible"],
        problems_heuristic=n_status["heuristic"],
    )
    n_skip = sum((r.milp1 == "skipped") + (r.milp2 == "skipped") for r in records)
    n1_timeout = sum(r.milp1 == "timeout" and r.status == "heuristic" for r in records)
    n2_run = sum(r.milp2 not in (None, "skipped") for r in records)
    n2_opt = sum(r.milp2 == "optimal" for r in records)
    worst = "optimal" if n_status["feasible"] == n_status["heuristic"] == 0 else (
        "feasible" if n_status["heuristic"] == 0 else "heuristic")
    objective = float(sum(r.bins for r in records))
    # a problem whose bin count was proved minimal is bounded by that count, not by its simple lower bound
    # (else an all-optimal plan recorded objective 106, bound 104 under status "optimal")
    bound = float(sum(r.bins if r.status == "optimal" else r.lower_bound for r in records))
    solver = SolverRecord(
        backend="ffd+pulp-cbc" if use_milp else "ffd",
        status=worst,
        objective=objective,
        bound=bound,
        gap=relative_gap(objective, bound),  # (was not recorded: show said "feasible" without it)
        solve_seconds=round(sum(solve_times), 6),
        time_limit=time_limit if use_milp else None,  # first-fit decreasing takes none
        seed=seed if use_milp else None,  # (first-fit decreasing draws nothing: --seed is refused with --no-milp)
        threads=1,
        note=(f"{len(records)} (global batch, group) problems: {n_status['optimal']} bin count proved minimal"
              + (f", {n_status['feasible']} MILP stopped by its time limit" if use_milp else " (FFD met the lower "
                 "bound)")
              + f", {n_status['heuristic']} FFD kept unproved"
              # (of them: a bin-count MILP stopped by its limit before a solution - was filed as plain FFD)
              + (f" ({n1_timeout} of them: the bin-count MILP stopped by its time limit without a solution)"
                 if n1_timeout else "")
              + ("" if use_milp else " (no MILP run: --no-milp)")
              + "; objective = total bins, bound = sum of per-problem bounds (the bin count where proved minimal, "
                "else the volume/adapter lower bound)"
              + (f"; MILP 2 (smallest last bin) proved optimal in {n2_opt} of {n2_run} runs" if use_milp else "")
              + (", the rest stopped by the time limit" if n2_run > n2_opt else "")
              + (f"; {n_skip} MILPs not started: too large for their budget (samples x bins > "
                 f"{MILP_BINARIES_PER_SECOND} x seconds; raise --time-limit)" if n_skip else "")
              + ({"sequential": "; the per-job sequential schedule simulated faster than the packed one and is "
                                "the plan's sequence",
                  "mlora-cut": "; the mLoRA-style cut (every job's global batch in the same number of microbatches) "
                               "as packed segments fits the capacity, simulated faster than the packed problems and "
                               "is the plan's sequence"}.get(source, ""))
              + grouping_note + capacity_note
              + "".join(f"; {n}" for n in w.notes)),
    )
    jobs = [LoRAJob(name=j.spec.name, adapter=j.spec.adapter, lr=j.spec.lr, global_batch_size=j.spec.global_batch_size,
                    global_batches=len(j.batches), mean_tokens=round(st.mu, 3), std_tokens=round(st.sigma, 3))
            for j, st in zip(w.jobs, stats)]
    mbs = [LoRAMicrobatch(
        segments=[LoRASegment(job=a, global_batch=g, samples=list(ids), tokens=sum(L[s] for s in ids),
                              padded_tokens=padded(sum(L[s] for s in ids))) for a, g, ids in mb.segments],
        padded_tokens=mb.padded_tokens(L)) for mb in seq]
    return LoRAPlan(
        inputs_digest=inputs_digest(cfg, list(L)),
        profile=profile_ref(profile),
        solver=solver,
        predicted_ms=round_ms(ms),
        baselines_ms=baselines_ms_of(base),
        source=w.source,
        capacity=cfg.capacity,
        packing_capacity=packing_capacity if packing_capacity != cfg.capacity else None,
        stages=cfg.stages,
        layers=cfg.layers,
        jobs=jobs,
        lengths=list(L),
        groups={"packed": groups, "sequential": [[j.index] for j in w.jobs],
                "mlora-cut": [[j.index for j in w.jobs]]}[source],
        microbatches=mbs,
        sequence_source=source,
        problems=records,
        stage_cost=cost.as_dict(),
        summary=summary,
    )

