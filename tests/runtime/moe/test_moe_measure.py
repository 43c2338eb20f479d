"""`python -m adasched.launch.moe_measure` and `adasched bench moe --measure`: the FSMoE model's predicted MoE layer
time vs the real expert-parallel layer over 4 gloo ranks (quick mode: one flat-EP configuration and one in the
expert-sharded layout, 2 nodes x 2 shards).

The numbers are timings, so they are checked for consistency, not for values: every r in {1, 2, 4} is present
for both layouts with positive predicted and measured times; the errors are recomputed from those times, the
top-level means from the flat rows and ``by_layout`` from each layout's; the r = 1 prediction equals the closed
form (dispatch [+ all-gather] + expert compute [+ reduce-scatter] + combine, nothing overlaps; with the weight
gradients deferred: ... + dX + the longer of the rest of the exchange and dW) recomputed from the fitted constants;
r > 1 predictions lie between the busiest resource and the serial sum; the alpha-beta fits reproduce their own
measured points to within their reported error. The sharded rows must come from a really sharded layer (its
groups, its half-width expert weights, a two-step exchange per chunk) and be predicted with nonzero stage 1/3
work."""
import json
import math
import statistics

import pytest

from adasched.launch.moe_measure import R_VALUES, main, stage_costs_of

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


def _check_errors(rows: list[dict], block: dict, what: str) -> None:
    """One layout's error statistics recomputed from its rows."""
    errs, signed, deferred = [], [], []
    for d in ("fwd", "bwd", "bwd_deferred"):
        for r in rows:
            p, m = r[f"predicted_{d}_ms"], r[f"measured_{d}_ms"]
            assert math.isfinite(p) and p > 0 and m > 0, f"{r['config']} r={r['r']} {d}: predicted {p}, measured {m}"
            _close(r[f"error_{d}"], (p - m) / m, f"{r['config']} r={r['r']} error_{d}")
            (deferred if d == "bwd_deferred" else errs).append(abs((p - m) / m))
            if d != "bwd_deferred":
                signed.append((p - m) / m)
    _close(block["mean_abs_error_bwd_deferred"], statistics.fmean(deferred), f"{what} mean_abs_error_bwd_deferred")
    for r in rows:
        _close(r["measured_deferred_over_fused"], r["measured_bwd_deferred_ms"] / r["measured_bwd_ms"], "ratio")
        _close(r["predicted_deferred_over_fused"], r["predicted_bwd_deferred_ms"] / r["predicted_bwd_ms"], "ratio")
    _close(block["measured_deferred_over_fused_mean"],
           statistics.fmean(r["measured_deferred_over_fused"] for r in rows), f"{what} measured_deferred_over_fused")
    _close(block["mean_abs_error"], statistics.fmean(errs), f"{what} mean_abs_error")
    _close(block["mean_signed_error"], statistics.fmean(signed), f"{what} mean_signed_error")


def _check_layout(cfg: dict) -> None:
    """The layer that was measured is the layout its rows say: groups, expert weight shapes, exchange steps."""
    lay, c = cfg["layout"], cfg["config"]
    cols = lambda f: 2 * f if c["activation"] == "swiglu" else f          # noqa: E731
    if lay["layout"] == "flat":
        assert (lay["ep_size"], lay["expert_shards"], lay["ep_ranks"], lay["shard_ranks"]) == (4, 1, [0, 1, 2, 3], [])
        assert lay["w1_shape"] == [c["experts"] // 4, c["hidden"], cols(c["ffn"])], lay
        assert lay["issued_steps"] == {"dispatch": [1], "combine": [1]}, lay
        return
    assert lay["layout"] == "sharded" and c["expert_shards"] == 2
    # rank 0: EP group = index 0 of both nodes, its node = ranks 0 and 1; half the FFN width of E / 2 experts
    assert (lay["ep_size"], lay["expert_shards"], lay["ep_ranks"], lay["shard_ranks"]) == (2, 2, [0, 2], [0, 1]), lay
    assert lay["w1_shape"] == [c["experts"] // 2, c["hidden"], cols(c["ffn"] // 2)], lay
    assert lay["w2_shape"] == [c["experts"] // 2, c["ffn"] // 2, c["hidden"]], lay
    # per chunk: the all-to-all across the nodes, then the all-gather (dispatch) / reduce-scatter first (combine)
    assert lay["issued_steps"] == {"dispatch": [1, 2], "combine": [1, 2]}, lay


def _check_result(res: dict, configs: int, sharded: int = 0) -> None:
    rows = res["rows"]
    names = sorted({r["config"] for r in rows})
    assert len(names) == configs + sharded
    for lo, n in (("flat", configs), ("sharded", sharded)):
        assert len({r["config"] for r in rows if r["layout"] == lo}) == n, lo
    for name in names:
        assert sorted(r["r"] for r in rows if r["config"] == name) == list(R_VALUES), name
    flat = [r for r in rows if r["layout"] == "flat"]
    # the top-level statistics stay the flat layout's (what earlier runs reported); by_layout has each layout's
    _check_errors(flat, res, "top level (flat)")
    assert sorted(res["by_layout"]) == sorted({"flat"} | ({"sharded"} if sharded else set()))
    for lo, block in res["by_layout"].items():
        _check_errors([r for r in rows if r["layout"] == lo], block, lo)
    assert res["note"] and "core" in res["note"] and res["machine"].endswith("4 ranks")
    assert ("Expert-sharded rows" in res["note"]) == bool(sharded)
    for cfg in res["configs"]:
        name = cfg["name"]
        by_r = {r["r"]: r for r in rows if r["config"] == name}
        # measured best r: the argmin of the rows' measured times
        for d in ("fwd", "bwd"):
            best = min(R_VALUES, key=lambda q: by_r[q][f"measured_{d}_ms"])
            assert res["best_r_measured"][name][d] == best, (name, d)
            assert res["chosen_r_predicted"][name][d] in R_VALUES
        a2a, comp, fixed = cfg["a2a"], cfg["compute"], cfg["fixed"]
        _check_layout(cfg)
        sharded_cfg = cfg["layout"]["layout"] == "sharded"
        assert all(r["layout"] == cfg["layout"]["layout"] for r in rows if r["config"] == name)
        _check_fit(a2a["rows"], a2a["dispatch_ms"], a2a["dispatch"], f"{name} dispatch")
        _check_fit(a2a["rows"], a2a["combine_ms"], a2a["combine"], f"{name} combine")
        _check_fit(comp["rows"], comp["fwd_ms"], comp["fwd"], f"{name} expert fwd")
        _check_fit(comp["rows"], comp["bwd_ms"], comp["bwd"], f"{name} expert bwd")
        _check_fit(comp["rows"], comp["bwd_dw_ms"], comp["bwd_dw"], f"{name} expert bwd dW")
        assert all(v > 0 for v in fixed.values()), fixed
        n_a2a = max(cfg["rows_sent_max"], cfg["rows_received_max"])
        n_recv = cfg["rows_received_max"]
        assert n_a2a >= cfg["config"]["tokens"], "top-2 routing: at least one row per token on the busiest rank"
        # per chunk of r: one all-to-all (mean of dispatch and combine) and one expert step; expert-sharded: also
        # the all-gather and the reduce-scatter of the rank's block inside the node, and the expert step on every
        # row the node received
        a0 = (a2a["dispatch"]["alpha_ms"] + a2a["combine"]["alpha_ms"]) / 2
        w0 = (a2a["dispatch"]["ms_per_row"] + a2a["combine"]["ms_per_row"]) / 2 * n_a2a
        a1 = w1 = a3 = w3 = 0.0
        n_comp = n_recv
        if sharded_cfg:
            sh = cfg["shard"]
            _check_fit(sh["rows"], sh["allgather_ms"], sh["allgather"], f"{name} all-gather")
            _check_fit(sh["rows"], sh["reducescatter_ms"], sh["reducescatter"], f"{name} reduce-scatter")
            n_comp = cfg["rows_node_max"]
            assert n_recv < n_comp <= 2 * n_recv, (name, n_recv, n_comp)      # two peers' blocks, the busiest one
            a1, w1 = sh["allgather"]["alpha_ms"], sh["allgather"]["ms_per_row"] * n_recv
            a3, w3 = sh["reducescatter"]["alpha_ms"], sh["reducescatter"]["ms_per_row"] * n_recv
        for d in ("fwd", "bwd"):
            sc = stage_costs_of(cfg, d)
            assert not sc.two_step
            if sharded_cfg:
                assert sc.work[1] > 0 and sc.work[3] > 0 and sc.alpha[1] >= 0 and sc.alpha[3] >= 0, (name, sc)
            else:
                assert sc.work[1] == sc.work[3] == 0.0, (name, sc)
            a2, w2 = comp[d]["alpha_ms"], comp[d]["ms_per_row"] * n_comp
            _close(sc.work[2], w2, f"{name} {d} stage 2 work")
            pipes = {}
            for q in R_VALUES:
                fx = fixed[f"local_{d}_ms"] + fixed[f"book_{d}_ms_r{q}"]
                pipe = pipes[q] = by_r[q][f"predicted_{d}_ms"] - fx
                intra = (q * a1 + w1 + q * a3 + w3) if sharded_cfg else 0.0
                serial = 2 * (q * a0 + w0) + q * a2 + w2 + intra
                if q == 1:
                    _close(pipe, serial, f"{name} {d} r=1: dispatch [+ all-gather] + compute [+ reduce-scatter] + "
                                         "combine")
                else:
                    busiest = max(2 * (q * a0 + w0), q * a2 + w2, intra)
                    assert busiest - 1e-9 <= pipe <= serial + 1e-9, (name, d, q, busiest, pipe, serial)
            # the planner's pick (over {1, 2, 4}, dispatch-first as measured) has the shortest pipelined time
            assert pipes[res["chosen_r_predicted"][name][d]] <= min(pipes.values()) + 1e-9, (name, d, pipes)
            if d == "bwd":
                dw = min(comp["bwd_dw"]["alpha_ms"] + comp["bwd_dw"]["ms_per_row"] * n_comp, a2 + w2)
                fx = fixed["local_bwd_ms"] + fixed["book_bwd_ms_r1"]
                _close(by_r[1]["predicted_bwd_deferred_ms"] - fx,
                       (a0 + w0) + (a1 + w1) + (a2 + w2 - dw) + max((a3 + w3) + (a0 + w0), dw),
                       f"{name} bwd r=1 dW deferred: dispatch [+ all-gather] + dX + "
                       "max([reduce-scatter +] combine, dW)")
    for lo, block in res["by_layout"].items():
        mine = {c["name"] for c in res["configs"] if c["layout"]["layout"] == lo}
        matches = sum(res["chosen_r_predicted"][n][d] == res["best_r_measured"][n][d] for n in mine
                      for d in ("fwd", "bwd"))
        assert block["chosen_r_matches_best"] == matches and block["chosen_r_decisions"] == 2 * len(mine), lo
    assert res["chosen_r_matches_best"] == res["by_layout"]["flat"]["chosen_r_matches_best"]
    assert res["chosen_r_decisions"] == 2 * configs


def test_measure_quick_table_and_json(capsys):
    rc = main(["--quick"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.strip().splitlines()
    assert "predicted vs measured" in out and "flat: mean |error|" in out and "sharded: mean |error|" in out
    res = json.loads(lines[-1])              # the last line is the JSON result
    _check_result(res, configs=1, sharded=1)
    # quick = one configuration per layout (checked above) and fewer repeats; its duration is not a test's business
    # (a 60 s bound failed on a loaded machine at 64 s)
    assert res["quick"] is True and res["repeats"] == {"warmup": 2, "rounds": 7} and res["wall_s"] > 0, res


def test_bench_moe_measure_end_to_end(capsys):
    from adasched.planner.cli import main as cli

    rc = cli(["bench", "moe", "--measure", "--quick", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out)
    assert "summary" in res and "measure" in res
    _check_result(res["measure"], configs=1, sharded=1)


@pytest.mark.parametrize("nproc,what", [(3, "does not divide the 8 experts"), (1, "at least 2 ranks")])
def test_bad_nproc(capsys, nproc, what):
    rc = main(["--json", "--quick", "--nproc", str(nproc)])
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == ""
    assert cap.err.startswith("error: --nproc: ") and what in cap.err and cap.err.count("\n") == 1, cap.err


def _one_rank_fails_worker(rank, world):
    """Rank 1's measurement raises at once; rank 0's waits in a receive from it (a peer in a collective)."""
    import time

    import torch
    import torch.distributed as dist

    from adasched.launch import moe_measure

    def measure(*args):
        if rank == 1:
            raise ValueError("measurement failed on rank 1")
        dist.recv(torch.empty(1), src=1)
    moe_measure._measure_config = measure
    start = time.monotonic()
    try:
        return moe_measure._rank_main(rank, world, [None], None, 0)
    finally:
        if rank == 1:
            assert time.monotonic() - start < 10, "the error was held back"


def test_measure_rank_error_reaches_the_caller_without_waiting_for_the_timeout():
    """_rank_main's dist.barrier() sat in a `finally`: a rank whose measurement raised waited there for peers
    blocked in the collective it had left, and its error came out only after the collective timeout (up to
    600 s), as a timeout error."""
    import time

    from adasched.runtime.dist import WorkerError, spawn_gloo

    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        spawn_gloo(_one_rank_fails_worker, 2, timeout_s=300)
    elapsed, msg = time.monotonic() - start, str(info.value)
    # rank 1's own error (the earliest; rank 0's receive fails after it, on the closed connection), never a
    # collective time-out, and well before it
    assert info.value.rank == 1 and "ValueError: measurement failed on rank 1" in msg, msg
    assert "held back" not in msg and "timed out" not in msg.lower() and "timeout" not in msg.lower(), msg
    # the bug waits for the collective timeout (300 s); 2 spawned ranks took 17-22 s under load (the bound was 45 s
    # with a 60 s timeout)
    assert elapsed < 150, elapsed
