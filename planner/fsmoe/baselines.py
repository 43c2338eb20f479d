"""Baselines evaluated with the same cost model and simulator as the chosen schedule.

- no-pipeline (DeepSpeed-MoE-like): r = 1 forward and backward, gradient all-reduce after the backward pass;
- fixed-r2 (Tutel-like, a2a_ffn_overlap_degree = 2): r = 2 both directions, all-reduce after the backward pass.
Both compute the backward weight gradients with the data gradients (autograd's order: wgrad "fused") and a
shared expert before the dispatch (no overlap), as those systems do; our schedule may defer the weight gradients
and runs a shared expert while the dispatches are in flight (planner.fsmoe.model).
"""
from __future__ import annotations

from .costmodel import StageCosts
from .model import evaluate_pipeline, orders

__all__ = ["BASELINES", "baseline_fwd_bwd_ms"]

BASELINES = {"no-pipeline": 1, "fixed-r2": 2}


def baseline_fwd_bwd_ms(fwd: StageCosts, bwd: StageCosts, r: int) -> tuple[float, float]:
    """(forward ms, backward ms) of one layer with a fixed degree r (best issue order, as for ours)."""
    f = min(evaluate_pipeline(fwd, r, o, shared_overlap=False).time_ms for o in orders(r, fwd.two_step))
    b = min(evaluate_pipeline(bwd, r, o, shared_overlap=False).time_ms for o in orders(r, bwd.two_step))
    return f, b
