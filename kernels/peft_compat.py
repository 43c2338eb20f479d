"""Switch a PEFT LoRA model to the fused kernels with one call.

``apply_fused_lora(peft_model)`` turns every ``peft.tuners.lora.Linear`` of the model, in place, into a
``FusedLoRALinear`` - a subclass of PEFT's layer that differs only in its ``forward``. The module stays where it
was, with the same parameters, buffers, adapter state and ``state_dict`` keys, and it is still one of PEFT's tuner
layers, so everything PEFT does with its layers keeps working: ``save_pretrained`` / ``from_pretrained``,
``load_adapter``, ``set_adapter``, ``disable_adapter()``, ``merge_adapter`` / ``unmerge_adapter``,
``merge_and_unload`` / ``unload``, ``delete_adapter``, ``set_scale``, optimizers holding the parameters.

The forward computes what PEFT's does, through ``adasched.kernels.lora.lora_linear``:

    y = base(x) + scaling * lora_B(lora_A(dropout(x)))     scaling = alpha / r, or alpha / sqrt(r) with rsLoRA

(PEFT's own ``scaling`` entry, read at every call, so both conventions and ``set_scale`` follow the adapter's
config; with ``lora_bias`` lora_B's bias joins the base bias times ``scaling``). Dropout is active when the
adapter's dropout module is in ``train()`` mode, with the fused kernels' seeded Philox mask (seed drawn from torch's
generator per call: the same distribution as PEFT's mask, not the same draw). Under ``torch.autocast`` the layer
computes in the autocast dtype, as PEFT's does (fp32 master weights work). Without autocast, adapters in a
wider dtype than the input - PEFT's default on a bf16/fp16 model, whose ``get_peft_model`` upcasts the adapters to
fp32 - get PEFT's numerics: the input cast to the adapters' dtype, S, the LoRA term and its gradients in fp32,
added to the base output in fp32 and rounded to the input's dtype (equal to PEFT's layer; torch ops, not the
fused kernels, except the dropout mask: the speed of the fused path needs autocast or adapters in the input's
dtype; with ``lora_bias`` that dtype mix runs PEFT's own forward, which adds lora_B's bias inside the fp32 term).
Adapters not wider than the input without autocast (fp16 adapters on an fp32 model, bf16 adapters on fp16 and the
reverse; PEFT computes the LoRA term in the adapters' dtype) run PEFT's own forward too.

The fused kernels serve a layer in PEFT's plain state: one active adapter, not merged, adapters enabled, no extra
forward arguments. Whenever PEFT puts the layer in another state - ``disable_adapter()``, merged weights, several
active adapters (``set_adapter([...])``), an active adapter this layer lacks, a LoRA variant such as DoRA loaded
later, a mixed-adapter batch (``adapter_names=``) - the call runs PEFT's own forward, so the output is always
PEFT's. ``apply_fused_lora`` itself refuses (``ValueError`` naming the layer, nothing switched) layers that could
never run fused: DoRA and other variants on the active adapter, ``fan_in_fan_out`` (Conv1D bases), merged
adapters, several active adapters, a base layer that is not ``nn.Linear``, subclasses of PEFT's ``Linear``.

A base weight that requires grad is refused while grad mode is on (the kernels compute no gradient for it):
``ValueError`` from the layer's forward, naming ``base_layer.weight``; under ``torch.no_grad()`` it runs.
"""
from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.lora import Linear as _PeftLoraLinear
from torch import nn

from .lora import _autocasting, lora_linear

__all__ = ["FusedLoRALinear", "apply_fused_lora", "restore_peft_lora"]


def _is_variant(module: nn.Module, name: str) -> bool:
    """Whether adapter ``name`` of a PEFT layer is a LoRA variant (DoRA, ...), which the fused kernels do not run."""
    return name in getattr(module, "lora_variant", {}) or bool(getattr(module, "use_dora", {}).get(name, False))


class FusedLoRALinear(_PeftLoraLinear):
    """A ``peft.tuners.lora.Linear`` whose forward runs the fused Triton kernels when the layer is in PEFT's plain
    one-adapter state, and PEFT's forward otherwise. Made from an existing PEFT layer by ``from_peft`` /
    ``apply_fused_lora`` (in place); ``restore_peft_lora`` turns it back."""

    @classmethod
    def from_peft(cls, module: nn.Module, adapter_name: Optional[str] = None) -> "FusedLoRALinear":
        """Switch ``module`` (a ``peft.tuners.lora.Linear``) to the fused kernels in place and return it.
        ``adapter_name``, when given, is made the layer's active adapter first (as PEFT's ``set_adapter``)."""
        cls._check(module, adapter_name)
        if adapter_name is not None and adapter_name not in module.lora_A:
            raise ValueError(f"adapter_name: {adapter_name!r} not in {list(module.lora_A.keys())}")
        return cls._switch(module, adapter_name)

    @classmethod
    def _switch(cls, module: nn.Module, adapter_name: Optional[str], inference_mode: bool = False
                ) -> "FusedLoRALinear":
        if adapter_name is not None:
            _set_adapter(module.set_adapter, adapter_name, inference_mode=inference_mode)
        module.__class__ = cls
        return module

    @staticmethod
    def _check(module: nn.Module, adapter_name: Optional[str]) -> None:
        """Raises ValueError if ``module`` can never run the fused kernels (nothing is changed). A layer without
        the adapter (``adapter_name``, else the active one) is fine: PEFT computes its base projection only."""
        if type(module) not in (_PeftLoraLinear, FusedLoRALinear):
            raise ValueError(f"module: {type(module).__name__} is not a peft.tuners.lora.Linear"
                             + (" (subclasses are not supported)" if isinstance(module, _PeftLoraLinear) else ""))
        if adapter_name is None:
            active = [a for a in module.active_adapters if a in module.lora_A]
            if len(active) > 1:
                raise ValueError(f"adapter_name: layer has active adapters {active}; name exactly one")
            adapter_name = active[0] if active else None
        if adapter_name is not None and adapter_name in module.lora_A and _is_variant(module, adapter_name):
            raise ValueError(f"adapter {adapter_name!r}: LoRA variants (DoRA, ...) are not supported by the fused "
                             "kernels")
        if getattr(module, "fan_in_fan_out", False):
            raise ValueError("fan_in_fan_out=True (Conv1D base layers) is not supported by the fused kernels")
        if getattr(module, "merged", False):
            raise ValueError("the layer has merged adapters; unmerge before switching to the fused kernels")
        base = module.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base_layer: {type(base).__name__} is not nn.Linear")
        if type(base).forward is not nn.Linear.forward:
            # the fused kernels read base.weight and base.bias and never call the base layer: a subclass's forward
            # (a fake-quantising QAT Linear, a scaled one) was skipped silently
            raise ValueError(f"base_layer: {type(base).__name__} overrides nn.Linear.forward, which the fused kernels "
                             "would skip (they read its weight and bias)")

    def fused_adapter(self) -> Optional[str]:
        """The adapter the fused kernels compute now, or None when the layer's state needs PEFT's forward."""
        if self.disable_adapters or self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        if _is_variant(self, name):
            return None
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear) or not all(_called_plainly(m) for m in (base, self.lora_A[name],
                                                                                    self.lora_B[name])):
            return None
        return name

    @property
    def dropout_p(self) -> float:
        """Dropout probability of the adapter the fused kernels compute (0.0 when none or no dropout)."""
        name = self.fused_adapter()
        drop = self.lora_dropout[name] if name is not None and name in self.lora_dropout else None
        return float(drop.p) if isinstance(drop, nn.Dropout) else 0.0

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = None if args or any(v is not None for v in kwargs.values()) else self.fused_adapter()
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        if base.weight.requires_grad and torch.is_grad_enabled():
            raise ValueError("base_layer.weight: requires grad, but the fused kernels compute no gradient for it; "
                             "freeze it (requires_grad_(False)) or call restore_peft_lora(model) first")
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        has_lora_bias = getattr(self, "lora_bias", {}).get(name, False) and lora_b.bias is not None
        if has_lora_bias and not _autocasting(x.device.type) and \
                torch.promote_types(x.dtype, lora_a.weight.dtype) != x.dtype:
            # adapters wider than x (fp32 on bf16) with lora_bias: PEFT adds lora_B's bias inside the fp32 term,
            # lora_linear takes one bias in x's dtype - PEFT's own forward keeps its numerics
            return super().forward(x, *args, **kwargs)
        if not _autocasting(x.device.type) and lora_a.weight.dtype != x.dtype and \
                torch.promote_types(x.dtype, lora_a.weight.dtype) != lora_a.weight.dtype:
            # adapters not wider than x (fp16 on an fp32 model, bf16 on fp16 and the reverse): PEFT casts x to the
            # adapters' dtype and computes the LoRA term there; lora_linear computed it in x's dtype (7e-4 from
            # PEFT's output on fp32, 8e-3 on bf16 x with fp16 adapters) - PEFT's own forward
            return super().forward(x, *args, **kwargs)
        scaling = float(self.scaling[name])
        bias = base.bias
        if has_lora_bias:
            lb = lora_b.bias * scaling
            bias = lb if bias is None else bias + lb.to(bias.dtype)
        drop = self.lora_dropout[name] if name in self.lora_dropout else None
        p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
        if p >= 1.0:  # everything dropped: PEFT's own forward (lora_linear takes p in [0, 1): it raised here)
            return super().forward(x, *args, **kwargs)
        return lora_linear(x, base.weight, lora_a.weight, lora_b.weight, scaling, p, bias)

    def __repr__(self) -> str:
        return "fused_" + super().__repr__()


def _called_plainly(m: nn.Module) -> bool:
    """Calling ``m`` would run nn.Linear.forward and nothing else: no forward/backward hooks (its own or global:
    weight_norm's pre-hook, accelerate's offload hook, a user's), no instance-level forward. The fused kernels read
    the weights instead of calling the layers, so where a call would do more, PEFT's forward runs."""
    from torch.nn.modules import module as _m

    return (type(m).forward is nn.Linear.forward and "forward" not in m.__dict__
            and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
            and not (_m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks
                     or _m._global_backward_pre_hooks))


def _peft_layers(model: nn.Module) -> list:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _PeftLoraLinear)]


def apply_fused_lora(model: nn.Module, adapter_name: Optional[str] = None) -> int:
    """Switch every ``peft.tuners.lora.Linear`` in ``model`` to ``FusedLoRALinear`` in place; returns how many
    layers were switched (layers already switched count too; a layer without the active adapter is switched and
    computes its base projection, as PEFT's). ``adapter_name``, when given, is made the active adapter
    first (``PeftModel.set_adapter`` for a PeftModel, else each layer's ``set_adapter``). Raises ``ValueError`` if
    there is no such layer, or if one cannot be fused (nothing is changed then: every layer is checked first)."""
    found = _peft_layers(model)
    if not found:
        raise ValueError("model: no peft.tuners.lora.Linear layers found")
    for name, mod in found:
        try:
            FusedLoRALinear._check(mod, adapter_name)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    if adapter_name is not None and not any(adapter_name in mod.lora_A for _, mod in found):
        raise ValueError(f"adapter_name: {adapter_name!r} is in no LoRA layer (adapters: "
                         f"{sorted({a for _, mod in found for a in mod.lora_A})})")
    if adapter_name is not None:
        # model-wide, whatever the wrapper: PeftModel / LoraModel have set_adapter; a model PEFT injected adapters
        # into (inject_adapter_in_model, transformers' add_adapter) takes PEFT's function. Both switch the
        # modules_to_save wrappers too: per layer only, they stayed on the old adapter (adapter b's LoRA with
        # adapter a's head, a's head trainable)
        from peft import PeftModel
        from peft.tuners.lora import LoraModel
        from peft.tuners.tuners_utils import set_adapter

        # PEFT's set_adapter makes the adapter trainable unless told inference_mode: an adapter loaded for
        # inference (PeftModel.from_pretrained, is_trainable=False: its config says inference_mode) stays frozen
        # (it was unfrozen: an optimiser over requires_grad parameters picked it up, forwards built graphs)
        config = (getattr(model, "peft_config", None) or {}).get(adapter_name)
        inference_mode = bool(getattr(config, "inference_mode", False))
        if isinstance(model, (PeftModel, LoraModel)):
            _set_adapter(model.set_adapter, adapter_name, inference_mode=inference_mode)
        else:
            _set_adapter(set_adapter, model, adapter_name, inference_mode=inference_mode)
    else:
        inference_mode = False
    for _, mod in found:
        FusedLoRALinear._switch(mod, adapter_name, inference_mode)
    return len(found)


def _set_adapter(fn, *args, inference_mode: bool) -> None:
    """PEFT's set_adapter with ``inference_mode`` where this PEFT takes it (0.21 does; older ones make the adapter
    trainable, as they always did)."""
    try:
        fn(*args, inference_mode=inference_mode)
    except TypeError as err:
        if "inference_mode" not in str(err):
            raise
        fn(*args)


def restore_peft_lora(model: nn.Module) -> int:
    """Undo ``apply_fused_lora``: the fused layers become plain ``peft.tuners.lora.Linear`` again (same module
    objects, same state); returns how many were restored."""
    layers = [m for m in model.modules() if type(m) is FusedLoRALinear]
    for m in layers:
        m.__class__ = _PeftLoraLinear
    return len(layers)
