"""Single-process MoE layer against a per-token loop reference; Triton (interpreted) vs torch backend."""
import pytest
import torch
import torch.nn.functional as F

from adasched.runtime.moe import MoELayer, RouterConfig
from adasched.runtime.moe.router import ROUTER_KINDS


def _loop_reference(layer, x):
    """out[t] = sum over t's assignments of gate * MLP_e(x_t), computed token by token in float64."""
    xt = x.reshape(-1, layer.hidden)
    r = layer.router(xt)
    out = torch.zeros(xt.shape, dtype=torch.float64)
    w1, w2 = layer.w1.double(), layer.w2.double()
    for t, e, g in zip(r.token_idx.tolist(), r.expert_idx.tolist(), r.weight.double()):
        a = xt[t].double() @ w1[e]
        if layer.activation == "swiglu":
            gg, u = a.chunk(2)
            h = F.silu(gg) * u
        else:
            h = F.gelu(a)
        out[t] = out[t] + g * (h @ w2[e])
    return out.reshape(x.shape), r


@pytest.mark.parametrize("kind", ROUTER_KINDS)
def test_layer_matches_token_loop(kind):
    torch.manual_seed(1)
    cf = 1.0 if kind in ("gshard", "expert_choice") else None
    layer = MoELayer(12, 10, RouterConfig(kind=kind, num_experts=4, top_k=2, capacity_factor=cf, k_max=3),
                     activation="gelu" if kind == "switch" else "swiglu", backend="torch")
    layer.eval()
    x = torch.randn(2, 7, 12)
    y = layer(x)
    want, r = _loop_reference(layer, x)
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
    assert layer.last_stats.num_tokens == 14
    assert layer.last_stats.tokens_per_expert.sum() == r.token_idx.numel()
    if cf is not None and layer.last_stats.dropped:
        dropped_tokens = set(range(14)) - set(r.token_idx.tolist())
        for t in dropped_tokens:       # a token with every assignment dropped passes through as zero
            assert torch.all(y.reshape(14, 12)[t] == 0)


@pytest.mark.parametrize("kind", ["gshard", "top_p"])
def test_triton_backend_matches_torch_backend(kind):
    torch.manual_seed(2)
    cfg = RouterConfig(kind=kind, num_experts=5, top_k=2, k_max=3)
    a = MoELayer(16, 12, cfg, backend="triton")
    b = MoELayer(16, 12, cfg, backend="torch")
    b.load_state_dict(a.state_dict())
    x = torch.randn(19, 16)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = a(xa), b(xb)
    torch.testing.assert_close(ya, yb, atol=2e-5, rtol=2e-5)
    gy = torch.randn_like(ya)
    (ya * gy).sum().add(a.aux_loss).backward()
    (yb * gy).sum().add(b.aux_loss).backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=2e-5, rtol=2e-5)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=2e-5, rtol=2e-5, msg=n)


@pytest.mark.parametrize("backend,activation", [("torch", "swiglu"), ("triton", "gelu")])
def test_shared_expert_adds_a_dense_mlp_on_every_token(backend, activation):
    """shared_experts=2 of width 5: out = routed experts (token loop, float64) + one MLP of width 10 on every
    token (float64), and its weights get the gradient of that MLP."""
    torch.manual_seed(5)
    layer = MoELayer(12, 8, RouterConfig(kind="gshard", num_experts=4, top_k=2), activation=activation,
                     backend=backend, shared_experts=2, shared_ffn=5).eval()
    assert tuple(layer.shared_w2.shape) == (1, 10, 12)
    x = torch.randn(3, 5, 12, requires_grad=True)
    y = layer(x)
    routed, _ = _loop_reference(layer, x)
    xt = x.detach().reshape(-1, 12).double().requires_grad_(True)
    w1 = layer.shared_w1.detach()[0].double().requires_grad_(True)
    w2 = layer.shared_w2.detach()[0].double().requires_grad_(True)
    a = xt @ w1
    h = F.silu(a[:, :10]) * a[:, 10:] if activation == "swiglu" else F.gelu(a)
    shared = h @ w2
    torch.testing.assert_close(y.double(), routed + shared.reshape(3, 5, 12), atol=2e-5, rtol=2e-5)
    gy = torch.randn(15, 12, dtype=torch.float64)
    (y.reshape(15, 12).double() * gy).sum().backward()
    (shared * gy).sum().backward()
    torch.testing.assert_close(layer.shared_w1.grad[0].double(), w1.grad, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(layer.shared_w2.grad[0].double(), w2.grad, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="shared_experts=-1"):
        MoELayer(12, 8, RouterConfig(kind="gshard", num_experts=4, top_k=2), shared_experts=-1)


def test_layer_in_a_model_trains():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), MoELayer(16, 16, RouterConfig(kind="top_p", num_experts=4,
                                                                                       k_max=2, p=0.5), backend="torch"),
                                torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(64, 8)
    target = (x[:, :1] * x[:, 1:2]).sin()
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        (loss + model[1].aux_loss).backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert 1.0 <= model[1].last_stats.mean_k <= 2.0


def test_sigmoid_bias_updates_in_training_only():
    torch.manual_seed(4)
    layer = MoELayer(8, 8, RouterConfig(kind="sigmoid_bias", num_experts=4, top_k=1, bias_update_rate=0.1), backend="torch")
    x = torch.randn(30, 8)
    layer.eval()
    layer(x)
    assert torch.all(layer.router.expert_bias == 0)
    layer.train()
    with torch.no_grad():                   # a training-mode forward with no backward to follow: no step
        layer(x)
    assert torch.all(layer.router.expert_bias == 0)
    y = layer(x)
    assert torch.all(layer.router.expert_bias == 0)   # the step comes with the backward (recompute-safe)
    y.square().sum().backward()
    c = layer.last_stats.tokens_per_expert.float()
    torch.testing.assert_close(layer.router.expert_bias, 0.1 * torch.sign(c.mean() - c))


def test_bad_layer_input():
    with pytest.raises(ValueError, match="activation: 'tanh'"):
        MoELayer(4, 4, RouterConfig(num_experts=2, top_k=1), activation="tanh")
    layer = MoELayer(4, 4, RouterConfig(num_experts=2, top_k=1))
    with pytest.raises(ValueError, match="last dim 5"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="r_fwd: 0 must be an int >= 1"):
        layer.set_pipeline(0, 2)
    with pytest.raises(ValueError, match="r_bwd: 2.5 must be an int"):   # review: was truncated to 2
        layer.set_pipeline(1, 2.5)
    assert (layer.r_fwd, layer.r_bwd) == (1, 1)
