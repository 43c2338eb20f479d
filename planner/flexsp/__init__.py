"""adasched.planner.flexsp: heterogeneity-adaptive sequence parallelism (FlexSP) planner.

Per global batch: micro-batch split (min-max token DP), length bucketing (padding DP), the FlexSP MILP over
(bucket, SP group) counts warm-started from the best single-degree plan, evaluated on real lengths and
kept only when better than every baseline (static SP = N, best single degree per micro-batch, greedy)."""
from .api import load_lengths, plan_sp, summarize, to_plan
from .costmodel import MODEL_PRESETS, ModelShape, SPCostModel, model_preset, sp_cost_model
from .plan import SPGroup, SPMicroBatch, SPPlan, SPStep
from .planner import PlannerConfig, StepResult, plan_step

__all__ = [
    "SPGroup", "SPMicroBatch", "SPStep", "SPPlan",
    "ModelShape", "MODEL_PRESETS", "model_preset", "SPCostModel", "sp_cost_model",
    "PlannerConfig", "StepResult", "plan_step", "plan_sp", "load_lengths", "summarize", "to_plan",
]
