"""Profiler fixes from a bug hunt (each failed before):
- a profile whose model cost or attention fit has no length term (a1 = a2 = 0) loaded, and `plan sp` died with a
  ZeroDivisionError; it is refused on load now, naming the fields;
- the attention fit of flat or falling times came out a constant (length free) without a note: it falls back to a
  line from the slowest point and says so, and a fit without an s^2 term gets a note;
- an NVML error after nvmlInit (GPU lost, no permission) escaped `inventory` as a traceback;
- `--nproc` on a one-GPU node (collectives skipped) was silently ignored."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from adasched.planner.cli import main
from adasched.profiler import inventory as inv
from adasched.profiler.fit import fit_quadratic
from adasched.profiler.local import resolve_nproc
from adasched.profiler.profile import AttentionFit, load_profile


def test_model_cost_without_a_length_term_is_refused_on_load(tmp_path, capsys):
    data = load_profile("a100-64-flexsp-paper").model_dump(mode="json")
    name = next(iter(data["model_costs"]))
    data["model_costs"][name].update(a1_ms_per_tok2=0.0, a2_ms_per_tok=0.0)
    path = tmp_path / "b1only.json"
    path.write_text(json.dumps(data))
    rc = main(["plan", "sp", "--profile", str(path), "--model", name, "--seqlens", "builtin", "--gpus", "8",
               "--global-batch", "16", "--steps", "1", "--max-context", "32768", "--no-milp",
               "--out", str(tmp_path / "sp.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {path}") and "a1_ms_per_tok2 and a2_ms_per_tok: both 0" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "sp.json").exists()


def test_attention_fit_without_a_length_term_is_refused():
    with pytest.raises(ValueError, match="a1_ms_per_tok2 and a2_ms_per_tok: both 0"):
        AttentionFit(a1_ms_per_tok2=0.0, a2_ms_per_tok=0.0, b_ms=3.0)


def test_flat_or_falling_attention_times_fall_back_to_a_line_with_a_note():
    rng = np.random.default_rng()
    s = np.array([64, 256, 1024, 4096], dtype=float)
    ms = np.sort(rng.uniform(30, 40, 4))[::-1]          # falling with length: a loaded machine
    fit = fit_quadratic(s, ms)
    a1, a2, b = fit.coef
    assert a1 == 0 and a2 > 0 and b == pytest.approx(ms.min()) and "no growth with length" in fit.note
    assert a2 * 4096 + b == pytest.approx(ms.max())      # the line reaches the slowest point at the longest length
    lin = fit_quadratic(s, 0.01 * s + rng.uniform(1, 2))  # exactly linear: no s^2 term, said so
    assert lin.coef[0] == 0 and "no s^2 term" in lin.note
    quad = fit_quadratic(s, 1e-6 * s * s + 0.01 * s + 1)
    assert quad.coef[0] > 0 and quad.note == ""


def test_nvml_error_after_init_falls_back(monkeypatch, capsys):
    import torch

    class _Err(Exception):
        pass

    m = types.ModuleType("pynvml")
    m.nvmlInit = lambda: None
    m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetCount = lambda: 2
    m.nvmlDeviceGetHandleByIndex = lambda i: i

    def lost(h):
        raise _Err("GPU is lost")

    m.nvmlDeviceGetMemoryInfo = lost
    monkeypatch.setitem(sys.modules, "pynvml", m)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dev, _ = inv.inventory()
    err = capsys.readouterr().err
    assert dev.kind == "cpu" and "NVML: GPU is lost" in err and err.count("\n") == 1


def test_nproc_on_one_gpu_is_refused():
    with pytest.raises(ValueError, match="--nproc: this node has one GPU"):
        resolve_nproc(2, quick=True, collectives=True, ngpu=1)
    assert resolve_nproc(None, quick=True, collectives=True, ngpu=1) >= 1  # the default stays accepted
    assert resolve_nproc(3, quick=True, collectives=True, ngpu=0) == 3     # odd CPU worlds are fine


def test_negligible_fit_terms_are_zero():
    """The NNLS solver returned a1 = 1e-21 for exactly linear data (the 'no s^2 term' note then depended on the
    draw): terms that add less than 1e-9 of the largest time are zero."""
    rng = np.random.default_rng()
    s = np.array([64, 256, 1024, 4096], dtype=float)
    for _ in range(50):
        fit = fit_quadratic(s, float(rng.uniform(1e-3, 1e-1)) * s + float(rng.uniform(0.5, 3)))
        assert fit.coef[0] == 0.0 and fit.coef[1] > 0 and "no s^2 term" in fit.note


def test_show_takes_a_profile_without_kind_as_every_planner_does(tmp_path, capsys):
    """Hunt finding: `show` sent a profile without "kind" to the plan loader ("kind: missing or not a string"),
    while load_profile (every --profile) takes it: kind is optional."""
    data = load_profile("h100-sxm").model_dump(mode="json")
    data.pop("kind")
    data.pop("num_nodes")  # (defaults to 1; the collectives must then fit one node of 8)
    data["collectives"] = [c for c in data["collectives"] if c["group_size"] <= 8]
    data["name"] = f"nokind-{np.random.default_rng().integers(10 ** 6)}"
    path = tmp_path / "nokind.json"
    path.write_text(json.dumps(data))
    assert main(["show", str(path)]) == 0
    assert f"profile {data['name']}" in capsys.readouterr().out
    assert load_profile(path).name == data["name"]


def test_a_file_named_like_a_built_in_profile_is_refused_as_ambiguous(tmp_path, monkeypatch, capsys):
    """Hunt finding: with a file named h100-sxm in the folder, `show h100-sxm` read the file while every
    `--profile h100-sxm` silently used the built-in. Both refuse the name now; ./h100-sxm is the file."""
    data = load_profile("h100-sxm").model_dump(mode="json")
    data["name"] = "local-copy"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "h100-sxm").write_text(json.dumps(data))
    want = "'h100-sxm' is both a built-in profile and a file here: pass ./h100-sxm for the file"
    assert main(["show", "h100-sxm"]) == 2
    assert want in capsys.readouterr().err
    assert main(["plan", "lora", "--jobs", "tiny", "--profile", "h100-sxm", "--no-milp", "--out", "l.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --profile: ") and want in err and not (tmp_path / "l.json").exists()
    assert load_profile("./h100-sxm").name == "local-copy"
    assert main(["show", "./h100-sxm"]) == 0 and "profile local-copy" in capsys.readouterr().out


def test_profile_without_collectives_records_no_worker_count(tmp_path):
    """Hunt finding: `profile --no-collectives` recorded host.ranks_per_node = --nproc's default (2; 4 on a GPU)
    though no worker ran: it is the node's device count now, as gpus_per_node."""
    out = tmp_path / "p.json"
    assert main(["profile", "--quick", "--no-collectives", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["host"]["ranks_per_node"] == data["gpus_per_node"] == data["device"]["count_per_node"]
