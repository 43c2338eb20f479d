import pytest

from adasched.planner.flexsp.costmodel import ModelShape, SPCostModel


def tiny_cost_model(world=4, gpus_per_node=2, cap_tokens=1500.0) -> SPCostModel:
    """A small cluster whose numbers make memory and communication both matter."""
    shape = ModelShape(name="tiny", hidden=64, layers=2, heads=4, act_bytes_per_token=1000.0)
    betas = {2: 1.0e-6, 4: 4.0e-6, 8: 9.0e-6, 16: 2.0e-5}
    return SPCostModel(
        model=shape, world=world, gpus_per_node=gpus_per_node, memory_bytes=cap_tokens * 1000.0 + 1e5,
        a1=1.0e-5, a2=0.01, b1=1.0, act_bytes_per_token=1000.0, model_state_bytes=1e5,
        a2a_alpha_ms={d: 0.002 * d for d in betas if d <= world},
        a2a_beta_ms_per_byte={d: b for d, b in betas.items() if d <= world},
    )


@pytest.fixture
def make_cm():
    return tiny_cost_model
