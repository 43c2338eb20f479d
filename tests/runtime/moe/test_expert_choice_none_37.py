"""``capacity_factor=None`` on the expert-choice router is a factor of 1 (documented as "dropless" for every router
before; h35): the same picks, gates and stats as 1.0, each expert its C = ceil(T k / E) highest-probability tokens,
and a token no expert picks counted in ``dropped``."""
import torch

from adasched.runtime.moe.router import Router, RouterConfig


def test_expert_choice_none_is_factor_one():
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed {seed}")
    torch.manual_seed(seed)
    T, E = 16, 4
    x = torch.randn(T, 8)
    routers = {cf: Router(8, RouterConfig(kind="expert_choice", num_experts=E, top_k=1, capacity_factor=cf))
               for cf in (None, 1.0)}
    routers[1.0].load_state_dict(routers[None].state_dict())
    a, b = (routers[cf](x) for cf in (None, 1.0))
    assert a.stats.as_dict() == b.stats.as_dict()
    for name in ("token_idx", "expert_idx", "weight"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    stats = a.stats.as_dict()
    assert stats["tokens_per_expert"] == [4] * E  # C = ceil(16 * 1 / 4)
    probs = torch.softmax(x @ routers[None].proj.weight.t(), dim=-1)
    want = {e: set(torch.topk(probs[:, e], 4).indices.tolist()) for e in range(E)}
    got = {e: set(a.token_idx[a.expert_idx == e].tolist()) for e in range(E)}
    assert got == want
    assert stats["dropped"] == T - len(set().union(*want.values()))
