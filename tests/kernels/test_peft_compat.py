"""A real PEFT LoRA model on a tiny torch module, switched to the fused kernels with one call."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from adasched.kernels.lora import lora_linear, lora_linear_reference  # noqa: E402
from adasched.kernels.peft_compat import FusedLoRALinear, apply_fused_lora, restore_peft_lora  # noqa: E402


class TinyBlock(nn.Module):
    def __init__(self, d=24, h=40):
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        x = x + self.v(torch.tanh(self.q(x)))
        return x + self.down(torch.relu(self.up(x)))


def _peft_model(r, alpha, dropout, rslora, lora_bias=False):
    torch.manual_seed(0)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["q", "v", "up"],
                     use_rslora=rslora, init_lora_weights=False, lora_bias=lora_bias)
    model = get_peft_model(TinyBlock(), cfg)
    with torch.no_grad():  # fresh random adapters (B is never zero here)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("r,alpha,rslora,lora_bias", [(4, 8, False, False), (8, 16, True, False),
                                                      (4, 6, False, True)])
def test_fused_model_matches_peft_outputs_and_grads(r, alpha, rslora, lora_bias):
    ref = _peft_model(r, alpha, 0.0, rslora, lora_bias)
    fused = copy.deepcopy(ref)
    keys_before = list(fused.state_dict().keys())
    assert apply_fused_lora(fused) == 3
    assert list(fused.state_dict().keys()) == keys_before  # save_pretrained sees the same tensors
    layers = [m for m in fused.modules() if isinstance(m, FusedLoRALinear)]
    assert len(layers) == 3
    want = alpha / r ** 0.5 if rslora else alpha / r
    assert all(abs(m.scaling["default"] - want) < 1e-12 for m in layers)

    x = torch.randn(3, 11, 24, requires_grad=True)
    xf = x.detach().clone().requires_grad_()
    for mode in ("train", "eval"):
        getattr(ref, mode)()
        getattr(fused, mode)()
        y_ref, y = ref(x), fused(xf)
        torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=2e-5)
    dy = torch.randn_like(y_ref)
    ref.zero_grad()
    fused.zero_grad()
    gx_ref = torch.autograd.grad(ref(x), x, dy)[0]
    gx = torch.autograd.grad(fused(xf), xf, dy)[0]
    # dX sums through three stacked layers in a different order than PEFT's: judge both against float64
    ref64 = copy.deepcopy(ref).double()
    x64 = x.detach().double().requires_grad_()
    gx64 = torch.autograd.grad(ref64(x64), x64, dy.double())[0]
    err_fused, err_peft = (gx.double() - gx64).abs().max().item(), (gx_ref.double() - gx64).abs().max().item()
    assert err_fused <= max(4 * err_peft, 2e-5 * gx64.abs().max().item()), (err_fused, err_peft)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)
    ref(x).backward(dy)
    fused(xf).backward(dy)
    g_ref, g = _lora_grads(ref), _lora_grads(fused)
    assert g.keys() == g_ref.keys() and len(g) >= 6
    for n in g:
        # gradients reach ~1e3 here: tolerance relative to the tensor's largest element (fp32 rounding)
        atol = 1e-5 * g_ref[n].abs().max().item()
        torch.testing.assert_close(g[n], g_ref[n], atol=atol, rtol=1e-4, msg=lambda m: f"{n}: {m}")

    assert restore_peft_lora(fused) == 3
    assert not any(isinstance(m, FusedLoRALinear) for m in fused.modules())
    fused.eval()
    ref.eval()
    torch.testing.assert_close(fused(xf), ref(x))


def test_dropout_in_train_mode_uses_the_seeded_mask():
    model = _peft_model(4, 8, 0.3, False)
    peft_layer = copy.deepcopy(model.base_model.model.up)  # PEFT's own layer, kept as the reference
    layer = FusedLoRALinear.from_peft(model.base_model.model.up)
    assert layer is model.base_model.model.up  # switched in place
    assert layer.dropout_p == pytest.approx(0.3)
    x = torch.randn(2, 7, 24, requires_grad=True)
    layer.train()
    torch.manual_seed(17)
    y = layer(x)
    torch.manual_seed(17)  # the reference draws the same seed from torch's generator -> the same Philox mask
    y_ref = lora_linear_reference(x, layer.base_layer.weight, layer.lora_A["default"].weight,
                                  layer.lora_B["default"].weight, layer.scaling["default"], 0.3,
                                  layer.base_layer.bias)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=2e-5)
    dy = torch.randn_like(y)
    a = layer.lora_A["default"].weight
    torch.testing.assert_close(torch.autograd.grad(y, (x, a), dy), torch.autograd.grad(y_ref, (x, a), dy),
                               atol=5e-5, rtol=5e-5)
    layer.eval()  # eval: no dropout -> exactly PEFT's eval output
    peft_layer.eval()
    torch.testing.assert_close(layer(x), peft_layer(x), atol=2e-5, rtol=2e-5)


def test_unsupported_layers_are_refused_without_partial_replacement():
    torch.manual_seed(0)
    model = get_peft_model(TinyBlock(), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], use_dora=True))
    with pytest.raises(ValueError, match="variants"):
        apply_fused_lora(model)
    assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())
    with pytest.raises(ValueError, match="no peft"):
        apply_fused_lora(TinyBlock())


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_autocast_mixed_precision_like_peft(dt):
    """fp32 weights under torch.autocast (HF Trainer's bf16/fp16 mode): the fused layers compute in the autocast
    dtype as PEFT's do - including after a plain Linear whose output is already in that dtype (``down`` here;
    this raised a dtype error before) - and the fp32 LoRA parameters get their gradients."""
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "down"], init_lora_weights=False)
    ref = get_peft_model(TinyBlock(), cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    fused = copy.deepcopy(ref)
    assert apply_fused_lora(fused) == 2
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(3, 11, 24)
    dy = torch.randn(3, 11, 24)
    outs = {}
    for name, model in (("peft", ref), ("fused", fused)):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dt):
            y = model(x)
            assert model.base_model.model.down(x.new_ones(2, 40)).dtype == dt  # the LoRA layer computes in dt
        (y.float() * dy).sum().backward()
        outs[name] = (y.float(), _lora_grads(model))
    y64 = ref64(x.double())
    (y64 * dy.double()).sum().backward()
    g64 = _lora_grads(ref64)
    assert all(g.dtype == torch.float32 for g in outs["fused"][1].values())

    def err(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    for i, (y_or_g, want) in enumerate([(0, y64)] + [(n, g64[n]) for n in g64]):
        got = {k: (v[0] if i == 0 else v[1][y_or_g]) for k, v in outs.items()}
        e_fused, e_peft = err(got["fused"], want), err(got["peft"], want)
        assert e_fused <= max(2 * e_peft, 1e-3), (y_or_g, e_fused, e_peft)


def test_autocast_leaves_float64_alone_as_f_linear_does():
    x, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    a, b = torch.randn(2, 8, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w, a, b, 0.5)
        assert torch.nn.functional.linear(x, w).dtype == torch.float64
    assert y.dtype == torch.float64
    # (the interpreted kernels accumulate in float32: float64 in, float64 out, float32-close values)
    torch.testing.assert_close(y, lora_linear_reference(x, w, a, b, 0.5), rtol=1e-5, atol=1e-5)


def _randomize(model, tag=""):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and tag in name:
                p.copy_(torch.randn_like(p) * 0.3)


def _two_adapter_model():
    model = _peft_model(4, 8, 0.0, False)
    model.add_adapter("two", LoraConfig(r=2, lora_alpha=5, target_modules=["q", "v", "up"], use_rslora=True,
                                        init_lora_weights=False))
    _randomize(model, ".two.")
    return model


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls that reach the fused kernels from a FusedLoRALinear."""
    import adasched.kernels.peft_compat as pc

    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return lora_linear(*args, **kwargs)

    monkeypatch.setattr(pc, "lora_linear", spy)
    return calls


def test_save_pretrained_of_a_fused_model_loads_back(tmp_path):
    """Review finding: PEFT finds the adapter weights to save by visiting its tuner layers; the fused layers were
    not PEFT layers any more, so save_pretrained wrote an adapter file with no tensors at all (a warning only) and
    from_pretrained loaded random initial weights. Now the layers stay PEFT layers."""
    from peft import PeftModel
    from safetensors.torch import load_file

    model = _peft_model(4, 8, 0.1, False)
    assert apply_fused_lora(model) == 3
    model.eval()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert len(saved) == 6 and all("lora_" in k for k in saved)
    torch.manual_seed(0)  # the same base weights as _peft_model's
    loaded = PeftModel.from_pretrained(TinyBlock(), tmp_path).eval()
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(loaded(x), model(x), atol=2e-5, rtol=2e-5)
    # and a fused model takes a second adapter from disk
    model.load_adapter(tmp_path, adapter_name="again")
    model.set_adapter("again")
    torch.testing.assert_close(model(x), loaded(x), atol=2e-5, rtol=2e-5)


def test_peft_adapter_controls_reach_fused_layers(fused_calls):
    """Review finding: set_adapter() left the fused layers computing the first adapter (outputs off by ~4.6),
    disable_adapter() raised "No adapter layers found", merge_and_unload() / unload() raised AttributeError and
    delete_adapter() KeyError. Each is now checked against the same call on PEFT's own model; the fused kernels
    run exactly when the layer is in the plain one-adapter state."""
    ref = _two_adapter_model()
    fused = copy.deepcopy(ref)
    assert apply_fused_lora(fused) == 3
    ref.eval()
    fused.eval()
    x = torch.randn(2, 5, 24)

    def same(runs_fused):
        n = len(fused_calls)
        y = fused(x)
        assert len(fused_calls) - n == (3 if runs_fused else 0)
        torch.testing.assert_close(y, ref(x), atol=2e-5, rtol=2e-5)
        return y

    y_default = same(True)
    for m in (ref, fused):
        m.set_adapter("two")
    y_two = same(True)
    assert (y_two - y_default).abs().max() > 0.1  # the adapters differ: the switch is visible
    with ref.disable_adapter(), fused.disable_adapter():
        same(False)
    for m in (ref, fused):
        m.base_model.set_adapter(["default", "two"])  # several active adapters: PEFT's forward
    same(False)
    for m in (ref, fused):
        m.set_adapter("default")
        m.merge_adapter()
    same(False)
    for m in (ref, fused):
        m.unmerge_adapter()
    same(True)
    for m in (ref, fused):
        m.delete_adapter("default")
    same(True)  # "two" is active now
    merged_ref, merged = copy.deepcopy(ref).merge_and_unload(), copy.deepcopy(fused).merge_and_unload()
    assert not any(isinstance(m, FusedLoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(x), merged_ref(x), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(merged(x), ref(x), atol=2e-5, rtol=2e-5)
    unloaded = fused.unload()
    torch.manual_seed(0)
    torch.testing.assert_close(unloaded(x), TinyBlock()(x))


def test_base_bias_trained_with_bias_all_and_adapter_name_argument():
    """PEFT's bias="all" trains the base biases: their gradients match PEFT's; apply_fused_lora(adapter_name=...)
    makes that adapter the active one."""
    torch.manual_seed(0)
    ref = get_peft_model(TinyBlock(), LoraConfig(r=4, lora_alpha=8, target_modules=["v", "up"], bias="all",
                                                 init_lora_weights=False))
    _randomize(ref)
    ref.add_adapter("two", LoraConfig(r=3, lora_alpha=4, target_modules=["v", "up"], init_lora_weights=False))
    _randomize(ref, ".two.")
    fused = copy.deepcopy(ref)
    assert apply_fused_lora(fused, adapter_name="two") == 2
    ref.set_adapter("two")
    assert fused.active_adapter == "two"
    x = torch.randn(3, 4, 24)
    dy = torch.randn(3, 4, 24)
    grads = []
    for m in (ref, fused):
        m.zero_grad(set_to_none=True)
        m(x).backward(dy)
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any(n.endswith("base_layer.bias") for n in grads[0])
    for n, g in grads[0].items():
        assert grads[1][n] is not None, n
        torch.testing.assert_close(grads[1][n], g, atol=1e-5 * g.abs().max().item() + 1e-6, rtol=1e-4)


def test_adapter_on_a_subset_of_the_layers(fused_calls):
    """Review finding: with an active adapter that targets only some of the LoRA layers (another adapter covers the
    rest), apply_fused_lora refused the whole model ("active adapters []"). The layers without it now compute the
    base projection as PEFT's do, the others run fused; an adapter name that no layer has is refused."""
    ref = _peft_model(4, 8, 0.0, False)
    ref.add_adapter("q_only", LoraConfig(r=2, lora_alpha=3, target_modules=["q"], init_lora_weights=False))
    _randomize(ref, ".q_only.")
    ref.set_adapter("q_only")
    fused = copy.deepcopy(ref)
    with pytest.raises(ValueError, match="adapter_name: 'nope'"):
        apply_fused_lora(fused, adapter_name="nope")
    assert not any(isinstance(m, FusedLoRALinear) for m in fused.modules())
    assert apply_fused_lora(fused) == 3
    x = torch.randn(2, 5, 24)
    y = fused(x)
    assert len(fused_calls) == 1  # q only
    torch.testing.assert_close(y, ref(x), atol=2e-5, rtol=2e-5)
    assert apply_fused_lora(fused, adapter_name="default") == 3
    ref.set_adapter("default")
    torch.testing.assert_close(fused(x), ref(x), atol=2e-5, rtol=2e-5)
    assert len(fused_calls) == 4


def test_trainable_base_weight_is_refused_not_silently_frozen():
    """The kernels compute no gradient for the base weight: a PEFT layer whose base weight requires grad raises
    (naming it) instead of training everything but W; under no_grad / inference_mode it runs and matches PEFT."""
    ref = _peft_model(4, 8, 0.0, False).eval()
    fused = copy.deepcopy(ref)
    apply_fused_lora(fused)
    fused.base_model.model.up.base_layer.weight.requires_grad_(True)
    x = torch.randn(2, 3, 24)
    with pytest.raises(ValueError, match="base_layer.weight"):
        fused(x)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), atol=2e-5, rtol=2e-5)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), ref(x), atol=2e-5, rtol=2e-5)


def _bf16_model_with_fp32_adapters(dropout, lora_bias=False):
    """PEFT's default dtype mix: get_peft_model on a bf16 model upcasts the adapters to fp32
    (autocast_adapter_dtype=True), and without torch.autocast PEFT computes the LoRA term in fp32."""
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q", "v", "up"],
                     init_lora_weights=False, lora_bias=lora_bias)
    model = get_peft_model(TinyBlock().to(torch.bfloat16), cfg)
    _randomize(model)
    lora = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert lora and set(lora.values()) == {torch.float32}
    return model


def test_bf16_base_fp32_adapters_without_autocast_match_peft():
    """Known gap, closed: with a bf16 base and fp32 adapters (no autocast) the LoRA term was computed in bf16
    (the adapters cast down), so lora_A/lora_B gradients were off PEFT's by ~2e-3 relative. The term now runs in
    the adapters' dtype as PEFT's does: per layer, the output, dX and the LoRA gradients equal PEFT's (the same
    ops in the same dtypes); the whole model's outputs too."""
    ref = _bf16_model_with_fp32_adapters(0.0)
    fused = copy.deepcopy(ref)
    apply_fused_lora(fused)
    x = torch.randn(3, 13, 24).to(torch.bfloat16)
    torch.testing.assert_close(fused(x), ref(x), atol=0, rtol=0)
    for name in ("q", "v", "up"):
        layers = {"peft": getattr(ref.base_model.model, name), "fused": getattr(fused.base_model.model, name)}
        assert isinstance(layers["fused"], FusedLoRALinear) and not isinstance(layers["peft"], FusedLoRALinear)
        dy = torch.randn(3, 13, layers["peft"].out_features).to(torch.bfloat16)
        got = {}
        for kind, layer in layers.items():
            xx = x.clone().requires_grad_()
            y = layer(xx)
            params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            got[kind] = (y, *torch.autograd.grad(y, [xx, *params], dy))
        (y_ref, gx_ref, ga_ref, gb_ref), (y, gx, ga, gb) = got["peft"], got["fused"]
        assert y.dtype == gx.dtype == torch.bfloat16 and ga.dtype == gb.dtype == torch.float32
        torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
        torch.testing.assert_close(gx, gx_ref, atol=0, rtol=0)
        for u, v in ((ga, ga_ref), (gb, gb_ref)):
            rel = ((u - v).norm() / v.norm()).item()
            assert rel <= 1e-6, (name, rel)  # before: ~1e-3 (the LoRA term rounded to bf16)


def test_bf16_base_fp32_adapters_dropout_uses_the_kernel_mask_in_fp32():
    """The same dtype mix with dropout: the mask is the kernels' Philox mask (the seed from torch's generator, as
    on the fused path), applied to the fp32-cast input as PEFT's dropout is; equal to PEFT's layer whose dropout
    applies that mask."""
    from adasched.kernels.lora import SEED_DRAW_RANGE, dropout_keep_mask

    model = _bf16_model_with_fp32_adapters(0.3)
    peft_layer = copy.deepcopy(model.base_model.model.up)
    layer = FusedLoRALinear.from_peft(model.base_model.model.up)
    layer.train()
    x = torch.randn(2, 9, 24).to(torch.bfloat16).requires_grad_()
    torch.manual_seed(23)
    y = layer(x)
    torch.manual_seed(23)
    seed = int(torch.randint(*SEED_DRAW_RANGE, (1,)).item())  # the draw the fused call made
    keep = dropout_keep_mask(seed, 18, 24, 0.3).reshape(2, 9, 24)
    assert 0 < int((~keep).sum()) < keep.numel()

    class Masked(nn.Module):
        def forward(self, h):
            assert h.dtype == torch.float32  # PEFT casts the input to lora_A's dtype before its dropout
            return h * keep.to(h.dtype) / (1.0 - 0.3)

    peft_layer.lora_dropout["default"] = Masked()
    xr = x.detach().clone().requires_grad_()
    y_ref = peft_layer(xr)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    dy = torch.randn_like(y)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    params_ref = [peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight]
    g = torch.autograd.grad(y, [x, *params], dy)
    g_ref = torch.autograd.grad(y_ref, [xr, *params_ref], dy)
    torch.testing.assert_close(g[0], g_ref[0], atol=0, rtol=0)
    for u, v in zip(g[1:], g_ref[1:]):
        assert u.dtype == torch.float32
        assert ((u - v).norm() / v.norm()).item() <= 1e-6


def test_bf16_base_fp32_adapters_with_lora_bias_run_peft_forward(fused_calls):
    """With lora_bias, PEFT adds lora_B's bias inside the fp32 LoRA term; lora_linear takes one bias in the
    input's dtype, so that dtype mix runs PEFT's own forward: outputs and every gradient are PEFT's."""
    ref = _bf16_model_with_fp32_adapters(0.0, lora_bias=True)
    fused = copy.deepcopy(ref)
    apply_fused_lora(fused)
    x = torch.randn(2, 5, 24).to(torch.bfloat16)
    y = fused(x)
    assert not fused_calls  # PEFT's forward, not the kernels
    torch.testing.assert_close(y, ref(x), atol=0, rtol=0)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref(x).backward(dy)
    g, g_ref = _lora_grads(fused), _lora_grads(ref)
    assert any(".lora_B." in n and n.endswith("bias") for n in g)
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast: the kernels again
        fused(x)
    assert len(fused_calls) == 3


@pytest.mark.parametrize("lora_bias", [False, True])
def test_dropout_of_one_in_train_mode_is_peft_s_output(fused_calls, lora_bias):
    """lora_dropout=1.0 (PEFT: the LoRA input all zeros) passed apply_fused_lora, then the first training forward
    raised "dropout_p: 1.0 must be in [0, 1)" from the kernels. It runs PEFT's forward now: outputs and every
    gradient equal PEFT's (A and B get zero gradients; lora_B's bias, if any, still counts); eval mode still
    takes the kernels."""
    ref = _peft_model(4, 8, 1.0, False, lora_bias=lora_bias)
    fused = copy.deepcopy(ref)
    apply_fused_lora(fused)
    fused.train(), ref.train()
    x = torch.randn(3, 5, 24)
    y = fused(x)
    assert not fused_calls
    torch.testing.assert_close(y, ref(x), atol=0, rtol=0)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref(x).backward(dy)
    g, g_ref = _lora_grads(fused), _lora_grads(ref)
    assert g.keys() == g_ref.keys() and any(".lora_A." in n for n in g)
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], atol=0, rtol=0)
        if ".lora_A." in n or (".lora_B." in n and n.endswith("weight")):
            assert not g[n].any(), n
    fused.eval(), ref.eval()
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)
    assert len(fused_calls) == 3


class _HalfLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 0.5


def test_a_base_layer_with_its_own_forward_is_refused():
    """The fused kernels read the base weight and bias and never call the base layer: a subclass overriding forward
    (here scaling by 0.5; a fake-quantising QAT Linear is the real case) gave another output silently."""
    torch.manual_seed(1)
    block = TinyBlock()
    block.q = _HalfLinear(24, 24, bias=False)
    model = get_peft_model(block, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    with pytest.raises(ValueError, match=r"q.*base_layer: _HalfLinear overrides nn.Linear.forward"):
        apply_fused_lora(model)
    assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())


@pytest.mark.parametrize("where", ["base pre-hook", "base hook", "lora_B hook", "global hook"])
def test_hooks_on_the_layers_run_through_peft_forward(where, fused_calls):
    """A forward hook or pre-hook on the base layer (weight_norm's, accelerate's offload hook, a user's) or on an
    adapter matrix was skipped by the fused path (75 % relative difference); such a layer now runs PEFT's forward,
    hooks included, and the others stay fused."""
    ref = _peft_model(4, 8, 0.0, False)
    fused = copy.deepcopy(ref)
    apply_fused_lora(fused)
    handles = []
    for model in (ref, fused):
        lay = model.base_model.model.v
        if where == "base pre-hook":
            handles.append(lay.base_layer.register_forward_pre_hook(lambda m, a: (a[0] * 2.0,)))
        elif where == "base hook":
            handles.append(lay.base_layer.register_forward_hook(lambda m, a, out: out + 1.0))
        elif where == "lora_B hook":
            handles.append(lay.lora_B["default"].register_forward_hook(lambda m, a, out: out * 3.0))
    if where == "global hook":
        handles.append(torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: out))
    try:
        x = torch.randn(2, 7, 24)
        want, got = ref(x), fused(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # the hooked layer (every layer, for a global hook) fell back to PEFT's forward; the others stayed fused
        assert len(fused_calls) == (0 if where == "global hook" else 2)
    finally:
        for h in handles:
            h.remove()
