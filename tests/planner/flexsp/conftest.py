import pytest

from adasched.planner.flexsp.oracle import tiny_cost_model


@pytest.fixture
def make_cm():
    return tiny_cost_model
