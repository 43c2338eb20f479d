"""What a Twill schedule's note says about the I values below the answer (2026-11-28)."""
from __future__ import annotations

import time

from adasched.planner.solver import SolveParams
from adasched.planner.twill import heuristic as twill_heuristic
from adasched.planner.twill import model as twill_model
from adasched.planner.twill.mii import MII


def _att(ii: int, status: str, warp: bool = False) -> twill_model.Attempt:
    return twill_model.Attempt(ii=ii, warp=warp, status=status, seconds=0.0)


def test_unproved_splits_timed_out_from_never_tried():
    """Every I in [MII, answer) not proved infeasible is named once: timed out, or never tried; a plain proof
    rules out the warp problem at that I too, a warp proof says nothing about the plain problem (as _lower_bound)."""
    b = MII(res=10, rec=3)
    atts = [_att(10, "infeasible"), _att(11, "timeout"), _att(13, "timeout", warp=True), _att(14, "infeasible", True),
            _att(16, "feasible")]
    assert twill_model._unproved(b, atts, 17, warp=True) == ([11, 13], [12, 15, 16])
    assert twill_model._unproved(b, atts, 17, warp=False) == ([11], [12, 13, 14, 15, 16])
    assert twill_model._unproved(b, [_att(i, "infeasible") for i in range(10, 17)], 17, warp=True) == ([], [])
    assert twill_model._ranges([16, 12, 13, 14, 3, 12]) == "3, 12-14, 16" and twill_model._ranges([]) == ""


def test_note_names_the_i_values_never_tried(monkeypatch):
    """The bisection (a wide range between MII and the heuristic's I) finds a schedule at MII + 3 and has a
    time-out at MII + 2; the scan's solve at MII times out and uses the scan's share, so MII + 1 is never tried.
    The note said 'I = [40, 42] timed out' (MII + 1 left out, and before that the same case could read
    'I = [] timed out'); it now says which I timed out and which were not tried, and the gap counts from MII."""
    from adasched.planner.twill.graph import check_graph, load_machine
    from adasched.planner.twill.scalebench import _scaled

    prob = check_graph(_scaled("toy-attention", "h100", 20), load_machine("h100"))  # MII 40, no warp fields
    mii = twill_model.compute_mii(prob).mii
    assert mii == 40 and not prob.warp
    sched = {ii: twill_heuristic.modulo_schedule(prob, ii) for ii in range(mii + 3, mii + 101)}
    assert all(v is not None for v in sched.values())
    monkeypatch.setattr(twill_model, "_coarse_schedule", lambda *a, **k: None)
    monkeypatch.setattr(twill_model, "heuristic_schedule", lambda problem, **kw: twill_heuristic.HeuristicSchedule(
        mii + 100, sched[mii + 100], {v: 0 for v in sched[mii + 100]}, {}, False))
    limit = 0.4
    calls: list[int] = []

    def at(problem, ii, params, *, warp, **kw):
        calls.append(ii)
        if ii >= mii + 3:
            return twill_model.Attempt(ii=ii, warp=warp, status="feasible", seconds=0.0, times=dict(sched[ii]),
                                       groups={v: 0 for v in sched[ii]})
        if ii == mii:
            time.sleep(0.7 * limit)  # the scan's solve at MII spends the scan's share (half of what was left)
        return _att(ii, "timeout", warp)

    # the bisection between 39 and 140: 89, 64, 51, 45 found, 42 timed out, 43 found; then the scan from 40
    monkeypatch.setattr(twill_model, "solve_at", at)
    s = twill_model.solve(prob, SolveParams(time_limit=limit, seed=0, threads=1))
    assert s.ii == mii + 3 and not s.proven and s.status == "feasible"
    assert mii + 1 not in calls and calls.count(mii) == 1 and calls.count(mii + 2) == 1, calls
    assert f"I = {mii}, {mii + 2} timed out; I = {mii + 1} not tried (out of time)" in s.note, s.note
    assert "[]" not in s.note and abs(s.gap - 3 / s.ii) < 1e-9
