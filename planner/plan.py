"""Typed, versioned plans. Every plan kind subclasses :class:`Plan` and shares one header:
schema_version, kind, the inputs' digest, the profile it was made for, the solver record, its predicted
cost and the predicted costs of the baselines it was compared against (so `adasched show` can say why).

Plan kinds register in :data:`PLAN_KINDS` (kind -> "module:Class") so `load_plan` can read any of them
without importing every planner.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
from datetime import datetime, timezone
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adasched.profiler.io import (InputError, atomic_write_json, check_iso_time, load_model, parse_iso_time,
                                  read_json)

__all__ = [
    "PLAN_SCHEMA_VERSION",
    "MAX_LAYERS",
    "SolverStatus",
    "SolverRecord",
    "ProfileRef",
    "Plan",
    "NonNegMs",
    "PLAN_KINDS",
    "inputs_digest",
    "load_plan",
    "save_plan",
]

PLAN_SCHEMA_VERSION = 1
#: Most transformer layers (or pipeline stages) a plan, a jobs file, a MoE config or a launcher's ``--layers`` takes:
#: a bound on the time to plan and build them (10**400 overflowed the cost models, 10**9 hung the planners)
MAX_LAYERS = 1024
#: a plan's solver status (DESIGN.md): a plan exists only where something was found - an infeasible or timed-out
#: solve is a step inside a planner (adasched.planner.solver.Status), never the status of a plan it writes
SolverStatus = Literal["optimal", "feasible", "heuristic"]

#: kind -> "module:Class"; each planner's plan.py defines its class, listed here once.
PLAN_KINDS: dict[str, str] = {
    "sp": "adasched.planner.flexsp.plan:SPPlan",
    "moe": "adasched.planner.fsmoe.plan:MoEPlan",
    "lora": "adasched.planner.lorafusion.plan:LoRAPlan",
    "twill": "adasched.planner.twill.plan:TwillPlan",
}


OPTIMAL_GAP_TOL = 1e-4
"""The largest relative gap a plan whose solver status is "optimal" may record (the solvers run at a MIP gap of
1e-6 by default: SolveParams.mip_gap)."""


#: a finite, non-negative number (ms, counts): what plan fields that hold times accept (NaN passed the
#: "v < 0" checks of verify and reached the runtime: min(1.0, nan) is 1.0)
NonNegMs = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]

class SolverRecord(BaseModel):
    """What solved the plan and how honest its optimality claim is."""

    model_config = ConfigDict(extra="forbid")
    # (a plan with solve_seconds Infinity, time_limit -1 or NaN, threads -3 loaded and was shown as such)
    backend: str = Field(min_length=1, description="e.g. 'pulp-cbc', 'ortools-cp-sat', 'heuristic'")
    status: SolverStatus
    gap: float | None = Field(default=None, ge=0.0, allow_inf_nan=False,
                              description="relative MIP gap (objective - bound)/objective")
    objective: float | None = Field(default=None, allow_inf_nan=False)
    bound: float | None = Field(default=None, allow_inf_nan=False)
    solve_seconds: float = Field(ge=0.0, allow_inf_nan=False)
    time_limit: float | None = Field(default=None, gt=0.0, allow_inf_nan=False, description="seconds")
    seed: int | None = Field(default=None, ge=0)
    threads: int | None = Field(default=None, ge=1)
    note: str | None = None


class ProfileRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    digest: str
    source: str = ""


class Plan(BaseModel):
    """Common header; subclasses set ``kind`` to a Literal and add their body fields."""

    model_config = ConfigDict(extra="forbid")
    SCHEMA_VERSION: ClassVar[int] = PLAN_SCHEMA_VERSION

    schema_version: Literal[1] = PLAN_SCHEMA_VERSION
    kind: str
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    inputs_digest: str = Field(description="sha256 of the canonical JSON of the inputs the plan was made from")
    profile: ProfileRef | None = None
    solver: SolverRecord
    predicted_ms: float = Field(ge=0.0, allow_inf_nan=False,
                                description="predicted cost of this plan (ms; per step where the plan has steps)")
    baselines_ms: dict[str, NonNegMs] = Field(
        default_factory=dict, description="predicted cost of each baseline (ms)")

    @field_validator("created")
    @classmethod
    def _iso_time(cls, v: str) -> str:
        return check_iso_time(v)

    def made_before(self, when: str) -> bool:
        """Whether the plan was written (``created``) before ``when`` (ISO 8601): checks of what a planner change
        introduced hold the plans written since, and plan files of earlier planners keep loading. A ``created``
        without a time zone is taken as UTC."""
        def utc(v: str) -> datetime:
            t = parse_iso_time(v)
            return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)

        return utc(self.created) < utc(when)

    # ---- presentation hooks, overridden per kind ------------------------------------------------
    def summary_rows(self) -> list[tuple[str, str]]:
        """(label, value) rows for `adasched show`; subclasses extend."""
        rows = [
            ("kind", self.kind),
            ("solver", f"{self.solver.backend} ({self.solver.status}"
             + (f", gap {self.solver.gap:.2%}" if self.solver.gap is not None else "") + ")"),
            ("solve time", f"{self.solver.solve_seconds:.3f} s"
             + (f" (limit {self.solver.time_limit:g} s)" if self.solver.time_limit else "")),
            ("predicted", f"{_ms(self.predicted_ms)} ms"),
        ]
        for name, ms in self.baselines_ms.items():
            # (a plan predicted at 0 ms, rounded: no ratio, not 'nanx')
            ratio = f" ({ms / self.predicted_ms:.2f}x of plan)" if self.predicted_ms > 0 else ""
            rows.append((f"baseline {name}", f"{_ms(ms)} ms{ratio}"))
        if self.profile:
            rows.append(("profile", self.profile.name))
        return rows

    def plot(self, path: str | os.PathLike) -> None:
        """Draw the plan (default: a Gantt chart of `gantt_tasks`)."""
        from .gantt import render_gantt

        tasks = self.gantt_tasks()
        if not tasks:
            raise InputError(path, f"plan kind {self.kind!r} has nothing to draw")
        render_gantt(tasks, path, title=f"{self.kind} plan: predicted {self.predicted_ms:,.2f} ms")

    def verify(self) -> list[str]:
        """Rules the plan's content must satisfy beyond its field types (what the planner's own verifier checked
        when it wrote the plan), one message per violation; ``load_plan`` refuses a plan with any. Subclasses
        extend it (``errors = super().verify()``); the base checks the solver record's claim: a status
        "optimal" with a gap (given, or between objective and bound) above ``OPTIMAL_GAP_TOL`` is refused - an
        optimal solve closes its gap, and one that did not is "feasible"."""
        s = self.solver
        errors: list[str] = []
        if s.status == "optimal":
            for what, gap in (("gap", s.gap), ("objective/bound", relative_gap(s.objective, s.bound))):
                if gap is not None and gap > OPTIMAL_GAP_TOL:
                    errors.append(f"solver.{what}: a relative gap of {gap:.3g} with status 'optimal' (an optimal "
                                  f"solve closes its gap to {OPTIMAL_GAP_TOL:g}; one that did not is 'feasible')")
                    break
        return errors

    def gantt_tasks(self) -> list:
        """Scheduled tasks (adasched.planner.simulator.ScheduledTask) to draw; subclasses override."""
        return []


def _ms(v: float) -> str:
    """Milliseconds for `show`: 3 decimals, or 4 significant digits below 1 ms (a Twill iteration's 0.00056 ms and
    its baseline's 0.00084 ms both read "0.001", next to "1.50x")."""
    return f"{v:.3f}" if v >= 1 or v == 0 else f"{v:.4g}"


def relative_gap(objective: float | None, bound: float | None) -> float | None:
    """|objective - bound| / |objective| (None when either is missing or not finite)."""
    if objective is None or bound is None or not (math.isfinite(objective) and math.isfinite(bound)):
        return None
    denom = max(abs(objective), 1e-9)
    return max(0.0, abs(objective - bound) / denom)


def inputs_digest(*parts: Any) -> str:
    """sha256 over the canonical JSON of the given inputs (pydantic models, dicts, lists, numbers)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, BaseModel):
            p = p.model_dump(mode="json")
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def profile_ref(profile) -> ProfileRef:
    return ProfileRef(name=profile.name, digest=inputs_digest(profile), source=profile.source)


def builtin_profile_of(ref: ProfileRef | None):
    """The built-in profile a plan's ``ref`` names, when its digest is the recorded one (the profile that made the
    plan); else None (no profile recorded, a file's name, or another profile under a built-in's name)."""
    from adasched.profiler.builtins import BUILTIN_PROFILES, builtin_profile

    if ref is None or ref.name not in BUILTIN_PROFILES:
        return None
    prof = builtin_profile(ref.name)
    return prof if profile_ref(prof).digest == ref.digest else None


def plan_class(kind: str) -> type[Plan]:
    if kind not in PLAN_KINDS:
        raise InputError("kind", f"unknown plan kind {kind!r} (known: {', '.join(sorted(PLAN_KINDS))})")
    mod, cls = PLAN_KINDS[kind].split(":")
    return getattr(importlib.import_module(mod), cls)


def load_plan(path: str | os.PathLike, expect: type[Plan] | None = None) -> Plan:
    """Read and validate any plan file (its `kind` picks the model), or a specific kind with `expect`."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(path, f"expected a JSON object, got {type(data).__name__}")
    if "schema_version" not in data:
        raise InputError(path, "schema_version: missing (not an adasched plan?)")
    if type(data["schema_version"]) is not int or data["schema_version"] != PLAN_SCHEMA_VERSION:
        raise InputError(path, f"schema_version {data['schema_version']!r} is not supported (expected {PLAN_SCHEMA_VERSION})")
    kind = data.get("kind")
    if not isinstance(kind, str):
        raise InputError(path, "kind: missing or not a string")
    if kind not in PLAN_KINDS and (expect is None or kind != expect.model_fields["kind"].default):
        what = {"cluster_profile": "a cluster profile (adasched profile; `adasched show` reads it)",
                "refined_lr_schedule": "a refined LR schedule (adasched schedules refine)"}.get(kind)
        want = f"a plan of kind {expect.model_fields['kind'].default!r}" if expect is not None else "a plan"
        if what is not None:
            raise InputError(path, f"kind: is {what}, not {want}")
    if expect is not None:  # the caller knows the class: no registry lookup (works for unregistered kinds too)
        want = expect.model_fields["kind"].default
        if kind != want:
            raise InputError(path, f"kind: is a {kind!r} plan, expected {want!r}")
        cls = expect
    else:
        try:
            cls = plan_class(kind)
        except InputError:
            raise InputError(path, f"kind: unknown plan kind {kind!r} (known: {', '.join(sorted(PLAN_KINDS))})") from None
    plan = load_model(path, cls, data=data)
    errors = plan.verify()
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InputError(path, f"fails verification: {errors[0]}{more}")
    return plan


def save_plan(plan: Plan, path: str | os.PathLike) -> None:
    atomic_write_json(path, plan)
