"""Read an FSMoE plan (``adasched plan moe``) into what the MoE runtime needs: per-layer pipeline degrees and
the dense-gradient slices. The runtime reads plans only through the plan models."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PlannedPipeline", "load_pipeline"]


@dataclass
class PlannedPipeline:
    """r_fwd/r_bwd/wgrad/order_fwd/order_bwd: per MoE layer (forward order); slice_fractions: share of the dense
    gradient all-reduced in each MoE layer's backward gap, in backward order - the plan's slice over its model's
    replicated gradient elements, so they sum to the share the plan hides in the gaps (at most 1); the rest is
    reduced after the backward (``GradSliceReducer.finish``), as the plan's ``grad_exposed_ms`` prices it.
    ``layer_kwargs(i)`` gives layer i's settings as MoELayer keyword arguments."""

    config: str
    ep_size: int
    r_fwd: list[int]
    r_bwd: list[int]
    slice_fractions: list[float]
    wgrad: list[str] = field(default_factory=list)
    """Backward weight-gradient placement per layer (a plan's ``wgrad_bwd``; older plans read as "fused"); left
    empty it is filled with "fused" for every layer."""
    order_fwd: list[str] = field(default_factory=list)
    """Forward collective issue order per layer (the plan's ``order_fwd``); left empty: "dispatch-first"."""
    order_bwd: list[str] = field(default_factory=list)
    """Backward collective issue order per layer (the plan's ``order_bwd``); left empty: "dispatch-first"."""
    shape_note: str | None = None
    """How the plan's model differs from the run's (layers, experts), or None: the settings still apply (a plan
    with fewer layers repeats its last one; the slices stay shares of the plan's model), but were costed for it."""

    def __post_init__(self):
        n = len(self.r_fwd)
        for name, default in (("wgrad", "fused"), ("order_fwd", "dispatch-first"), ("order_bwd", "dispatch-first")):
            if not getattr(self, name):
                setattr(self, name, [default] * n)
        lens = {k: len(getattr(self, k)) for k in ("r_fwd", "r_bwd", "wgrad", "order_fwd", "order_bwd")}
        if len(set(lens.values())) != 1:
            raise ValueError(f"the per-layer settings need one entry per layer each: {lens}")
        from .ep import ORDERS, WGRAD_MODES

        for name, allowed in (("wgrad", WGRAD_MODES), ("order_fwd", ORDERS), ("order_bwd", ORDERS)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad:
                raise ValueError(f"{name}: {bad[0]!r} is not one of {', '.join(allowed)}")

    def layer_kwargs(self, i: int) -> dict:
        """Layer i's pipeline settings as ``MoELayer``/``set_pipeline`` keyword arguments."""
        return {"r_fwd": self.r_fwd[i], "r_bwd": self.r_bwd[i], "wgrad": self.wgrad[i],
                "order_fwd": self.order_fwd[i], "order_bwd": self.order_bwd[i]}

    def slices_for(self, dense_elements: int) -> list[float]:
        """Slice sizes in elements for a model with ``dense_elements`` replicated gradient elements."""
        return [f * dense_elements for f in self.slice_fractions]


def load_pipeline(path: str | Path, *, ep_size: int, num_layers: int, config: str | None = None,
                  world: int | None = None, two_step: bool = False,
                  gpus_per_node: int | None = None, expert_shards: int = 1,
                  experts: int | None = None) -> PlannedPipeline:
    """Degrees and slices of ``config`` (default: the plan's first configuration) for ``num_layers`` MoE layers
    (a plan with fewer layers repeats its last one). Raises InputError naming the file when the configuration is
    missing or was planned for another EP size, or (``world`` given) for another number of GPUs: the plan's dense
    gradient all-reduce (its slices) and expert copies were costed for its ``gpus`` (``adasched plan moe --gpus D
    --ep-size K`` plans EP groups of K inside D), or for another layout: ``two_step`` / ``gpus_per_node`` are the
    run's exchange (``ExpertParallel.hierarchical`` and its node size; :meth:`MoEPlan.check_ep_size`);
    ``expert_shards``: the run's ``ExpertParallel.shards`` (FSMoE's expert-sharded layout when > 1). A plan of
    another layer count, or of another expert count than ``experts`` (the run's, when given), still loads, with
    ``shape_note`` saying so."""
    from adasched.planner.fsmoe.plan import MoEPlan
    from adasched.planner.plan import load_plan
    from adasched.profiler.io import InputError

    plan = load_plan(path, expect=MoEPlan)
    try:
        c = plan.check_ep_size(ep_size, config, world=world, two_step=two_step, gpus_per_node=gpus_per_node,
                               expert_shards=expert_shards)
    except InputError as err:                           # the same check, naming the file
        raise InputError(str(path), err.what) from None
    if num_layers < 1:
        raise ValueError(f"num_layers: {num_layers} must be >= 1")
    layers = [c.layers[min(i, len(c.layers) - 1)] for i in range(num_layers)]
    sl = [float(x) for x in c.grad_slices[:num_layers]] + [0.0] * max(0, num_layers - len(c.grad_slices))
    # each gap's share of the planned model's replicated gradient (the MILP fitted that much into the gap's idle
    # link time); they were normalised to sum to 1 once, which launched every gradient in the gaps (9x what the
    # plan hid per gap for Mixtral) and delayed the all-to-alls the plan assumed undisturbed
    from adasched.planner.fsmoe.costmodel import MoEConfig

    mcfg = MoEConfig.model_validate(c.config)
    total = float(mcfg.replicated_params) * len(c.layers)
    fr = [min(1.0, x / total) for x in sl] if total > 0 else [0.0] * num_layers
    differ = ([f"{len(c.layers)} MoE layers (this run {num_layers})"] if len(c.layers) != num_layers else []) + (
        [f"{mcfg.experts} experts (this run {experts})"] if experts is not None and mcfg.experts != experts else [])
    note = (f"{path}: configuration {c.name!r} was planned for {' and '.join(differ)}: its per-layer settings "
            f"apply{' (the last layer repeated)' if len(c.layers) < num_layers else ''}, costed for the plan's "
            f"model; its gradient slices hide {sum(fr):.3g} of this run's dense gradient") if differ else None
    return PlannedPipeline(c.name, c.ep_size, [x.r_fwd for x in layers], [x.r_bwd for x in layers], fr,
                           [x.wgrad_bwd for x in layers], [x.order_fwd for x in layers], [x.order_bwd for x in layers],
                           shape_note=note)
