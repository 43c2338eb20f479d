"""`python -m adasched.launch.moe_measure` and `adasched bench moe --measure`: the FSMoE model's predicted MoE layer
time vs the real expert-parallel layer over 4 gloo ranks (quick mode, one configuration).

The numbers are timings, so they are checked for consistency, not for values: every r in {1, 2, 4} is present
with positive predicted and measured times; the errors are recomputed from those times; the r = 1 prediction
equals the closed form (dispatch + expert compute + combine, nothing overlaps; with the weight gradients deferred:
dispatch + dX + the longer of combine and dW) recomputed from the fitted constants; r > 1 predictions lie between the busiest resource and the serial sum; the alpha-beta fits reproduce
their own measured points to within their reported error."""
import json
import statistics

import pytest

from adasched.launch.moe_measure import R_VALUES, main

pytestmark = pytest.mark.timeout(240)
REL = 1e-9


def _close(a, b, what):
    assert a == pytest.approx(b, rel=REL, abs=1e-12), f"{what}: {a} vs {b}"


def _check_fit(xs, ys, fit, what):
    assert len(xs) == len(ys) >= 3, what
    assert all(y > 0 for y in ys), f"{what}: non-positive time in {ys}"
    assert fit["alpha_ms"] >= 0 and fit["ms_per_row"] > 0, f"{what}: {fit}"
    pred = [fit["alpha_ms"] + fit["ms_per_row"] * x for x in xs]
    rel = statistics.fmean(abs(p - y) / y for p, y in zip(pred, ys))
    _close(rel, fit["fit_rel_error"], f"{what}: fit error")


def _check_result(res: dict, configs: int) -> None:
    rows = res["rows"]
    names = sorted({r["config"] for r in rows})
    assert len(names) == configs
    for name in names:
        assert sorted(r["r"] for r in rows if r["config"] == name) == list(R_VALUES), name
    errs, signed = [], []
    deferred = []
    for d in ("fwd", "bwd", "bwd_deferred"):
        for r in rows:
            p, m = r[f"predicted_{d}_ms"], r[f"measured_{d}_ms"]
            assert p > 0 and m > 0, f"{r['config']} r={r['r']} {d}: predicted {p}, measured {m}"
            _close(r[f"error_{d}"], (p - m) / m, f"{r['config']} r={r['r']} error_{d}")
            (deferred if d == "bwd_deferred" else errs).append(abs((p - m) / m))
            if d != "bwd_deferred":
                signed.append((p - m) / m)
    _close(res["mean_abs_error_bwd_deferred"], statistics.fmean(deferred), "mean_abs_error_bwd_deferred")
    for r in rows:
        _close(r["measured_deferred_over_fused"], r["measured_bwd_deferred_ms"] / r["measured_bwd_ms"], "ratio")
        _close(r["predicted_deferred_over_fused"], r["predicted_bwd_deferred_ms"] / r["predicted_bwd_ms"], "ratio")
    _close(res["measured_deferred_over_fused_mean"], statistics.fmean(r["measured_deferred_over_fused"] for r in rows),
           "measured_deferred_over_fused_mean")
    _close(res["mean_abs_error"], statistics.fmean(errs), "mean_abs_error")
    _close(res["mean_signed_error"], statistics.fmean(signed), "mean_signed_error")
    assert res["note"] and "core" in res["note"] and res["machine"].endswith("4 ranks")
    for cfg in res["configs"]:
        name = cfg["name"]
        by_r = {r["r"]: r for r in rows if r["config"] == name}
        # measured best r: the argmin of the rows' measured times
        for d in ("fwd", "bwd"):
            best = min(R_VALUES, key=lambda q: by_r[q][f"measured_{d}_ms"])
            assert res["best_r_measured"][name][d] == best, (name, d)
            assert res["chosen_r_predicted"][name][d] in R_VALUES
        a2a, comp, fixed = cfg["a2a"], cfg["compute"], cfg["fixed"]
        _check_fit(a2a["rows"], a2a["dispatch_ms"], a2a["dispatch"], f"{name} dispatch")
        _check_fit(a2a["rows"], a2a["combine_ms"], a2a["combine"], f"{name} combine")
        _check_fit(comp["rows"], comp["fwd_ms"], comp["fwd"], f"{name} expert fwd")
        _check_fit(comp["rows"], comp["bwd_ms"], comp["bwd"], f"{name} expert bwd")
        _check_fit(comp["rows"], comp["bwd_dw_ms"], comp["bwd_dw"], f"{name} expert bwd dW")
        assert all(v > 0 for v in fixed.values()), fixed
        n_a2a = max(cfg["rows_sent_max"], cfg["rows_received_max"])
        n_recv = cfg["rows_received_max"]
        assert n_a2a >= cfg["config"]["tokens"], "top-2 routing: at least one row per token on the busiest rank"
        # per chunk of r: one all-to-all (mean of dispatch and combine) and one expert step
        a0 = (a2a["dispatch"]["alpha_ms"] + a2a["combine"]["alpha_ms"]) / 2
        w0 = (a2a["dispatch"]["ms_per_row"] + a2a["combine"]["ms_per_row"]) / 2 * n_a2a
        for d in ("fwd", "bwd"):
            a2, w2 = comp[d]["alpha_ms"], comp[d]["ms_per_row"] * n_recv
            pipes = {}
            for q in R_VALUES:
                fx = fixed[f"local_{d}_ms"] + fixed[f"book_{d}_ms_r{q}"]
                pipe = pipes[q] = by_r[q][f"predicted_{d}_ms"] - fx
                serial = 2 * (q * a0 + w0) + q * a2 + w2
                if q == 1:
                    _close(pipe, serial, f"{name} {d} r=1: dispatch + compute + combine")
                else:
                    busiest = max(2 * (q * a0 + w0), q * a2 + w2)
                    assert busiest - 1e-9 <= pipe <= serial + 1e-9, (name, d, q, busiest, pipe, serial)
            # the planner's pick (over {1, 2, 4}, dispatch-first as measured) has the shortest pipelined time
            assert pipes[res["chosen_r_predicted"][name][d]] <= min(pipes.values()) + 1e-9, (name, d, pipes)
            if d == "bwd":
                dw = min(comp["bwd_dw"]["alpha_ms"] + comp["bwd_dw"]["ms_per_row"] * n_recv, a2 + w2)
                fx = fixed["local_bwd_ms"] + fixed["book_bwd_ms_r1"]
                _close(by_r[1]["predicted_bwd_deferred_ms"] - fx, (a0 + w0) + (a2 + w2 - dw) + max(a0 + w0, dw),
                       f"{name} bwd r=1 dW deferred: dispatch + dX + max(combine, dW)")
    matches = sum(res["chosen_r_predicted"][n][d] == res["best_r_measured"][n][d]
                  for n in res["chosen_r_predicted"] for d in ("fwd", "bwd"))
    assert res["chosen_r_matches_best"] == matches and res["chosen_r_decisions"] == 2 * configs


def test_measure_quick_table_and_json(capsys):
    rc = main(["--quick"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.strip().splitlines()
    assert "predicted vs measured" in out and "mean |error|" in out
    res = json.loads(lines[-1])              # the last line is the JSON result
    _check_result(res, configs=1)
    assert res["quick"] is True and res["wall_s"] < 60, res["wall_s"]


def test_bench_moe_measure_end_to_end(capsys):
    from adasched.planner.cli import main as cli

    rc = cli(["bench", "moe", "--measure", "--quick", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out)
    assert "summary" in res and "measure" in res
    _check_result(res["measure"], configs=1)


@pytest.mark.parametrize("nproc,what", [(3, "does not divide the 8 experts"), (1, "at least 2 ranks")])
def test_bad_nproc(capsys, nproc, what):
    rc = main(["--json", "--quick", "--nproc", str(nproc)])
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == ""
    assert cap.err.startswith("error: --nproc: ") and what in cap.err and cap.err.count("\n") == 1, cap.err
