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
