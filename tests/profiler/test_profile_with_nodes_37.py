"""ClusterProfile.with_nodes and one-node scopes (h38, r7): the derived profile names itself in errors (not the file
it came from), takes whole node counts only (numpy integers too), and what it returns saves and loads; a one-node
profile's fits measured across nodes are kept as intra-node ones (a file with them, as with_nodes(1) wrote before,
still loads)."""
import json

import pytest

from adasched.profiler.io import InputError
from adasched.profiler.profile import load_profile, save_profile


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


def test_with_nodes_takes_numpy_integers():
    import numpy as np

    for n in (np.int64(2), np.int32(3)):
        q = load_profile("h100-sxm").with_nodes(n)
        assert type(q.num_nodes) is int and q.num_nodes == int(n) and q.name == f"h100-sxm@{int(n)}n"


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


def test_one_node_profile_keeps_an_inter_fit_as_intra(tmp_path):
    d = load_profile("h100-sxm").with_nodes(1).model_dump(mode="json")
    d["collectives"][0]["scope"] = "inter"
    path = tmp_path / "one.json"
    path.write_text(json.dumps(d))
    p = load_profile(path)
    c = p.collectives[0]
    assert c.scope == "intra" and c.source.endswith("measured across nodes, kept for one node (pessimistic)")
    assert [x.model_dump(mode="json") for x in p.collectives[1:]] == d["collectives"][1:]  # the others as written
