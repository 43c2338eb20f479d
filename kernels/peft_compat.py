"""Switch a PEFT LoRA model to the fused kernels with one call.

``apply_fused_lora(peft_model)`` replaces every ``peft.tuners.lora.Linear`` in place with a ``FusedLoRALinear``
that shares the same parameter objects (base weight/bias, ``lora_A``/``lora_B`` ModuleDicts), so optimizers,
``state_dict`` keys and ``save_pretrained`` keep working, and computes the same function through
``adasched.kernels.lora.lora_linear``:

    y = base(x) + scaling * lora_B(lora_A(dropout(x)))     scaling = alpha / r, or alpha / sqrt(r) with rsLoRA

(PEFT's own ``scaling`` entry is used, so both conventions follow the adapter's config). Dropout is active in
``train()`` mode only, with the fused kernels' seeded Philox mask (seed drawn from torch's generator per call).
Under ``torch.autocast`` the layer computes in the autocast dtype, as PEFT's does (fp32 master weights work).

Not supported (a ``ValueError`` names the layer): DoRA and other LoRA variants, ``fan_in_fan_out`` (Conv1D
bases), merged adapters, several active adapters on one layer, a base layer that is not ``nn.Linear``.
PEFT's ``disable_adapter()`` context does not reach fused layers; call ``restore_peft_lora`` first.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .lora import lora_linear

__all__ = ["FusedLoRALinear", "apply_fused_lora", "restore_peft_lora"]


def _peft_lora_linear_cls():
    from peft.tuners.lora import Linear

    return Linear


class FusedLoRALinear(nn.Module):
    """One PEFT LoRA linear layer (one adapter) executed by the fused Triton kernels."""

    def __init__(self, base_layer: nn.Linear, lora_A: nn.ModuleDict, lora_B: nn.ModuleDict,
                 lora_dropout: nn.ModuleDict, scaling: float, adapter_name: str = "default",
                 lora_bias: bool = False):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"base_layer: {type(base_layer).__name__} is not nn.Linear")
        self.base_layer = base_layer
        self.lora_A = lora_A
        self.lora_B = lora_B
        self.lora_dropout = lora_dropout
        self.adapter_name = adapter_name
        self.scaling = float(scaling)
        self.lora_bias = bool(lora_bias)

    @property
    def dropout_p(self) -> float:
        drop = self.lora_dropout[self.adapter_name] if self.adapter_name in self.lora_dropout else None
        return float(drop.p) if isinstance(drop, nn.Dropout) else 0.0

    @classmethod
    def from_peft(cls, module: nn.Module, adapter_name: Optional[str] = None) -> "FusedLoRALinear":
        """Wrap a ``peft.tuners.lora.Linear``; ``adapter_name`` defaults to its single active adapter."""
        if not isinstance(module, _peft_lora_linear_cls()):
            raise ValueError(f"module: {type(module).__name__} is not a peft.tuners.lora.Linear")
        if adapter_name is None:
            active = [a for a in module.active_adapters if a in module.lora_A]
            if len(active) != 1:
                raise ValueError(f"adapter_name: layer has active adapters {active}; name exactly one")
            adapter_name = active[0]
        if adapter_name not in module.lora_A:
            raise ValueError(f"adapter_name: {adapter_name!r} not in {list(module.lora_A.keys())}")
        if adapter_name in getattr(module, "lora_variant", {}) or module.use_dora.get(adapter_name, False):
            raise ValueError(f"adapter {adapter_name!r}: LoRA variants (DoRA, ...) are not supported by the fused "
                             "kernels")
        if getattr(module, "fan_in_fan_out", False):
            raise ValueError("fan_in_fan_out=True (Conv1D base layers) is not supported by the fused kernels")
        if getattr(module, "merged", False):
            raise ValueError("the layer has merged adapters; unmerge before switching to the fused kernels")
        fused = cls(module.get_base_layer(), module.lora_A, module.lora_B, module.lora_dropout,
                    module.scaling[adapter_name], adapter_name,
                    lora_bias=bool(getattr(module, "lora_bias", {}).get(adapter_name, False)))
        object.__setattr__(fused, "_peft_module", module)  # for restore_peft_lora; not a registered submodule
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A[self.adapter_name].weight
        b_layer = self.lora_B[self.adapter_name]
        bias = self.base_layer.bias
        if self.lora_bias and b_layer.bias is not None:
            lb = b_layer.bias.to(x.dtype) * self.scaling
            bias = lb if bias is None else bias + lb
        p = self.dropout_p if self.training else 0.0
        return lora_linear(x, self.base_layer.weight, a, b_layer.weight, self.scaling, p, bias)

    def extra_repr(self) -> str:
        w = self.base_layer.weight
        r = self.lora_A[self.adapter_name].weight.shape[0]
        return (f"in={w.shape[1]}, out={w.shape[0]}, adapter={self.adapter_name!r}, r={r}, "
                f"scaling={self.scaling:g}, dropout={self.dropout_p:g}")


def _replace_modules(model: nn.Module, pick, make) -> int:
    targets = [(name, mod) for name, mod in model.named_modules() if pick(mod)]
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, make(mod))
    return len(targets)


def apply_fused_lora(model: nn.Module, adapter_name: Optional[str] = None) -> int:
    """Replace every ``peft.tuners.lora.Linear`` in ``model`` in place by a ``FusedLoRALinear``; returns how
    many layers were switched. Raises ``ValueError`` if there is none, or if one cannot be fused (nothing is
    replaced then: all layers are checked first)."""
    cls = _peft_lora_linear_cls()
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]
    if not found:
        raise ValueError("model: no peft.tuners.lora.Linear layers found")
    fused = {}
    for name, mod in found:
        try:
            fused[id(mod)] = FusedLoRALinear.from_peft(mod, adapter_name)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    return _replace_modules(model, lambda m: isinstance(m, cls), lambda m: fused[id(m)])


def restore_peft_lora(model: nn.Module) -> int:
    """Undo ``apply_fused_lora``: put the original PEFT layers back; returns how many were restored."""
    return _replace_modules(model, lambda m: isinstance(m, FusedLoRALinear) and hasattr(m, "_peft_module"),
                            lambda m: m._peft_module)
