"""MoE layer fixes from a hunt (each failed before):
- a model holding an MoELayer could not be deep-copied (copy.deepcopy, swa_utils.AveragedModel for EMA/SWA) after
  any training forward: ``layer.aux_loss`` is a non-leaf tensor of that step's graph, which deepcopy refuses;
- ``Router.p`` (the live top_p threshold) took any value: 1.5/inf routed k_max experts to every token, 0/negative/NaN
  one, and a NaN went into the state_dict where the controller could never move it again."""
import copy
import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from adasched.runtime.moe import MoELayer, RouterConfig


def _trained_model(attach):
    torch.manual_seed(torch.randint(0, 2 ** 31, ()).item())
    model = torch.nn.Sequential(torch.nn.Linear(8, 8),
                                MoELayer(8, 16, RouterConfig(kind="top_p", num_experts=4, k_max=2),
                                         attach_aux_loss=attach))
    loss = model(torch.randn(10, 8)).pow(2).mean()
    if not attach:
        loss = loss + model[1].aux_loss
    loss.backward()
    return model


@pytest.mark.parametrize("attach", [False, True])
def test_a_trained_moe_model_deep_copies_and_averages(attach):
    model = _trained_model(attach)
    live = model[1].aux_loss
    assert attach or live.grad_fn is not None  # the live loss is still the step's graph node
    twin = copy.deepcopy(model)
    assert twin[1].aux_loss.grad_fn is None and twin[1].aux_loss.item() == live.item()
    assert model[1].aux_loss is live  # the original is untouched
    x = torch.randn(6, 8)
    model.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    ema = AveragedModel(model)
    with torch.no_grad():
        torch.testing.assert_close(ema.module(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [1.5, -0.3, 0.0, float("nan"), float("inf"), "0.5x", None, True])
def test_router_p_setter_refuses_what_the_config_refuses(bad):
    layer = MoELayer(8, 16, RouterConfig(kind="top_p", num_experts=4, k_max=2, p=0.4))
    with pytest.raises(ValueError, match=r"^p: .* must be"):
        layer.router.p = bad
    assert layer.router.p == pytest.approx(0.4)  # unchanged
    for good in (1.0, 0.25, 1e-3):
        layer.router.p = good
        assert math.isclose(layer.router.p, good, rel_tol=1e-12)
