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
