"""FlexSP plan: per training step, per micro-batch, a set of concurrent SP groups of power-of-two degree,
each with its ranks and the sequences it runs. The runtime reads this through the model only."""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..plan import NonNegMs, Plan

__all__ = ["SPGroup", "SPMicroBatch", "SPStep", "SPModelShape", "SPPlan", "known_models", "MAX_WORLD",
           "MAX_PLAN_CONTEXT"]

#: most GPUs an SP plan spans (one model replica's GPUs; the largest clusters built have ~1e5): simulating a
#: step makes a task per rank per micro-batch, and world_size 1e12 was a MemoryError after 40 s in `show`
MAX_WORLD = 2 ** 16
#: longest max_context a plan records and --max-context takes (tokens): a clip far beyond any sequence a cluster
#: holds (2**40, about 1.1e12); larger values overflowed numpy's int64 lengths
MAX_PLAN_CONTEXT = 2 ** 40
#: plans written since price their static baseline with baselines.pack_bins' fewer bins (before: best-fit
#: decreasing alone, which verify re-derives for them)
STATIC_FEWER_BINS_SINCE = "2026-12-03T15:50:00+00:00"


def _short(n: int) -> str:
    """A length for an error line: a 400-digit number as its digit count."""
    text = str(n)
    return text if len(text) <= 24 else f"of {len(text)} digits"


class SPGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")
    degree: int = Field(ge=1, description="SP degree (power of two) = len(ranks)")
    ranks: list[int] = Field(description="global ranks, contiguous and aligned to the degree (buddy placement)")
    seq_ids: list[int] = Field(description="indices into the step's sequence list")
    seqlens: list[int] = Field(description="lengths (tokens) of those sequences, same order")
    predicted_ms: float = Field(ge=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check(self) -> "SPGroup":
        if self.degree & (self.degree - 1):
            raise ValueError(f"degree {self.degree} is not a power of two")
        if len(self.ranks) != self.degree:
            raise ValueError(f"group of degree {self.degree} lists {len(self.ranks)} ranks")
        if len(self.seq_ids) != len(self.seqlens):
            raise ValueError("seq_ids and seqlens differ in length")
        if any(s <= 0 for s in self.seqlens):
            raise ValueError("seqlens must be positive")
        big = next((s for s in self.seqlens if s > MAX_PLAN_CONTEXT), None)
        if big is not None:  # (10**400 made the runtime's length scaling raise OverflowError: a traceback)
            raise ValueError(f"seqlens: length {_short(big)} is more than {MAX_PLAN_CONTEXT:,} tokens")
        return self


class SPMicroBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    groups: list[SPGroup]
    predicted_ms: float = Field(ge=0.0, allow_inf_nan=False, description="makespan over the concurrent groups")
    source: str = Field(default="", description="which candidate won: milp, homogeneous-d, greedy[-target], +ls")


class SPStep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: int = Field(ge=0)
    seqlens: list[int] = Field(description="the global batch's sequence lengths; seq_ids index this list")
    micro_batches: list[SPMicroBatch]
    predicted_ms: float = Field(ge=0.0, allow_inf_nan=False)
    baselines_ms: dict[str, NonNegMs] = Field(default_factory=dict)
    solve_seconds: float = Field(default=0.0, ge=0.0, allow_inf_nan=False,
                                 description="planning wall time of this step (s)")
    solver_status: Literal["optimal", "feasible", "timeout", "infeasible", "heuristic"] = Field(
        default="heuristic", description="MILP status of this step (infeasible: every MILP's bucketed model had no "
                                         "solution)")
    mip_gap: float | None = Field(default=None, ge=0.0, allow_inf_nan=False,
                                  description="mean relative gap of this step's MILPs (bucketed model)")

    @model_validator(mode="after")
    def _check_lengths(self) -> "SPStep":
        bad = next((s for s in self.seqlens if s <= 0), None)
        if bad is not None:
            raise ValueError(f"seqlens: length {bad} is not positive")
        big = next((s for s in self.seqlens if s > MAX_PLAN_CONTEXT), None)
        if big is not None:
            raise ValueError(f"seqlens: length {_short(big)} is more than {MAX_PLAN_CONTEXT:,} tokens")
        return self


#: what an SP plan's model name may be (1-200 characters)
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+/:@-]*$"

#: the runtime's tiny GPT (``runtime.sp_model_spec.MODEL_NAME``, kept equal by a test: the planner never imports
#: the runtime, DESIGN.md)
RUNTIME_MODEL_NAME = "tiny-gpt"


class SPModelShape(BaseModel):
    """The sizes of a model the plan was made for (:class:`~.costmodel.ModelShape` as JSON)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    hidden: int = Field(ge=1)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    vocab: int = Field(ge=1)
    act_bytes_per_token: float = Field(gt=0.0, allow_inf_nan=False)
    zero_stage: int = Field(ge=0, le=3)
    state_bytes_per_param: int = Field(ge=1)


def known_models() -> list[str]:
    """Model names an SP plan may give without a model_shape: the planner's presets and the runtime's tiny GPT."""
    from .costmodel import MODEL_PRESETS

    return [*MODEL_PRESETS, RUNTIME_MODEL_NAME]


#: the baselines an SP plan's steps record (planner.flexsp.planner.plan_step)
SP_BASELINES = ("static", "best_homogeneous", "greedy")


class SPPlan(Plan):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())  # (model_shape: pydantic < 2.10 warned)
    kind: Literal["sp"] = "sp"
    world_size: int = Field(ge=1, le=MAX_WORLD, description="GPUs (a power of two)")
    model: str = Field(min_length=1, max_length=200, pattern=MODEL_NAME_PATTERN,
                       description="the model planned for: a planner preset (gpt-7b, gpt-13b, gpt-30b), the "
                                   "runtime's tiny GPT ('tiny-gpt'), or any other name whose sizes model_shape "
                                   "lists (the library's plan_sp given its own ModelShape); another name is refused")
    model_shape: SPModelShape | None = Field(default=None, description="sizes of a model that is not a preset "
                                                                        "(or a preset changed); None for a preset")
    max_context: int | None = Field(default=None, ge=1, le=MAX_PLAN_CONTEXT,
                                    description="lengths were clipped to this many tokens (None: not clipped)")
    cost_model_source: str = Field(default="", description="where the cost model's terms come from, including "
                                                          "any two-level collective estimate (older plans: empty)")
    steps: list[SPStep]

    @model_validator(mode="after")
    def _check_model(self) -> "SPPlan":
        if self.model_shape is None and self.model not in known_models():
            raise ValueError(f"model: unknown model {self.model!r} (known: {', '.join(known_models())}; a plan for "
                             f"another model lists its sizes in model_shape)")
        if self.model_shape is not None and self.model_shape.name != self.model:
            raise ValueError(f"model_shape.name: {self.model_shape.name!r} is not the plan's model {self.model!r}")
        return self

    @model_validator(mode="after")
    def _check_world(self) -> "SPPlan":
        if self.world_size & (self.world_size - 1):
            raise ValueError(f"world_size: {self.world_size} is not a power of two (Ulysses groups are buddy-aligned "
                             "powers of two)")
        for st in self.steps:
            for mi, mb in enumerate(st.micro_batches):
                used: set[int] = set()
                for g in mb.groups:
                    for r in g.ranks:
                        if r < 0 or r >= self.world_size:
                            raise ValueError(f"steps.{st.step}.micro_batches.{mi}: rank {r} outside world size "
                                             f"{self.world_size}")
                        if r in used:
                            raise ValueError(f"steps.{st.step}.micro_batches.{mi}: rank {r} in two groups")
                        used.add(r)
        return self

    def verify(self) -> list[str]:
        """What any run of the plan needs, world-size aside (``launch/train_sp.check_plan`` adds the run's world):
        per step, every group's ranks an aligned power-of-two range of ``world_size``, every sequence of the global
        batch in exactly one group with the step's length for it."""
        if not self.steps:
            return ["steps: the plan has no steps"]
        # an older plan (no objective/bound) recorded the bucketed MILPs' mean gap next to status "optimal" (every
        # step at its lower bound): not a claim the base check can judge
        old = self.solver.objective is None and self.solver.bound is None
        errors = [] if old else super().verify()
        bad_ids = False
        for si, st in enumerate(self.steps):
            n = len(st.seqlens)
            if n == 0:  # (the trainer failed with "max() arg is an empty sequence")
                errors.append(f"steps.{si}.seqlens: empty (a step trains at least one sequence)")
                bad_ids = True  # (the cost-model checks below look its groups' ids up: an IndexError, a traceback)
                continue
            seen: dict[int, str] = {}
            for mi, mb in enumerate(st.micro_batches):
                for gi, g in enumerate(mb.groups):
                    loc = f"steps.{si}.micro_batches.{mi}.groups.{gi}"
                    lo = min(g.ranks)
                    if sorted(g.ranks) == list(range(lo, lo + g.degree)) and not lo % g.degree \
                            and g.ranks != sorted(g.ranks):  # (it said "not an aligned range" of [1, 0])
                        errors.append(f"{loc}.ranks: {g.ranks} must be listed in ascending order")
                    elif g.ranks != list(range(lo, lo + g.degree)) or lo % g.degree:
                        errors.append(f"{loc}.ranks: {g.ranks} is not an aligned power-of-two rank range of world "
                                      f"size {self.world_size}")
                    for sid, slen in zip(g.seq_ids, g.seqlens):
                        if not 0 <= sid < n:
                            errors.append(f"{loc}.seq_ids: {sid} outside the step's {n} sequences")
                            bad_ids = True
                            continue
                        if st.seqlens[sid] != slen:
                            errors.append(f"{loc}.seqlens: sequence {sid} has length {slen} here but "
                                          f"{st.seqlens[sid]} in steps.{si}.seqlens")
                        if sid in seen:
                            errors.append(f"{loc}.seq_ids: sequence {sid} already runs in {seen[sid]}")
                        seen[sid] = loc
            missing = sorted(set(range(n)) - set(seen))
            if missing:
                errors.append(f"steps.{si}: sequences {missing[:8]} are in no group (the loss is over the whole "
                              "global batch)")
            # (plan_sp clips to max_context since 2026-12-02: the library's earlier plans recorded it unclipped)
            if (self.max_context is not None and max(st.seqlens) > self.max_context
                    and not self.made_before("2026-12-02T02:06:00+00:00")):
                errors.append(f"steps.{si}.seqlens: a length of {max(st.seqlens):,} tokens, but the plan's lengths "
                              f"were clipped to max_context {self.max_context:,}")
        first: dict[int, int] = {}
        for si, st in enumerate(self.steps):  # plan.simulate(number) looks a step up by its number (train_sp runs
            # the steps in file order, printing each one's number)
            if st.step in first:
                errors.append(f"steps.{si}.step: {st.step} is also steps.{first[st.step]}'s number")
            first.setdefault(st.step, si)
        if bad_ids:  # the checks below index the step's lengths by these ids (an id past the end was an IndexError
            return errors  # traceback from show and simulate)
        errors += self._time_errors()
        cm = self._builtin_cost_model()
        if cm is not None and cm.token_capacity(cm.world) <= 0:  # (the bounds below divided by it: a
            # ZeroDivisionError traceback from show, simulate and train_sp's pre-check)
            return errors + [f"model {self.model!r}: its states alone need {cm.memory_needed(0.0, cm.world) / 2**30:,.2f} "
                             f"GiB per GPU on all {cm.world} GPUs, more than profile {self.profile.name!r}'s "
                             f"{cm.memory_bytes / 2**30:,.2f} GiB: no sequence fits"]
        if cm is not None:
            errors += self._cost_model_errors(cm)
        errors += self._baseline_errors()
        if not old:
            errors += self._solver_errors()
        if cm is not None:
            errors += self._derived_errors(cm, check_bound=not old)
        return errors

    def _baseline_errors(self) -> list[str]:
        """Each step's baselines are the planner's, and its two search baselines (the best single degree per
        micro-batch, the greedy heuristic) no faster than the step's plan: the plan is the best of its candidates
        (a halved best_homogeneous showed the plan 0.82x of it)."""
        errors = []
        for si, st in enumerate(self.steps):
            for name in sorted(set(st.baselines_ms) - set(SP_BASELINES)):
                errors.append(f"steps.{si}.baselines_ms.{name}: not a baseline the planner computes "
                              f"({', '.join(SP_BASELINES)})")
            for name in ("best_homogeneous", "greedy"):
                have = st.baselines_ms.get(name)
                if have is not None and have < st.predicted_ms - 2e-6 * (len(st.micro_batches) + 1):
                    errors.append(f"steps.{si}.baselines_ms.{name}: {have} ms, faster than the step's plan "
                                  f"({st.predicted_ms} ms), which is the best of its candidates")
        return errors

    def _solver_errors(self) -> list[str]:
        """The solver record as :func:`~.api.to_plan` writes it: the objective is the predicted time, the bound at
        most that, the gap theirs (0 at status "optimal"), the status "feasible" exactly when some step's MILP found
        a solution (short of every step at its bound: "optimal"), and a step's "optimal" with a closed gap. Edited
        records were shown as written ("optimal, gap 0.00%" over a plan 1.3 % above its bound)."""
        from ..plan import OPTIMAL_GAP_TOL, relative_gap

        s, errors = self.solver, []
        tol = 2e-6 * (len(self.steps) + 1)
        if s.objective is None or not math.isclose(s.objective, self.predicted_ms, rel_tol=1e-9, abs_tol=tol):
            errors.append(f"solver.objective: {s.objective}, but the plan's predicted time is {self.predicted_ms} ms")
        if s.bound is None or s.bound > self.predicted_ms + tol:
            errors.append(f"solver.bound: {s.bound}, but a lower bound is at most the plan's {self.predicted_ms} ms")
        elif s.status == "optimal" and s.gap not in (None, 0.0):
            errors.append(f"solver.gap: {s.gap} with status 'optimal' (every step at its lower bound: gap 0)")
        elif s.status != "optimal":
            want = relative_gap(s.objective, s.bound)
            if s.gap is None or want is None or not math.isclose(s.gap, want, rel_tol=1e-6,
                                                                  abs_tol=2 * tol / max(abs(s.objective), 1e-9)):
                errors.append(f"solver.gap: {s.gap}, objective {s.objective} and bound {s.bound} give {want}")
        solved = any(st.solver_status in ("optimal", "feasible") for st in self.steps)
        if s.status != "optimal" and s.status != ("feasible" if solved else "heuristic"):
            errors.append(f"solver.status: {s.status!r}, but " + (
                "a step's MILP found a solution (then 'feasible')" if solved else
                "no step's MILP found a solution (then 'heuristic')"))
        for si, st in enumerate(self.steps):
            if st.solver_status == "optimal" and st.mip_gap is not None and st.mip_gap > OPTIMAL_GAP_TOL:
                errors.append(f"steps.{si}.mip_gap: {st.mip_gap} with solver_status 'optimal' (an optimal MILP "
                              f"closes its gap to {OPTIMAL_GAP_TOL:g})")
        return errors

    def _builtin_cost_model(self):
        """The cost model this plan was made with, when it can be rebuilt here: a built-in profile whose digest is
        the recorded one and a preset model (or the recorded model_shape); else None (a profile file, or one made
        elsewhere: nothing to rebuild it from)."""
        from adasched.planner.plan import builtin_profile_of
        from adasched.profiler.io import InputError

        from .costmodel import MODEL_PRESETS, ModelShape, sp_cost_model

        prof = builtin_profile_of(self.profile)
        if prof is None:
            return None
        if self.model_shape is not None:
            shape = ModelShape(**self.model_shape.model_dump())
        elif self.model in MODEL_PRESETS:
            shape = MODEL_PRESETS[self.model]
        else:
            return None
        try:
            return sp_cost_model(prof, shape, self.world_size)
        except InputError:
            return None

    def _derived_errors(self, cm, check_bound: bool = True) -> list[str]:
        """Against the rebuilt cost model ``cm``: each step's best_homogeneous at most one degree per micro-batch of
        the plan's own micro-batches, and (``check_bound``: a record that keeps one; older plans did not) the
        solver's bound the sum of the steps' lower bounds, every step at its bound under status "optimal"."""
        from .baselines import best_homogeneous
        from .planner import step_lower_bound

        errors: list[str] = []
        bounds = []
        for si, st in enumerate(self.steps):
            bounds.append(step_lower_bound(np.array(st.seqlens, dtype=np.int64), cm))
            if check_bound and self.solver.status == "optimal" and st.predicted_ms > bounds[-1] * (1 + 1e-9) + 2e-6:
                errors.append(f"steps.{si}.predicted_ms: {st.predicted_ms} ms, above the step's lower bound "
                              f"{round(bounds[-1], 6)} ms, under solver status 'optimal' (every step at its bound)")
            have = st.baselines_ms.get("best_homogeneous")
            # at most the best single degree of each of the plan's own micro-batches (a candidate since 2026-12-01
            # 05:38 UTC: before, the sorted splits' only)
            if have is not None and not self.made_before("2026-12-01T05:39:00+00:00"):
                own = 0.0
                for mb in st.micro_batches:
                    ids = np.array(sorted(i for g in mb.groups for i in g.seq_ids), dtype=np.int64)
                    h, _ = best_homogeneous(ids, np.array(st.seqlens, dtype=np.int64), cm)
                    own += h.time_ms if h is not None and h.fits else math.inf
                if have > own + 2e-6 * (len(st.micro_batches) + 1):
                    errors.append(f"steps.{si}.baselines_ms.best_homogeneous: {have} ms, but one degree per "
                                  f"micro-batch runs the plan's own micro-batches in {round(own, 6)} ms")
        bound = self.solver.bound
        if check_bound and bound is not None and not math.isclose(bound, sum(bounds), rel_tol=1e-9,
                                                                  abs_tol=2e-6 * (len(self.steps) + 1)):
            errors.append(f"solver.bound: {bound} ms, but profile {self.profile.name!r}'s cost model bounds the "
                          f"steps' sequences at {round(sum(bounds), 6)} ms")
        return errors

    def _cost_model_errors(self, cm) -> list[str]:
        """Against the cost model the plan names, rebuilt (``cm``, a built-in profile): every group's predicted_ms
        is its cost-model time (to the recorded 1e-6 ms) and its sequences fit a GPU's memory. A hand-edited plan
        that ran every sequence on one rank (or kept a group's time and moved its sequences) passed `show` and
        reached the trainer."""
        errors: list[str] = []
        for si, st in enumerate(self.steps):
            for mi, mb in enumerate(st.micro_batches):
                for gi, g in enumerate(mb.groups):
                    loc = f"steps.{si}.micro_batches.{mi}.groups.{gi}"
                    if not cm.fits(g.degree, g.seqlens):
                        errors.append(f"{loc}: {sum(g.seqlens):,} tokens on {g.degree} GPUs need "
                                      f"{cm.group_memory(g.degree, g.seqlens) / 2**30:,.2f} GiB per GPU, more than "
                                      f"profile {self.profile.name!r}'s {cm.memory_bytes / 2**30:,.2f} GiB")
                    want = cm.group_time(g.degree, g.seqlens)
                    if not math.isclose(g.predicted_ms, want, rel_tol=1e-9, abs_tol=2e-6):
                        errors.append(f"{loc}.predicted_ms: {g.predicted_ms} ms, but profile {self.profile.name!r}'s "
                                      f"cost model gives {round(want, 6)} ms for these sequences on {g.degree} GPUs")
            # the static baseline (every micro-batch one group of all GPUs, best-fit decreasing) follows from the
            # step's sequences alone: a halved one showed the plan slower than its baseline, and an edited
            # world_size kept the old figure (static on 8 GPUs is 2.4x faster than the 4-GPU plan it stood beside)
            have = st.baselines_ms.get("static")
            if have is not None:
                from .baselines import static_sp

                lens = np.array([x for mb in st.micro_batches for g in mb.groups for x in g.seqlens], dtype=np.int64)
                try:
                    want = sum(sol.time_ms for sol in static_sp(lens, cm, fewer_bins=not self.made_before(
                        STATIC_FEWER_BINS_SINCE)))
                except ValueError as err:  # (a sequence no all-GPU group holds: named above, per group, too)
                    errors.append(f"steps.{si}.baselines_ms.static: {err}")
                    continue
                if not math.isclose(have, want, rel_tol=1e-9, abs_tol=2e-6):
                    errors.append(f"steps.{si}.baselines_ms.static: {have} ms, but profile {self.profile.name!r}'s "
                                  f"cost model gives {round(want, 6)} ms for the step's sequences on "
                                  f"{self.world_size} GPUs")
        return errors

    def _time_errors(self) -> list[str]:
        """The predicted times add up as the planner computed them (each rounded to 1e-6 ms): a micro-batch takes
        its slowest group, a step the sum of its micro-batches, the plan (and each baseline) the sum of its
        steps. A hand-edited time showed in `show` and the trainers' reports as the plan's own."""
        errors: list[str] = []

        def off(value: float, total: float, terms: int) -> bool:
            return not math.isclose(value, total, rel_tol=1e-9, abs_tol=1e-6 * (terms + 1))

        for si, st in enumerate(self.steps):
            for mi, mb in enumerate(st.micro_batches):
                slowest = max((g.predicted_ms for g in mb.groups), default=0.0)
                if off(mb.predicted_ms, slowest, 1):
                    errors.append(f"steps.{si}.micro_batches.{mi}.predicted_ms: {mb.predicted_ms} ms, its slowest "
                                  f"group takes {slowest} ms")
            total = sum(mb.predicted_ms for mb in st.micro_batches)
            if off(st.predicted_ms, total, len(st.micro_batches)):
                errors.append(f"steps.{si}.predicted_ms: {st.predicted_ms} ms, its micro-batches add up to {total} ms")
        total = sum(st.predicted_ms for st in self.steps)
        if off(self.predicted_ms, total, len(self.steps)):
            errors.append(f"predicted_ms: {self.predicted_ms} ms, the steps add up to {total} ms")
        for name, ms in self.baselines_ms.items():
            total = sum(st.baselines_ms.get(name, math.inf) for st in self.steps)
            if off(ms, total, len(self.steps)):
                errors.append(f"baselines_ms.{name}: {ms} ms, the steps' {name} add up to {total} ms")
        return errors

    # ---- presentation -----------------------------------------------------------------------------
    def summary_rows(self) -> list[tuple[str, str]]:
        rows = super().summary_rows()
        rows.insert(1, ("model / GPUs", f"{self.model} on {self.world_size} GPUs"))
        if self.cost_model_source:
            rows.insert(2, ("cost model", self.cost_model_source))
        if self._builtin_cost_model() is None:  # (show said nothing, and an edited digest skipped every check)
            rows.insert(2, ("not re-checked", f"group times, memory and the static baseline: profile "
                                              f"{self.profile.name if self.profile else None!r} is not a built-in "
                                              f"profile with the plan's digest (or the model's shape is not "
                                              f"recorded), so its cost model cannot be rebuilt here"))
        for st in self.steps:
            degs: dict[int, int] = {}
            for mb in st.micro_batches:
                for g in mb.groups:
                    degs[g.degree] = degs.get(g.degree, 0) + 1
            mix = " ".join(f"{d}x{n}" for d, n in sorted(degs.items(), reverse=True))
            base = ", ".join(f"{k} {v / st.predicted_ms:.2f}x" for k, v in st.baselines_ms.items()
                             if st.predicted_ms > 0 and v == v and v != float("inf"))
            rows.append((f"step {st.step}", f"{len(st.seqlens)} seqs, {len(st.micro_batches)} micro-batches, "
                                            f"{st.predicted_ms:.1f} ms; groups (degree x count) {mix}; "
                                            f"baselines/plan: {base}"))
        return rows

    def gantt_tasks(self, step: int = 0) -> list:
        """The step's groups per rank on a timeline (simulated; micro-batches end with a barrier)."""
        return self.simulate(step).tasks

    def simulate(self, step: int = 0):
        """Discrete-event simulation of one step: each group runs its predicted time on every rank it owns;
        a zero-length barrier over all ranks separates micro-batches (gradient accumulation boundary)."""
        from adasched.planner.simulator import Task, simulate

        st = next((s for s in self.steps if s.step == step), None)
        if st is None:
            raise ValueError(f"plan has no step {step} (steps: {[s.step for s in self.steps]})")
        tasks: list[Task] = []
        prev: dict[int, str] = {}
        for mi, mb in enumerate(st.micro_batches):
            for gi, g in enumerate(mb.groups):
                for r in g.ranks:
                    name = f"mb{mi}.g{gi}.r{r}"
                    tasks.append(Task(name, r, "compute", g.predicted_ms, deps=(prev[r],) if r in prev else (),
                                      category=f"SP={g.degree}"))
                    prev[r] = name
            for r in range(self.world_size):
                name = f"mb{mi}.barrier.r{r}"
                tasks.append(Task(name, r, "compute", 0.0, deps=(prev[r],) if r in prev else (),
                                  sync=f"mb{mi}.barrier", category="barrier"))
                prev[r] = name
        return simulate(tasks)

    def plot(self, path, step: int | None = None) -> None:
        """Draw step ``step`` (its number in the plan; default: the first step, whatever it is numbered - a plan
        numbered from 5 failed with "no step 0")."""
        from adasched.planner.gantt import render_gantt

        step = self.steps[0].step if step is None else step
        tasks = [t for t in self.gantt_tasks(step) if t.category != "barrier"]
        st = next(s for s in self.steps if s.step == step)
        render_gantt(tasks, path, title=f"FlexSP step {step}: {st.predicted_ms:.0f} ms, "
                                        f"{len(st.micro_batches)} micro-batches, {self.world_size} GPUs",
                     lane_of=lambda t: f"rank {t.rank}",
                     label_of=lambda t: f"{t.name.split('.')[0]} {t.name.split('.')[1]} {t.category}")
