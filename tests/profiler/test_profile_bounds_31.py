"""31st session: a profile file whose name was blank ("  ") loaded (min_length=1 took it) and its reports and the
with_nodes copies carried the blank; num_nodes had no upper bound (10**9 nodes loaded as 8e9 GPUs and every
planner's --gpus check took it), and with_nodes(10**9) made such a profile without any check."""
from __future__ import annotations

import json
import random

import pytest

from adasched.planner.cli import main
from adasched.profiler.io import InputError
from adasched.profiler.profile import MAX_GPUS, load_profile


def _edited(tmp_path, **fields):
    d = json.loads(load_profile("h100-sxm").model_dump_json())
    d.update(fields)
    p = tmp_path / f"p{random.randrange(10**6)}.json"
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize("fields,field", [({"name": "   "}, "name"), ({"name": "\t"}, "name"),
                                         ({"num_nodes": 10**9}, "num_nodes"),
                                         ({"num_nodes": MAX_GPUS // 8 + 1}, "num_nodes")])
def test_blank_name_and_too_many_gpus_are_refused(tmp_path, capsys, fields, field):
    p = _edited(tmp_path, **fields)
    assert main(["show", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {p}: "), err
    assert "must not be blank" in err[0] if field == "name" else f"more than the {MAX_GPUS}" in err[0]
    out = tmp_path / "never.json"
    assert main(["plan", "lora", "--jobs", "tiny", "--no-milp", "--profile", str(p), "--out", str(out)]) == 2
    assert not out.exists()


def test_the_largest_profile_still_loads_and_with_nodes_is_bounded(tmp_path):
    p = _edited(tmp_path, num_nodes=MAX_GPUS // 8)
    prof = load_profile(p)
    assert prof.world_size == MAX_GPUS
    assert load_profile("h100-sxm").with_nodes(MAX_GPUS // 8).world_size == MAX_GPUS
    with pytest.raises(InputError, match=f"more than the {MAX_GPUS}"):
        load_profile("h100-sxm").with_nodes(MAX_GPUS // 8 + 1)


def test_a_flat_affine_fit_has_no_round_off_slope():
    """31st session's profiler hunt: on flat times (noise ~1e-12) half the affine fits came back with a slope like
    1.3e-14 ms/token, which passed the linear benchmark's `> 0` fallback check: a "linear" model that does not grow
    with tokens, without a note. A slope under 1e-9 of the largest time is round-off (zero), as in the other fits."""
    import numpy as np

    from adasched.profiler.fit import fit_affine

    rng = np.random.default_rng()
    zero = 0
    for _ in range(200):
        t = np.sort(rng.choice(np.arange(64, 8192), size=6, replace=False)).astype(float)
        ms = 2.0 + rng.normal(0, 1e-12, t.size)
        c, b = fit_affine(t, ms).coef
        assert c == 0.0 or c * t.max() >= 1e-9 * ms.max(), c
        zero += c == 0.0
    assert zero > 100
    t = np.array([100.0, 200, 400, 800])
    c, b = fit_affine(t, 0.01 * t + 3 + rng.uniform(0, 1e-6, 4)).coef  # a real slope stays
    assert c == pytest.approx(0.01, rel=1e-4) and b == pytest.approx(3, rel=1e-4)


def test_profile_collectives_takes_an_empty_nproc_as_its_default(tmp_path, monkeypatch, capsys):
    """The same hunt: profile_collectives.sh runs torchrun with ${NPROC:-4}, but its --check refused NPROC= with
    "error: NPROC: : collectives need >= 2 processes"."""
    from adasched.launch import profile_collectives

    monkeypatch.setenv("NPROC", "")
    assert profile_collectives.main(["--check", "--quick", "--out", str(tmp_path / "p.json")]) == 0
    monkeypatch.setenv("NPROC", "1")
    assert profile_collectives.main(["--check", "--quick", "--out", str(tmp_path / "p.json")]) == 2
    assert capsys.readouterr().err.startswith("error: NPROC: 1: collectives need >= 2 processes")


def test_the_torchrun_entry_says_the_rough_fit_notes(tmp_path, monkeypatch, capsys):
    """The same hunt: launch/profile_collectives.py wrote fits 23-44 % off their points without the notes
    `adasched profile` prints (the measuring is stubbed here: a profile with one rough collective fit)."""
    from adasched.launch import profile_collectives
    from adasched.profiler import local
    from adasched.profiler.report import rough_fit_notes

    prof = load_profile("h100-sxm")
    assert rough_fit_notes(prof) == []
    err = random.uniform(0.26, 0.9)
    worse = prof.model_copy(update={"collectives": [prof.collectives[0].model_copy(update={"fit_rel_error": err})]})
    monkeypatch.setattr(local, "in_torchrun", lambda: True)
    monkeypatch.setattr(local, "profile_in_world", lambda **kw: worse)
    assert profile_collectives.main(["--out", str(tmp_path / "p.json")]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == rough_fit_notes(worse) and len(lines) == 1, lines
    assert lines[0].startswith("note: 1 collective fit(s) more than 25% off") and f"{err:.0%}" in lines[0]
