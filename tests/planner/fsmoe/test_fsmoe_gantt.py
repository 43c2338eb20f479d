"""A flat-EP MoE plan's drawing holds no empty "intra" lanes (26th session's show/simulate hunt): the flat exchange's
zero-length intra-node steps were drawn as hairlines with "allgather" / "reducescatter" legend entries, and
`simulate` listed their lanes at 0 busy time."""
from __future__ import annotations

import json
import random

from adasched.planner.cli import main
from adasched.planner.plan import load_plan


def test_flat_plan_draws_and_simulates_only_what_runs(tmp_path, capsys):
    gpus = random.choice([2, 4, 8])
    out = tmp_path / "p.json"
    assert main(["plan", "moe", "--config", "mixtral-8x7b", "--gpus", str(gpus), "--time-limit", "0.5",
                 "--out", str(out)]) == 0
    plan = load_plan(out)
    tasks = plan.gantt_tasks()
    assert tasks and all(t.end_ms > t.start_ms for t in tasks)
    assert not any("intra" in t.stream for t in tasks), sorted({t.stream for t in tasks})
    assert {"fwd compute", "fwd inter", "bwd compute", "bwd inter"} <= {t.stream for t in tasks}
    capsys.readouterr()
    assert main(["simulate", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert not any("intra" in lane for lane in got["busy_ms"]), got["busy_ms"]
    l0 = plan.configs[0].layers[0]
    assert abs(got["makespan_ms"] - (l0.fwd_ms + l0.bwd_ms)) <= 1e-6 * got["makespan_ms"]
