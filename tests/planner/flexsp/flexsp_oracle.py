"""The FlexSP tests' brute-force oracle: the package's (``adasched.planner.flexsp.oracle``, which `adasched bench
sp-oracle` uses too) under the tests' names."""
from adasched.planner.flexsp.oracle import STRUCTURES, micro_batch_optimum as brute_force, step_optimum

__all__ = ["STRUCTURES", "brute_force", "step_optimum"]
