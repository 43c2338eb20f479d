"""`adasched schedules refine|plot` and `adasched bench schedules --quick`: outputs, and bad input -> one line
`error: ...` with exit status 2 and no file written."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adasched.planner.cli import main
from adasched.schedules import LinearDecay, Refined, refined_multipliers, write_norms_csv


def _norms(tmp_path, n=50, const=False):
    rng = np.random.default_rng(1)
    l2 = np.full(n, 1.7) if const else rng.lognormal(0, 0.4, n) * np.linspace(4, 1, n)
    return write_norms_csv(tmp_path / "norms.csv", l2.tolist(), (l2 * 5).tolist()), l2


def test_refine_writes_schedule_and_from_file_uses_it(tmp_path, capsys):
    path, l2 = _norms(tmp_path)
    out = tmp_path / "s.json"
    assert main(["schedules", "refine", str(path), "--out", str(out), "--norm", "l1", "--smoothing", "0.2",
                 "--plot", str(tmp_path / "r.png")]) == 0
    doc = json.loads(out.read_text())
    assert doc["kind"] == "refined_lr_schedule" and doc["steps"] == 50 and doc["norm"] == "l1"
    np.testing.assert_allclose(doc["multipliers"], refined_multipliers(l2 * 5, "l1", 0.2), rtol=1e-12)
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert "peak at step" in capsys.readouterr().out
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    sched = Refined.from_file(opt, out, warmup_steps=0)
    np.testing.assert_allclose([sched.multiplier(t) for t in range(51)], doc["multipliers"], rtol=1e-12)


def test_refine_constant_norms_is_linear(tmp_path, capsys):
    path, _ = _norms(tmp_path, 40, const=True)
    out = tmp_path / "s.json"
    assert main(["schedules", "refine", str(path), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lin = LinearDecay(opt, 40)
    np.testing.assert_allclose(printed["multipliers"], [lin.multiplier(t) for t in range(41)], rtol=1e-13)


def test_plot_default_and_mixed(tmp_path, capsys):
    path, _ = _norms(tmp_path)
    assert main(["schedules", "plot", "--out", str(tmp_path / "a.png"), "--steps", "60", "--warmup", "6"]) == 0
    text = capsys.readouterr().out
    assert "uba phi=0.5" in text and "rex" in text
    assert main(["schedules", "plot", "rex", "uba:3", str(path), "--out", str(tmp_path / "b.png"), "--json"]) == 0
    curves = json.loads(capsys.readouterr().out)["curves"]
    assert all(len(v) == 51 for v in curves.values()) and len(curves) == 3
    assert (tmp_path / "a.png").stat().st_size > 1000 and (tmp_path / "b.png").stat().st_size > 1000
    # all warmup (warmup == steps, as the schedules accept): linear warmup, then the floor
    assert main(["schedules", "plot", "rex", "--out", str(tmp_path / "c.png"), "--steps", "8", "--warmup", "8",
                 "--json"]) == 0
    rex = json.loads(capsys.readouterr().out)["curves"]["rex"]
    np.testing.assert_allclose(rex, [k / 8 for k in range(8)] + [0.0], rtol=0, atol=1e-15)


@pytest.mark.parametrize("args,needle", [
    (["schedules", "refine", "{dir}/missing.csv", "--out", "{dir}/o.json"], "missing.csv: no such file"),
    (["schedules", "refine", "{norms}", "--out", "{dir}/o.json", "--norm", "l3"], "--norm"),
    (["schedules", "refine", "{norms}", "--out", "{dir}/o.json", "--smoothing", "1.5"], "--smoothing"),
    (["schedules", "refine", "{norms}", "--out", "{dir}/o.json", "--steps", "49"], "wrong length"),
    (["schedules", "refine", "{empty}", "--out", "{dir}/o.json"], "empty"),
    (["schedules", "plot", "uba:0", "--out", "{dir}/o.png"], "phi"),
    (["schedules", "plot", "rex", "--out", "{dir}/o.png", "--steps", "0"], "--steps"),
    (["schedules", "plot", "rex", "--out", "{dir}/o.png", "--steps", "10", "--warmup", "11"], "--warmup"),
    (["schedules", "plot", "{norms}", "--out", "{dir}/o.png", "--warmup", "50"], "warmup_steps"),
    (["schedules", "plot", "rex", "--out", "{dir}/o.png", "--warmup", "-1"], "--warmup"),
    (["schedules", "plot", "rex", "--out", "{norms}/x.png"], "--out"),
    (["schedules", "plot", "step", "--out", "{dir}/o.png"], "schedule"),
    (["schedules", "plot", "{norms}", "--steps", "20", "--out", "{dir}/o.png"], "norms.csv: has 50 steps, --steps is 20"),
    # two files of different lengths: the second was refused as "has 30 steps but total_steps=50 (wrong length)",
    # an option the command does not have
    (["schedules", "plot", "{norms}", "{short}", "--out", "{dir}/o.png"],
     "short.csv: has 30 steps, {norms} has 50: the curves of one plot share a length"),
])
def test_cli_errors_exit_2(tmp_path, capsys, args, needle):
    path, _ = _norms(tmp_path)
    (tmp_path / "empty.csv").write_text("")
    short = write_norms_csv(tmp_path / "short.csv", [1.0 + 0.1 * k for k in range(30)], [2.0] * 30)
    fill = dict(dir=tmp_path, norms=path, empty=tmp_path / "empty.csv", short=short)
    args, needle = [a.format(**fill) for a in args], needle.format(**fill)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "o.png").exists()


def test_bench_quick_json(capsys, tmp_path):
    assert main(["bench", "schedules", "--quick", "--json", "--plot", str(tmp_path / "b.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["results"]
    scheds = {r["schedule"] for r in rows}
    assert scheds == {"constant", "step", "linear", "cosine", "onecycle", "rex", "uba0.5", "uba1", "uba2", "uba4",
                      "refined"}
    assert len(rows) == 2 * 2 * 2 * 11
    for r in rows:
        assert len(r["losses"]) == 2 and np.isfinite(r["loss_mean"]) and 0.5 < r["acc_mean"] <= 1.0
    for key in {(r["model"], r["optimizer"], r["budget"]) for r in rows}:
        grp = [r for r in rows if (r["model"], r["optimizer"], r["budget"]) == key]
        assert sum(r["best_loss"] for r in grp) >= 1
        assert min(r["loss_mean"] for r in grp) == next(r["loss_mean"] for r in grp if r["best_loss"])
    # UBA phi=2 trains exactly like cosine (same lrs up to float rounding)
    for key in {(r["model"], r["optimizer"], r["budget"]) for r in rows}:
        u2, cos = (next(r for r in rows if (r["model"], r["optimizer"], r["budget"], r["schedule"]) == key + (s,))
                   for s in ("uba2", "cosine"))
        np.testing.assert_allclose(u2["losses"], cos["losses"], rtol=1e-6)  # float32 training, identical lr tables
    assert (tmp_path / "b.png").stat().st_size > 1000


@pytest.mark.parametrize("doc,needle", [
    ({"grad_norms": [1, 2, 3]}, "norm: Field required"),
    ({"grad_norms": [1, True, 3], "norm": "l2"}, "grad_norms.1: Input should be a valid number"),
    ({"grad_norms": "abc", "norm": "l2"}, "grad_norms: Input should be a valid list"),
    ({"grad_norms": [1, 2], "norm": "l7"}, "norm: Input should be 'l2' or 'l1'"),
    ({"grad_norms": [1, 2], "norm": "l2", "smoothing": "x"}, "smoothing: Input should be a valid number"),
    ({"grad_norms": [1, 2], "norm": "l2", "schema_version": "banana"}, "schema_version: Input should be 1"),
])
def test_refined_schedule_json_is_validated(tmp_path, capsys, doc, needle):
    """Walk finding: a schedule JSON without "norm" raised KeyError (traceback); bools passed as norms."""
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"kind": "refined_lr_schedule", **doc}))
    png = tmp_path / "p.png"
    assert main(["schedules", "plot", str(p), "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p}: ") and needle in err and err.count("\n") == 1, err
    assert not png.exists()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="s.json: "):
        Refined.from_file(opt, p)


def test_norms_csv_steps_in_order_and_special_files(tmp_path, capsys):
    """Walk findings: a repeated or reordered step column was accepted (misaligned norms), /dev/null was
    'no such file', and a 2-D norms array was flattened into twice the steps."""
    p = tmp_path / "n.csv"
    for body, needle in (("0,1,1\n1,2,2\n1,3,3\n", "line 4: step 1 follows step 1"),
                         ("0,1,1\n2,2,2\n", "line 3: step 2 follows step 0"),
                         ("0,1,1\nx,2,2\n", "line 3: column 'step' is not an integer")):
        p.write_text("step,l2,l1\n" + body)
        assert main(["schedules", "refine", str(p), "--out", str(tmp_path / "s.json")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {p}: {needle}") and err.count("\n") == 1, err
    assert main(["schedules", "refine", "/dev/null", "--out", str(tmp_path / "s.json")]) == 2
    assert "is not a regular file" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"grad_norms: must be one number per optimizer step \(1-D\)"):
        Refined(opt, [[1.0, 2.0], [3.0, 4.0]])
