"""apply_fused_lora(model, adapter_name=...) on a model that is not a PeftModel (a LoraModel, or a model PEFT
injected adapters into, as transformers' add_adapter does) switched only the LoRA layers: the modules_to_save
wrappers stayed on the old adapter (adapter b's LoRA with adapter a's head, a's head trainable). Failed before."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from adasched.kernels.peft_compat import apply_fused_lora  # noqa: E402


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        return self.head(torch.tanh(self.q(x)))


def _two_adapters():
    cfg = dict(r=4, lora_alpha=8, target_modules=["q"], modules_to_save=["head"], init_lora_weights=False)
    pm = peft.get_peft_model(_Net(), peft.LoraConfig(**cfg), adapter_name="one")
    pm.add_adapter("two", peft.LoraConfig(**cfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.3)
    return pm


@pytest.mark.parametrize("which", ["peft_model", "lora_model"])
def test_adapter_name_switches_modules_to_save_too(which):
    pm = _two_adapters()
    x = torch.randn(5, 16)
    pm.set_adapter("two")
    with torch.no_grad():
        want = pm(x)
    pm.set_adapter("one")
    fused = copy.deepcopy(pm)
    target = fused if which == "peft_model" else fused.base_model
    assert apply_fused_lora(target, adapter_name="two") == 1
    with torch.no_grad():
        got = fused(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    trainable = sorted(n for n, p in fused.named_parameters() if p.requires_grad)
    assert trainable and all(".two." in n for n in trainable), trainable
    assert any("modules_to_save.two" in n for n in trainable), trainable


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # a second injected adapter
def test_injected_adapters_switch_with_their_heads():
    from peft import inject_adapter_in_model

    cfg = dict(r=4, lora_alpha=8, target_modules=["q"], modules_to_save=["head"], init_lora_weights=False)
    net = inject_adapter_in_model(peft.LoraConfig(**cfg), _Net(), adapter_name="one")
    net = inject_adapter_in_model(peft.LoraConfig(**cfg), net, adapter_name="two")
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(5, 16)
    ref = copy.deepcopy(net)
    from peft.tuners.tuners_utils import set_adapter

    set_adapter(ref, "two")
    with torch.no_grad():
        want = ref(x)
    assert apply_fused_lora(net, adapter_name="two") == 1
    with torch.no_grad():
        got = net(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert net.head.active_adapters == ["two"]


def test_adapter_name_keeps_an_inference_adapter_frozen(tmp_path):
    """Hunt finding: apply_fused_lora(model, adapter_name=...) called PEFT's set_adapter without inference_mode,
    so an adapter loaded for inference (PeftModel.from_pretrained: frozen) became trainable. A training model's
    newly selected adapter still becomes trainable, as with PEFT's own set_adapter; outputs are PEFT's."""
    pm = _two_adapters()
    pm.save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    base = _Net()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "two"), adapter_name="two")
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "two"), adapter_name="two")
    assert not any(p.requires_grad for p in loaded.parameters())
    assert apply_fused_lora(loaded, adapter_name="two") == 1
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(5, 16)
    torch.testing.assert_close(loaded(x), ref(x), rtol=1e-5, atol=1e-5)
    # training: switching to "two" makes it the trainable one, "one" frozen (PEFT's set_adapter semantics)
    apply_fused_lora(pm, adapter_name="two")
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".two." in n or n.endswith(".two") for n in trainable if "lora_" in n), trainable
    assert any("lora_A.two" in n for n in trainable) and not any("lora_A.one" in n for n in trainable)


def test_set_adapter_without_inference_mode_falls_back(monkeypatch):
    """An older PEFT whose set_adapter takes no inference_mode: apply_fused_lora still switches the adapter (as it
    did before; the adapter becomes trainable there, as PEFT's own set_adapter makes it)."""
    pm = _two_adapters()
    real = peft.PeftModel.set_adapter
    calls = []

    def old_style(self, adapter_name):
        calls.append(adapter_name)
        return real(self, adapter_name)

    monkeypatch.setattr(peft.PeftModel, "set_adapter", old_style)
    assert apply_fused_lora(pm, adapter_name="two") == 1
    assert calls == ["two"] and pm.active_adapter == "two"


@pytest.mark.parametrize("x_dtype, a_dtype", [(torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_adapters_not_wider_than_the_input_get_peft_numerics(x_dtype, a_dtype):
    """fp16 adapters on an fp32 model (26th session's hunt; bf16 x with fp16 adapters and the reverse, its review):
    PEFT casts x to the adapters' dtype and computes the LoRA term there; the fused layer computed it in x's dtype,
    7e-4 (fp32 x) / 8e-3 (bf16 x) from PEFT's output and gradients. It runs PEFT's own forward there now: the same
    output and gradients, to the element."""
    torch.manual_seed(torch.seed() % 2**31)
    net = nn.Sequential(nn.Linear(16, 24, bias=False)).to(x_dtype)
    pm = peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data = (p.data.float() + torch.randn(p.shape) * 0.5).to(a_dtype)
    ref = copy.deepcopy(pm)
    x = torch.randn(5, 16).to(x_dtype)
    g = torch.randn(5, 24).to(x_dtype)
    y_ref = ref(x)
    (y_ref * g).sum().backward()
    assert apply_fused_lora(pm) == 1
    y = pm(x)
    (y * g).sum().backward()
    assert torch.equal(y, y_ref)
    for (n, p), (_, q) in zip(pm.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), n
