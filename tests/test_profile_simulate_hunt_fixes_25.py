"""Findings of the 25th session's profiler + simulator hunt, each a test that fails on the code before the fix."""
from __future__ import annotations

import json
import random

import pytest

from adasched.planner.cli import main
from adasched.profiler.profile import load_profile


def _write_profile(tmp_path, name: str, edit) -> str:
    data = json.loads(load_profile(name).model_dump_json())
    edit(data)
    path = tmp_path / f"{name}-edited.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_activation_bytes_typed_in_mib_are_refused(tmp_path, capsys):
    """flexsp.md's "act MB/token" typed into act_bytes_per_token (4.4804 for 4.48 MiB): the profile loaded and
    plan sp planned with ~10^6 times too little activation memory, so no memory limit ever bound (exit 0)."""
    value = round(random.Random().uniform(1.0, 8000.0), 4)
    prof = _write_profile(tmp_path, "a100-64-flexsp-paper",
                          lambda d: d["model_costs"]["gpt-7b"].update(act_bytes_per_token=value))
    out = tmp_path / "p.json"
    assert main(["plan", "sp", "--profile", prof, "--model", "gpt-7b", "--seqlens", "builtin", "--gpus", "8",
                 "--global-batch", "16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {prof}: model_costs.gpt-7b: act_bytes_per_token: {value:g} is under one bf16 hidden "
                   f"vector (2 x hidden = 8192 bytes): the field is in bytes (4.48 MiB = 4697620)\n"), err
    assert not out.exists()


@pytest.mark.parametrize("field,value", [("gemm_tflops", 4.17e10), ("copy_GBps", 3.0e12)])
def test_rates_typed_in_base_units_are_refused(tmp_path, capsys, field, value):
    """gemm_tflops 4.17e10 (FLOP/s in the TFLOP/s field) was accepted and shown as '4.17e+10 TFLOP/s'."""
    prof = _write_profile(tmp_path, "h100-sxm", lambda d: d.update({field: value}))
    assert main(["plan", "sp", "--profile", prof, "--model", "gpt-7b", "--seqlens", "builtin", "--gpus", "8",
                 "--global-batch", "16", "--out", str(tmp_path / "p.json")]) == 2
    assert capsys.readouterr().err == f"error: {prof}: {field}: Input should be less than or equal to 100000\n"


def test_published_model_terms_of_another_shape_are_refused(tmp_path, capsys):
    """model_costs[name].hidden / .layers were required and never read: the published terms of an 80-layer,
    8192-wide model under 'gpt-7b' planned exactly like gpt-7b's (the communication term takes the preset's
    shape). Now a mismatch with the model is an error naming the field."""
    layers = random.Random().choice([40, 80])
    prof = _write_profile(tmp_path, "a100-64-flexsp-paper",
                          lambda d: d["model_costs"]["gpt-7b"].update(hidden=8192, layers=layers))
    assert main(["plan", "sp", "--profile", prof, "--model", "gpt-7b", "--seqlens", "builtin", "--gpus", "8",
                 "--global-batch", "16", "--out", str(tmp_path / "p.json")]) == 2
    assert capsys.readouterr().err == (f"error: {prof}: model_costs['gpt-7b']: hidden 8192, "
                                       f"layers {layers}, but model 'gpt-7b' has hidden 4096, layers 32\n")


def test_simulate_names_the_configuration_and_the_iterations_it_shows(tmp_path, capsys):
    """`simulate MOE_PLAN` printed "makespan 113.949 ms" for the first of two configurations (the plan's
    predicted_ms sums both) without naming it; `simulate TWILL_PLAN` "makespan 8.000 cycles" for a plan of I = 2
    without saying the chart holds 3 overlapped iterations."""
    moe = tmp_path / "moe.json"
    assert main(["plan", "moe", "--config", "mixtral-8x7b", "--gpus", "16", "--out", str(moe)]) == 0
    capsys.readouterr()
    assert main(["simulate", str(moe), "--json"]) == 0
    capsys.readouterr()
    assert main(["simulate", str(moe)]) == 0
    assert ("mixtral-8x7b-L1024 (the first of 2 configurations; --config NAME or a position 0..1 picks another): "
            "makespan " in capsys.readouterr().out)
    # the position it names picks the other one (it said "configuration 1 of 2" and --config 1 was the second)
    assert main(["simulate", str(moe), "--config", "1"]) == 0
    assert capsys.readouterr().out.lstrip().startswith("mixtral-8x7b-L4096: makespan ")
    tw = tmp_path / "tw.json"
    assert main(["plan", "twill", "--graph", "toy-attention", "--out", str(tw)]) == 0
    capsys.readouterr()
    assert main(["simulate", str(tw)]) == 0
    assert "3 overlapped iterations of I = 2: makespan 8.000 cycles" in capsys.readouterr().out


def test_simulate_plot_leaves_out_zero_length_barriers(tmp_path, monkeypatch):
    """`simulate SP_PLAN --plot` drew the zero-length barriers as hairlines with a 'barrier' legend entry;
    `show --plot` leaves them out."""
    import adasched.planner.cli as cli

    sp = tmp_path / "sp.json"
    assert main(["plan", "sp", "--seqlens", "builtin", "--gpus", "8", "--global-batch", "16", "--max-context", "32768",
                 "--out", str(sp)]) == 0
    drawn = {}

    def fake_render(tasks, path, **kw):
        drawn["tasks"] = list(tasks)

    monkeypatch.setattr(cli, "render_gantt", fake_render, raising=False)
    import adasched.planner.gantt as gantt

    monkeypatch.setattr(gantt, "render_gantt", fake_render)
    assert main(["simulate", str(sp), "--plot", str(tmp_path / "x.png")]) == 0
    assert drawn["tasks"] and not any(t.category == "barrier" and t.end_ms <= t.start_ms for t in drawn["tasks"])
