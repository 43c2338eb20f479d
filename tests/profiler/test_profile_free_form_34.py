"""34th session's profiler hunt: NaN/Infinity in a profile's free-form dicts (raw, host, device.topology) loaded -
pydantic's allow_inf_nan does not reach ``Any`` values - and a save wrote them as null, so a round trip changed the
file. Refused at load now, naming the field and key."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from adasched.profiler.io import InputError
from adasched.profiler.builtins import builtin_profile
from adasched.profiler.profile import load_profile, save_profile


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field, put", [
    ("raw", lambda d, v: d["raw"].setdefault("extra", {}).update(pts=[1.0, [2.0, v]])),
    ("host", lambda d, v: d["host"].update(load=v)),
    ("device.topology", lambda d, v: d["device"].update(topology={"links": [[0.0, v]]})),
])
def test_non_finite_values_in_free_form_fields_are_refused(tmp_path, field, put, bad):
    d = json.loads(builtin_profile("h100-sxm").model_dump_json())
    put(d, bad)
    p = tmp_path / "p.json"
    p.write_text(json.dumps(d))  # json writes NaN / Infinity literals, which json.loads reads back
    with pytest.raises(InputError) as err:
        load_profile(p)
    key = {"raw": "extra.pts.1.1", "host": "load", "device.topology": "links.0.1"}[field]
    assert str(err.value) == f"{p}: {field}: {key}: {bad} is not a JSON number (NaN and infinities are refused)"


def test_finite_free_form_values_round_trip(tmp_path):
    rng = np.random.default_rng(34)
    d = json.loads(builtin_profile("h100-sxm").model_dump_json())
    vals = rng.lognormal(size=6).tolist()
    d["raw"]["extra"] = {"pts": [vals[:3], {"x": vals[3]}]}
    d["host"]["load"] = vals[4]
    d["device"]["topology"] = {"links": [[vals[5], 1]]}
    p, q = tmp_path / "p.json", tmp_path / "q.json"
    p.write_text(json.dumps(d))
    save_profile(load_profile(p), q)
    back = json.loads(q.read_text())
    assert back["raw"]["extra"] == d["raw"]["extra"] and back["host"]["load"] == vals[4]
    assert back["device"]["topology"] == d["device"]["topology"]


def _measured(att_rows, att_coef, lin_rows=None, lin_coef=None):
    d = json.loads(builtin_profile("h100-sxm").model_dump_json())
    d["raw"] = {"attention": att_rows, **({"linear": lin_rows} if lin_rows else {})}
    d["attention"].update(a1_ms_per_tok2=att_coef[0], a2_ms_per_tok=att_coef[1], b_ms=att_coef[2])
    if lin_coef:
        d["linear"].update(ms_per_token=lin_coef[0], b_ms=lin_coef[1])
    from adasched.profiler.profile import ClusterProfile

    return ClusterProfile.model_validate(d)


def test_a_fit_far_under_its_longest_point_is_noted():
    """(34th session's profiler hunt) a quick CPU profile's attention points (64..512 tokens: 0.31, 0.50, 1.62,
    17.84 ms) fitted to 6.79 ms at 512 - 62 % under - and only the mean error (26 %) was noted."""
    from adasched.profiler.fit import fit_quadratic
    from adasched.profiler.report import rough_fit_notes

    s, ms = [64, 128, 256, 512], [0.307526, 0.49942, 1.61609401, 17.841584]
    fit = fit_quadratic(s, ms)
    pred = fit.coef[0] * 512**2 + fit.coef[1] * 512 + fit.coef[2]
    rows = [{"seq": a, "heads": 2, "fwd_bwd_ms": b} for a, b in zip(s, ms)]
    notes = rough_fit_notes(_measured(rows, fit.coef))
    want = (f"note: the attention fit is {1 - pred / 17.841584:.0%} under its longest measured point (seq 512: "
            f"{pred:.3g} ms fitted, 17.8 ms measured): longer ones will be underestimated - re-run, or without "
            f"--quick, before planning with it")
    assert want in notes and pred < 0.75 * 17.841584, notes
    # points a quadratic fits (random coefficients, 2 % noise): no such note, for the linear fit either
    rng = np.random.default_rng(34)
    a1, a2, b = rng.uniform(1e-6, 1e-5), rng.uniform(1e-4, 1e-3), rng.uniform(0.05, 0.2)
    y = [(a1 * x * x + a2 * x + b) * rng.uniform(0.98, 1.02) for x in s]
    good = fit_quadratic(s, y)
    t = [64, 256, 1024]
    c, b0 = rng.uniform(0.01, 0.1), rng.uniform(0.5, 2.0)
    lin = [{"tokens": x, "fwd_bwd_ms": c * x + b0} for x in t]
    notes = rough_fit_notes(_measured([{"seq": a, "heads": 2, "fwd_bwd_ms": v} for a, v in zip(s, y)], good.coef,
                                      lin, (c, b0)))
    assert not any("longest measured point" in n for n in notes), notes
    # a linear fit at half its longest point is noted too
    notes = rough_fit_notes(_measured([{"seq": a, "heads": 2, "fwd_bwd_ms": v} for a, v in zip(s, y)], good.coef,
                                      lin, (c / 2, b0 / 2)))
    assert [n for n in notes if "longest" in n] == [
        f"note: the linear fit is 50% under its longest measured point (tokens 1024: {(c * 1024 + b0) / 2:.3g} ms "
        f"fitted, {c * 1024 + b0:.3g} ms measured): longer ones will be underestimated - re-run, or without --quick, "
        f"before planning with it"], notes
