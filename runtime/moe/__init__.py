"""adasched.runtime.moe: MoE layer, routers and expert parallelism."""
from .ep import EPExperts, ExpertParallel, GradSliceReducer, ep_experts
from .layer import MoELayer
from .planned import PlannedPipeline, load_pipeline
from .router import ROUTER_KINDS, Router, RouterConfig, RouterStats, Routing

__all__ = ["MoELayer", "Router", "RouterConfig", "RouterStats", "Routing", "ROUTER_KINDS",
           "ExpertParallel", "EPExperts", "GradSliceReducer", "ep_experts", "PlannedPipeline", "load_pipeline"]
