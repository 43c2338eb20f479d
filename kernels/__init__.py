"""adasched.kernels: fused Triton kernels, each with a torch reference, an autograd.Function and a benchmark.

Imports are lazy (``from adasched.kernels import lora_linear`` loads torch/triton on first use), so the CLI
plugin that lives here stays cheap to import.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "LoRAAdapterWeights": "adasched.kernels.lora",
    "lora_linear": "adasched.kernels.lora",
    "lora_linear_reference": "adasched.kernels.lora",
    "multi_lora_linear": "adasched.kernels.lora",
    "multi_lora_linear_reference": "adasched.kernels.lora",
    "FusedLoRALinear": "adasched.kernels.peft_compat",
    "apply_fused_lora": "adasched.kernels.peft_compat",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adasched.kernels' has no attribute {name!r}")
