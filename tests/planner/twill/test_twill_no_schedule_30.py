"""30th session (Twill hunt): a graph with no schedule was reported under its "name" field ("graph 'graph'" for a
file without one, "graph 'rand20-s3-x32'" for rg_ops20seed3scale32.json): the error line names the graph as the
user gave it now (its file, or its built-in name); a Graph object passed to the library keeps the solver's
message (its name is all there is)."""
from __future__ import annotations

import json
import random

import pytest

from adasched.planner.cli import main
from adasched.planner.twill.graph import load_graph
from adasched.planner.twill.plan import plan_twill


def _impossible(tmp_path, name=None):
    """Two blocking warp ops whose loop-carried edges contradict at every I: o1 -> o0 at distance 2 needs
    t1 - t0 >= I + 3 (o1's 150 registers leave room for one buffer) and at distance 1 with delay 4 t1 - t0 <= I - 4."""
    d = {"ops": [{"name": "o0", "reserve": {"TMA": [1, 1, 1]}, "regs": 64, "smem": 100, "blocking": True},
                 {"name": "o1", "reserve": {"SFU": [1]}, "regs": 150, "blocking": True}],
         "edges": [{"from": "o1", "to": "o0", "delay": 2, "distance": 1},
                   {"from": "o1", "to": "o0", "delay": 4, "distance": 1},
                   {"from": "o1", "to": "o0", "delay": 3, "distance": 2}]}
    if name is not None:
        d["name"] = name
    p = tmp_path / f"g{random.randrange(10**6)}.json"
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize("name", [None, "some-other-name"])
def test_the_cli_names_the_graph_file(tmp_path, capsys, name):
    p = _impossible(tmp_path, name)
    out = tmp_path / "never.json"
    assert main(["plan", "twill", "--graph", str(p), "--time-limit", "30", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {p}: no warp-specialised schedule: the register, shared-memory or warp-group limits "
                   f"cannot be met up to I = 20 (nor at any larger I: at this one the ops already run one after "
                   f"another)\n"), err
    assert not out.exists()


def test_a_graph_object_keeps_the_solvers_message(tmp_path):
    p = _impossible(tmp_path, "mine")
    graph, _ = load_graph(p)
    with pytest.raises(ValueError, match=r"^graph 'mine': no warp-specialised schedule"):
        plan_twill(graph, "h100")
    with pytest.raises(ValueError, match=rf"^{p}: no warp-specialised schedule"):
        plan_twill(str(p), "h100")
