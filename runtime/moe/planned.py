"""Read an FSMoE plan (``adasched plan moe``) into what the MoE runtime needs: per-layer pipeline degrees and
the dense-gradient slices. The runtime reads plans only through the plan models."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PlannedPipeline", "load_pipeline"]


@dataclass
class PlannedPipeline:
    """r_fwd/r_bwd/wgrad: per MoE layer (forward order); slice_fractions: share of the dense gradient all-reduced in
    each MoE layer's backward gap, in backward order (sums to 1 unless the plan has no slices)."""

    config: str
    ep_size: int
    r_fwd: list[int]
    r_bwd: list[int]
    slice_fractions: list[float]
    wgrad: list[str] = field(default_factory=list)
    """Backward weight-gradient placement per layer (a plan's ``wgrad_bwd``; older plans read as "fused"); left
    empty it is filled with "fused" for every layer."""

    def __post_init__(self):
        if not self.wgrad:
            self.wgrad = ["fused"] * len(self.r_fwd)
        if not len(self.r_fwd) == len(self.r_bwd) == len(self.wgrad):
            raise ValueError(f"r_fwd, r_bwd and wgrad need one entry per layer: {len(self.r_fwd)}, "
                             f"{len(self.r_bwd)}, {len(self.wgrad)}")

    def slices_for(self, dense_elements: int) -> list[float]:
        """Slice sizes in elements for a model with ``dense_elements`` replicated gradient elements."""
        return [f * dense_elements for f in self.slice_fractions]


def load_pipeline(path: str | Path, *, ep_size: int, num_layers: int, config: str | None = None) -> PlannedPipeline:
    """Degrees and slices of ``config`` (default: the plan's first configuration) for ``num_layers`` MoE layers
    (a plan with fewer layers repeats its last one). Raises InputError naming the file when the configuration is
    missing or was planned for another EP size."""
    from adasched.planner.fsmoe.plan import MoEPlan
    from adasched.planner.plan import load_plan
    from adasched.profiler.io import InputError

    plan = load_plan(path, expect=MoEPlan)
    cfgs = [c for c in plan.configs if config in (None, c.name)]
    if not cfgs:
        raise InputError(str(path), f"configuration {config!r} not in the plan "
                                    f"({', '.join(c.name for c in plan.configs)})")
    c = cfgs[0]
    if c.ep_size != ep_size:
        raise InputError(str(path), f"configuration {c.name!r} was planned for EP size {c.ep_size}, "
                                    f"this run has {ep_size} ranks")
    if num_layers < 1:
        raise ValueError(f"num_layers: {num_layers} must be >= 1")
    layers = [c.layers[min(i, len(c.layers) - 1)] for i in range(num_layers)]
    sl = [float(x) for x in c.grad_slices[:num_layers]] + [0.0] * max(0, num_layers - len(c.grad_slices))
    tot = sum(sl)
    fr = [x / tot for x in sl] if tot > 0 else [1.0 / num_layers] * num_layers
    return PlannedPipeline(c.name, c.ep_size, [x.r_fwd for x in layers], [x.r_bwd for x in layers], fr,
                           [x.wgrad_bwd for x in layers])
