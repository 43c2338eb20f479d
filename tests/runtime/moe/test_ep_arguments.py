"""ExpertParallel / ep_experts / GradSliceReducer argument checks (hunt findings; each failed before):
gpus_per_node=0 read as "not given" (one node nobody asked for), num_experts 0 / -8 / 8.0 accepted (a division by zero
later, experts_per_rank -4, a TypeError from torch.randn), r_fwd 2.5 / "2" a TypeError further in, and NaN / inf /
negative gradient slices taken until the first backward failed naming nothing. 2 gloo ranks: every rank refuses
the same way, before any group is made."""
from __future__ import annotations

from adasched.runtime.dist import spawn_gloo


def _refusals(rank, world):
    import torch

    from adasched.runtime.moe.ep import ExpertParallel, GradSliceReducer, ep_experts

    out = []

    def refused(fn):
        try:
            fn()
        except ValueError as err:
            out.append(str(err))
        else:
            out.append(None)

    refused(lambda: ExpertParallel.create(4, hierarchical=True, gpus_per_node=0))
    refused(lambda: ExpertParallel.create_groups(4, 2, hierarchical=True, gpus_per_node=0))
    refused(lambda: ExpertParallel.create(4, hierarchical=True, gpus_per_node=2.0))
    for bad in (0, -8, 8.0, True):
        refused(lambda bad=bad: ExpertParallel.create(bad))
    refused(lambda: ExpertParallel.create_groups(-8, 2))
    p = torch.nn.Parameter(torch.randn(3))
    for bad in ([float("nan")], [float("inf")], [-1.0]):
        refused(lambda bad=bad: GradSliceReducer([p], bad))
    ep = ExpertParallel.create(4)
    x = torch.randn(2, 8)
    for kw in ({"r_fwd": 2.5}, {"r_bwd": "2"}, {"r_fwd": 0}, {"r_bwd": True}):
        refused(lambda kw=kw: ep_experts(x, torch.randn(2, 8, 32), torch.randn(2, 16, 8), torch.tensor([0, 1]),
                                         torch.tensor([0, 1]), 2, ep, **kw))
    # legal values still work: an explicit node size, and GradSliceReducer with zero and positive slices
    hier = ExpertParallel.create(4, hierarchical=True, gpus_per_node=1)
    GradSliceReducer([p], [0.0, 2.0])
    return out, hier.gpus_per_node


def test_bad_expert_parallel_arguments_are_one_value_error_naming_them():
    got = spawn_gloo(_refusals, 2, timeout_s=120)
    assert got[0] == got[1]
    msgs, gpn = got[0]
    want = ["gpus_per_node: 0 must be an int >= 1", "gpus_per_node: 0 must be an int >= 1",
            "gpus_per_node: 2.0 must be an int >= 1",
            "num_experts: 0 must be an int >= 1", "num_experts: -8 must be an int >= 1",
            "num_experts: 8.0 must be an int >= 1", "num_experts: True must be an int >= 1",
            "num_experts: -8 must be an int >= 1",
            "slices: nan must be a finite number >= 0", "slices: inf must be a finite number >= 0",
            "slices: -1.0 must be a finite number >= 0",
            "r_fwd: 2.5 must be an int >= 1", "r_bwd: '2' must be an int >= 1", "r_fwd: 0 must be an int >= 1",
            "r_bwd: True must be an int >= 1"]
    assert len(msgs) == len(want)
    for m, w in zip(msgs, want):
        assert m is not None and m.startswith(w), (m, w)
    assert gpn == 1
