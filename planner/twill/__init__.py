"""Twill: optimal software pipelining and warp specialisation of GPU loop bodies with CP-SAT.

``plan_twill(graph, machine, params)`` -> :class:`TwillPlan` (I, MII, status, stage/issue cycle and warp
group per op, buffer depths, Triton knobs). Graphs and machines are JSON (built-ins in graphs/, machines/).
"""
from .graph import Graph, Machine, Problem, load_graph, load_machine, make_problem, normalise_costs
from .model import Schedule, TimeLimitError, solve
from .plan import TwillPlan, make_plan, plan_twill

__all__ = ["Graph", "Machine", "Problem", "Schedule", "TimeLimitError", "TwillPlan", "load_graph", "load_machine",
           "make_problem", "make_plan", "normalise_costs", "plan_twill", "solve"]
