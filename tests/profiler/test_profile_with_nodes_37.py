"""ClusterProfile.with_nodes and the scope check (h38): the derived profile names itself in errors (not the file it
came from), takes whole node counts only, and what it returns saves and loads; a one-node profile cannot hold a fit
measured across nodes."""
import json

import pytest

from adasched.profiler.io import InputError
from adasched.profiler.profile import ClusterProfile, load_profile, save_profile


def _two_node_file(tmp_path, inter_small=False):
    d = load_profile("h100-sxm").model_dump(mode="json")
    # 2 nodes of 8, fits up to 16 ranks (the larger ones dropped)
    d["num_nodes"] = 2
    d["collectives"] = [c for c in d["collectives"] if c["group_size"] <= 16]
    if inter_small:  # a 2-rank group placed across the nodes
        for c in d["collectives"]:
            if c["group_size"] == 2:
                c["scope"] = "inter"
    path = tmp_path / "two.json"
    path.write_text(json.dumps(d))
    return path


def test_derived_profile_names_itself_in_errors(tmp_path):
    path = _two_node_file(tmp_path)
    q = load_profile(path).with_nodes(4)
    assert q.name.endswith("@4n")
    with pytest.raises(InputError) as err:
        q.collective("all_to_all", 64)
    assert str(path) not in str(err.value) and q.name in str(err.value), str(err.value)


@pytest.mark.parametrize("bad", [2.5, 2.0, True, "2"])
def test_with_nodes_takes_whole_numbers(bad):
    with pytest.raises(InputError, match="num_nodes: must be a whole number"):
        load_profile("h100-sxm").with_nodes(bad)


@pytest.mark.parametrize("nodes", [1, 2, 3, 16])
def test_with_nodes_result_saves_and_loads(tmp_path, nodes):
    for src in (load_profile("h100-sxm"), load_profile(_two_node_file(tmp_path, inter_small=True))):
        q = src.with_nodes(nodes)
        out = tmp_path / f"q{nodes}.json"
        save_profile(q, out)
        assert load_profile(out) == q
        if nodes == 1:
            assert all(c.scope == "intra" for c in q.collectives)


def test_one_node_profile_refuses_an_inter_fit(tmp_path):
    d = load_profile("h100-sxm").with_nodes(1).model_dump(mode="json")
    d["collectives"][0]["scope"] = "inter"
    with pytest.raises(ValueError, match="has scope 'inter', but the profile has one node"):
        ClusterProfile.model_validate(d)
