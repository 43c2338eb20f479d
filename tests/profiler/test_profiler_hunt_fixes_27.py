"""27th session's profiler hunt (each failed before): a collective fit of 1e300 ms/byte loaded and failed in the
planners far from the file; an alpha-beta fit of one message size put all the time in beta (alpha 0) without a
word, and sizes that round to one size passed; `profile --name` with invalid UTF-8 was refused only after the
measuring."""
from __future__ import annotations

import json
import random

import pytest

from adasched.planner.cli import main
from adasched.profiler.collectives import CollectiveConfig, fit_collectives
from adasched.profiler.fit import fit_alpha_beta
from adasched.profiler.profile import load_profile


@pytest.mark.parametrize("field, value", [("beta_ms_per_byte", 1e300), ("beta_ms_per_byte", 1.5),
                                          ("alpha_ms", 1e308), ("alpha_ms", 2e6)])
def test_absurd_collective_constants_are_refused_on_load(field, value, tmp_path, capsys):
    d = json.loads(load_profile("h100-sxm").model_dump_json())
    k = random.randrange(len(d["collectives"]))
    d["collectives"][k][field] = value
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: collectives.{k}.{field}"), err


def test_one_message_size_is_no_alpha_beta_fit():
    size = random.choice([8.0, 4096.0, 1e6])
    for n in (1, random.randint(2, 5)):
        with pytest.raises(ValueError, match="at least 2 distinct message sizes"):
            fit_alpha_beta([size] * n, [random.uniform(0.5, 2.0) for _ in range(n)], min_size_term=0.05)
    fit = fit_alpha_beta([size, 2 * size], [1.0, 1.5])  # two sizes: a fit
    assert fit.coef[0] == pytest.approx(0.5) and fit.coef[1] == pytest.approx(0.5 / size)


def test_collective_sizes_that_round_to_one_are_named():
    with pytest.raises(ValueError, match="distinct"):
        CollectiveConfig(sizes=(64, 64))
    CollectiveConfig(sizes=(4, 8))  # distinct as given; they round to one size on 2 ranks, named at the fit:
    pts = [{"op": "all_reduce", "group_size": 2, "bytes": 8, "ms": 0.5},
           {"op": "all_reduce", "group_size": 2, "bytes": 8, "ms": 0.6}]
    with pytest.raises(ValueError, match=r"^all_reduce on 2 ranks: .*2 distinct message sizes.*give larger sizes"):
        fit_collectives({"points": pts, "world": 2, "backend": "gloo"}, 2, "t")


def test_a_profile_name_that_is_not_utf8_is_refused_before_measuring(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["profile", "--quick", "--no-collectives", "--name", "ab\udcff", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --name: 'ab\\udcff' is not valid UTF-8 text"], err
    assert not out.exists()
