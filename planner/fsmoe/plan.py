"""MoE plan: per configuration the chosen pipeline degrees (forward/backward), where the backward computes the
expert weight gradients, predicted layer times, the baselines' times and the gradient all-reduce slices. The
runtime reads r_fwd, r_bwd, order_fwd, order_bwd, wgrad_bwd and grad_slices (``runtime.moe.load_pipeline``)."""
from __future__ import annotations

import math

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from adasched.profiler.io import InputError

from ..plan import NonNegMs, Plan

__all__ = ["MoELayerPlan", "MoEConfigPlan", "MoEPlan", "StageCostsRecord"]


#: most chunks per MoE layer a plan or `train_moe --r-fwd/--r-bwd` takes (the planner chooses at most
#: model.R_MAX = 64; every chunk issues its own all-to-alls, even empty: r = 10**5 ran for minutes)
MAX_CHUNKS = 256


class MoELayerPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: int = Field(ge=0)
    mean_k: NonNegMs
    r_fwd: int = Field(ge=1, le=MAX_CHUNKS)
    r_bwd: int = Field(ge=1, le=MAX_CHUNKS)
    order_fwd: Literal["dispatch-first", "interleaved"]
    order_bwd: Literal["dispatch-first", "interleaved"]
    wgrad_bwd: Literal["fused", "per-chunk", "deferred"] = Field(
        default="fused", description="where the backward weight-gradient GEMMs run: with dX (fused), right after "
                                     "their chunk's dX, or after the last dX (see planner.fsmoe.model)")
    fwd_ms: NonNegMs
    bwd_ms: NonNegMs
    bwd_fused_wgrad_ms: NonNegMs | None = Field(default=None, description="best backward with wgrad fused (any r): "
                                                                      "what the degree choice alone gives")
    bwd_fastest_ms: NonNegMs | None = Field(default=None, description="the layer's fastest backward (any r, order, "
                                                                   "wgrad); bwd_ms is longer where a slower backward "
                                                                   "leaves the gradient all-reduces more idle link "
                                                                   "and shortens the iteration; older plans: None")
    bwd_link_idle_ms: NonNegMs | None = Field(default=None, description="idle time of the link the gradient "
                                                                     "all-reduces share during this backward (their "
                                                                     "room in it); older plans: None")
    case_fwd: str = Field(description="the forward's busiest resource at the chosen r: a2a-bound (T_A), "
                                      "compute-bound (T_B) or intra-node-bound (all-gather / reduce-scatter, or a "
                                      "two-step exchange's intra-node all-to-all)")
    time_by_r_fwd: dict[str, NonNegMs]
    time_by_r_bwd: dict[str, NonNegMs]


class StageCostsRecord(BaseModel):
    """Layer 0's forward stage costs as the planner priced them (``planner.fsmoe.costmodel.StageCosts``): what
    ``adasched simulate``/``show --plot`` re-simulate, whatever profile made the plan."""
    model_config = ConfigDict(extra="forbid")
    alpha: list[NonNegMs] = Field(min_length=5, max_length=5, description="ms per chunk of the five stages")
    work: list[NonNegMs] = Field(min_length=5, max_length=5, description="ms of each stage's whole workload")
    shared: list[NonNegMs] = Field(default_factory=lambda: [0.0, 0.0], min_length=2, max_length=2,
                                description="(alpha, work) ms of the shared experts")
    dw: list[NonNegMs] | None = Field(default=None, min_length=2, max_length=2,
                                   description="(alpha, work) of the backward's weight-gradient part, if measured")
    two_step: bool = False
    source: str = ""

    @classmethod
    def of(cls, c) -> "StageCostsRecord":
        return cls(alpha=list(c.alpha), work=list(c.work), shared=list(c.shared),
                   dw=None if c.dw is None else list(c.dw), two_step=c.two_step, source=c.source)

    def costs(self):
        from .costmodel import StageCosts

        return StageCosts(tuple(self.alpha), tuple(self.work), self.source,  # type: ignore[arg-type]
                          shared=(self.shared[0], self.shared[1]),
                          dw=None if self.dw is None else (self.dw[0], self.dw[1]), two_step=self.two_step)


class MoEConfigPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    config: dict
    ep_size: int = Field(ge=1)
    hierarchical: bool = Field(description="FSMoE's layout: EP over nodes, each expert sharded over a node's GPUs "
                                           "(all-gather/reduce-scatter inside the node); the runtime builds it with "
                                           "train_moe --expert-shards G (G = gpus_per_node)")
    two_step_a2a: bool = Field(default=False, description="whole experts per GPU, each exchange an intra-node then "
                                                          "an inter-node all-to-all (train_moe --hierarchical); "
                                                          "older plans: False")
    gpus_per_node: int | None = Field(default=None, ge=1, description="the cluster's node size the layout was "
                                                                       "costed with (the profile's, at most gpus; "
                                                                       "older plans: None)")
    exchange_gpus_per_node: int | None = Field(default=None, ge=1, description="two-step: ranks of an EP group per "
                                                                               "node, min(gpus_per_node, ep_size) "
                                                                               "(train_moe: min(--gpus-per-node, "
                                                                               "--ep-size), G = plan moe "
                                                                               "--gpus-per-node); None otherwise")
    expert_copies: int = Field(default=1, ge=1, description="copies of each expert in the data-parallel world "
                                                            "(gpus / ep_size for flat EP; older plans: 1)")
    expert_grad_allreduce_ms: float = Field(default=0.0, ge=0.0, allow_inf_nan=False, description="all-reduce of the expert gradients "
                                            "over their copies, the runtime's buckets summed (0 with one copy)")
    expert_grad_exposed_ms: float | None = Field(default=None, ge=0.0, allow_inf_nan=False, description="the part of it not hidden in the "
                                                 "backward (in iteration_ms); older plans: None = all of it")
    a2a_ms: NonNegMs = Field(description="one un-chunked forward all-to-all (ms)")
    layers: list[MoELayerPlan] = Field(min_length=1)
    fwd_bwd_ms: NonNegMs = Field(description="one MoE layer fwd+bwd with the chosen r (layer 0)")
    baselines_fwd_bwd_ms: dict[str, NonNegMs]
    grad_slices: list[NonNegMs] = Field(description="dense-gradient elements all-reduced in each layer's backward gap, "
                                                 "backward order (last layer first)")
    grad_exposed_ms: NonNegMs
    grad_exposed_at_end_ms: NonNegMs = Field(description="all-reduce exposed when it all runs after the backward pass")
    iteration_ms: NonNegMs = Field(description="all layers fwd+bwd incl. dense blocks and the exposed all-reduce")
    iteration_baselines_ms: dict[str, NonNegMs]
    iteration_lower_bound_ms: NonNegMs | None = Field(default=None, description="no choice of the layers' backward "
                                                      "candidates gives a shorter iteration (planning."
                                                      "iteration_lower_bound); older plans: None")
    iteration_fastest_bwd_ms: NonNegMs | None = Field(default=None, description="the iteration with every layer's "
                                                      "fastest backward (the per-layer choice the joint one starts "
                                                      "from; iteration_ms is never longer); older plans: None")
    bwd_choice: str | None = Field(default=None, description="how the backward schedules were chosen with the "
                                                             "slices: 'single' (one candidate per layer), "
                                                             "'nothing-exposed' (the fastest backward in every layer "
                                                             "hides all communication: optimal), "
                                                             "'exhaustive' (every combination) or "
                                                             "'coordinate-descent' (a heuristic); older plans: None")
    slice_solver_status: str
    slice_solver_backend: str = Field(default="exact", description="'exact': the greedy fill met its upper bound; "
                                                                   "'heuristic': expert buckets share the link, the "
                                                                   "better of that fill and one fitted to their "
                                                                   "queue; else the slice MILP's backend (pulp-cbc)")
    stage_source: str
    stage_notes: list[str] = Field(default_factory=list)
    layer0_stage_costs: StageCostsRecord | None = Field(default=None, description="layer 0's forward stage costs "
                                                        "(the backward's are derived from them); older plans: None")


#: plans written since re-price their expert buckets' exposure in verify (the bucket prices last changed then)
EXPERT_EXPOSURE_CHECKED_SINCE = "2026-12-02T03:02:00+00:00"
#: plans written since have layer 0's stored stage costs re-derived from their config in verify (the cost model has
#: not changed since; plans of an earlier one keep their costs)
LAYER0_COSTS_CHECKED_SINCE = "2026-12-03T00:00:00+00:00"
#: plans written since have every layer re-simulated in verify (not only layer 0 and the layers of another mean_k),
#: their idle link time re-derived, and each gradient slice held to its gap (h50)
ALL_LAYERS_CHECKED_SINCE = "2026-12-05T00:00:00+00:00"


def _check_stage_costs(at: str, rec: StageCostsRecord, l0: MoELayerPlan) -> list[str]:
    """Layer 0's stored stage costs give its forward and backward times at the chosen degrees (a plan whose costs
    or degrees were changed by hand would draw and re-simulate another pipeline than the one it reports)."""
    from .model import evaluate_pipeline

    if any(v < 0 for v in (*rec.alpha, *rec.work, *rec.shared, *(rec.dw or ()))):
        return [f"{at}: layer0_stage_costs has a negative cost"]
    try:
        fwd = rec.costs()
        got = (evaluate_pipeline(fwd, l0.r_fwd, l0.order_fwd).time_ms,
               evaluate_pipeline(fwd.backward(), l0.r_bwd, l0.order_bwd, l0.wgrad_bwd).time_ms)
    except ValueError as e:
        return [f"{at}: layer0_stage_costs: {e}"]
    return [f"{at} layer 0: {what} {want} ms, but its stored stage costs give {t} ms at r={r}"
            for what, want, t, r in (("forward", l0.fwd_ms, got[0], l0.r_fwd), ("backward", l0.bwd_ms, got[1], l0.r_bwd))
            if not math.isclose(want, t, rel_tol=1e-9, abs_tol=1e-12)]


def _dense_blocks_ms(c: "MoEConfigPlan", expert_exposed: float) -> float:
    """The dense blocks' share of a configuration's iteration: what its MoE layers and exposed all-reduces (the dense
    gradients', ``expert_exposed`` of the experts') leave of ``iteration_ms``."""
    return c.iteration_ms - sum(lp.fwd_ms + lp.bwd_ms for lp in c.layers) - c.grad_exposed_ms - expert_exposed


def _baseline_errors(at: str, c: "MoEConfigPlan") -> list[str]:
    """Layer 0's baselines (no pipelining, a fixed r = 2) and its un-chunked all-to-all, re-simulated from its stored
    stage costs as the planner simulates them (an edited fixed-r2 baseline showed as a 3.66x speedup where the
    plan's own costs give 1.22x)."""
    from .baselines import BASELINES, baseline_fwd_bwd_ms

    fwd = c.layer0_stage_costs.costs()
    errors = []
    for name, r in BASELINES.items():
        want = sum(baseline_fwd_bwd_ms(fwd, fwd.backward(), r))
        have = c.baselines_fwd_bwd_ms.get(name)
        if have is not None and not math.isclose(have, want, rel_tol=1e-9, abs_tol=1e-12):
            errors.append(f"{at}: baselines_fwd_bwd_ms.{name} {have} ms, but layer 0's stage costs give {want} ms")
    if not math.isclose(c.a2a_ms, fwd.a2a_ms, rel_tol=1e-9, abs_tol=1e-12):
        errors.append(f"{at}: a2a_ms {c.a2a_ms}, but layer 0's stage costs give {fwd.a2a_ms} ms")
    return errors


def _pipeline_tasks(fwd, l0: MoELayerPlan) -> list:
    """Layer ``l0``'s forward then backward pipeline from its forward stage costs ``fwd``, one lane per stream."""
    from .model import evaluate_pipeline
    from ..simulator import ScheduledTask

    f = evaluate_pipeline(fwd, l0.r_fwd, l0.order_fwd).sim.tasks
    b = evaluate_pipeline(fwd.backward(), l0.r_bwd, l0.order_bwd, l0.wgrad_bwd).sim.tasks
    shift = max(t.end_ms for t in f)
    # (zero-length tasks - a flat exchange's intra-node all-gather / reduce-scatter steps - drew empty "intra" lanes of
    # hairlines and legend entries for collectives the layout does not run)
    out = [ScheduledTask("F:" + t.name, 0, "fwd " + t.stream, t.start_ms, t.end_ms, t.category) for t in f
           if t.end_ms > t.start_ms]
    out += [ScheduledTask("B:" + t.name, 0, "bwd " + t.stream, t.start_ms + shift, t.end_ms + shift, t.category)
            for t in b if t.end_ms > t.start_ms]
    return out


def layer_counts(values: list[int]) -> dict[int, int]:
    """How many layers run each value, by value."""
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def _counts(values: list[int]) -> str:
    """'1 x31, 16 x1': how many layers run each value."""
    return ", ".join(f"{k} x{n}" for k, n in layer_counts(values).items())


def layout_text(c: MoEConfigPlan) -> str:
    """One line for ``adasched show``: the expert-parallel layout a configuration was costed with (what
    ``train_moe --plan`` checks) and its expert copies' gradient all-reduce."""
    node = f", nodes of {c.gpus_per_node} GPUs" if c.gpus_per_node else ""
    if c.hierarchical:
        g = c.gpus_per_node or "G"
        text = (f"EP {c.ep_size} over nodes, each expert sharded over a node's GPUs{node} (FSMoE's layout; "
                f"train_moe --expert-shards {g} --ep-size {c.ep_size})")
    elif c.two_step_a2a:
        text = (f"EP {c.ep_size}, two-step all-to-all ({c.exchange_gpus_per_node} ranks per node: intra- then "
                f"inter-node; train_moe --hierarchical --gpus-per-node {c.exchange_gpus_per_node}){node}")
    else:
        text = f"flat EP {c.ep_size} (one all-to-all){node}"
    text += f"; {c.expert_copies} cop{'y' if c.expert_copies == 1 else 'ies'} of each expert"
    if c.expert_copies > 1:
        exposed = c.expert_grad_allreduce_ms if c.expert_grad_exposed_ms is None else c.expert_grad_exposed_ms
        text += (f", expert-gradient all-reduce {c.expert_grad_allreduce_ms:,.2f} ms ({exposed:,.2f} ms not hidden "
                 "in the backward)")
    return text


class MoEPlan(Plan):
    kind: Literal["moe"] = "moe"
    gpus: int = Field(ge=1, le=2**31 - 1, description="the data-parallel world the plan is for: dense gradients all-reduced over it")
    gpus_per_node: int = Field(ge=1, le=2**31 - 1)
    ep_size_option: int | None = Field(default=None, description="`adasched plan moe --ep-size`: flat EP groups "
                                                                 "of this size inside the world; None = the default "
                                                                 "layout (EP over every GPU, or over nodes)")
    configs: list[MoEConfigPlan] = Field(min_length=1)

    def verify(self) -> list[str]:
        """Per configuration: EP size dividing the GPUs, layers numbered 0.. in order (as many as the model has),
        each layer's chosen degrees among the ones it timed - the forward's the fastest, the backward the time
        recorded for its r (the fastest, in a plan without ``bwd_fastest_ms``; else that field its fastest), an
        iteration no longer than with every layer's fastest backward -, fwd_bwd_ms = layer 0's forward + backward, one non-negative
        gradient slice per layer; a layout that holds together (two-step: whole experts, an exchange node size
        dividing ep_size; flat: no exchange node size; expert_copies = gpus / ep_size, or / (ep_size * node size)
        for expert sharding)."""
        from pydantic import ValidationError

        from adasched.profiler.io import describe_validation_error

        from .baselines import BASELINES
        from .costmodel import MoEConfig
        from .model import R_CANDIDATES, R_MAX
        from .planning import PROVED_CHOICES

        errors = super().verify()
        if set(self.baselines_ms) != set(BASELINES):
            errors.append(f"baselines_ms has {sorted(self.baselines_ms)}, not the baselines {sorted(BASELINES)}")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            # (simulate rebuilt the topology from it and blamed "--gpus", an option it does not have)
            errors.append(f"gpus {self.gpus} are not whole nodes of gpus_per_node {self.gpus_per_node}")
        names = [c.name for c in self.configs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # (simulate --config NAME and train_moe --plan took the first: the second was unreachable)
            errors.append(f"configs: the names {twice} appear more than once")
        for c in self.configs:
            at = f"config {c.name!r}"
            if c.ep_size < 1 or self.gpus % c.ep_size:
                errors.append(f"{at}: ep_size {c.ep_size} does not divide {self.gpus} GPUs")
            if self.ep_size_option is not None and c.ep_size != self.ep_size_option:
                errors.append(f"{at}: ep_size {c.ep_size} is not the planned --ep-size {self.ep_size_option}")
            if c.two_step_a2a and (c.hierarchical or c.exchange_gpus_per_node is None
                                   or c.ep_size % c.exchange_gpus_per_node):
                errors.append(f"{at}: a two-step exchange needs whole experts (hierarchical false) and "
                              f"exchange_gpus_per_node dividing ep_size {c.ep_size} "
                              f"(got {c.hierarchical}, {c.exchange_gpus_per_node})")
            if not c.two_step_a2a and c.exchange_gpus_per_node is not None:
                errors.append(f"{at}: exchange_gpus_per_node {c.exchange_gpus_per_node} given for a flat exchange "
                              f"(two_step_a2a false): which layout was planned?")
            gpn = c.gpus_per_node or min(self.gpus_per_node, self.gpus)
            if c.hierarchical and c.ep_size >= 1 and self.gpus % (c.ep_size * gpn):
                errors.append(f"{at}: experts sharded over nodes of {gpn} GPUs in EP groups of {c.ep_size} do not "
                              f"cover {self.gpus} GPUs")
            copies = self.gpus // (c.ep_size * (gpn if c.hierarchical else 1)) if c.ep_size >= 1 else 0
            if c.expert_copies != copies:
                errors.append(f"{at}: expert_copies {c.expert_copies} is not the layout's {copies} ({self.gpus} GPUs, "
                              f"ep_size {c.ep_size}" + (f", experts sharded over {gpn} GPUs" if c.hierarchical
                                                        else "") + ")")
            try:  # (a config that is no MoEConfig verified, then failed in load_pipeline as a raw ValidationError)
                cfg = MoEConfig.model_validate(c.config)
            except ValidationError as err:
                errors.append(f"{at}: config is not a MoE configuration ({describe_validation_error(err)})")
                cfg = None
            if cfg is not None:
                errors += self._layout_errors(at, c, cfg)
            if c.hierarchical or c.two_step_a2a:  # (the runtime refuses it after torchrun started: h50)
                bad = next((lp for lp in c.layers if "interleaved" in (lp.order_fwd, lp.order_bwd)), None)
                if bad is not None:
                    path = "expert-sharded" if c.hierarchical else "two-step"
                    errors.append(f"{at} layer {bad.layer}: issue order 'interleaved' on the {path} layout; the "
                                  f"runtime interleaves dispatches and combines on flat exchanges only (the planner "
                                  f"gives 'dispatch-first' there)")
            for field, names in (("baselines_fwd_bwd_ms", c.baselines_fwd_bwd_ms),
                                 ("iteration_baselines_ms", c.iteration_baselines_ms)):
                if set(names) != set(BASELINES):  # (show died on a KeyError for a baseline taken out by hand)
                    errors.append(f"{at}: {field} has {sorted(names)}, not the baselines {sorted(BASELINES)}")
            if c.layers and c.iteration_ms < sum(lp.fwd_ms + lp.bwd_ms for lp in c.layers) * (1 - 1e-9):
                errors.append(f"{at}: iteration {c.iteration_ms} ms is shorter than its MoE layers' forward + "
                              f"backward ({sum(lp.fwd_ms + lp.bwd_ms for lp in c.layers)} ms)")
            if c.bwd_choice is not None and self.solver.status == "optimal" and \
                    c.bwd_choice.split(" (")[0] not in PROVED_CHOICES:
                errors.append(f"{at}: status optimal, but the backward choice {c.bwd_choice!r} is a heuristic")
            if cfg is not None:
                for lp in c.layers:
                    if lp.layer < cfg.num_layers and not math.isclose(lp.mean_k, cfg.k_of_layer(lp.layer),
                                                                      rel_tol=1e-9):
                        errors.append(f"{at} layer {lp.layer}: mean_k {lp.mean_k} is not its config's "
                                      f"{cfg.k_of_layer(lp.layer)}")
                        break
                dense = float(cfg.replicated_params) * len(c.layers) if self.gpus > 1 else 0.0
                if sum(c.grad_slices) > dense * (1 + 1e-9):  # (the runtime all-reduces what the slices say)
                    errors.append(f"{at}: gradient slices sum to {sum(c.grad_slices):.6g} elements, more than the "
                                  f"dense gradients ({dense:.6g})")
            # layers of one mean_k (one cost model) timed the same degrees at the same times: only layer 0 is
            # re-simulated, so a hand-edited layer's degree and its one matching "timing" passed
            first: dict[float, MoELayerPlan] = {}
            for lp in c.layers:
                ref = first.setdefault(lp.mean_k, lp)
                if lp.time_by_r_fwd != ref.time_by_r_fwd or lp.time_by_r_bwd != ref.time_by_r_bwd:
                    errors.append(f"{at} layer {lp.layer}: timings differ from layer {ref.layer}'s at the same "
                                  f"mean_k {lp.mean_k}")
                    break
            n = c.config.get("num_layers")
            if [lp.layer for lp in c.layers] != list(range(len(c.layers))) or (n is not None and len(c.layers) != n):
                errors.append(f"{at}: layers {[lp.layer for lp in c.layers][:6]}... are not 0..{(n or len(c.layers)) - 1}")
            for lp in c.layers:
                fwd, bwd = lp.time_by_r_fwd.get(str(lp.r_fwd)), lp.time_by_r_bwd.get(str(lp.r_bwd))
                # the planner times every candidate degree and doubles from the largest (powers of two up to
                # R_MAX): a layer's timings without them, or with another degree, were edited (a layer of its own
                # mean_k, as with router statistics, is not re-simulated)
                for what, timed in (("fwd", lp.time_by_r_fwd), ("bwd", lp.time_by_r_bwd)):
                    keys = {int(k) if k.isdigit() else -1 for k in timed}
                    if not set(R_CANDIDATES) <= keys or any(k < 1 or k > R_MAX or k & (k - 1) for k in keys):
                        errors.append(f"{at} layer {lp.layer}: time_by_r_{what} has degrees {sorted(timed)}; the "
                                      f"planner times {list(R_CANDIDATES)} and powers of two up to {R_MAX}")
                        fwd = bwd = None
                if fwd is None or bwd is None:
                    errors.append(f"{at} layer {lp.layer}: r_fwd {lp.r_fwd} / r_bwd {lp.r_bwd} not among the timed "
                                  f"degrees {sorted(lp.time_by_r_fwd)} / {sorted(lp.time_by_r_bwd)}")
                    continue
                if not math.isclose(lp.fwd_ms, fwd, rel_tol=1e-9):
                    errors.append(f"{at} layer {lp.layer}: forward {lp.fwd_ms} ms, but r={lp.r_fwd} was timed at "
                                  f"{fwd} ms")
                elif fwd > min(lp.time_by_r_fwd.values()) * (1 + 1e-9):
                    errors.append(f"{at} layer {lp.layer}: forward {fwd} ms at r={lp.r_fwd} is not the fastest "
                                  f"timed degree ({min(lp.time_by_r_fwd.values())} ms)")
                if not math.isclose(lp.bwd_ms, bwd, rel_tol=1e-9):  # (a plan with r_bwd changed by hand passed)
                    errors.append(f"{at} layer {lp.layer}: backward {lp.bwd_ms} ms, but r={lp.r_bwd} was timed at "
                                  f"{bwd} ms")
                elif lp.bwd_fastest_ms is None and bwd > min(lp.time_by_r_bwd.values()) * (1 + 1e-9):
                    # (an older plan: the fastest backward per layer; a newer one may run a slower one chosen with
                    # the gradient slices, checked against the iteration below)
                    errors.append(f"{at} layer {lp.layer}: backward {bwd} ms at r={lp.r_bwd} is not the fastest "
                                  f"timed degree ({min(lp.time_by_r_bwd.values())} ms)")
                elif lp.bwd_fastest_ms is not None and not math.isclose(lp.bwd_fastest_ms,
                                                                        min(lp.time_by_r_bwd.values()), rel_tol=1e-9):
                    errors.append(f"{at} layer {lp.layer}: bwd_fastest_ms {lp.bwd_fastest_ms} is not its fastest "
                                  f"timed backward ({min(lp.time_by_r_bwd.values())} ms)")
            if c.layers and c.layer0_stage_costs is not None:
                if c.layer0_stage_costs.two_step != c.two_step_a2a:  # (the Gantt drew a two-step exchange for an
                    # expert-sharded plan whose makespan happened to be the same)
                    errors.append(f"{at}: layer0_stage_costs.two_step {c.layer0_stage_costs.two_step} is not the "
                                  f"layout's two_step_a2a {c.two_step_a2a}")
                stage_errors = _check_stage_costs(at, c.layer0_stage_costs, c.layers[0]) or \
                    self._layer0_cost_errors(at, c)
                errors += stage_errors or (_baseline_errors(at, c) + self._layer_errors(at, c))  # (per configuration)
                if (not stage_errors and cfg is not None and len(c.layers) == cfg.num_layers
                        and set(c.iteration_baselines_ms) == set(c.baselines_fwd_bwd_ms) == set(BASELINES)):
                    errors += self._iteration_errors(at, c, cfg)
            if c.layers and not math.isclose(c.fwd_bwd_ms, c.layers[0].fwd_ms + c.layers[0].bwd_ms, rel_tol=1e-9):
                errors.append(f"{at}: fwd_bwd_ms {c.fwd_bwd_ms} != layer 0's forward + backward")
            if c.iteration_fastest_bwd_ms is not None and c.iteration_ms > c.iteration_fastest_bwd_ms * (1 + 1e-9):
                errors.append(f"{at}: iteration {c.iteration_ms} ms is longer than with every layer's fastest "
                              f"backward ({c.iteration_fastest_bwd_ms} ms)")
            if c.expert_copies == 1 and c.expert_grad_allreduce_ms != 0:  # (documented 0: nothing to all-reduce)
                errors.append(f"{at}: expert_grad_allreduce_ms {c.expert_grad_allreduce_ms}, but each expert exists "
                              f"once (expert_copies 1): there is no expert all-reduce")
            for lp in c.layers:  # (the fused placement is one of the candidates the fastest backward is the best of)
                if lp.bwd_fastest_ms is not None and lp.bwd_fused_wgrad_ms < lp.bwd_fastest_ms * (1 - 1e-9):
                    errors.append(f"{at} layer {lp.layer}: bwd_fused_wgrad_ms {lp.bwd_fused_wgrad_ms} is below its "
                                  f"fastest backward ({lp.bwd_fastest_ms} ms)")
                    break
            if c.iteration_fastest_bwd_ms is not None and c.layers and c.layer0_stage_costs is not None and \
                    cfg is not None and all(lp.bwd_fastest_ms is not None for lp in c.layers):
                errors += self._fastest_iteration_errors(at, c, cfg)
            if c.expert_grad_exposed_ms is not None and \
                    c.expert_grad_exposed_ms > c.expert_grad_allreduce_ms * (1 + 1e-9) + 1e-9:  # (older plans: 1e-15)
                errors.append(f"{at}: expert_grad_exposed_ms {c.expert_grad_exposed_ms} exceeds the expert all-reduce "
                              f"{c.expert_grad_allreduce_ms}")
            if len(c.grad_slices) != len(c.layers) or any(v < 0 for v in c.grad_slices):
                errors.append(f"{at}: {len(c.grad_slices)} gradient slices (need one >= 0 per layer, "
                              f"{len(c.layers)})")
        errors += self._record_errors()
        for name, value, total in [("predicted_ms", self.predicted_ms, sum(c.fwd_bwd_ms for c in self.configs))] + [
                (f"baselines_ms.{b}", ms, sum(c.baselines_fwd_bwd_ms.get(b, math.nan) for c in self.configs))
                for b, ms in self.baselines_ms.items()]:
            if not math.isclose(value, total, rel_tol=1e-9, abs_tol=1e-9):
                errors.append(f"{name}: {value} ms is not the sum over the configurations ({total} ms)")
        return errors

    def summary_rows(self) -> list[tuple[str, str]]:
        from .planning import proved_iteration  # (a proved iteration is the optimum itself: no bound shown)

        # the headline is layer 0's fwd+bwd; its backward may be slower than it could be (chosen with the gradient
        # slices for the iteration), so a baseline can be faster there: the per-configuration rows give the
        # iteration, which is what the plan minimises (it read "fixed-r2 0.89x slower" for a faster baseline)
        rows = [("predicted (layer 0's fwd+bwd, summed over the configurations; the plan minimises the iteration, "
                 "below)", v) if k == "predicted" else (k, v)
                for k, v in super().summary_rows()]
        for c in self.configs:
            l0 = c.layers[0]
            nb = c.baselines_fwd_bwd_ms
            ratio = {k: f"{v / c.fwd_bwd_ms:.2f}x" if c.fwd_bwd_ms > 0 else "n/a" for k, v in nb.items()}
            rows.append((c.name, f"r_fwd={l0.r_fwd} r_bwd={l0.r_bwd} wgrad={l0.wgrad_bwd} layer fwd+bwd {c.fwd_bwd_ms:.2f} ms; "
                                 f"baseline / plan: no-pipeline {ratio['no-pipeline']}, fixed-r2 {ratio['fixed-r2']}; "
                                 f"iteration ({len(c.layers)} layers, gradient all-reduces) {c.iteration_ms:.2f} ms, "
                                 "baseline / plan: "
                                 + ", ".join(f"{k} {v / c.iteration_ms:.2f}x" for k, v in c.iteration_baselines_ms.items()
                                             if c.iteration_ms > 0)
                                 + (f" (every layer's fastest backward: {c.iteration_fastest_bwd_ms:.2f} ms; the "
                                    f"backward degrees are chosen with the gradient slices, r_bwd over the layers "
                                    f"{_counts([lp.r_bwd for lp in c.layers])})"
                                    if c.iteration_fastest_bwd_ms is not None else "")
                                 + (f"; no choice of backward candidates beats {c.iteration_lower_bound_ms:.2f} ms"
                                    if c.iteration_lower_bound_ms is not None and not proved_iteration(c) else "")))
            rows.append((f"{c.name} layout", layout_text(c)))
        return rows

    def _layout_errors(self, at: str, c: "MoEConfigPlan", cfg) -> list[str]:
        """The layout the planner builds for this configuration on the plan's GPUs (:func:`~.costmodel.topology`
        with the plan's --ep-size, two-step exchange and its node size) is the one recorded: a plan edited to
        another EP size (its expert copies edited to match) kept the costs of the layout it was planned with - an
        all-to-all priced for EP 8 and no expert all-reduce - and loaded for an EP-4 run; 3 experts on EP 8
        verified."""
        from .costmodel import topology

        try:
            topo = topology(cfg, self.gpus, self.gpus_per_node, self.ep_size_option, two_step=c.two_step_a2a,
                            exchange_gpus_per_node=c.exchange_gpus_per_node if c.two_step_a2a else None)
        except InputError as err:
            return [f"{at}: no layout of {self.gpus} GPUs holds this configuration ({err})"]
        recorded = (c.ep_size, c.hierarchical, c.expert_copies)
        planned = (topo.ep_size, topo.hierarchical, topo.expert_copies)
        if recorded != planned or (c.gpus_per_node is not None and c.gpus_per_node != topo.gpus_per_node):
            return [f"{at}: ep_size {c.ep_size}, hierarchical {c.hierarchical}, expert_copies {c.expert_copies}, "
                    f"gpus_per_node {c.gpus_per_node} are not the layout the planner builds on {self.gpus} GPUs "
                    f"(ep_size {topo.ep_size}, hierarchical {topo.hierarchical}, expert_copies {topo.expert_copies}, "
                    f"gpus_per_node {topo.gpus_per_node}); its costs are that layout's"]
        return []

    def _stage_inputs(self, c: "MoEConfigPlan"):
        """(config, topology, stage source, profile) that re-derive configuration ``c``'s stage costs, as the planner
        built them; InputError when the plan's profile is not the built-in one of its name nor a file of it with
        the plan's digest."""
        from .costmodel import MoEConfig, topology
        from adasched.profiler.profile import load_profile

        cfg = MoEConfig.model_validate(c.config)
        topo = topology(cfg, self.gpus, self.gpus_per_node, self.ep_size_option, two_step=c.two_step_a2a,
                        exchange_gpus_per_node=c.exchange_gpus_per_node)
        src = "published" if c.stage_source.startswith("published") else "profile"
        prof = None
        if src == "profile" and self.profile:
            from adasched.planner.plan import builtin_profile_of, profile_ref
            from adasched.profiler.builtins import BUILTIN_PROFILES

            # a built-in by its name (a file of that name in the working folder is not what the plan used)
            prof = builtin_profile_of(self.profile)
            if prof is None and self.profile.name not in BUILTIN_PROFILES:
                try:
                    prof = load_profile(self.profile.name)
                except InputError:
                    prof = None
            if prof is None or profile_ref(prof).digest != self.profile.digest:
                # re-simulating with another profile of the same name drew another plan's timeline (a profile
                # file named like a built-in one: 166 ms drawn for a 3,772 ms plan)
                raise InputError(self.profile.name, f"this plan was made with a profile named {self.profile.name!r} "
                                                    f"(digest {self.profile.digest}) that is not the built-in one of "
                                                    f"that name, and (an older plan) its stage costs are not in it, "
                                                    f"so it cannot be re-simulated or drawn here; plan it again")
        return cfg, topo, src, prof

    def _record_errors(self) -> list[str]:
        """Each configuration's iteration lower bound at most its iteration, and the solver record's objective,
        bound and gap as :func:`~.planning.plan_moe` writes them (older plans: no bound, no objective)."""
        from ..plan import relative_gap
        from .planning import record_bound

        errors = []
        for c in self.configs:
            lb = c.iteration_lower_bound_ms
            if lb is not None and lb > c.iteration_ms * (1 + 1e-9) + 1e-9:
                errors.append(f"config {c.name!r}: iteration_lower_bound_ms {lb} is above its iteration "
                              f"{c.iteration_ms} ms")
        s = self.solver
        if errors or s.objective is None:  # (older plans: no record to check)
            return errors
        missing = next((c.name for c in self.configs if c.iteration_lower_bound_ms is None), None)
        if missing is not None:  # a record with an objective was written with every configuration's bound
            return [f"config {missing!r}: no iteration_lower_bound_ms, but the solver record has an objective "
                    f"(written with every configuration's bound)"]
        objective, bound = record_bound(self.configs)
        close = lambda a, b: a is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)  # noqa: E731
        if not close(s.objective, objective):
            errors.append(f"solver.objective: {s.objective}, but the configurations' iterations add up to "
                          f"{objective} ms")
        if not close(s.bound, bound):
            errors.append(f"solver.bound: {s.bound}, but the configurations give {bound} ms (their iterations where "
                          f"proved minimal, else their lower bounds)")
        if not errors and not close(s.gap, relative_gap(objective, bound)):
            errors.append(f"solver.gap: {s.gap}, objective {objective} and bound {bound} give "
                          f"{relative_gap(objective, bound)}")
        return errors

    def _iteration_errors(self, at: str, c: "MoEConfigPlan", cfg) -> list[str]:
        """The iteration's all-reduce figures from layer 0's stored stage costs (the all-reduce is its stage 4) and
        the gradient slices, as :func:`~.planning.plan_config` computes them: the dense gradients' all-reduce
        after the backward (``grad_exposed_at_end_ms``), what the slices leave exposed (``grad_exposed_ms``), the
        slices' prefix rule (a layer's gradients are reduced only after its backward); for layers of one cost
        model, the iteration baselines against the iteration (the same dense blocks, the baselines' layers at
        layer 0's figure, their all-reduce after the backward); with a built-in profile, the dense blocks
        themselves. These were only summed: an edited baseline iteration showed as a speedup the plan's own
        figures do not give."""
        from .model import _exposed
        from .planning import dense_allreduce

        rel = lambda a, b: math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)  # noqa: E731
        rec, L = c.layer0_stage_costs, len(c.layers)
        a4, b4, produced, at_end = dense_allreduce(cfg, self.gpus, rec.alpha[4], rec.work[4])
        errors = []
        if not rel(c.grad_exposed_at_end_ms, at_end):
            errors.append(f"{at}: grad_exposed_at_end_ms {c.grad_exposed_at_end_ms} ms, but layer 0's stage costs "
                          f"give {at_end} ms for the dense gradients all-reduced after the backward")
        exposed = _exposed(c.grad_slices, produced, a4, b4)
        if not rel(c.grad_exposed_ms, exposed):
            errors.append(f"{at}: grad_exposed_ms {c.grad_exposed_ms} ms, but the gradient slices leave {exposed} ms "
                          f"of the all-reduce exposed")
        taken = prefix = 0.0
        for j, x in enumerate(c.grad_slices):  # (backward order: position j reduces what positions < j produced)
            taken += x
            if taken > prefix * (1 + 1e-9) + 1e-6:
                errors.append(f"{at}: gradient slice {j} ({x:.6g} elements) reduces gradients no layer has produced "
                              f"yet ({taken:.6g} reduced by then, {prefix:.6g} produced)")
                break
            prefix += produced[j] if j < L else 0.0
        if not errors and not self.made_before(ALL_LAYERS_CHECKED_SINCE) and \
                all(lp.bwd_link_idle_ms is not None for lp in c.layers):
            errors += self._slice_gap_errors(at, c, cfg, a4, b4)
        if errors:
            return errors
        expert_exposed = c.expert_grad_exposed_ms if c.expert_copies > 1 else 0.0
        if expert_exposed is None:  # (an older plan: not recorded)
            return errors
        dense_total = _dense_blocks_ms(c, expert_exposed)
        from adasched.planner.plan import builtin_profile_of

        prof = builtin_profile_of(self.profile) if self.profile else None
        # (the dense blocks' constants are charged once per layer since 2026-11-30 14:48 UTC: older plans priced
        # them otherwise and keep their iteration)
        if prof is not None and not self.made_before("2026-11-30T14:49:00+00:00"):
            from .planning import dense_block_ms

            f, b = dense_block_ms(cfg, prof)
            want = sum(lp.fwd_ms + lp.bwd_ms for lp in c.layers) + L * (f + b) + c.grad_exposed_ms + expert_exposed
            if not math.isclose(c.iteration_ms, want, rel_tol=1e-9, abs_tol=1e-6):
                errors.append(f"{at}: iteration {c.iteration_ms} ms, but its layers, the profile's dense blocks "
                              f"({L} x {f + b:.6g} ms) and the exposed all-reduces give {want} ms")
                return errors
            if c.expert_copies > 1 and not self.made_before(EXPERT_EXPOSURE_CHECKED_SINCE) and \
                    all(lp.bwd_link_idle_ms is not None for lp in c.layers):
                errors += self._expert_exposure_errors(at, c, cfg, prof, b, a4, b4)
                if errors:
                    return errors
        if cfg.mean_k_per_layer is not None:  # the baselines' layers have costs of their own (not stored)
            return errors
        extra = {}  # per baseline: its exposed expert all-reduce (the same buckets for both; 0 with one copy)
        for name, have in c.iteration_baselines_ms.items():
            extra[name] = have - c.baselines_fwd_bwd_ms[name] * L - at_end - dense_total
        scale = max([c.iteration_ms, *c.iteration_baselines_ms.values()]) * 1e-9 + 1e-6
        for name, e in extra.items():
            if not -scale <= e <= c.expert_grad_allreduce_ms + scale:
                want = c.baselines_fwd_bwd_ms[name] * L + at_end + dense_total
                what = ("" if c.expert_copies == 1 else
                        f" plus an exposed expert all-reduce of at most {c.expert_grad_allreduce_ms} ms")
                errors.append(f"{at}: iteration_baselines_ms.{name} {c.iteration_baselines_ms[name]} ms, but "
                              f"{L} layers of its fwd+bwd, the all-reduce after the backward and the plan's dense "
                              f"blocks give {want} ms{what}")
        if not errors and max(extra.values()) - min(extra.values()) > scale:
            errors.append(f"{at}: iteration_baselines_ms: beyond their layers, the all-reduce after the backward and "
                          f"the dense blocks they differ by {max(extra.values()) - min(extra.values())} ms, but every "
                          f"baseline runs the same expert all-reduce")
        return errors

    def _slice_gap_errors(self, at: str, c: "MoEConfigPlan", cfg, a4: float, b4: float) -> list[str]:
        """Each gradient slice fits its gap, alpha + beta x at most its backward position's idle link time plus its
        dense block's backward, as the gap fill, the slice MILP and the queue fills all size them: slices past their
        gaps let an edited plan claim an iteration below the optimum under status optimal (h50). The dense block's
        backward from a built-in profile; else at most the plan's dense blocks per layer (forward included: a
        bound)."""
        from adasched.planner.plan import builtin_profile_of

        prof = builtin_profile_of(self.profile) if self.profile else None
        if prof is not None:
            from .planning import dense_block_ms

            dense_b, how = dense_block_ms(cfg, prof)[1], "its dense block's backward"
        else:
            expert_exposed = c.expert_grad_exposed_ms if c.expert_copies > 1 else 0.0
            if expert_exposed is None:
                return []
            dense_b = max(0.0, _dense_blocks_ms(c, expert_exposed)) / len(c.layers)
            how = "at most its dense block"
        idle = [lp.bwd_link_idle_ms for lp in reversed(c.layers)]  # (backward order: the last layer first)
        for j, x in enumerate(c.grad_slices[:len(idle)]):
            need, gap = a4 + b4 * x, idle[j] + dense_b
            if x > 0 and need > gap * (1 + 1e-9) + 1e-9:
                return [f"{at}: gradient slice {j} ({x:.6g} elements) takes {need:.6g} ms of the link, more than its "
                        f"gap of {gap:.6g} ms (layer {len(idle) - 1 - j}'s idle link {idle[j]:.6g} ms + {how} "
                        f"{dense_b:.6g} ms)"]
        return []

    def _layer0_cost_errors(self, at: str, c: "MoEConfigPlan") -> list[str]:
        """Layer 0's stored stage costs are those its configuration, layout and profile give (the stored costs
        were only checked against the stored times: a plan whose config was edited - FFN width doubled, capacity
        factor 5 - kept the costs and speedups of the one it was planned for). Skipped where the costs cannot be
        re-derived (a profile file not here, see :meth:`_stage_inputs`)."""
        from .costmodel import stage_costs

        if self.made_before(LAYER0_COSTS_CHECKED_SINCE):  # (an older cost model priced the plans written before)
            return []
        try:
            cfg, topo, src, prof = self._stage_inputs(c)
        except (InputError, ValueError):
            return []
        try:
            want = StageCostsRecord.of(stage_costs(cfg, topo, source=src, profile=prof, layer=0))
        except (InputError, ValueError) as e:
            return [f"{at}: its configuration's stage costs cannot be derived here ({e})"]
        have = c.layer0_stage_costs
        for name in ("alpha", "work", "shared", "dw"):
            a, b = getattr(have, name), getattr(want, name)
            if (a is None) != (b is None) or (a is not None and not all(
                    math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a, b))):
                show = lambda v: "none" if v is None else "[" + ", ".join(f"{x:.6g}" for x in v) + "]"  # noqa: E731
                return [f"{at}: layer0_stage_costs.{name} {show(a)} ms, but its config, layout and profile give "
                        f"{show(b)} ms"]
        return []

    def _fastest_iteration_errors(self, at: str, c: "MoEConfigPlan", cfg) -> list[str]:
        """``iteration_fastest_bwd_ms`` (every layer at its fastest backward) lies between that choice's layers and
        dense blocks alone and the same with the whole dense and expert all-reduces exposed (it was not checked:
        99999 ms was shown beside an iteration of 7,782)."""
        from .planning import dense_allreduce

        rec = c.layer0_stage_costs
        _, _, _, at_end = dense_allreduce(cfg, self.gpus, rec.alpha[4], rec.work[4])
        dense_total = _dense_blocks_ms(c, (c.expert_grad_exposed_ms or 0.0) if c.expert_copies > 1 else 0.0)
        low = sum(lp.fwd_ms + lp.bwd_fastest_ms for lp in c.layers) + dense_total
        high = low + at_end + c.expert_grad_allreduce_ms
        tol = 1e-9 * max(high, 1.0) + 1e-6
        if not low - tol <= c.iteration_fastest_bwd_ms <= high + tol:
            return [f"{at}: iteration_fastest_bwd_ms {c.iteration_fastest_bwd_ms} ms, but the layers at their fastest "
                    f"backward and the dense blocks give {low:.6g} ms, and at most {high:.6g} ms with every "
                    f"all-reduce exposed"]
        return []

    def _expert_exposure_errors(self, at: str, c: "MoEConfigPlan", cfg, prof, dense_b: float, a4: float,
                                b4: float) -> list[str]:
        """The expert buckets' all-reduce and what of it the backward leaves exposed, re-priced from the profile,
        the layers' idle link time and the gradient slices on the link they share (a slice moved by hand onto the
        buckets' backlog kept its plan's exposure, and passed)."""
        from .costmodel import topology
        from .planning import expert_bucket_ms, link_exposure

        try:
            topo = topology(cfg, self.gpus, self.gpus_per_node, self.ep_size_option, two_step=c.two_step_a2a,
                            exchange_gpus_per_node=c.exchange_gpus_per_node)
        except ValueError:  # (an inconsistent layout: named by verify's layout checks)
            return []
        src = "published" if c.stage_source.startswith("published") else "profile"
        _, _, expert_ms, rest_ms = expert_bucket_ms(cfg, topo, src, prof)
        total = sum(expert_ms) + rest_ms
        if not math.isclose(c.expert_grad_allreduce_ms, total, rel_tol=1e-9, abs_tol=1e-9):
            return [f"{at}: expert_grad_allreduce_ms {c.expert_grad_allreduce_ms} ms, but the profile prices the "
                    f"expert gradients' buckets at {total} ms"]
        idle = [lp.bwd_link_idle_ms for lp in reversed(c.layers)]  # (backward order: the last layer first)
        exposed = max(0.0, link_exposure(idle, c.grad_slices, a4, b4, expert_ms, dense_b,
                                         c.grad_exposed_ms + rest_ms) - c.grad_exposed_ms)
        if not math.isclose(c.expert_grad_exposed_ms, exposed, rel_tol=1e-9, abs_tol=1e-6):
            return [f"{at}: expert_grad_exposed_ms {c.expert_grad_exposed_ms} ms, but the expert buckets beside the "
                    f"gradient slices on the link leave {exposed} ms exposed"]
        return []

    def _layer_errors(self, at: str, c: "MoEConfigPlan") -> list[str]:
        """Each layer re-simulated from its stage costs - layer 0's stored ones for the layers of its mean_k, else
        re-derived as the planner derives them (router statistics: every layer its own) -: its forward and backward
        times at its chosen degrees, order and wgrad placement, and (plans since ALL_LAYERS_CHECKED_SINCE) the idle
        link time its backward leaves the gradient all-reduces. Only layer 0 and the layers of another mean_k were
        re-simulated, and a later layer's only check was its timing table, which holds the best time at each r: its
        order or wgrad placement edited by hand passed (h50). Layers whose costs cannot be re-derived (a profile file
        not here) are skipped. Older plans: the layers of another mean_k only, without the idle time."""
        from .costmodel import stage_costs
        from .model import evaluate_pipeline
        from .planning import link_idle_ms

        k0 = c.layers[0].mean_k
        newer = not self.made_before(ALL_LAYERS_CHECKED_SINCE)
        costs = {k0: c.layer0_stage_costs.costs()}
        inputs = None  # (cfg, topo, src, prof) once needed; False: not derivable here
        fwd_at: dict = {}
        bwd_at: dict = {}
        errors = []
        for lp in c.layers if newer else c.layers[1:]:
            if not newer and lp.mean_k == k0:
                continue
            if lp.mean_k not in costs:
                if inputs is None:
                    try:
                        inputs = self._stage_inputs(c)
                    except (InputError, ValueError):
                        inputs = False
                if inputs is False:
                    continue
                cfg, topo, src, prof = inputs
                if lp.layer >= cfg.num_layers:  # (counted above)
                    continue
                try:
                    costs[lp.mean_k] = stage_costs(cfg, topo, source=src, profile=prof, layer=lp.layer)
                except ValueError as e:
                    errors.append(f"{at} layer {lp.layer}: its stage costs do not re-simulate ({e})")
                    costs[lp.mean_k] = None
            fwd = costs[lp.mean_k]
            if fwd is None:
                continue
            kf, kb = (lp.mean_k, lp.r_fwd, lp.order_fwd), (lp.mean_k, lp.r_bwd, lp.order_bwd, lp.wgrad_bwd)
            try:
                if kf not in fwd_at:
                    fwd_at[kf] = evaluate_pipeline(fwd, lp.r_fwd, lp.order_fwd).time_ms
                if kb not in bwd_at:
                    ev = evaluate_pipeline(fwd.backward(), lp.r_bwd, lp.order_bwd, lp.wgrad_bwd)
                    bwd_at[kb] = (ev.time_ms, link_idle_ms(ev))
            except ValueError as e:
                errors.append(f"{at} layer {lp.layer}: its stage costs do not re-simulate ({e})")
                continue
            whose = "layer 0's stored stage costs" if lp.mean_k == k0 else f"its stage costs (mean_k {lp.mean_k})"
            errors += [f"{at} layer {lp.layer}: {what} {want} ms, but {whose} give {t} ms at r={r}"
                       for what, want, t, r in (("forward", lp.fwd_ms, fwd_at[kf], lp.r_fwd),
                                                ("backward", lp.bwd_ms, bwd_at[kb][0], lp.r_bwd))
                       if not math.isclose(want, t, rel_tol=1e-9, abs_tol=1e-12)]
            idle = bwd_at[kb][1]
            if newer and lp.bwd_link_idle_ms is not None and not math.isclose(lp.bwd_link_idle_ms, idle,
                                                                               rel_tol=1e-9, abs_tol=1e-9):
                errors.append(f"{at} layer {lp.layer}: bwd_link_idle_ms {lp.bwd_link_idle_ms} ms, but its backward "
                              f"(r={lp.r_bwd}, {lp.order_bwd}, wgrad {lp.wgrad_bwd}) leaves the link idle {idle} ms")
            if errors:
                break  # (one layer's story: a config edited in one place reads as one line)
        return errors

    def gantt_tasks(self, config: int = 0) -> list:
        """Forward then backward pipeline of configuration ``config``'s (position) first layer, one lane per
        resource."""
        from .costmodel import stage_costs

        c = self.configs[config]
        l0 = c.layers[0]
        if c.layer0_stage_costs is not None:
            return _pipeline_tasks(c.layer0_stage_costs.costs(), l0)
        cfg, topo, src, prof = self._stage_inputs(c)
        return _pipeline_tasks(stage_costs(cfg, topo, source=src, profile=prof), l0)

    def simulate(self, config: int = 0):
        """The drawn pipeline (configuration ``config`` by position, layer 0: forward then backward) as a
        simulation, for ``adasched simulate`` (``--config``)."""
        from ..simulator import Simulation

        return Simulation(tasks=self.gantt_tasks(config))

    def plot(self, path) -> None:
        from ..gantt import render_gantt

        c = self.configs[0]
        l0 = c.layers[0]
        # one chart: the first configuration; the title says so when there are more (it drew the first silently)
        more = (f"\n(the first of {len(self.configs)} configurations; adasched simulate PLAN --config NAME --plot "
                f"draws another)"
                if len(self.configs) > 1 else "")
        render_gantt(self.gantt_tasks(), path,
                     title=f"{c.name}: one MoE layer, forward r={l0.r_fwd} then backward r={l0.r_bwd} (wgrad {l0.wgrad_bwd}): "
                           f"{c.fwd_bwd_ms:.2f} ms (no pipelining {c.baselines_fwd_bwd_ms['no-pipeline']:.2f} ms){more}")

    def check_ep_size(self, ep_size: int, config: str | None = None, *, world: int | None = None,
                      two_step: bool = False, gpus_per_node: int | None = None,
                      expert_shards: int = 1) -> MoEConfigPlan:
        """The plan entry ``config`` (default: the first) for a runtime whose layout is: expert-parallel size
        ``ep_size`` with whole experts per rank, ``world`` data-parallel ranks (when given), a flat exchange or
        (``two_step``, ``train_moe --hierarchical``) a two-step one through nodes of ``gpus_per_node`` ranks of
        the EP group (the runtime's min(--gpus-per-node, --ep-size)). A clear one-line error (InputError) if the
        entry is missing or was planned for another layout: another EP size or number of GPUs (its dense
        gradient all-reduce and expert copies were costed for ``self.gpus``), FSMoE's expert-sharded layout
        (``hierarchical``) unless the run shards its experts the same way (``expert_shards`` = the plan's node
        size, ``ep_size`` = its EP size over the nodes: ``train_moe --expert-shards G``), or another exchange (flat
        vs two-step, another node size)."""
        cfgs = [c for c in self.configs if config in (None, c.name)]
        if not cfgs:
            raise InputError("plan", f"configuration {config!r} not in the plan "
                                     f"({', '.join(c.name for c in self.configs)})")
        c = cfgs[0]
        # (the planner takes a power-of-two --gpus only: a 3-rank run was told to run `plan moe --gpus 3`)
        fits = (world is not None and ep_size >= 1 and world % ep_size == 0 and expert_shards == 1
                and world & (world - 1) == 0)
        replan = (f"adasched plan moe --gpus {world} --ep-size {ep_size}"
                  + (f" --two-step-a2a --gpus-per-node {gpus_per_node}" if two_step else "")) if fits else None
        if c.hierarchical:
            nodes = f"{c.ep_size} node{'s' * (c.ep_size != 1)}"
            g = c.gpus_per_node or min(self.gpus_per_node, self.gpus)
            planned = (f"configuration {c.name!r} was planned for {self.gpus} GPUs with EP over {nodes} and each "
                       f"expert sharded over a node's {g} GPUs (FSMoE's layout; train_moe --expert-shards {g} "
                       f"--ep-size {c.ep_size})")
            if expert_shards == 1:
                raise InputError("plan", f"{planned}, this run holds whole experts per rank"
                                         + (f"; plan it with {replan}" if replan else ""))
            if (expert_shards, ep_size) != (g, c.ep_size) or (world is not None and world != self.gpus) or two_step:
                run = f"{world} ranks, " if world is not None else ""
                raise InputError("plan", f"{planned}, this run has {run}EP size {ep_size} with experts sharded over "
                                         f"{expert_shards} ranks")
            return c
        if expert_shards > 1:
            raise InputError("plan", f"configuration {c.name!r} was planned with whole experts per GPU (EP size "
                                     f"{c.ep_size}), this run shards each expert over {expert_shards} ranks "
                                     f"(--expert-shards); FSMoE's sharded layout comes from adasched plan moe --gpus "
                                     f"{world if world is not None else 'WORLD'} (no --ep-size) with a node size of "
                                     f"{expert_shards} (min(the profile's GPUs per node, --gpus)) and fewer experts "
                                     f"than GPUs, with EP size gcd(experts, nodes) (the run's --ep-size must equal it)")
        if c.ep_size != ep_size or (world is not None and world != self.gpus):
            run = f"{world} ranks with EP size {ep_size}" if world is not None else f"EP size {ep_size}"
            raise InputError("plan", f"configuration {c.name!r} was planned for {self.gpus} GPUs with EP size "
                                     f"{c.ep_size}, this run has {run} (--ep-size, default: the world size)"
                                     + (f"; plan it with {replan}" if replan else ""))
        planned = (f"a two-step all-to-all through nodes of {c.exchange_gpus_per_node} ranks" if c.two_step_a2a
                   else "a flat all-to-all")
        this = (f"a two-step one through nodes of {gpus_per_node} (--hierarchical, min(--gpus-per-node, "
                f"--ep-size))" if two_step else "a flat one (no --hierarchical)")
        if c.two_step_a2a != two_step or (two_step and c.exchange_gpus_per_node != gpus_per_node):
            raise InputError("plan", f"configuration {c.name!r} was planned with {planned}, this run has {this}"
                                     + (f"; plan it with {replan}" if replan else ""))
        return c
