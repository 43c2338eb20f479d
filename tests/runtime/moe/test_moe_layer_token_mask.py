"""MoELayer's token_mask and last_losses (an integration hunt: padding could not be kept out of the routing - its
content changed real tokens' outputs through capacity drops and counted in every router loss - and the router's
unweighted loss terms were computed, then dropped by the layer)."""
from __future__ import annotations

import pytest
import torch

from adasched.runtime.moe import MoELayer, RouterConfig

BACKENDS = ["torch", "triton"]


def _layer(kind="gshard", **kw):
    torch.manual_seed(5)
    cfg = dict(kind=kind, num_experts=4, top_k=2, capacity_factor=0.5) if kind == "gshard" else \
        dict(kind=kind, num_experts=4, k_max=3, p=0.6, entropy_coef=0.05, z_loss_coef=0.01, aux_loss_coef=0.02)
    return MoELayer(hidden=8, ffn=12, router=RouterConfig(**cfg), **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_is_not_routed(backend):
    m = _layer(backend=backend)
    g = torch.Generator().manual_seed(1)
    real = torch.randn(2, 6, 8, generator=g)
    lengths = [6, 4]
    mask = torch.zeros(2, 10, dtype=torch.long)          # an attention mask: 1 = token, 0 = pad
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    outs = []
    for pad_seed in (2, 3):                              # two different paddings
        x = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(pad_seed))
        for b, n in enumerate(lengths):
            x[b, :n] = real[b, :n]
        x.requires_grad_(True)
        y = m(x, token_mask=mask)
        outs.append((x, y, m.aux_loss, m.last_stats))
    (x0, y0, aux0, st0), (x1, y1, aux1, st1) = outs
    keep = mask.bool()
    torch.testing.assert_close(y0[keep], y1[keep], rtol=0, atol=0)
    assert torch.equal(y0[~keep], torch.zeros_like(y0[~keep])) and torch.equal(y1[~keep], torch.zeros_like(y1[~keep]))
    assert st0.num_tokens == st1.num_tokens == 10 and float(aux0.detach()) == float(aux1.detach())
    # the same as routing the real tokens alone: outputs, aux loss and every gradient
    xr = torch.cat([real[b, :n] for b, n in enumerate(lengths)]).requires_grad_(True)
    yr = m(xr)
    torch.testing.assert_close(y0[keep], yr, rtol=1e-6, atol=1e-6)
    assert float(m.aux_loss.detach()) == pytest.approx(float(aux0.detach()), rel=1e-6)
    w = torch.randn(yr.shape, generator=g)
    grads_r = torch.autograd.grad((yr * w).sum() + m.aux_loss, [xr, *m.parameters()])
    y2 = m(x0, token_mask=mask)
    grads_m = torch.autograd.grad((y2[keep] * w).sum() + m.aux_loss, [x0, *m.parameters()])
    torch.testing.assert_close(grads_m[0][keep], grads_r[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(grads_m[0][~keep], torch.zeros_like(grads_m[0][~keep]))
    for a, b in zip(grads_m[1:], grads_r[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # without the mask the padding's content reaches the real tokens (capacity drops): the point of the mask
    assert not torch.allclose(m(x0.detach())[keep], m(x1.detach())[keep])


def test_token_mask_is_checked():
    m = _layer(backend="torch")
    x = torch.randn(2, 5, 8)
    for bad, what in ((torch.ones(2, 4, dtype=torch.bool), r"token_mask: \(2, 4\) must be a tensor of the input's "
                       r"shape without its last dim, \(2, 5\)"),
                      ([[1] * 5] * 2, "token_mask: list must be a tensor"),
                      (torch.ones(2, 5), "token_mask: dtype torch.float32 must be bool or an integer type")):
        with pytest.raises(ValueError, match=what):
            m(x, token_mask=bad)
    y = m(x, token_mask=torch.zeros(2, 5, dtype=torch.bool))   # every token padding: nothing routed, zeros
    assert torch.equal(y, torch.zeros_like(y)) and m.last_stats.num_tokens == 0
    torch.testing.assert_close(m(x, token_mask=torch.ones(2, 5, dtype=torch.bool)), m(x), rtol=0, atol=0)


def test_last_losses_are_the_unweighted_terms_of_aux_loss():
    m = _layer(kind="top_p", backend="torch")
    x = torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(4))
    m(x)
    cfg = m.router.config
    terms = m.last_losses
    assert set(terms) == {"load_balance", "z_loss", "entropy"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in terms.values())
    weighted = (cfg.aux_loss_coef * terms["load_balance"] + cfg.z_loss_coef * terms["z_loss"]
                + cfg.entropy_coef * terms["entropy"])
    assert float(m.aux_loss.detach()) == pytest.approx(float(weighted), rel=1e-6)
    # the entropy term is the mean router entropy over tokens
    probs = torch.softmax(m.router.proj(x.reshape(-1, 8)).float(), dim=-1)
    ent = float(-(probs * probs.log()).sum(-1).mean().detach())
    assert float(terms["entropy"]) == pytest.approx(ent, rel=1e-5)
