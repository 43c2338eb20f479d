"""The plan's solver note counts MILP 2 runs honestly: with none run (every last bin already minimal, as in the
tiny preset) it said "proved optimal in 0 of 0 runs, the rest stopped by the time limit"."""
from __future__ import annotations

import re

from adasched.planner.cli import main
from adasched.planner.lorafusion.plan import LoRAPlan
from adasched.planner.plan import load_plan


def test_note_names_time_limited_milp2_runs_only_when_there_are_some(tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", "lora", "--jobs", "tiny", "--out", str(out), "--time-limit", "0.2"]) == 0
    note = load_plan(out, expect=LoRAPlan).solver.note
    m = re.search(r"MILP 2 \(smallest last bin\) proved optimal in (\d+) of (\d+) runs(, the rest stopped by the "
                  r"time limit)?", note)
    assert m is not None, note
    n_opt, n_run, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    assert n_opt <= n_run
    assert (rest is not None) == (n_run > n_opt), note


def test_a_first_fit_decreasing_plan_names_no_milp_and_no_seed(tmp_path):
    """With --no-milp the note said '0 MILP stopped by its time limit ... MILP 2 proved optimal in 0 of 0 runs' and
    the record a seed of 0 (--seed is refused with --no-milp: nothing is drawn)."""
    out = tmp_path / "plan.json"
    assert main(["plan", "lora", "--jobs", "tiny", "--no-milp", "--out", str(out)]) == 0
    solver = load_plan(out, expect=LoRAPlan).solver
    assert solver.backend == "ffd" and solver.seed is None and solver.time_limit is None
    assert "MILP" not in solver.note.replace("no MILP run: --no-milp", ""), solver.note
    assert "no MILP run: --no-milp" in solver.note
