"""adasched.runtime.moe: MoE layer, routers and expert parallelism."""
from .deepspeed_ep import prepare_for_deepspeed
from .ep import EPExperts, ExpertGradReducer, ExpertParallel, GradSliceReducer, ep_experts
from .layer import MoELayer, named_parameters_by_kind, replica_divergence, split_parameters, step_routers
from .planned import PlannedPipeline, load_pipeline
from .router import ROUTER_KINDS, Router, RouterConfig, RouterStats, Routing

__all__ = ["MoELayer", "Router", "RouterConfig", "RouterStats", "Routing", "ROUTER_KINDS",
           "ExpertParallel", "EPExperts", "GradSliceReducer", "ExpertGradReducer", "ep_experts",
           "named_parameters_by_kind", "split_parameters", "replica_divergence", "step_routers", "PlannedPipeline",
           "load_pipeline", "prepare_for_deepspeed"]
