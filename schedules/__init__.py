"""adasched.schedules: budget-aware LR schedules (REX, UBA, linear decay, refined from gradient norms) as torch
LRSchedulers, a gradient-norm recorder, adapters for transformers, DeepSpeed and megatron-core, and MoE
layer-wise capacity schedules (DynaMoE).

Imports are lazy (``from adasched.schedules import REX`` loads torch on first use), so the CLI plugin that lives
here (``adasched.schedules.cli``) stays cheap to import and ``adasched --help`` stays fast.
"""
from __future__ import annotations

import importlib

_MODULE_OF = {
    **dict.fromkeys(("DeepSpeedSchedule", "MEGATRON_STYLES", "MegatronParamScheduler", "ScheduleLambda",
                     "get_lambda_schedule",
                     "get_refined_schedule_with_warmup", "get_rex_schedule_with_warmup",
                     "get_uba_schedule_with_warmup"), "adapters"),
    **dict.fromkeys(("CAPACITY_SCHEDULES", "capacity_schedule", "moe_layer_configs", "schedule_shape"), "capacity"),
    **dict.fromkeys(("GradNormRecorder", "grad_norms_of", "load_norms_file", "read_norms_csv", "write_norms_csv"),
                    "gradnorm"),
    **dict.fromkeys(("REX", "SCHEDULE_NAMES", "UBA", "UBA_DEFAULT_PHI", "LinearDecay", "Refined", "WarmupDecay",
                     "cosine_multiplier", "get_schedule", "linear_multiplier", "refined_multipliers",
                     "rex_multiplier", "smooth_norms", "uba_multiplier", "warmup_decay_multiplier"), "lr"),
}

__all__ = [
    # schedulers (torch LRScheduler subclasses) and the transformers-like factory
    "REX", "UBA", "LinearDecay", "Refined", "WarmupDecay", "get_schedule", "SCHEDULE_NAMES", "UBA_DEFAULT_PHI",
    # pure multipliers of progress z in [0, 1]
    "linear_multiplier", "cosine_multiplier", "rex_multiplier", "uba_multiplier", "refined_multipliers",
    "smooth_norms", "warmup_decay_multiplier",
    # gradient norms
    "GradNormRecorder", "grad_norms_of", "read_norms_csv", "write_norms_csv", "load_norms_file",
    # adapters
    "get_rex_schedule_with_warmup", "get_uba_schedule_with_warmup", "get_refined_schedule_with_warmup",
    "get_lambda_schedule", "ScheduleLambda", "DeepSpeedSchedule", "MegatronParamScheduler", "MEGATRON_STYLES",
    # MoE layer-wise capacity schedules
    "CAPACITY_SCHEDULES", "capacity_schedule", "schedule_shape", "moe_layer_configs",
]


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
